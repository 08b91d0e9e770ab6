"""A pack, a mask's bits and an unpack, each one graph node with its own Inductor lowering.

``actfx::pack_codes``: a pack's bytes (stochastic rounding included).

Why: a pack's code for a value is the producer's math inlined (BatchNorm's, GELU's), the group's
range, the noise hash, floor and clamp: a large expression. Written as ATen math, Inductor saw it
as a chain of nodes and stored the first one that grew large (the fp32 ``t + noise``), or, lane by
lane, generated the whole expression once per lane of a byte (4 copies at 2 bits, 8 for 1 bit):
most of a compiled forward's C++ and of its code-generation time. As one node with its own
lowering it is one expression, stored once, one byte a value, and generated once; its lanes are
then ORed into bytes in the same node. That OR and a mask's (``actfx::or_lanes``) were ATen
selects, casts, shifts and ORs, over a third of a compiled ResNet-18's forward graph (2,456
nodes; 1,582 with them as one node each), each lowered and walked by Inductor's passes on its
own.

``actfx::unpack_codes``: a packed value read back in its own shape. Written as ATen math (split
the bytes into lanes, scale, cut the padding, view and permute back), every backward kernel reading
it indexed bytes through chains of reshapes: nested floor divisions and moduli of the flat index,
which Inductor's C++ code generation simplified with sympy, value by value and kernel by kernel
(ResNet-18's first step: over a tenth of its compile time). Lowered here, the byte, lane and
group of a value come straight from its row and column.

The eager implementations are the same arithmetic in ATen (``graph_pack``), so the compiled
bytes and values equal eager's and the CPU pack kernel's bit for bit (``tests/test_graph_pack.py``).
"""

from __future__ import annotations

import torch
from torch import Tensor

from actfx.kernels.widths import TERNARY, TRIT_WEIGHTS, of_levels, per_byte

__all__ = ["pack_codes", "or_lanes", "unpack_codes"]

_HASH_MUL_1 = 0x7FEB352D
_HASH_MUL_2 = -0x7B935975  # 0x846CA68B as a signed 32-bit value
_LOW32 = 0xFFFFFFFF


@torch.library.custom_op("actfx::pack_codes", mutates_args=())
def pack_codes(table: Tensor, seed: Tensor, levels: int, stochastic: bool, wide: bool) -> Tensor:
    """``table``: fp32 ``[bytes, per, columns]`` of (x - lo) / step (finite, >= 0); returns the
    ``[bytes, columns]`` bytes holding its codes ``min(floor(t + u), levels)``, the ``per`` lanes
    least-significant first (base-3 digits for three levels), u the noise of lane k of byte ``b * columns + q`` (1/2 without
    ``stochastic``); ``wide``: bytes are indexed past 2^31 and the hash takes the index's high bits
    too, as eager's int64 hash does (decided where the sizes are traced, so a symbolic size is
    guarded once, there)."""
    from actfx.kernels.graph_pack import join_lanes, lanes_uniform

    count, per, columns = table.shape
    noise = lanes_uniform(count, per, columns, seed, table.device, wide) if stochastic else 0.5
    codes = torch.floor(table + noise).clamp_max(float(levels)).to(torch.uint8)
    return join_lanes(codes, of_levels(levels), dim=1)


@pack_codes.register_fake
def _(table, seed, levels, stochastic, wide):
    return table.new_empty([table.shape[0], table.shape[2]], dtype=torch.uint8)


def _mark_reuse(value, readers: int) -> None:
    """Inductor's rule for a value with several readers (store it if its expression is large),
    applied to the storage under ``value``'s views (a view's own ``mark_reuse`` does nothing)."""
    from torch._inductor import ir

    while isinstance(value, (ir.TensorBox, ir.BaseView)):
        value = value.data
    if isinstance(value, ir.StorageBox):
        value.mark_reuse(readers)


def _lower(table, seed, levels: int, stochastic: bool, wide: bool):
    """The same arithmetic as two Inductor Pointwise nodes: the codes, stored one byte a value
    (each lane's expression, the producer's math inlined, generated once), then the bytes ORed
    from them. Why not each byte rounding its own lanes: that generates the expression once per
    lane (4 copies at 2 bits), and for the usual table (a stored value's (x - lo) / step) it
    compiled no faster than the stored codes (ResNet-18, cold first steps)."""
    from torch._inductor import ir
    from torch._inductor.virtualized import ops

    from actfx.kernels.graph_pack import _LANE_STEP

    count, per, columns = table.get_size()
    load, load_seed = table.make_loader(), seed.make_loader()

    def const(value):
        return ops.constant(value, torch.int64)

    def low32(h):
        return ops.bitwise_and(h, const(_LOW32))

    # The hash in int64 with no product past 2^63, each kept to its low 32 bits: the same bits
    # as the int32 arithmetic (wrapping) eager runs. Not in int32: a product that wraps is
    # undefined behaviour in Inductor's scalar C++ (where the hash does not vary along the
    # vector, a one-column table), and those kernels gave other bytes than eager on 1 and 3
    # threads (not on 2). Every value stays in [0, 2^32), so a right shift needs no mask
    # (eager's int32 shifts are masked to act as logical ones: the same bits).
    def hash_of(b, q):
        byte = ops.index_expr(b * columns + q, torch.int64)
        if wide:
            h = ops.bitwise_xor(low32(ops.add(byte, load_seed(()))), ops.bitwise_right_shift(byte, const(32)))
        else:
            h = ops.bitwise_xor(byte, ops.bitwise_and(load_seed(()), const(0x7FFFFFFF)))
        h = ops.bitwise_xor(h, ops.bitwise_right_shift(h, const(16)))
        h = low32(ops.mul(h, const(_HASH_MUL_1)))
        h = ops.bitwise_xor(h, ops.bitwise_right_shift(h, const(15)))
        h = low32(ops.mul(h, const(_HASH_MUL_2)))  # negative: the same low bits as 0x846CA68B
        return ops.bitwise_xor(h, ops.bitwise_right_shift(h, const(16)))

    def code(b, k, q, h):
        """Lane k's code as uint8, ``h`` the byte's hash (None: round to nearest)."""
        if h is None:
            u = ops.constant(0.5, torch.float32)
        else:
            lane = ops.bitwise_right_shift(low32(ops.mul(h, const(1 + k * _LANE_STEP))), const(8))
            u = ops.mul(ops.to_dtype(lane, torch.float32), ops.constant(1.0 / (1 << 24), torch.float32))
        rounded = ops.minimum(ops.floor(ops.add(load([b, k, q]), u)), ops.constant(float(levels), torch.float32))
        return ops.to_dtype(rounded, torch.uint8)

    codes = ir.Pointwise.create(
        device=table.get_device(), dtype=torch.uint8, ranges=[count, per, columns],
        inner_fn=lambda index: code(*index, hash_of(index[0], index[2]) if stochastic else None))
    if per > 1:  # one reader per lane; at 8 bits the one lane is the byte, read once
        codes.realize()
    return _or_node(codes, of_levels(levels), 1)


@torch.library.custom_op("actfx::or_lanes", mutates_args=())
def or_lanes(codes: Tensor, bits: int, dim: int) -> Tensor:
    """uint8 ``codes`` -> uint8 bytes, the ``8 / bits`` entries along ``dim`` (dropped) ORed into
    a byte, least-significant first (a mask's bits). One node: written as ATen, a mask's lanes were
    31 nodes (8 selects, casts, shifts, 7 ORs), with the values' lanes a third of a compiled
    ResNet's forward graph, each lowered and passed over by Inductor on its own."""
    from actfx.kernels.graph_pack import _or_bits

    return _or_bits(codes, bits, dim)


@or_lanes.register_fake
def _(codes, bits, dim):
    return codes.new_empty([s for d, s in enumerate(codes.shape) if d != dim], dtype=torch.uint8)


def _lower_or_lanes(codes, bits: int, dim: int):
    """The lanes ORed in one Pointwise node; ``codes`` is stored first where Inductor would store
    a value read ``8 / bits`` times (a large expression), as it did for the selects."""
    _mark_reuse(codes, 8 // bits)
    return _or_node(codes, bits, dim)


def _or_node(codes, bits, dim: int):
    """A Pointwise ORing the ``8 / bits`` entries of ``codes`` along ``dim`` into bytes (three
    levels: five base-3 digits, multiplied and added)."""
    from torch._inductor import ir
    from torch._inductor.virtualized import ops

    size = list(codes.get_size())
    load = codes.make_loader()

    def inner_fn(index):
        index = list(index)
        packed = None
        for k in range(size[dim]):
            lane = ops.to_dtype(load(index[:dim] + [k] + index[dim:]), torch.int32)
            if k and bits == TERNARY:
                lane = ops.mul(lane, ops.constant(TRIT_WEIGHTS[k], torch.int32))
            elif k:
                lane = ops.bitwise_left_shift(lane, ops.constant(bits * k, torch.int32))
            join = ops.add if bits == TERNARY else ops.bitwise_or
            packed = lane if packed is None else join(packed, lane)
        return ops.to_dtype(packed, torch.uint8)

    return ir.Pointwise.create(device=codes.get_device(), dtype=torch.uint8, inner_fn=inner_fn,
                               ranges=size[:dim] + size[dim + 1:])


@torch.library.custom_op("actfx::unpack_codes", mutates_args=())
def unpack_codes(packed: Tensor, lo: Tensor, step: Tensor, dtype: torch.dtype, levels: int, rows: bool,
                 per_group: int) -> Tensor:
    """The whole table ``packed`` holds, padding included: flat (``rows`` False), one value per
    code in order, groups of ``per_group`` (bytes ``[groups, per_group / lanes]``, or one byte table
    across groups for three levels); in rows, ``[rows, columns]``, a byte's lanes are consecutive
    rows, groups of ``per_group`` rows (``lo``/``step`` per group, or per group and column where
    they have two dimensions). ``levels``: 1, 3, 15, 255 (1, 2, 4, 8 bits) or 2 (three levels,
    five base-3 digits a byte). ``lo`` and ``step`` empty: a mask (levels 1), as bool. The caller
    cuts the padding off and views the value's shape: every range here is a whole number of
    bytes and groups (Inductor's C++ loops dropped the last partial group of a range split by a
    floor division that does not divide it)."""
    from actfx.kernels import graph_pack

    return graph_pack.unpack_table(packed, lo, step, dtype, levels, rows, per_group)


@unpack_codes.register_fake
def _(packed, lo, step, dtype, levels, rows, per_group):
    per = per_byte(of_levels(levels))
    if rows:
        shape = [packed.shape[0] * per, packed.shape[1]]
    elif packed.dim() == 1 and lo.numel():  # three levels: one byte table across whole groups
        shape = [lo.shape[0] * per_group]
    else:
        shape = [packed.numel() * per]
    return packed.new_empty(shape, dtype=dtype)


def _lower_unpack(packed, lo, step, dtype, levels: int, rows: bool, per_group: int):
    """Each code's byte, lane and group from its row and column, as one Inductor Pointwise node.
    A base-3 digit k of byte v is ``floor((v + 1/2) / 3^k) - 3 floor((v + 1/2) / 3^(k+1))`` in
    fp32: exact (v + 1/2 over a power of three up to 3^5 stays 1/486 or more from an integer, far
    above fp32's rounding), and vectorised like the binary widths' shift, where an integer
    division by a lane's power of three was not."""
    from torch._inductor import ir
    from torch._inductor.virtualized import ops
    from torch.utils._sympy.functions import FloorDiv, ModularIndexing

    load, load_lo, load_step = packed.make_loader(), lo.make_loader(), step.make_loader()
    bits = of_levels(levels)
    per = per_byte(bits)
    mask = lo.get_numel() == 0
    size = packed.get_size()
    byte_row = len(size) == 1  # one byte table: a flat mask's bytes, or three levels' across groups

    def digit(byte, lane):
        """The code as int32 (binary widths) or fp32 (three levels)."""
        if bits != TERNARY:
            shift = ops.index_expr(lane * bits, torch.int32)
            return ops.bitwise_and(ops.bitwise_right_shift(ops.to_dtype(byte, torch.int32), shift),
                                   ops.constant((1 << bits) - 1, torch.int32))
        v = ops.add(ops.to_dtype(byte, torch.float32), ops.constant(0.5, torch.float32))
        k = ops.index_expr(lane, torch.int32)

        def inverse_power(first):  # 3^-(first + lane), one select per lane
            value = ops.constant(3.0 ** -(first + per - 1), torch.float32)
            for j in range(per - 2, -1, -1):
                value = ops.where(ops.eq(k, ops.constant(j, torch.int32)),
                                  ops.constant(3.0 ** -(first + j), torch.float32), value)
            return value

        high = ops.floor(ops.mul(v, inverse_power(0)))
        higher = ops.floor(ops.mul(v, inverse_power(1)))
        return ops.sub(high, ops.mul(higher, ops.constant(3.0, torch.float32)))

    def inner_fn(index):
        if rows:
            r, q = index
            byte, lane = [FloorDiv(r, per), q], ModularIndexing(r, 1, per)
            group = [FloorDiv(r, per_group)] + ([q] if len(lo.get_size()) == 2 else [])
        else:
            (i,) = index
            byte = [FloorDiv(i, per)] if byte_row else [FloorDiv(i, per_group), FloorDiv(ModularIndexing(i, 1, per_group), per)]
            lane, group = ModularIndexing(i, 1, per), [FloorDiv(i, per_group)]
        code = digit(load(byte), lane)
        if mask:
            return ops.to_dtype(code, torch.bool)
        if bits != TERNARY:
            code = ops.to_dtype(code, torch.float32)
        value = ops.add(ops.mul(code, load_step(group)), load_lo(group))
        return ops.to_dtype(value, dtype)

    if rows:
        ranges = [size[0] * per, size[1]]
    elif byte_row and not mask:
        ranges = [lo.get_size()[0] * per_group]
    else:
        ranges = [packed.get_numel() * per]
    return ir.Pointwise.create(device=packed.get_device(), dtype=dtype, inner_fn=inner_fn, ranges=ranges)


def _register_lowering() -> None:
    from torch._inductor.lowering import register_lowering

    register_lowering(torch.ops.actfx.pack_codes.default, type_promotion_kind=None)(_lower)
    register_lowering(torch.ops.actfx.or_lanes.default, type_promotion_kind=None)(_lower_or_lanes)
    register_lowering(torch.ops.actfx.unpack_codes.default, type_promotion_kind=None)(_lower_unpack)


_register_lowering()
