"""Pure-PyTorch group quantization: the CPU path and the oracle the Triton kernels are tested against.

The bit layout and the error bound are documented in `actfx/format.py`. This file follows that
description step by step, with the same fp32 operations in the same order as the Triton kernel, so
that both produce identical bytes in deterministic mode.

It is also the CPU training path, so it is written for speed: few passes over the data, in-place
ops on temporaries it owns, and never a write into the caller's tensor.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from .widths import TERNARY, TRIT_WEIGHTS, TRITS_PER_BYTE, code_bytes, levels

__all__ = [
    "pack_groups_reference",
    "unpack_groups_reference",
    "mix_seed",
    "inv_levels",
    "round_bf16_down",
    "round_bf16_up",
    "store_constants",
    "group_lo_step",
]

# Keep the low 16 bits of an fp32 pattern out: what is left is exactly a bfloat16 value.
_HI_MASK = -65536  # 0xFFFF0000 as int32
_LO_ONES = 0xFFFF
# Added (times the stream id) to the seed, so streams get different Philox keys (golden-ratio constant).
_STREAM_MULT = 0x9E3779B97F4A7C15
_MASK64 = (1 << 64) - 1
_CHUNK_VALUES = 1 << 19  # 2 MB of fp32: the fastest of 128K..16M on a 2-core CPU
_NOISE_BITS = 15  # resolution of the reference's rounding noise, see `_add_noise_and_round`
_BF16_NAN = 0x7FC0  # the canonical quiet NaN, stored for both lo and step of non-finite groups


def mix_seed(seed: int, stream: int) -> int:
    """Philox key for (seed, stream), as a signed int64: `seed + stream * golden` wrapped to 64 bits.

    The Triton kernel adds the same int64 (see `stream_key`) to the seed it loads on the device.
    """
    return _to_int64(seed + stream_key(stream))


def stream_key(stream: int) -> int:
    """The int64 offset that `stream` adds to the seed (wrapping arithmetic)."""
    return _to_int64(stream * _STREAM_MULT)


def _to_int64(v: int) -> int:
    v &= _MASK64
    return v - (1 << 64) if v >= (1 << 63) else v


def inv_levels(bits: int | float) -> float:
    """fp32 `1 / L` (L = 2**bits - 1, or 2 for three levels), correctly rounded, returned as a
    Python float (exact in fp32)."""
    one = torch.tensor(1.0, dtype=torch.float32)
    return (one / float(levels(bits))).item()


def round_bf16_down(v: torch.Tensor) -> torch.Tensor:
    """Round fp32 values toward -inf to the nearest bfloat16 value; result stays fp32.

    Dropping the low 16 bits of the pattern rounds toward zero: that is "down" for positive
    numbers; negative numbers with a non-zero tail need their magnitude bumped up one bf16 ulp,
    which `(bits + 0xFFFF) & 0xFFFF0000` does (carrying into the exponent when needed).
    """
    bits = v.view(torch.int32)
    away = torch.bitwise_and(bits + _LO_ONES, _HI_MASK)
    return torch.where(bits < 0, away, bits & _HI_MASK).view(torch.float32)


def round_bf16_up(v: torch.Tensor) -> torch.Tensor:
    """Round fp32 values toward +inf to bfloat16 (mirror image of `round_bf16_down`)."""
    bits = v.view(torch.int32)
    away = torch.bitwise_and(bits + _LO_ONES, _HI_MASK)
    return torch.where(bits < 0, bits & _HI_MASK, away).view(torch.float32)


def non_finite_groups(mn: torch.Tensor, mx: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
    """Groups stored as NaN: a NaN or infinity among their values, or a range beyond fp32 / bf16.
    Read from the statistics too, not only from the rounded step: rounding a NaN's bits can give
    a number (CUDA's NaN, 0x7FFFFFFF, rounded up to bf16 is -0.0; seen on an H200)."""
    return ~(torch.isfinite(step) & torch.isfinite(mn) & torch.isfinite(mx))


class _Scratch:
    """Temporaries reused from chunk to chunk within one call.

    A fresh multi-MB CPU tensor is page-faulted in on first touch, which costs more than the
    arithmetic done on it (~1.5 ms per 2 MB here); reusing a handful of buffers avoids that.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.buffers: dict[str, torch.Tensor] = {}

    def get(self, name: str, numel: int, dtype: torch.dtype) -> torch.Tensor:
        buf = self.buffers.get(name)
        if buf is None or buf.numel() < numel or buf.dtype != dtype:
            buf = self.buffers[name] = torch.empty(numel, dtype=dtype, device=self.device)
        return buf[:numel]


def _chunk_rows(num_groups: int, group_size: int, device: torch.device) -> int:
    """Groups per chunk: ~512K values on CPU, so a chunk's temporaries stay in cache (about 2x
    faster than whole-tensor passes at 64 MB); everything at once on other devices (fewer launches)."""
    if device.type != "cpu":
        return num_groups
    return max(1, _CHUNK_VALUES // group_size)


def _chunk_groups(
    xs: torch.Tensor, rows: int, group_size: int, owned: bool, scratch: _Scratch
) -> tuple[torch.Tensor, bool]:
    """A chunk of the flat input as fp32 [rows, G]; whether we may overwrite it.

    A partial last group is padded with copies of the chunk's last value, so padding never changes
    the group's min or max; its codes are zeroed after quantization.
    """
    pad = rows * group_size - xs.numel()
    if pad == 0 and xs.dtype == torch.float32:
        return xs.view(rows, group_size), owned
    out = scratch.get("x", rows * group_size, torch.float32)
    out[: xs.numel()].copy_(xs)
    if pad:
        out[xs.numel() :].copy_(xs[-1:].expand(pad))
    return out.view(rows, group_size), True


# Per bits (< 8): the integer "lane" type that holds one output byte's worth (8 / bits) of uint8 codes.
_LANE_DTYPE = {4: torch.int16, 2: torch.int32, 1: torch.int64}


def _lane_mask(bits: int, s: int) -> int:
    """Chunks of bits*s low bits every 8*s bits across one lane, as a signed int of the lane's width."""
    width = 8 * (8 // bits)
    mask = sum(((1 << (bits * s)) - 1) << pos for pos in range(0, width, 8 * s))
    return mask - (1 << width) if mask >= 1 << (width - 1) else mask


def _merge_stages(bits: int) -> list[tuple[int, int, int]]:
    """(shift, mask_before, mask_after) of the stages that pack a lane's codes into its low byte.

    Stage s moves chunks of bits*s bits that sit 8*s bits apart next to each other:
    `v = (v | v >> shift) & mask_after` halves their number; `v = (v | v << shift) & mask_before`
    undoes it (for unpacking, stages reversed).
    """
    stages = []
    s = 1
    while s < 8 // bits:
        stages.append(((8 - bits) * s, _lane_mask(bits, s), _lane_mask(bits, 2 * s)))
        s *= 2
    return stages


def _pack_bytes(codes: torch.Tensor, bits: int, out: torch.Tensor, scratch: _Scratch) -> None:
    """uint8 codes [n] (each < 2**bits) -> `out` bytes [n * bits // 8], LSB first.

    The 8/bits codes of one output byte are adjacent bytes, i.e. one int16/32/64 lane (little
    endian); a few shift-or-mask stages over the lanes gather them into each lane's low byte.
    """
    if bits == 8:
        out.copy_(codes)
        return
    a = codes.view(_LANE_DTYPE[bits])
    b = scratch.get("lane", a.numel(), a.dtype)
    for shift, _, mask_after in _merge_stages(bits):
        torch.bitwise_right_shift(a, shift, out=b)
        b.bitwise_or_(a).bitwise_and_(mask_after)
        a, b = b, a
    out.copy_(a)  # the low byte of each lane; the final mask is 0xFF


def _unpack_bytes(codes: torch.Tensor, bits: int, scratch: _Scratch) -> torch.Tensor:
    """bytes uint8 [m] -> codes uint8 [m * 8 // bits] (inverse of `_pack_bytes`)."""
    if bits == 8:
        return codes
    a = scratch.get("lane_a", codes.numel(), _LANE_DTYPE[bits])
    b = scratch.get("lane_b", codes.numel(), _LANE_DTYPE[bits])
    a.copy_(codes)
    for shift, mask_before, _ in reversed(_merge_stages(bits)):
        torch.bitwise_left_shift(a, shift, out=b)
        b.bitwise_or_(a).bitwise_and_(mask_before)
        a, b = b, a
    return a.view(torch.uint8)


def _pack_trits(codes: torch.Tensor, out: torch.Tensor) -> None:
    """uint8 codes [rows, G] (each < 3) -> `out` [rows, ceil(G / 5)]: value i of a group in
    byte i // 5 as base-3 digit i % 5 (least significant first); a group's last byte pads with 0."""
    rows, group_size = codes.shape
    nbytes = out.shape[1]
    padded = torch.zeros(rows, nbytes * TRITS_PER_BYTE, dtype=torch.int16, device=codes.device)
    padded[:, :group_size] = codes
    weights = torch.tensor(TRIT_WEIGHTS, dtype=torch.int16, device=codes.device)
    out.copy_((padded.view(rows, nbytes, TRITS_PER_BYTE) * weights).sum(2))


def _unpack_trits(codes: torch.Tensor, group_size: int) -> torch.Tensor:
    """bytes uint8 [rows, ceil(G / 5)] -> codes uint8 [rows, G] (inverse of `_pack_trits`)."""
    rows, nbytes = codes.shape
    weights = torch.tensor(TRIT_WEIGHTS, dtype=torch.int16, device=codes.device)
    digits = torch.div(codes.to(torch.int16)[:, :, None], weights, rounding_mode="floor").remainder_(3)
    return digits.view(rows, nbytes * TRITS_PER_BYTE)[:, :group_size].to(torch.uint8)


def _add_noise_and_round(f: torch.Tensor, frac: torch.Tensor, gen: torch.Generator, scratch: _Scratch) -> None:
    """f += (u < frac), u ~ U[0, 1) at 15-bit resolution: u = (k + 1/2) / 2**15.

    One 31-bit `random_` draw feeds two values (its two int16 halves, 15 bits each): 2-3x faster
    on CPU than `torch.rand`, which costs one generator call per value and was two thirds of a
    stochastic pack. Rounding up then happens with probability within 2**-16 of frac, i.e. a bias
    of at most 2**-16 step per value, far below the noise itself (std up to step / 2).
    """
    n = f.numel()
    draws = scratch.get("draws", n // 2, torch.int32).random_(generator=gen)
    k = draws.view(torch.int16).bitwise_and_((1 << _NOISE_BITS) - 1)
    u = scratch.get("u", n, torch.float32).view(f.shape)
    u.view(-1).copy_(k)
    u.add_(0.5).mul_(2.0**-_NOISE_BITS)
    f.add_(u.lt_(frac))


def _quantize_chunk(
    groups: torch.Tensor, owned: bool, n_real: int, bits: int, gen: torch.Generator | None,
    codes_out: torch.Tensor, meta_out: torch.Tensor, scratch: _Scratch,
) -> None:
    """Quantize fp32 [rows, G] into `codes_out` [rows, code_bytes(bits, G)] and `meta_out` (int16
    view) [rows, 2]."""
    rows, group_size = groups.shape
    numel = rows * group_size
    top = levels(bits)
    mn, mx = torch.amin(groups, dim=1), torch.amax(groups, dim=1)  # 10x faster than aminmax on CPU
    lo = round_bf16_down(mn)
    step = round_bf16_up((mx - lo).mul_(inv_levels(bits)))
    bad = non_finite_groups(mn, mx, step)
    const = (mx == mn).logical_and_(~bad)
    step.masked_fill_(const, 0.0)
    ok = step > 0  # False for NaN
    recip = torch.where(ok, 1.0 / torch.where(ok, step, 1.0), 0.0)  # r = 1/step, IEEE division

    # t = (x - lo) * r ; f = floor(t) ; frac = t - f (exact for t >= 0)
    if owned:
        t = groups.sub_(lo[:, None])
    else:
        t = torch.sub(groups, lo[:, None], out=scratch.get("t", numel, torch.float32).view(rows, group_size))
    t.mul_(recip[:, None])
    f = torch.floor(t, out=scratch.get("f", numel, torch.float32).view(rows, group_size))
    frac = t.sub_(f)
    if gen is not None:
        _add_noise_and_round(f, frac, gen, scratch)  # code = f + (u < frac)
    else:
        f.add_(frac.ge_(0.5))  # code = f + (frac >= 0.5)
    f.clamp_max_(float(top))  # t >= 0 already; t can exceed `levels` by float rounding
    if bool(bad.any()):
        f.masked_fill_(bad[:, None], 0.0)  # NaN would not convert to an integer code
    if n_real < numel:
        f.view(-1)[n_real:] = 0.0
    codes = scratch.get("codes", numel, torch.uint8)
    codes.copy_(f.view(-1))
    if bits == TERNARY:
        _pack_trits(codes.view(rows, group_size), codes_out)
    else:
        _pack_bytes(codes, bits, codes_out.view(-1), scratch)

    store_constants(codes_out, const, mn)
    # bf16 patterns are the top halves of the (already bf16-valued) fp32 patterns; NaN -> 0x7FC0.
    meta_out[:, 0] = lo.view(torch.int32).bitwise_right_shift(16)
    meta_out[:, 1] = step.view(torch.int32).bitwise_right_shift(16)
    meta_out.masked_fill_(bad[:, None], _BF16_NAN)


def pack_groups_reference(
    x: torch.Tensor,
    seed: torch.Tensor,
    stream: int,
    bits: int,
    group_size: int,
    stochastic: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize x to `bits` per value in groups of `group_size`; returns (codes uint8, meta bf16).

    Arguments are assumed validated by the caller (`actfx.kernels.pack_groups`). Stochastic noise
    comes from a private generator seeded with `mix_seed(seed, stream)`; the global RNG is untouched.
    """
    flat = x.reshape(-1)
    flat_owned = flat.data_ptr() != x.data_ptr()  # reshape copied a non-contiguous x: ours
    n, G, device = flat.numel(), group_size, x.device
    num_groups = -(-n // G)
    codes = torch.empty(num_groups, code_bytes(bits, G), dtype=torch.uint8, device=device)
    meta = torch.empty(num_groups, 2, dtype=torch.bfloat16, device=device)
    if n == 0:
        return codes, meta
    gen = None
    if stochastic:
        gen = torch.Generator(device=device)
        gen.manual_seed(mix_seed(int(seed.item()), stream) & _MASK64)
    scratch = _Scratch(device)
    meta_bits = meta.view(torch.int16)
    step_rows = _chunk_rows(num_groups, G, device)
    for g0 in range(0, num_groups, step_rows):
        g1 = min(num_groups, g0 + step_rows)
        xs = flat[g0 * G : min(n, g1 * G)]
        groups, owned = _chunk_groups(xs, g1 - g0, G, flat_owned, scratch)
        _quantize_chunk(groups, owned, xs.numel(), bits, gen, codes[g0:g1], meta_bits[g0:g1], scratch)
    return codes, meta


def unpack_groups_reference(
    codes: torch.Tensor,
    meta: torch.Tensor,
    shape: Sequence[int],
    dtype: torch.dtype,
    bits: int,
    group_size: int,
) -> torch.Tensor:
    """Dequantize `x_hat = lo + code * step` in fp32, then cast; constant and NaN groups as documented."""
    n, G = math.prod(shape), group_size
    out = torch.empty(n, dtype=dtype, device=codes.device)
    num_groups = codes.shape[0]
    scratch = _Scratch(codes.device)
    step_rows = _chunk_rows(num_groups, G, codes.device)
    for g0 in range(0, num_groups, step_rows):
        g1 = min(num_groups, g0 + step_rows)
        dest = out[g0 * G : min(n, g1 * G)]
        direct = dtype == torch.float32 and dest.numel() == (g1 - g0) * G
        vals = dest if direct else scratch.get("vals", (g1 - g0) * G, torch.float32)
        _dequantize_chunk(codes[g0:g1], meta[g0:g1], bits, vals.view(g1 - g0, G), scratch)
        if not direct:
            dest.copy_(vals[: dest.numel()])
    return out.view(tuple(shape))


def store_constants(codes: torch.Tensor, const: torch.Tensor, mn: torch.Tensor) -> None:
    """Constant groups: the constant's exact fp32 bits, little-endian, in the group's first 4 bytes."""
    if bool(const.any()):
        codes[const, :4] = mn[const].contiguous().view(torch.uint8).view(-1, 4)


def group_lo_step(codes: torch.Tensor, meta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per group, fp32 (lo, step) with `x_hat = lo + code * step` exact for constant groups too.

    A constant group (step 0) reads its exact value from its code bytes and gets step -0.0:
    `c + code * -0.0` is exactly c for every c, including -0.0. NaN groups keep a NaN step.
    """
    m = meta.to(torch.float32)
    lo, step = m[:, 0], m[:, 1]
    const = step == 0
    if bool(const.any()):
        exact = codes[:, :4].contiguous().view(torch.float32).view(-1)
        lo = torch.where(const, exact, lo)
        step = torch.where(const, -0.0, step)
    return lo, step


def _dequantize_chunk(
    codes: torch.Tensor, meta: torch.Tensor, bits: int, out: torch.Tensor, scratch: _Scratch
) -> None:
    """codes [rows, code_bytes(bits, G)] + meta [rows, 2] -> fp32 `out` [rows, G]."""
    lo, step = group_lo_step(codes, meta)
    if bits == TERNARY:
        out.copy_(_unpack_trits(codes, out.shape[1]))
    else:
        out.view(-1).copy_(_unpack_bytes(codes.reshape(-1), bits, scratch))
    out.mul_(step[:, None]).add_(lo[:, None])  # NaN step -> NaN for the whole group
