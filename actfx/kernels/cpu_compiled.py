"""The CPU training path: the reference's pack/unpack math as single fused loops, via torch.compile.

Why: the eager reference (`reference.py`) makes ~15 passes over every saved activation, about
6 ns per value on one core, which made a ResNet-50 CPU step 1.9x slower than plain PyTorch.
Written as one expression per output byte (the 8/bits codes of a byte computed side by side, the
rounding noise hashed from the value's position in registers), Inductor's C++ backend turns a pack
into one reduction plus one loop and an unpack into one loop: 3-5x faster than the reference
(`python benchmarks/kernels.py --device cpu`).

Bytes: deterministic mode gives exactly the reference's bytes (tests/test_cpu_compiled.py).
Stochastic rounding here takes its noise from a counter-based integer hash of (seed, stream,
position) at 24-bit resolution instead of the reference's torch.Generator, so those bytes differ
from the reference's; both are unbiased (P(round up) = frac to within 2**-24 here).

If Inductor cannot compile here (no C++ compiler), the first call warns once and every call takes
the reference. Each (bits, stochastic) pair has its own small wrapper function, so Dynamo's
per-function recompile limit (8) is not reached by the combinations one process uses; the
compiled functions are cached for the process, like torch.compile's own caches (no settings
live there: two converted models share only compiled code).
"""

from __future__ import annotations

import contextlib
import functools
import math
import warnings

import torch

from .reference import (
    group_lo_step,
    inv_levels,
    mix_seed,
    pack_groups_reference,
    round_bf16_down,
    round_bf16_up,
    store_constants,
)
from .widths import TERNARY, TRIT_WEIGHTS, TRITS_PER_BYTE, levels

__all__ = [
    "compiled_cpu_works",
    "pack_groups_compiled",
    "unpack_groups_compiled",
    "pack_bits_compiled",
    "scale_by_bits_compiled",
    "affine_scale_by_bits_compiled",
    "pack_bits_between_compiled",
    "MIN_COMPILED_VALUES",
]

# Below this many values a compiled call's fixed cost (~50 us of guards) is not worth it.
MIN_COMPILED_VALUES = 1 << 14
# Positions are hashed as int32: larger tensors take the reference path.
_MAX_VALUES = (1 << 31) - (1 << 16)
_BF16_NAN = 0x7FC0
_HASH_MULT = 0x45D9F3B  # the multiplier of a well-tested 32-bit integer finaliser (two rounds)
_MASK64 = (1 << 64) - 1


# ---------------------------------------------------------------------------------------- noise


def _hash32(h: torch.Tensor) -> torch.Tensor:
    """Integer finaliser on int32 lanes (wrapping multiply; `>>` made logical by masking)."""
    h = (h ^ ((h >> 16) & 0xFFFF)) * _HASH_MULT
    h = (h ^ ((h >> 16) & 0xFFFF)) * _HASH_MULT
    return h ^ ((h >> 16) & 0xFFFF)


def _uniform(position: torch.Tensor, mult: torch.Tensor, add: torch.Tensor) -> torch.Tensor:
    """u in (0, 1) at 24-bit resolution, u = (k + 1/2) / 2**24, a function of the int32 position.

    `position * mult + add` (mult odd) is a different permutation of the positions per key, so
    two packs never see shifted copies of each other's noise.
    """
    k = (_hash32(position * mult + add) >> 8) & 0xFFFFFF
    return k.float() * 2.0**-24 + 2.0**-25


def noise_keys(seed: int, stream: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(mult, add) as int32 0-d tensors from (seed, stream): tensors, so new seeds never recompile."""
    z = mix_seed(seed, stream) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64  # splitmix64 finaliser
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    z ^= z >> 31
    mult, add = (z & 0xFFFFFFFF) | 1, z >> 32
    to_i32 = lambda v: v - (1 << 32) if v >= 1 << 31 else v  # noqa: E731
    return (torch.tensor(to_i32(mult), dtype=torch.int32), torch.tensor(to_i32(add), dtype=torch.int32))


# ------------------------------------------------------------------------------------ pack body


def _group_range(x: torch.Tensor, bits):
    """Per row of fp32 [R, G]: (min, lo, step, bad, const, 1/step) as `reference._quantize_chunk`
    computes them (step 0 for constant rows, 1/step 0 where step is 0 or not finite)."""
    mn, mx = x.amin(dim=1), x.amax(dim=1)
    lo = round_bf16_down(mn)
    step = round_bf16_up((mx - lo) * inv_levels(bits))
    bad = ~torch.isfinite(step)
    const = (mx == mn) & ~bad
    step = torch.where(const, 0.0, step)
    ok = step > 0
    recip = torch.where(ok, 1.0 / torch.where(ok, step, 1.0), 0.0)
    return mn, lo, step, bad, const, recip


def _meta(lo: torch.Tensor, step: torch.Tensor, bad: torch.Tensor) -> torch.Tensor:
    """int16 [R, 2]: the bf16 patterns of lo and step (the top halves of their fp32 patterns), NaN's for bad rows."""
    meta = torch.stack((lo.view(torch.int32) >> 16, step.view(torch.int32) >> 16), dim=1)
    return torch.where(bad[:, None], _BF16_NAN, meta).to(torch.int16)


def _pack_body(x: torch.Tensor, mult, add, bits: int, stochastic: bool):
    """fp32 [R, G] -> codes uint8 [R, G*bits/8], meta int16 [R, 2], const bool [R], min fp32 [R].

    Same fp32 operations in the same order as `reference._quantize_chunk`; output byte j of a
    row holds the codes of values j*per .. j*per+per-1 (per = 8 / bits), least significant first.
    """
    rows, group = x.shape
    per = 8 // bits
    mn, lo, step, bad, const, recip = _group_range(x, bits)
    lo_c, recip_c, bad_c = lo[:, None], recip[:, None], bad[:, None]
    xv = x.view(rows, group // per, per)
    if stochastic:
        first = torch.arange(rows * (group // per), dtype=torch.int32, device=x.device)
        first = first.view(rows, group // per) * per
    packed = None
    for k in range(per):
        t = (xv[:, :, k] - lo_c) * recip_c
        f = torch.floor(t)
        frac = t - f
        if stochastic:
            f = f + (_uniform(first + k, mult, add) < frac).float()
        else:
            f = f + (frac >= 0.5).float()
        f = torch.where(bad_c, 0.0, f.clamp_max(float((1 << bits) - 1)))
        code = f.to(torch.int32) << (bits * k)
        packed = code if packed is None else packed | code
    return packed.to(torch.uint8), _meta(lo, step, bad), const, mn


def _pack_trits_body(x: torch.Tensor, mult, add, stochastic: bool):
    """Three levels: fp32 [R, G] -> codes uint8 [R, ceil(G / 5)], meta, const, min as `_pack_body`.

    The same fp32 operations as `reference._quantize_chunk`. The row's whole bytes (five values
    each, read as a strided view) and its last partial byte are quantized side by side and
    summed in base 3, as `_pack_body` does with shifts: no codes table is written (padding the
    codes to whole bytes and summing them ran 3.4x slower than 2 bits at 64 MB).
    """
    rows, group = x.shape
    mn, lo, step, bad, const, recip = _group_range(x, TERNARY)
    lo_c, recip_c, bad_c = lo[:, None], recip[:, None], bad[:, None]
    whole, rest = divmod(group, TRITS_PER_BYTE)

    def digits(values: torch.Tensor, position: torch.Tensor | None) -> torch.Tensor:
        t = (values - lo_c) * recip_c
        f = torch.floor(t)
        frac = t - f
        f = f + ((_uniform(position, mult, add) < frac) if stochastic else (frac >= 0.5)).float()
        return torch.where(bad_c, 0.0, f.clamp_max(float(levels(TERNARY)))).to(torch.int32)

    rows_at = torch.arange(rows, dtype=torch.int32, device=x.device)[:, None] * group
    body = x[:, : whole * TRITS_PER_BYTE].view(rows, whole, TRITS_PER_BYTE)
    starts = rows_at + torch.arange(whole, dtype=torch.int32, device=x.device)[None, :] * TRITS_PER_BYTE
    packed = sum(digits(body[:, :, k], starts + k) * TRIT_WEIGHTS[k] for k in range(TRITS_PER_BYTE))
    if rest:
        tail = sum(digits(x[:, whole * TRITS_PER_BYTE + k, None], rows_at + whole * TRITS_PER_BYTE + k)
                   * TRIT_WEIGHTS[k] for k in range(rest))
        packed = torch.cat([packed, tail], dim=1)
    return packed.to(torch.uint8), _meta(lo, step, bad), const, mn


# One wrapper per (bits, stochastic): each is its own code object, so each has its own recompile budget.
def _pack_1(x, mult, add):
    return _pack_body(x, mult, add, 1, False)


def _pack_2(x, mult, add):
    return _pack_body(x, mult, add, 2, False)


def _pack_4(x, mult, add):
    return _pack_body(x, mult, add, 4, False)


def _pack_8(x, mult, add):
    return _pack_body(x, mult, add, 8, False)


def _pack_1s(x, mult, add):
    return _pack_body(x, mult, add, 1, True)


def _pack_2s(x, mult, add):
    return _pack_body(x, mult, add, 2, True)


def _pack_4s(x, mult, add):
    return _pack_body(x, mult, add, 4, True)


def _pack_8s(x, mult, add):
    return _pack_body(x, mult, add, 8, True)


def _pack_3(x, mult, add):
    return _pack_trits_body(x, mult, add, False)


def _pack_3s(x, mult, add):
    return _pack_trits_body(x, mult, add, True)


_PACK = {
    (1, False): _pack_1, (2, False): _pack_2, (4, False): _pack_4, (8, False): _pack_8,
    (1, True): _pack_1s, (2, True): _pack_2s, (4, True): _pack_4s, (8, True): _pack_8s,
    (TERNARY, False): _pack_3, (TERNARY, True): _pack_3s,
}


# ---------------------------------------------------------------------------------- unpack body


def _unpack_body(codes: torch.Tensor, lo: torch.Tensor, step: torch.Tensor, bits: int) -> torch.Tensor:
    """codes uint8 [R, B] + per-row fp32 lo, step -> fp32 [R, B * 8/bits]: lo + code * step.

    Written as [R, B, per] (the per = 8/bits values of each byte along a short static last
    dim), which Inductor vectorizes well; per-shift planes stacked afterwards ran 3x slower.
    """
    rows, nbytes = codes.shape
    per = 8 // bits
    shift = torch.arange(per, dtype=torch.int32, device=codes.device) * bits
    c = (codes[:, :, None].to(torch.int32) >> shift) & ((1 << bits) - 1)
    return (c.float() * step[:, None, None] + lo[:, None, None]).view(rows, nbytes * per)


def _unpack_1(codes, lo, step):
    return _unpack_body(codes, lo, step, 1)


def _unpack_2(codes, lo, step):
    return _unpack_body(codes, lo, step, 2)


def _unpack_4(codes, lo, step):
    return _unpack_body(codes, lo, step, 4)


def _unpack_8(codes, lo, step):
    return _unpack_body(codes, lo, step, 8)


def _unpack_3(codes, lo, step):
    """Three levels: codes uint8 [R, B] -> fp32 [R, G] (digit k of byte j is value 5j + k; G, a
    power of two, is the largest at most 5 B: B = ceil(G / 5) tells the group size apart).

    Digits by repeated division by 3 written as ``(q * 171) >> 9`` (exact for q < 512): Inductor
    vectorizes it, where integer division ran 6x slower than a 2-bit unpack."""
    rows, nbytes = codes.shape
    group = 1 << ((nbytes * TRITS_PER_BYTE).bit_length() - 1)
    q = codes.to(torch.int32)
    digits = []
    for _ in range(TRITS_PER_BYTE):
        nxt = (q * 171) >> 9
        digits.append(q - 3 * nxt)
        q = nxt
    c = torch.stack(digits, dim=2).view(rows, nbytes * TRITS_PER_BYTE)[:, :group]
    return c.float() * step[:, None] + lo[:, None]


_UNPACK = {1: _unpack_1, 2: _unpack_2, 4: _unpack_4, 8: _unpack_8, TERNARY: _unpack_3}


# ------------------------------------------------------------------------------------ bit masks


def _pack_bits_body(mask: torch.Tensor) -> torch.Tensor:
    """bool [n/8, 8] -> uint8 [n/8], bit k of byte i = mask[i, k]."""
    m = mask.to(torch.int32)
    packed = m[:, 0]
    for k in range(1, 8):
        packed = packed | (m[:, k] << k)
    return packed.to(torch.uint8)


def _bits_of(codes: torch.Tensor) -> torch.Tensor:
    """uint8 codes [...] -> int32 [..., 8]: bit k of each byte along a short static last dim."""
    return (codes[..., None].to(torch.int32) >> torch.arange(8, dtype=torch.int32, device=codes.device)) & 1


def _channel_affine(x: torch.Tensor, a, b) -> torch.Tensor:
    """x [N, C, S/8, 8] * a[c] + b[c]: a multiply then an add, as `kernels.channel_affine` does."""
    return x * a[None, :, None, None] + b[None, :, None, None]


def _affine_scale_by_bits_body(x: torch.Tensor, a, b, codes: torch.Tensor, inside, outside) -> torch.Tensor:
    """(x * a[c] + b[c]) * (inside where the bit is set, outside elsewhere), in one pass.

    x [N, C, S/8, 8] fp32, a and b [C], codes uint8 [N, C, S/8] (S, the values per channel, a
    multiple of 8, so each mask byte covers one channel's values): BatchNorm's affine map and the
    ReLU mask that rebuild a conv's input from BatchNorm's unpacked input.
    """
    return _channel_affine(x, a, b) * torch.where(_bits_of(codes) != 0, inside, outside)


def _affine_add_scale_by_bits_body(x: torch.Tensor, a, b, addend: torch.Tensor, codes: torch.Tensor,
                                   inside, outside) -> torch.Tensor:
    """((x * a[c] + b[c]) + addend) * mask scale: a residual block's output rebuilt in one pass
    (BatchNorm's affine on the branch, plus the shortcut, then the ReLU mask); shapes as above."""
    return (_channel_affine(x, a, b) + addend) * torch.where(_bits_of(codes) != 0, inside, outside)


def _pack_above_body(values: torch.Tensor, lo) -> torch.Tensor:
    """values [n/8, 8] -> uint8 [n/8] of `values > lo` (ReLU's mask straight from its output)."""
    return _pack_bits_body(values > lo)


def _pack_between_body(values: torch.Tensor, lo, hi) -> torch.Tensor:
    """values [n/8, 8] -> uint8 [n/8] of `lo < values < hi` (ReLU6 / hardtanh)."""
    return _pack_bits_body((values > lo) & (values < hi))


def _scale_by_bits_body(values: torch.Tensor, codes: torch.Tensor, inside, outside) -> torch.Tensor:
    """values [n/8, 8] * (inside where the bit is set, outside elsewhere); codes uint8 [n/8]."""
    return values * torch.where(_bits_of(codes) != 0, inside, outside)


# ------------------------------------------------------------------------------- compiled cache


# Inductor inlines a per-row value (lo, step, 1/step) into every lane that reads it, and a 1-bit
# pack's 8 lanes made its loop body so large that generating its code took 28 s on this CPU
# (2-bit: 15 s). Storing nodes of more than 16 ops that several lanes read (Inductor's default:
# 30) stores those per-row values: 8 s and 5 s, at the same run time (65536 groups of 64).
_INDUCTOR_OPTIONS = {"realize_opcount_threshold": 16}


@functools.cache
def _compiled(fn):
    """torch.compile'd `fn` (Inductor), rows dynamic via `maybe_mark_dynamic` at call time."""
    return torch.compile(fn, fullgraph=True, dynamic=False, options=_INDUCTOR_OPTIONS)


def _call(fn, *tensors, dynamic_dims: int = 1):
    """Run the compiled `fn`; the first `dynamic_dims` dims of every tensor argument are sizes that
    vary from call to call (rows; for the BatchNorm rebuilds also channels and spatial size), so
    one compilation serves them all."""
    for t in tensors:
        for d in range(min(dynamic_dims, t.dim())):
            torch._dynamo.maybe_mark_dynamic(t, d)
    with _torch_deprecations_ignored():
        return _compiled(fn)(*tensors)


@contextlib.contextmanager
def _torch_deprecations_ignored():
    """PyTorch's own DeprecationWarnings while Inductor compiles a kernel ignored. Why: under a
    caller's ``warnings.simplefilter("error")`` (a test suite run with ``-W error``) one raised
    inside the compile (``torch.jit.script_method is deprecated``), the first kernel failed, and
    the process fell back to the slow reference packs for good."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        yield


@functools.cache
def compiled_cpu_works() -> bool:
    """Compile and run a small pack once, checked against the reference; warn once if it fails."""
    try:
        x = torch.linspace(-3.0, 5.0, 64 * 32).view(64, 32)
        mult, add = noise_keys(0, 0)
        codes, meta, _, _ = _call(_PACK[(2, False)], x, mult, add)
        want_codes, want_meta = pack_groups_reference(x, torch.zeros(1, dtype=torch.int64), 0, 2, 32, False)
        if not (torch.equal(codes, want_codes) and torch.equal(meta, want_meta.view(torch.int16))):
            raise RuntimeError("compiled pack disagrees with the PyTorch reference")
        return True
    except Exception as err:  # noqa: BLE001 - any failure means "use the reference here"
        warnings.warn(
            f"actfx: torch.compile'd CPU kernels do not work here ({type(err).__name__}: {err}); "
            f"CPU packing falls back to the slower eager reference (set ACTFX_CPU_KERNELS=reference "
            f"to choose it without trying)",
            RuntimeWarning,
            stacklevel=3,
        )
        return False


def usable(numel: int) -> bool:
    """Whether a tensor of `numel` values is worth (and safe) to send to the compiled kernels."""
    return MIN_COMPILED_VALUES <= numel <= _MAX_VALUES


# ------------------------------------------------------------------------------ public launchers


def pack_groups_compiled(
    x: torch.Tensor, seed: torch.Tensor, stream: int, bits: int, group_size: int, stochastic: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Same contract as `pack_groups_reference`; full groups compiled, a partial last group by the reference."""
    flat = x.reshape(-1)
    if flat.dtype != torch.float32:
        flat = flat.float()
    n, G = flat.numel(), group_size
    full = n // G
    mult, add = noise_keys(int(seed.item()), stream)
    codes, meta, const, mn = _call(_PACK[(bits, stochastic)], flat[: full * G].view(full, G), mult, add)
    store_constants(codes, const, mn)
    meta = meta.view(torch.bfloat16)
    if full * G < n:
        tail_codes, tail_meta = pack_groups_reference(flat[full * G :], seed, stream, bits, G, stochastic)
        codes, meta = torch.cat((codes, tail_codes)), torch.cat((meta, tail_meta))
    return codes, meta


def unpack_groups_compiled(
    codes: torch.Tensor, meta: torch.Tensor, shape, dtype: torch.dtype, bits: int, group_size: int
) -> torch.Tensor:
    """Same contract as `unpack_groups_reference` (constant and NaN groups handled per row first)."""
    lo, step = group_lo_step(codes, meta)
    out = _call(_UNPACK[bits], codes, lo.contiguous(), step.contiguous())
    out = out.view(-1)[: math.prod(shape)]
    if dtype != torch.float32:
        out = out.to(dtype)
    return out.view(tuple(shape))


def pack_bits_compiled(mask: torch.Tensor) -> torch.Tensor:
    """bool mask with a multiple of 8 elements -> uint8 [n / 8] (layout of `masks.pack_bits_impl`)."""
    return _call(_pack_bits_body, mask.reshape(-1, 8))


def pack_bits_between_compiled(values: torch.Tensor, lo: float, hi: float | None) -> torch.Tensor:
    """`pack_bits(lo < values < hi)` for contiguous values with a multiple of 8 elements."""
    flat = values.reshape(-1, 8)
    if hi is None:
        return _call(_pack_above_body, flat, torch.tensor(lo, dtype=values.dtype))
    return _call(_pack_between_body, flat, torch.tensor(lo, dtype=values.dtype), torch.tensor(hi, dtype=values.dtype))


def affine_scale_by_bits_compiled(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, codes: torch.Tensor,
                                  inside: float, outside: float, addend: torch.Tensor | None = None) -> torch.Tensor:
    """fp32 x [N, C, *spatial] (contiguous, prod(spatial) % 8 == 0) -> ((x * a + b) [+ addend]) * mask scale."""
    n, c = x.shape[0], x.shape[1]
    per_channel = x.numel() // (n * c)
    x4 = x.view(n, c, per_channel // 8, 8)
    codes3 = codes.view(n, c, per_channel // 8)
    a, b = a.float().contiguous(), b.float().contiguous()
    inside_t, outside_t = torch.tensor([inside, outside], dtype=torch.float32)
    if addend is None:
        out = _call(_affine_scale_by_bits_body, x4, a, b, codes3, inside_t, outside_t, dynamic_dims=3)
    else:
        out = _call(_affine_add_scale_by_bits_body, x4, a, b, addend.view(x4.shape), codes3, inside_t, outside_t,
                    dynamic_dims=3)
    return out.view(x.shape)


def scale_by_bits_compiled(values: torch.Tensor, codes: torch.Tensor, inside: float, outside: float) -> torch.Tensor:
    """values * where(bit, inside, outside), bits unpacked on the fly; values has a multiple of 8 elements."""
    flat = values.reshape(-1, 8)
    scales = torch.tensor([inside, outside], dtype=values.dtype)
    out = _call(_scale_by_bits_body, flat, codes, scales[0], scales[1])
    return out.view(values.shape)
