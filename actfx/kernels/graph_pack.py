"""Pack and unpack written as plain ATen math, for insertion into compiled (Inductor) graphs.

Why: inside ``torch.compile`` a pack must be code Inductor can fuse into the kernel that produces
the value, and an unpack into the backward kernel that reads it; an opaque custom op or an
autograd.Function blocks that. These functions are traced into the partitioned forward and
backward graphs (``actfx/passes/pack_saved.py``) and lowered by Inductor like any other ATen.

Layout (the eager format's grouping, with fp32 group metadata so constant groups stay exact):
x is read as ``x.reshape(-1)`` in fp32, padded to whole groups of G by repeating its last value
(padding never widens a group's range), split into ``[num_groups, G]``.

* ``lo[g] = min``, ``hi[g] = max`` saved (fp32); ``step[g] = (hi - lo) / L`` (L = 2**bits - 1, or 2
  for three levels) computed from them where it is read (:func:`group_step`);
* ``code = clamp(floor((x - lo) / step + u), 0, L)`` with ``u ~ U[0, 1)`` from a seeded index hash
  (stochastic rounding: E[lo + code * step] = x) or ``u = 1/2`` (round to nearest);
* codes packed ``8 / bits`` to a byte, least-significant first: ``packed[g, j]`` holds values
  ``j*per .. j*per + per - 1`` of group g.

Three levels (``bits`` 1.6, L = 2): five codes a byte as base-3 digits, least-significant first;
in the flat layout the bytes run across groups (``ceil(n / 5)`` bytes for n values).

A constant group has step 0 and unpacks to lo exactly (all-zero groups after a ReLU are exact).
A group with a NaN or an infinity unpacks to NaN everywhere, so overflow stays visible.
Memory at G = 256: bits + 64/256 bits per value (2.25 at 2 bits: 14.2x smaller than fp32).

Boolean masks are packed 8 to a byte (exact).

Row layout (``rows`` given, a :class:`Rows`): the value is read as rows of the dimension
Inductor stores innermost (``x.permute(..., inner).reshape(R, Q)``: W of an NCHW convolution
output, channels of a channels-last one, features of a transformer's), padded with copies of its
last row, and ``8 / bits`` consecutive rows share a byte: ``packed[r // per, q]`` holds
``code[r, q]`` at bit ``bits * (r % per)``. A group stays inside one channel: where the channel is
the column, a group is one column of up to G rows; where it is a row dimension (NCHW), a group is
a block of whole rows of one channel plane holding up to G values. Why: a backward kernel reading
the value runs along q; here its byte and shift are contiguous or constant along q, and its
group index too, so Inductor vectorizes the unpack fused into that kernel. In the flat layout
every lane reads byte ``i // per`` at shift ``bits * (i % per)``, and Inductor's C++ backend
ran those kernels scalar (ResNet-50 batch 8, 2 bits, CPU: backward 1.54 s flat, 0.89 s in rows;
torch.compile's own 0.99 s). Masks use the same rows, 8 to a byte.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import torch
from torch._inductor import inductor_prims

from actfx.kernels import lowered  # noqa: F401 - registers actfx::pack_codes, or_lanes, unpack_codes, lowerings
from actfx.kernels.widths import TERNARY, TRIT_WEIGHTS, TRITS_PER_BYTE, of_levels, per_byte, levels as levels_of

__all__ = ["pack_values", "unpack_values", "group_step", "pack_mask", "unpack_mask", "packed_value_bytes",
           "packed_mask_bytes", "Rows", "row_layout", "padded", "join_lanes"]


def _groups(flat: torch.Tensor, group: int) -> torch.Tensor:
    """``flat`` padded with its last value to whole groups, as ``[num_groups, group]``."""
    n = flat.shape[0]
    num_groups = (n + group - 1) // group
    if isinstance(n, int) and n % group == 0:
        return flat.view(num_groups, group)  # no padding: a plain view keeps the loads vectorized
    index = torch.arange(num_groups * group, device=flat.device).clamp_max(n - 1)
    return flat[index].view(num_groups, group)


_LOW32 = 0xFFFFFFFF


def _pack_seed(device: torch.device) -> torch.Tensor:
    """A pack's noise seed: an Inductor seed node here; the pass replaces all of a graph's seeds
    by one ``actfx::pack_seeds`` call on the model's own stream (``seed_stream.py``)."""
    return inductor_prims.seed(device)


# Stochastic rounding's noise: U[0, 1) on a 2^-24 grid from a counter-based integer hash of each
# output byte's index and the pack's seed, spread over the byte's lanes by one multiply per value:
# lane k takes the top 24 bits of hash * (1 + k * _LANE_STEP). The multiplier is odd, a bijection
# of the 32-bit hash, so each lane is as uniform as the hash; distinct multipliers keep the lanes
# of a byte uncorrelated (tests/test_graph_pack.py). Why not Inductor's own ``rand``: on CPU it runs
# one scalar Philox per element, 6x slower than the whole rest of a pack (ResNet-50's 2-bit pack
# of an 8x256x56x56 value: 51 ms with it, 8 ms with this). One hash per byte: the CPU pack kernel
# hashes each byte once for its lanes; the compiled codes node (lowered.py) hashes each value's
# byte, one expression generated once. Here the hash (two multiply-xorshift rounds) runs in
# int32, 8 lanes to an AVX2 vector with a native multiply; products wrap modulo 2^32, and a
# signed shift is masked to act as a logical one (the compiled node computes the same bits in
# int64, lowered.py says why). Tables of 2^31 bytes and more hash in int64. 7 * _LANE_STEP stays
# below 2^31.
_LANE_STEP = 0x11E3_779A


def wide_table(count: int, columns: int) -> bool:
    """Whether a ``[count, columns]`` byte table's indices pass int32 (its hash runs in int64)."""
    return count * columns >= 1 << 31


def byte_hashes(count: int, columns: int, seed: torch.Tensor, device: torch.device, wide: bool) -> torch.Tensor:
    """The hash of each byte of a ``[count, columns]`` byte table (int32; int64 where ``wide``)."""
    index = torch.arange(count * columns, dtype=torch.int64 if wide else torch.int32, device=device)
    index = index.view(count, columns)
    return _hash_wide(index, seed) if wide else _hash(index, seed)


def lanes_uniform(count: int, per: int, columns: int, seed: torch.Tensor, device: torch.device,
                  wide: bool) -> torch.Tensor:
    """The U[0, 1) noise of a ``[count, per, columns]`` codes table: entry (b, k, q) is lane k of
    byte ``b * columns + q``."""
    hashes = byte_hashes(count, columns, seed, device, wide)[:, None, :]
    dtype = hashes.dtype
    multiplier = (torch.arange(per, dtype=dtype, device=device) * _LANE_STEP + 1)[None, :, None]
    h = hashes * multiplier
    if dtype == torch.int64:
        h = h & _LOW32
    return ((h >> 8) & 0xFFFFFF).float() * (1.0 / (1 << 24))


def uniform_from_seed(t: torch.Tensor, seed: torch.Tensor, per: int = 1, columns: int = 1) -> torch.Tensor:
    """The noise :func:`pack_values` adds to ``t`` (the codes' fp32 table, read flat as rows of
    ``columns`` columns, ``per`` rows to a byte; the flat layout: one column) under ``seed``: the
    value at row r, column q is lane ``r % per`` of byte ``(r // per) * columns + q``."""
    count = t.numel() // (per * columns)
    return lanes_uniform(count, per, columns, seed, t.device, wide_table(count, columns)).reshape(t.shape)


def _hash(index: torch.Tensor, seed: torch.Tensor) -> torch.Tensor:
    """32 well-mixed bits of (index, seed), as int32."""
    h = index ^ (seed & 0x7FFFFFFF).to(torch.int32)
    h = h ^ ((h >> 16) & 0xFFFF)
    h = h * 0x7FEB352D
    h = h ^ ((h >> 15) & 0x1FFFF)
    h = h * -0x7B935975  # 0x846CA68B as a signed 32-bit value
    return h ^ ((h >> 16) & 0xFFFF)


def _hash_wide(index: torch.Tensor, seed: torch.Tensor) -> torch.Tensor:
    """:func:`_hash` for indices of 2^31 and more, in int64 (each product masked to 32 bits)."""
    h = ((index + seed) & _LOW32) ^ (index >> 32)
    h = h ^ (h >> 16)
    h = (h * 0x7FEB352D) & _LOW32
    h = h ^ (h >> 15)
    h = (h * 0x846CA68B) & _LOW32
    return h ^ (h >> 16)


@dataclasses.dataclass(frozen=True)
class Rows:
    """The row layout of a value: ``inner`` is the dimension read as columns; ``plane``: how many
    consecutive rows share one channel when the channel is not ``inner`` (H for an NCHW
    convolution output read along W), then a group is a block of whole rows inside one channel
    plane; None: the channel is ``inner`` itself, and a group is one column of rows."""

    inner: int
    plane: int | None = None


def _unit(bits) -> int:
    """Rows are padded to whole groups of this many (whole bytes): 8 for the binary widths (their
    layout since rows were introduced), five for three levels."""
    return TRITS_PER_BYTE if bits == TERNARY else 8


def pack_values(x: torch.Tensor, bits, group_size: int, stochastic: bool = True, rows: Rows | None = None):
    """x (any float dtype and shape) -> (packed uint8, lo fp32, hi fp32), the groups' minima and
    maxima (:func:`group_step` gives their steps); ``rows``: the row layout (None: flat). Three
    levels (``bits`` 1.6) keep five codes a byte as base-3 digits; in the flat layout their bytes
    run across groups (one byte table, ``ceil(n / 5)`` bytes for the groups' n values), so no
    group is padded to a multiple of five.

    Why the maximum and not the step: the step, a pointwise node over the groups, and the group
    range's reduction share their outer loop but not its vector width, so Inductor's C++ backend
    tried them as one outer-loop kernel, failed its check, and generated both again (a compiled
    ResNet-18: 21 of its 46 failed outer-loop fusions); computed where it is read, it is the same
    fp32 arithmetic, so the same bits."""
    levels = levels_of(bits)
    per = per_byte(bits)
    direct = _direct_views(x, bits, group_size, rows)
    if direct is not None:
        xg, grid, spread = direct
    elif rows is None:
        xg = _groups(x.reshape(-1).float(), group_size)
    else:
        table = _rows(x, rows.inner).float()
        count, columns = table.shape
        per_group, padded = _row_groups(count, columns, group_size, rows.plane, _unit(bits))
        table = _pad_rows(table, padded)
        xg = _row_groups_of(table, per_group, columns, by_column=rows.plane is None)
    lo, hi = xg.amin(dim=1), xg.amax(dim=1)
    step = group_step(lo, hi, bits)
    recip = torch.where(step > 0, 1.0 / torch.where(step > 0, step, 1.0), 0.0)
    # a group with NaN or Inf (step NaN or inf; it unpacks to NaN) gets codes 0: every t is then
    # finite and >= 0, and no NaN reaches the float -> int conversion (undefined in C++ and LLVM)
    finite = step < float("inf")
    columns = 1 if rows is None else x.shape[rows.inner]
    if direct is not None:  # the codes table [bytes, per, columns] read from x itself (see _direct_views)
        table = torch.where(spread(finite), (grid - spread(lo)) * spread(recip), 0.0)
    else:
        t = torch.where(finite[:, None], (xg - lo[:, None]) * recip[:, None], 0.0)
        if rows is None and t.numel() % per:  # three levels: the last byte's missing digits (never read)
            flat = t.reshape(-1)
            t = torch.cat([flat, flat.new_zeros(per - flat.numel() % per)])
        table = t.reshape(-1, per, columns)
    # the bytes of the codes table [bytes, per, columns] as one node (lowered.py)
    wide = wide_table(table.shape[0], columns)
    packed = torch.ops.actfx.pack_codes(table, _pack_seed(x.device), levels, stochastic, bool(wide))
    if rows is None:
        return (packed.view(-1) if bits == TERNARY else packed.view(lo.shape[0], -1)), lo, hi
    # contiguous: a transposed value's codes keep its strides, and the backward reads rows of bytes
    return packed.contiguous(), lo, hi


def group_step(lo: torch.Tensor, hi: torch.Tensor, bits) -> torch.Tensor:
    """The groups' code step ``(hi - lo) / L`` (fp32), as the pack computes it."""
    return (hi - lo) * (1.0 / levels_of(bits))


def _direct_views(x: torch.Tensor, bits, group_size: int, rows: Rows | None):
    """Where no padding is needed: (the groups, the codes table ``[bytes, per, columns]``, a
    function spreading a per-group tensor over that table), each one reshape of ``x`` (permuted
    to rows; the flat layout is one column of rows in groups of whole rows). None where the value
    is padded (or three levels in the flat layout).

    Why: built as a chain (rows, then groups, then bytes), each view's index is a floor division
    and modulus of the one before, and Inductor's C++ code generation simplified those nested
    expressions with sympy kernel by kernel and loop variant by variant, to the same affine index
    in the end (ResNet-18: half the code-generation time of the pack kernels). One reshape of x
    gives each index as one decomposition of the flat index, which Inductor simplifies at once.
    Same elements, same arithmetic: the bytes are the chain's bit for bit."""
    per = per_byte(bits)
    if rows is None:
        if bits == TERNARY or not isinstance(x.numel(), int) or x.numel() % group_size:
            return None
        source, columns, per_group, by_column = x.float(), 1, group_size, False
    else:
        source = x.permute(_order(x.dim(), rows.inner)).float()
        columns = x.shape[rows.inner]
        count = x.numel() // columns
        per_group, padded = _row_groups(count, columns, group_size, rows.plane, _unit(bits))
        if padded != count:
            return None
        by_column = rows.plane is None  # a group: one column of per_group rows; else per_group whole rows
    if per_group % per:
        return None
    groups = _row_groups_of(source, per_group, columns, by_column)
    return groups, source.reshape(-1, per, columns), functools.partial(_spread_over_bytes, per_bytes=per_group // per)


def _row_groups_of(table: torch.Tensor, per_group: int, columns: int, by_column: bool) -> torch.Tensor:
    """A row table's groups for the range reduction over dim 1: ``[groups, per_group, columns]``
    (a group per column of rows) or ``[groups, per_group * columns]`` (blocks of whole rows).
    reshape, not view: a transposed value's table is a strided view (Inductor copies it only there)."""
    return table.reshape(-1, per_group, columns) if by_column else table.reshape(-1, per_group * columns)


def _spread_over_bytes(stat: torch.Tensor, per_bytes: int) -> torch.Tensor:
    """A per-group ``[groups]`` (or per group and column ``[groups, columns]``) tensor repeated
    for each of a group's ``per_bytes`` byte rows, shaped to broadcast over the codes table."""
    wide = stat.unsqueeze(1).expand(stat.shape[0], per_bytes, *stat.shape[1:])
    return wide.reshape(-1, 1, stat.shape[1] if stat.dim() == 2 else 1)


def unpack_values(packed: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, like: torch.Tensor, bits,
                  rows: Rows | None = None, group_size: int | None = None):
    """The inverse of :func:`pack_values`, shaped and typed like ``like`` (only its shape and dtype
    are read: it may be a fake tensor or an expanded zero). The table is one
    ``actfx::unpack_codes`` node (``lowered.py``). ``group_size``: needed for three levels in the
    flat layout only (its bytes run across groups, so they do not tell where a group ends)."""
    per = per_byte(bits)
    step = group_step(lo, hi, bits)
    if rows is not None:
        per_group = packed.shape[0] * per // lo.shape[0]
    elif bits == TERNARY:
        if group_size is None:
            raise TypeError("unpack_values: three levels in the flat layout need group_size")
        per_group = group_size
    else:
        per_group = packed.shape[1] * per
    table = torch.ops.actfx.unpack_codes(packed, lo, step, like.dtype, levels_of(bits), rows is not None, per_group)
    if rows is None:
        return table[: like.numel()].view(like.shape)
    return _from_rows(table, like, rows.inner)


def unpack_table(packed: torch.Tensor, lo: torch.Tensor, step: torch.Tensor, dtype: torch.dtype, levels: int,
                 rows: bool, per_group: int) -> torch.Tensor:
    """``actfx::unpack_codes`` in ATen (its eager implementation; see there for the arguments)."""
    if lo.numel() == 0:  # a mask
        bits_ = _split_lanes(packed, 1, dim=1)
        return (bits_.reshape(-1, packed.shape[1]) if rows else bits_.reshape(-1)).to(torch.bool)
    bits = of_levels(levels)
    if not rows:
        if packed.dim() == 1:  # three levels: one byte table across groups
            code = _split_lanes(packed, bits, dim=1).reshape(-1)[: lo.shape[0] * per_group].view(lo.shape[0], -1)
            return (code.float() * step[:, None] + lo[:, None]).reshape(-1).to(dtype)
        code = _split_lanes(packed, bits, dim=2)
        return (code.float() * step[:, None, None] + lo[:, None, None]).reshape(-1).to(dtype)
    columns = packed.shape[1]
    code = _split_lanes(packed, bits, dim=1).reshape(lo.shape[0], -1)
    if lo.dim() == 1:
        values = code.float() * step[:, None] + lo[:, None]
    else:
        values = code.view(lo.shape[0], -1, columns).float() * step[:, None, :] + lo[:, None, :]
    return values.reshape(-1, columns).to(dtype)


def pack_mask(mask: torch.Tensor, rows: Rows | None = None) -> torch.Tensor:
    """bool (any shape) -> uint8: flat, bit k of byte j = mask.flatten()[8 * j + k]; in rows,
    bit k of ``packed[j, q]`` = row ``8 * j + k``, column q."""
    # as uint8: the table has 8 readers, and Inductor stores a reused mask that reads many buffers
    # (BatchNorm -> ReLU's five) before packing it; in int32 that copy took 4 bytes a value
    if rows is None:
        return torch.ops.actfx.or_lanes(_groups(mask.reshape(-1).to(torch.uint8), 8), 1, 1)
    table = _rows(mask, rows.inner).to(torch.uint8)
    padded = _ceil_div(table.shape[0], 8) * 8
    rows_of_bits = _pad_rows(table, padded, zero=True).reshape(-1, 8, table.shape[1])
    return torch.ops.actfx.or_lanes(rows_of_bits, 1, 1).contiguous()


def unpack_mask(packed: torch.Tensor, like: torch.Tensor, rows: Rows | None = None) -> torch.Tensor:
    """The inverse of :func:`pack_mask`, shaped like ``like``."""
    none = packed.new_empty(0, dtype=torch.float32)
    table = torch.ops.actfx.unpack_codes(packed, none, none, torch.bool, 1, rows is not None, 8)
    if rows is None:
        return table[: like.numel()].view(like.shape)
    return _from_rows(table, like, rows.inner)


def row_layout(shape, inner: int, plane: int | None, min_rows: int) -> Rows | None:
    """The row layout along ``inner`` for a value of ``shape``, or None for the flat layout: rows
    need at least ``min_rows`` of them (a group's worth), or the padding and the per-column groups
    would cost more than they save."""
    if len(shape) < 2 or not all(isinstance(s, int) for s in shape) or shape[inner] == 0:
        return None
    count = math.prod(shape) // shape[inner]
    return Rows(inner % len(shape), plane) if count >= min_rows else None


def _or_bits(code: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """Codes (uint8 or int32) -> uint8, the ``8 / bits`` entries along ``dim`` (which is dropped)
    to a byte, least-significant first; each entry widened to int32 on its own."""
    packed = code.select(dim, 0).to(torch.int32)
    for k in range(1, code.shape[dim]):
        packed = packed | (code.select(dim, k).to(torch.int32) << (bits * k))
    return packed.to(torch.uint8)


def join_lanes(code: torch.Tensor, bits, dim: int) -> torch.Tensor:
    """Codes (uint8 or int32) -> uint8, the entries along ``dim`` (dropped) to a byte,
    least-significant first: ``bits`` each, ORed, or base-3 digits for three levels."""
    if bits != TERNARY:
        return _or_bits(code, bits, dim)
    packed = code.select(dim, 0).to(torch.int32)
    for k in range(1, code.shape[dim]):
        packed = packed + code.select(dim, k).to(torch.int32) * TRIT_WEIGHTS[k]
    return packed.to(torch.uint8)


def _split_lanes(packed: torch.Tensor, bits, dim: int) -> torch.Tensor:
    """The inverse of :func:`join_lanes`: int32 codes with the byte's ``per_byte(bits)`` entries
    at ``dim``."""
    shape = [1] * (packed.dim() + 1)
    shape[dim] = per_byte(bits)
    wide = packed.unsqueeze(dim).to(torch.int32)
    if bits == TERNARY:
        weight = torch.tensor(TRIT_WEIGHTS, dtype=torch.int32, device=packed.device).view(shape)
        return torch.div(wide, weight, rounding_mode="floor") % 3
    shift = (torch.arange(8 // bits, dtype=torch.int32, device=packed.device) * bits).view(shape)
    return (wide >> shift) & ((1 << bits) - 1)


def _order(ndim: int, inner: int) -> list[int]:
    return [d for d in range(ndim) if d != inner] + [inner]


def _rows(x: torch.Tensor, inner: int) -> torch.Tensor:
    """x as [R, Q]: Q = x.shape[inner], the rows in the order of the other dimensions."""
    return x.permute(_order(x.dim(), inner)).reshape(-1, x.shape[inner])


def _from_rows(rows: torch.Tensor, like: torch.Tensor, inner: int) -> torch.Tensor:
    """The inverse of :func:`_rows` (``rows`` may hold padding rows after the value's own)."""
    order = _order(like.dim(), inner)
    count = like.numel() // like.shape[inner]
    permuted = rows[:count].view([like.shape[d] for d in order])
    return permuted.permute([order.index(d) for d in range(like.dim())])


def _row_groups(count: int, columns: int, group_size: int, plane: int | None, unit: int = 8) -> tuple[int, int]:
    """(rows per group, padded row count). Columns of rows (``plane`` None): as few groups as
    ``group_size`` allows, each a multiple of ``unit`` rows (8; five for three levels: whole
    bytes), so padding stays under ``unit`` rows a group.
    Blocks of whole rows: the most rows of one plane that fit ``group_size`` values and divide the
    plane (whole planes when one is smaller than a group), so a group never mixes channels, unless
    that leaves under half a group (then the rows that fit); padded to whole groups and bytes."""
    if plane is None:
        groups = _ceil_div(count, group_size)
        per_group = _ceil_div(_ceil_div(count, groups), unit) * unit
        return per_group, groups * per_group
    fit = max(1, group_size // columns)
    if fit >= plane:
        per_group = plane * (fit // plane)
    else:
        per_group = max(d for d in range(1, fit + 1) if plane % d == 0)
        if per_group * columns * 2 < group_size:
            per_group = fit
    whole = math.lcm(per_group, unit)
    return per_group, _ceil_div(count, whole) * whole


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def _pad_rows(rows: torch.Tensor, padded: int, zero: bool = False) -> torch.Tensor:
    """``rows`` followed by copies of its last row (zeros for masks) up to ``padded`` rows: a copy
    of the last row never widens its group's range."""
    if padded == rows.shape[0]:
        return rows
    fill = rows.new_zeros(1, rows.shape[1]) if zero else rows[-1:]
    return torch.cat([rows, fill.expand(padded - rows.shape[0], rows.shape[1])])


def packed_value_bytes(shape, bits, group_size: int, rows: Rows | None = None) -> int:
    """What :func:`pack_values` returns for a value of ``shape``, in bytes."""
    numel = math.prod(shape)
    per = per_byte(bits)
    if rows is None:
        groups = _ceil_div(numel, group_size)
        return groups * 8 + _ceil_div(groups * group_size, per)
    columns = shape[rows.inner]
    per_group, padded = _row_groups(numel // columns, columns, group_size, rows.plane, _unit(bits))
    groups = padded // per_group
    return groups * (1 if rows.plane else columns) * 8 + padded * columns // per


def padded(shape, group_size: int, rows: Rows | None = None, mask: bool = False, bits=2) -> bool:
    """Whether a value of ``shape`` is unpacked from a table padded past its end (a partial last
    group, or rows up to whole bytes), then cut back to its size."""
    numel = math.prod(shape)
    if rows is None:
        return numel % (8 if mask else group_size) != 0
    count = numel // shape[rows.inner]
    if mask:
        return count % 8 != 0
    return _row_groups(count, shape[rows.inner], group_size, rows.plane, _unit(bits))[1] != count


def packed_mask_bytes(numel: int) -> int:
    return -(-numel // 8)
