"""The compressed activation format: `PackedTensor` and `pack()`.

Why this format
---------------
Activations saved for backward dominate training memory, and the gradient only needs them up to
unbiased noise (ActNN). Values are quantized in groups of G consecutive elements (of the flattened
tensor) against the group's own range, so one outlier only costs precision in its own group.
Per group we store two bfloat16 numbers: 32 bits of overhead, i.e. 2 + 32/256 = 2.125 bits per
value at 2 bits and G = 256 (15.06x smaller than fp32), while keeping fp32's exponent range so
ranges from 1e-30 to 1e30 neither overflow nor underflow (fp16 metadata would).

Layout
------
Input x: float32, float16 or bfloat16, any shape, read as `x.reshape(-1)`. n = numel,
G = group_size (a power of two, 32..4096), b = bits (1, 2, 4 or 8, or 1.6 for three levels),
num_groups = ceil(n / G), L = 2**b - 1 levels above zero (2 for three levels).

* `codes`: uint8 [num_groups, G*b/8]. Value i of a group (0-based) lives in byte (i*b)//8 at bit
  offset (i*b)%8, least-significant bits first. For b=2 the byte `0b11_10_01_00` holds codes
  0, 1, 2, 3 for values i = 0, 1, 2, 3. The padding slots of a partial last group hold code 0 and
  take no part in its min / max.
* Three levels (`bits=1.6`, L = 2): `codes` is uint8 [num_groups, ceil(G/5)]; value i of a group
  is base-3 digit i%5 of byte i//5 (least significant first: the byte of codes 0, 1, 2, 0, 1 is
  0 + 3 + 18 + 0 + 81 = 102); a group's last byte pads with zero digits. Why three levels:
  `actfx/kernels/widths.py`.
* `meta`: bfloat16 [num_groups, 2]:
  - `meta[g, 0] = lo`: the group min rounded toward -inf to bf16, so lo <= every value;
  - `meta[g, 1] = step`: `(max - lo) * inv_levels` computed in fp32 (inv_levels = the fp32 constant
    1/L), rounded toward +inf to bf16, so step * L >= max - lo.
  Both roundings work on the fp32 bit pattern (drop or round away the low 16 bits), identically in
  PyTorch and Triton.

Quantization uses lo and step *as stored*: r = 1/step (fp32, IEEE division, once per group),
t = (x - lo) * r, f = floor(t), frac = t - f, then

* stochastic: code = f + (u < frac) with u ~ U[0, 1) fp32, so E[code] = t and the dequantized
  value is unbiased (up to float rounding);
* deterministic: code = f + (frac >= 0.5), round half up;

clamped to [0, L]. Dequantization: x_hat = lo + code * step in fp32, cast to x's dtype.

Special groups
--------------
* Constant group (max == min, finite): step is stored as 0, lo as the value rounded down to bf16,
  and the value's exact fp32 bit pattern is written little-endian into the group's first 4 code
  bytes (G*b/8 >= 4, and ceil(G/5) >= 7, because G >= 32); the other code bytes are 0. Unpack restores that exact value
  (also when it is not representable in bf16, and keeping the sign of -0.0). All-zero groups, as
  after a ReLU, are therefore exact.
* Non-finite group (a NaN or +-Inf among the group's real values): lo and step are stored as NaN
  and all codes are 0; unpack yields NaN for every value of the group, so AMP's GradScaler sees
  the overflow instead of finite garbage. A finite group is treated the same way when its range
  cannot be represented: a value below -bf16max (about -3.39e38) whose rounded-down lo is -inf, or
  a range `max - lo` (or step) that overflows to inf.

Error bound
-----------
For every value of a finite, non-constant group (up to fp32 rounding in t and in x_hat, plus the
final cast to fp16 / bf16):

* |x_hat - x| < step in stochastic mode, and |x_hat - x| <= step / 2 in deterministic mode;
* step <= (max - lo) / L * (1 + 2**-7) and min - ulp_bf16(min) <= lo <= min, where ulp_bf16 is the
  bf16 spacing at min (2**-7 relative, or the smallest bf16 subnormal near zero).

That is ActNN's (max - min) / L up to the bf16 rounding of lo and step. (Where step or min falls in
the subnormal range, below ~1.2e-38, the relative 2**-7 becomes an absolute bf16 subnormal spacing,
2**-133 ~ 9.2e-41.)

Randomness
----------
Counter-based: the rounding noise is a function of (seed, stream, element index) only. `seed` is
a one-element int64 tensor on x's device (read inside the Triton kernel, so no host sync) and
`stream` an int naming the call site; they are mixed into one Philox key. Equal (seed, stream)
give equal bytes on the same backend; the Triton and PyTorch backends draw different noise. Only
`pack(..., seed=None)` touches the global RNG, to draw a fresh seed.

* Triton: `u = tl.rand(key, element_index)` (Philox, fp32, int64 indices).
* PyTorch reference (the CPU path): a private `torch.Generator` seeded with the same key. It draws
  u at 15-bit resolution, u = (k + 1/2) / 2**15, two values per 31-bit draw, because one
  `torch.rand` call per value was two thirds of a CPU pack. Rounding up then happens with a
  probability within 2**-16 of frac: a bias of at most 2**-16 step, far below the noise itself.
"""

from __future__ import annotations

import torch

from .kernels import (
    check_bits,
    check_float_dtype,
    check_group_size,
    pack_groups,
    unpack_groups,
)

__all__ = ["PackedTensor", "pack"]

_SEED_HIGH = 1 << 62  # seeds drawn for `seed=None`: any non-negative int64 below this


class PackedTensor:
    """A tensor stored as `codes` + `meta` (see the module docstring); `.unpack()` gives it back."""

    __slots__ = ("codes", "meta", "shape", "dtype", "bits", "group_size")

    def __init__(
        self,
        codes: torch.Tensor,
        meta: torch.Tensor,
        shape: torch.Size,
        dtype: torch.dtype,
        bits: int,
        group_size: int,
    ) -> None:
        self.codes = codes
        self.meta = meta
        self.shape = torch.Size(shape)
        self.dtype = dtype
        self.bits = bits
        self.group_size = group_size

    @property
    def device(self) -> torch.device:
        return self.codes.device

    @property
    def nbytes(self) -> int:
        """True memory held: codes + meta bytes."""
        return self.codes.nbytes + self.meta.nbytes

    @property
    def original_nbytes(self) -> int:
        """Bytes the unpacked tensor takes."""
        return self.shape.numel() * self.dtype.itemsize

    def unpack(self) -> torch.Tensor:
        """A new contiguous tensor with the original shape, dtype and device."""
        return unpack_groups(self.codes, self.meta, self.shape, self.dtype, self.bits, self.group_size)

    def __repr__(self) -> str:
        ratio = self.original_nbytes / self.nbytes if self.nbytes else float("nan")
        return (
            f"PackedTensor(shape={tuple(self.shape)}, dtype={self.dtype}, device={self.device}, "
            f"bits={self.bits}, group_size={self.group_size}, nbytes={self.nbytes}, "
            f"ratio={ratio:.2f}x)"
        )


def _seed_tensor(seed: int | None, device: torch.device, stochastic: bool) -> torch.Tensor:
    if seed is None:
        if not stochastic:  # no noise needed: leave the global RNG alone
            return torch.zeros(1, dtype=torch.int64, device=device)
        return torch.randint(0, _SEED_HIGH, (1,), dtype=torch.int64, device=device)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int or None, got {type(seed).__name__}")
    if not -(1 << 63) <= seed < (1 << 63):
        raise ValueError(f"seed must fit in int64, got {seed}")
    return torch.tensor([seed], dtype=torch.int64, device=device)


def pack(
    x: torch.Tensor,
    bits: int,
    *,
    group_size: int = 256,
    stochastic: bool = True,
    seed: int | None = None,
) -> PackedTensor:
    """Quantize `x` to `bits` per value (1, 2, 4 or 8, or 1.6: three levels) in groups of `group_size`.

    `seed=None` draws a fresh seed from torch's default generator on x's device, so repeated packs
    get independent noise; an int seed makes the bytes reproducible. x is never modified.
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"pack takes a torch.Tensor, got {type(x).__name__}")
    check_float_dtype(x.dtype)
    check_bits(bits)
    check_group_size(group_size)
    if not isinstance(stochastic, bool):
        raise TypeError(f"stochastic must be a bool, got {type(stochastic).__name__}")
    seed_t = _seed_tensor(seed, x.device, stochastic)
    codes, meta = pack_groups(x, seed_t, 0, bits, group_size, stochastic)
    return PackedTensor(codes, meta, x.shape, x.dtype, bits, group_size)
