"""A pack's codes and an unpack, each one graph node with its own Inductor lowering.

``actfx::round_codes``: a pack's codes (stochastic rounding included).

Why: a pack's code for a value is the producer's math inlined (BatchNorm's, GELU's), the group's
range, the noise hash, floor and clamp: a large expression. Written as ATen math, Inductor saw it
as a chain of nodes and stored the first one that grew large (the fp32 ``t + noise``), or, lane by
lane, generated the whole expression once per lane of a byte (4 copies at 2 bits, 8 for 1 bit):
most of a compiled forward's C++ and of its code-generation time. As one node with its own
lowering it is one expression with ``8 / bits`` readers (the lanes ORed into bytes), which
Inductor stores once, one byte a value, and generates once.

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

__all__ = ["round_codes", "unpack_codes"]

_HASH_MUL_1 = 0x7FEB352D
_HASH_MUL_2 = -0x7B935975  # 0x846CA68B as a signed 32-bit value
_LOW32 = 0xFFFFFFFF


@torch.library.custom_op("actfx::round_codes", mutates_args=())
def round_codes(table: Tensor, seed: Tensor, levels: int, stochastic: bool, wide: bool) -> Tensor:
    """``table``: fp32 ``[bytes, per, columns]`` of (x - lo) / step (finite, >= 0); returns its
    codes ``min(floor(t + u), levels)`` as uint8, u the noise of lane k of byte ``b * columns + q``
    (1/2 without ``stochastic``); ``wide``: bytes are indexed past 2^31 and the hash takes the
    index's high bits too, as eager's int64 hash does (decided where the sizes are traced, so a
    symbolic size is guarded once, there)."""
    from actfx.kernels.graph_pack import lanes_uniform

    count, per, columns = table.shape
    noise = lanes_uniform(count, per, columns, seed, table.device, wide) if stochastic else 0.5
    return torch.floor(table + noise).clamp_max(float(levels)).to(torch.uint8)


@round_codes.register_fake
def _(table, seed, levels, stochastic, wide):
    return table.new_empty(table.shape, dtype=torch.uint8)


def _lower(table, seed, levels: int, stochastic: bool, wide: bool):
    """The same arithmetic as one Inductor Pointwise node."""
    from torch._inductor import ir
    from torch._inductor.virtualized import ops

    load, load_seed = table.make_loader(), seed.make_loader()
    count, per, columns = table.get_size()

    def const(value):
        return ops.constant(value, torch.int64)

    def low32(h):
        return ops.bitwise_and(h, const(_LOW32))

    # The hash in int64 with no product past 2^63, each kept to its low 32 bits: the same bits
    # as the int32 arithmetic (wrapping) eager runs. Not in int32: a product that wraps is
    # undefined behaviour in Inductor's scalar C++ (where the hash does not vary along the
    # vector, a one-column table), and those kernels gave other bytes than eager on 1 and 3
    # threads (not on 2).
    def hash_of(byte):
        if wide:
            h = ops.bitwise_xor(low32(ops.add(byte, load_seed(()))), ops.bitwise_right_shift(byte, const(32)))
        else:
            h = ops.bitwise_xor(byte, ops.bitwise_and(load_seed(()), const(0x7FFFFFFF)))
        h = ops.bitwise_xor(h, ops.bitwise_and(ops.bitwise_right_shift(h, const(16)), const(0xFFFF)))
        h = low32(ops.mul(h, const(_HASH_MUL_1)))
        h = ops.bitwise_xor(h, ops.bitwise_and(ops.bitwise_right_shift(h, const(15)), const(0x1FFFF)))
        h = low32(ops.mul(h, const(_HASH_MUL_2)))  # negative: the same low bits as 0x846CA68B
        return ops.bitwise_xor(h, ops.bitwise_and(ops.bitwise_right_shift(h, const(16)), const(0xFFFF)))

    def inner_fn(index):
        b, k, q = index
        t = load(index)
        if stochastic:
            from actfx.kernels.graph_pack import _LANE_STEP

            lane = ops.index_expr(1 + k * _LANE_STEP, torch.int64)
            h = low32(ops.mul(hash_of(ops.index_expr(b * columns + q, torch.int64)), lane))
            bits24 = ops.bitwise_and(ops.bitwise_right_shift(h, const(8)), const(0xFFFFFF))
            u = ops.mul(ops.to_dtype(bits24, torch.float32), ops.constant(1.0 / (1 << 24), torch.float32))
        else:
            u = ops.constant(0.5, torch.float32)
        code = ops.minimum(ops.floor(ops.add(t, u)), ops.constant(float(levels), torch.float32))
        return ops.to_dtype(code, torch.uint8)

    return ir.Pointwise.create(device=table.get_device(), dtype=torch.uint8, inner_fn=inner_fn,
                               ranges=list(table.get_size()))


@torch.library.custom_op("actfx::unpack_codes", mutates_args=())
def unpack_codes(packed: Tensor, lo: Tensor, step: Tensor, dtype: torch.dtype, bits: int, rows: bool,
                 per_group: int) -> Tensor:
    """The whole table ``packed`` holds, padding included: flat (``rows`` False), one value per
    code in order, groups of ``per_group``; in rows, ``[rows, columns]``, ``8 / bits`` rows to a
    byte, groups of ``per_group`` rows (``lo``/``step`` per group, or per group and column where
    they have two dimensions). ``lo`` and ``step`` empty: a mask (bits 1), as bool. The caller
    cuts the padding off and views the value's shape: every range here is a whole number of
    bytes and groups (Inductor's C++ loops dropped the last partial group of a range split by a
    floor division that does not divide it)."""
    from actfx.kernels import graph_pack

    return graph_pack.unpack_table(packed, lo, step, dtype, bits, rows, per_group)


@unpack_codes.register_fake
def _(packed, lo, step, dtype, bits, rows, per_group):
    per = 8 // bits
    shape = [packed.shape[0] * per, packed.shape[1]] if rows else [packed.numel() * per]
    return packed.new_empty(shape, dtype=dtype)


def _lower_unpack(packed, lo, step, dtype, bits: int, rows: bool, per_group: int):
    """Each code's byte, lane and group from its row and column, as one Inductor Pointwise node."""
    from torch._inductor import ir
    from torch._inductor.virtualized import ops
    from torch.utils._sympy.functions import FloorDiv, ModularIndexing

    load, load_lo, load_step = packed.make_loader(), lo.make_loader(), step.make_loader()
    per = 8 // bits
    mask = lo.get_numel() == 0
    size = packed.get_size()
    byte_row = len(size) == 1  # a flat mask's bytes: one row, no groups

    def inner_fn(index):
        if rows:
            r, q = index
            byte, lane = [FloorDiv(r, per), q], ModularIndexing(r, 1, per)
            group = [FloorDiv(r, per_group)] + ([q] if len(lo.get_size()) == 2 else [])
        else:
            (i,) = index
            byte = [FloorDiv(i, per)] if byte_row else [FloorDiv(i, per_group), FloorDiv(ModularIndexing(i, 1, per_group), per)]
            lane, group = ModularIndexing(i, 1, per), [FloorDiv(i, per_group)]
        shift = ops.index_expr(lane * bits, torch.int32)
        code = ops.bitwise_and(ops.bitwise_right_shift(ops.to_dtype(load(byte), torch.int32), shift),
                               ops.constant((1 << bits) - 1, torch.int32))
        if mask:
            return ops.to_dtype(code, torch.bool)
        value = ops.add(ops.mul(ops.to_dtype(code, torch.float32), load_step(group)), load_lo(group))
        return ops.to_dtype(value, dtype)

    ranges = [size[0] * per, size[1]] if rows else [packed.get_numel() * per]
    return ir.Pointwise.create(device=packed.get_device(), dtype=dtype, inner_fn=inner_fn, ranges=ranges)


def _register_lowering() -> None:
    from torch._inductor.lowering import register_lowering

    register_lowering(torch.ops.actfx.round_codes.default, type_promotion_kind=None)(_lower)
    register_lowering(torch.ops.actfx.unpack_codes.default, type_promotion_kind=None)(_lower_unpack)


_register_lowering()
