"""Triton kernels for group quantization: one pass to pack, one pass to unpack.

Same math, same fp32 operation order and same bytes (in deterministic mode) as
`reference.py`; the format is documented in `actfx/format.py`. Written for Triton 3.0 to 3.9 on
anything from T4 (sm75) up: fp32 arithmetic only (bf16 is handled as int16 bit patterns, so no
bf16 instructions are needed), no tensor cores, no inline asm or libdevice (so the kernels also run
under TRITON_INTERPRET=1), int64 offsets so tensors past 2**31 elements work.

This module imports triton at import time; `actfx.kernels` only imports it when a Triton path is
actually taken, so `import actfx` works without triton.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from .reference import inv_levels, stream_key
from .widths import TERNARY, code_bytes, levels, per_byte

__all__ = ["pack_groups_triton", "unpack_groups_triton"]

# Elements handled by one program: several small groups per program, one big group otherwise.
_ELEMS_PER_PROGRAM = 4096
_NUM_WARPS = 4


@triton.jit
def _round_bf16(v, UP: tl.constexpr):
    # Round fp32 `v` to a bf16 value (kept in fp32) toward +inf (UP) or -inf (not UP).
    # Dropping the low 16 bits rounds toward zero; `(bits + 0xFFFF) & 0xFFFF0000` rounds away.
    # Toward -inf = toward zero for v >= 0, away for v < 0; toward +inf is the mirror image.
    bits = v.to(tl.int32, bitcast=True)
    toward_zero = bits & -65536
    away = (bits + 0xFFFF) & -65536
    if UP:
        out = tl.where(bits < 0, toward_zero, away)
    else:
        out = tl.where(bits < 0, away, toward_zero)
    return out.to(tl.float32, bitcast=True)


@triton.jit
def _trit_weight(k):
    # 3**k for k = 0..4 (the base-3 weight of value k of a byte); 1 past the byte's five, slots
    # that hold no value (their codes are 0 and they are never stored; 1 keeps `//` defined)
    return tl.where(k == 1, 3, tl.where(k == 2, 9, tl.where(k == 3, 27, tl.where(k == 4, 81, 1))))


@triton.jit
def _pack_kernel(
    x_ptr,  # flat input [n]: fp32 / fp16, or bf16 viewed as int16 (X_IS_BF16)
    seed_ptr,  # int64 [1]: Philox seed, loaded here so the host never syncs
    codes_ptr,  # uint8 [num_groups, NB], output
    meta_ptr,  # int16 [num_groups, 2], output: bf16 bit patterns of (lo, step)
    n,  # number of real values
    num_groups,  # ceil(n / G)
    stream_key,  # int64 added to the seed: one Philox key per call site
    inv_levels,  # fp32 1 / LEVELS
    BITS: tl.constexpr,  # 1, 2, 4 or 8 (unused when TRITS)
    TRITS: tl.constexpr,  # three levels: PER_BYTE = 5 base-3 digits a byte
    PER_BYTE: tl.constexpr,  # codes per byte: 8 // BITS, or 5
    K_TILE: tl.constexpr,  # PER_BYTE rounded up to a power of two (tile width)
    NB: tl.constexpr,  # code bytes per group: G // PER_BYTE, or ceil(G / 5)
    NB_TILE: tl.constexpr,  # NB rounded up to a power of two
    LEVELS: tl.constexpr,  # 2**BITS - 1, or 2
    G: tl.constexpr,  # group size, power of two 32..4096
    BLOCK_G: tl.constexpr,  # groups per program
    X_IS_BF16: tl.constexpr,
    STOCHASTIC: tl.constexpr,
):
    # Tile [BLOCK_G, NB_TILE, K_TILE]: group, byte within the group, value within the byte
    # (value byte * PER_BYTE + k of its group; slots past PER_BYTE or G hold no value).
    # lo = round_down_bf16(min); step = round_up_bf16((max - lo) * inv_levels)
    # r = 1 / step; t = (x - lo) * r; f = floor(t); code = f + (u < t - f)  or  f + (t - f >= 0.5)
    INF: tl.constexpr = float("inf")

    rows = tl.program_id(0).to(tl.int64) * BLOCK_G + tl.arange(0, BLOCK_G).to(tl.int64)
    row_ok = rows < num_groups
    byte = tl.arange(0, NB_TILE)
    k = tl.arange(0, K_TILE)
    pos = byte[None, :, None] * PER_BYTE + k[None, None, :]
    offs = rows[:, None, None] * G + pos
    valid = (offs < n) & (k < PER_BYTE)[None, None, :] & (pos < G)

    if X_IS_BF16:
        raw = tl.load(x_ptr + offs, mask=valid, other=0)
        x = (raw.to(tl.int32) << 16).to(tl.float32, bitcast=True)
    else:
        x = tl.load(x_ptr + offs, mask=valid, other=0.0).to(tl.float32)

    # Group statistics over real values only. min/max reductions may drop NaNs, so count them.
    mn = tl.min(tl.min(tl.where(valid, x, INF), axis=2), axis=1)
    mx = tl.max(tl.max(tl.where(valid, x, -INF), axis=2), axis=1)
    has_nan = tl.max(tl.max((x != x).to(tl.int32), axis=2), axis=1) > 0

    lo = _round_bf16(mn, False)
    step = _round_bf16((mx - lo) * inv_levels, True)
    bad = has_nan | (step != step) | (step >= INF)
    const = (mx == mn) & (bad == 0)
    step = tl.where(const, 0.0, step)
    ok = (step > 0.0) & (step < INF)
    r = tl.where(ok, tl.math.div_rn(tl.full(step.shape, 1.0, tl.float32), tl.where(ok, step, 1.0)), 0.0)

    t = (x - lo[:, None, None]) * r[:, None, None]
    f = tl.floor(t)
    frac = t - f
    if STOCHASTIC:
        seed = tl.load(seed_ptr) + stream_key
        u = tl.rand(seed, offs)
        code = f + (u < frac).to(tl.float32)
    else:
        code = f + (frac >= 0.5).to(tl.float32)
    code = tl.minimum(code, LEVELS)
    keep = valid & (bad == 0)[:, None, None]
    ci = tl.where(keep, code, 0.0).to(tl.int32)

    if TRITS:
        packed = tl.sum(ci * _trit_weight(k)[None, None, :], axis=2)  # base 3, digit k = value k
    else:
        packed = tl.sum(ci << (k * BITS)[None, None, :], axis=2)  # disjoint bits: sum == or

    # Constant groups: exact fp32 bits of the value, little-endian, in bytes 0..3.
    first4 = byte < 4
    shift = tl.where(first4, byte, 0) * 8
    pattern = (mn.to(tl.int32, bitcast=True)[:, None] >> shift[None, :]) & 255
    packed = tl.where(const[:, None] & first4[None, :], pattern, packed)
    tl.store(
        codes_ptr + rows[:, None] * NB + byte[None, :],
        packed.to(tl.uint8),
        mask=row_ok[:, None] & (byte < NB)[None, :],
    )

    # bf16 patterns are the top halves of the (already bf16-valued) fp32 patterns; NaN -> 0x7FC0.
    lo_bits = tl.where(bad, 0x7FC0, lo.to(tl.int32, bitcast=True) >> 16).to(tl.int16)
    step_bits = tl.where(bad, 0x7FC0, step.to(tl.int32, bitcast=True) >> 16).to(tl.int16)
    tl.store(meta_ptr + rows * 2, lo_bits, mask=row_ok)
    tl.store(meta_ptr + rows * 2 + 1, step_bits, mask=row_ok)


@triton.jit
def _unpack_kernel(
    codes_ptr,  # uint8 [num_groups, NB]
    meta_ptr,  # int16 [num_groups, 2]: bf16 bit patterns of (lo, step)
    out_ptr,  # flat output [n]: fp32 / fp16, or bf16 viewed as int16 (OUT_BF16)
    n,  # number of real values
    num_groups,  # ceil(n / G)
    BITS: tl.constexpr,
    TRITS: tl.constexpr,
    PER_BYTE: tl.constexpr,
    K_TILE: tl.constexpr,
    NB: tl.constexpr,
    NB_TILE: tl.constexpr,
    LEVELS: tl.constexpr,
    G: tl.constexpr,
    BLOCK_G: tl.constexpr,
    OUT_BF16: tl.constexpr,
):
    # x_hat = lo + code * step (fp32). Constant groups (step == 0): lo = exact value from bytes
    # 0..3 and step = -0.0, so x_hat == value bit for bit. NaN step -> NaN for the whole group.
    # Tile and constexprs as in _pack_kernel.
    rows = tl.program_id(0).to(tl.int64) * BLOCK_G + tl.arange(0, BLOCK_G).to(tl.int64)
    row_ok = rows < num_groups
    byte = tl.arange(0, NB_TILE)
    k = tl.arange(0, K_TILE)

    packed = tl.load(codes_ptr + rows[:, None] * NB + byte[None, :], mask=row_ok[:, None] & (byte < NB)[None, :],
                     other=0)
    packed = packed.to(tl.int32)
    if TRITS:
        code = (packed[:, :, None] // _trit_weight(k)[None, None, :]) % 3
    else:
        code = (packed[:, :, None] >> (k * BITS)[None, None, :]) & LEVELS

    lo_bits = tl.load(meta_ptr + rows * 2, mask=row_ok, other=0).to(tl.int32) << 16
    step_bits = tl.load(meta_ptr + rows * 2 + 1, mask=row_ok, other=0).to(tl.int32) << 16
    first4 = byte < 4
    shift = tl.where(first4, byte, 0) * 8
    exact_bits = tl.sum(tl.where(first4[None, :], packed << shift[None, :], 0), axis=1)
    const = step_bits == 0
    lo = tl.where(const, exact_bits, lo_bits).to(tl.float32, bitcast=True)
    step = tl.where(const, -2147483648, step_bits).to(tl.float32, bitcast=True)  # -0.0

    val = lo[:, None, None] + code.to(tl.float32) * step[:, None, None]

    pos = byte[None, :, None] * PER_BYTE + k[None, None, :]
    offs = rows[:, None, None] * G + pos
    valid = (offs < n) & (k < PER_BYTE)[None, None, :] & (pos < G)
    if OUT_BF16:
        # round to nearest even, as torch's float -> bfloat16 (NaN -> 0x7FC0)
        b = val.to(tl.int32, bitcast=True)
        rounded = (b + 0x7FFF + ((b >> 16) & 1)) >> 16
        tl.store(out_ptr + offs, tl.where(val != val, 0x7FC0, rounded).to(tl.int16), mask=valid)
    else:
        tl.store(out_ptr + offs, val.to(out_ptr.dtype.element_ty), mask=valid)


def _launch_config(group_size: int, num_groups: int) -> tuple[int, tuple[int]]:
    block_g = max(1, _ELEMS_PER_PROGRAM // group_size)
    return block_g, (triton.cdiv(num_groups, block_g),)


@functools.cache
def _layout(bits, group_size: int) -> dict:
    """The kernels' width constexprs: 1, 2, 4, 8 bits tile exactly [NB, 8 / bits]; three levels
    tile [64, 8] for a group of 256 (52 bytes of 5 values), masking the slots that hold none.
    Cached: every launch reads it (the callers only unpack it, never change it)."""
    trits = bits == TERNARY
    lanes = per_byte(bits)
    nb = code_bytes(bits, group_size)
    return dict(BITS=0 if trits else bits, TRITS=trits, PER_BYTE=lanes, K_TILE=triton.next_power_of_2(lanes),
                NB=nb, NB_TILE=triton.next_power_of_2(nb), LEVELS=levels(bits), G=group_size)


def pack_groups_triton(
    x: torch.Tensor,
    seed: torch.Tensor,
    stream: int,
    bits: int,
    group_size: int,
    stochastic: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton version of `pack_groups_reference` (arguments validated by `actfx.kernels.pack_groups`)."""
    flat = x.reshape(-1)
    n = flat.numel()
    num_groups = triton.cdiv(n, group_size)
    codes = torch.empty(num_groups, code_bytes(bits, group_size), dtype=torch.uint8, device=x.device)
    meta = torch.empty(num_groups, 2, dtype=torch.bfloat16, device=x.device)
    if n == 0:
        return codes, meta
    is_bf16 = flat.dtype == torch.bfloat16
    if is_bf16:
        flat = flat.view(torch.int16)
    block_g, grid = _launch_config(group_size, num_groups)
    _pack_kernel[grid](
        flat, seed, codes, meta.view(torch.int16), n, num_groups, stream_key(stream), inv_levels(bits),
        **_layout(bits, group_size), BLOCK_G=block_g, X_IS_BF16=is_bf16, STOCHASTIC=stochastic,
        num_warps=_NUM_WARPS, enable_fp_fusion=False,
    )
    return codes, meta


def unpack_groups_triton(
    codes: torch.Tensor,
    meta: torch.Tensor,
    shape: Sequence[int],
    dtype: torch.dtype,
    bits: int,
    group_size: int,
) -> torch.Tensor:
    """Triton version of `unpack_groups_reference`; codes and meta must be contiguous."""
    out = torch.empty(tuple(shape), dtype=dtype, device=codes.device)
    n = out.numel()
    if n == 0:
        return out
    num_groups = codes.shape[0]
    is_bf16 = dtype == torch.bfloat16
    block_g, grid = _launch_config(group_size, num_groups)
    _unpack_kernel[grid](
        codes, meta.view(torch.int16), out.view(torch.int16) if is_bf16 else out, n, num_groups,
        **_layout(bits, group_size), BLOCK_G=block_g, OUT_BF16=is_bf16,
        num_warps=_NUM_WARPS, enable_fp_fusion=False,
    )
    return out
