"""Pack and unpack written as plain ATen math, for insertion into compiled (Inductor) graphs.

Why: inside ``torch.compile`` a pack must be code Inductor can fuse into the kernel that produces
the value, and an unpack into the backward kernel that reads it; an opaque custom op or an
autograd.Function blocks that. These functions are traced into the partitioned forward and
backward graphs (``actfx/passes/pack_saved.py``) and lowered by Inductor like any other ATen.

Layout (the eager format's grouping, with fp32 group metadata so constant groups stay exact):
x is read as ``x.reshape(-1)`` in fp32, padded to whole groups of G by repeating its last value
(padding never widens a group's range), split into ``[num_groups, G]``.

* ``lo[g] = min``, ``step[g] = (max - min) / L`` (fp32, L = 2**bits - 1);
* ``code = clamp(floor((x - lo) / step + u), 0, L)`` with ``u ~ U[0, 1)`` from a seeded index hash
  (stochastic rounding: E[lo + code * step] = x) or ``u = 1/2`` (round to nearest);
* codes packed ``8 / bits`` to a byte, least-significant first: ``packed[g, j]`` holds values
  ``j*per .. j*per + per - 1`` of group g.

A constant group has step 0 and unpacks to lo exactly (all-zero groups after a ReLU are exact).
A group with a NaN or an infinity unpacks to NaN everywhere, so overflow stays visible.
Memory at G = 256: bits + 64/256 bits per value (2.25 at 2 bits: 14.2x smaller than fp32).

Boolean masks are packed 8 to a byte (exact).
"""

from __future__ import annotations

import torch
from torch._inductor import inductor_prims

__all__ = ["pack_values", "unpack_values", "pack_mask", "unpack_mask", "packed_value_bytes", "packed_mask_bytes"]


def _groups(flat: torch.Tensor, group: int) -> torch.Tensor:
    """``flat`` padded with its last value to whole groups, as ``[num_groups, group]``."""
    n = flat.shape[0]
    num_groups = (n + group - 1) // group
    if isinstance(n, int) and n % group == 0:
        return flat.view(num_groups, group)  # no padding: a plain view keeps the loads vectorized
    index = torch.arange(num_groups * group, device=flat.device).clamp_max(n - 1)
    return flat[index].view(num_groups, group)


_LOW32 = 0xFFFFFFFF


def _uniform_like(t: torch.Tensor) -> torch.Tensor:
    """U[0, 1) noise on a 2^-24 grid: a counter-based integer hash of each element's index and a
    per-pack seed (an Inductor seed node here; the pass replaces all of a graph's seeds by one
    ``actfx::pack_seeds`` call on the model's own stream, see ``seed_stream.py``). Why not Inductor's own ``rand``: on CPU it runs
    one scalar Philox per element, 6x slower than the whole rest of a pack (ResNet-50's 2-bit pack
    of an 8x256x56x56 value: 51 ms with it, 8 ms with this). The hash (two multiply-xorshift
    rounds) runs in int32, 8 lanes to an AVX2 vector with a native multiply: in int64 (4 lanes,
    the multiply emulated) it doubled the time of a whole 2-bit pack (40 ms against 18 ms for
    that value, one thread). The products wrap modulo 2^32 (the vector multiply does so; a signed
    shift is masked to act as a logical one). Values of 2^31 elements or more hash in int64."""
    return uniform_from_seed(t, inductor_prims.seed(t.device))


def uniform_from_seed(t: torch.Tensor, seed: torch.Tensor) -> torch.Tensor:
    """:func:`_uniform_like`'s noise for a given int64 ``seed`` (a 0-d tensor)."""
    if t.numel() >= 1 << 31:
        return _uniform_like_wide(t, seed)
    index = torch.arange(t.numel(), dtype=torch.int32, device=t.device).view(t.shape)
    h = index ^ (seed & 0x7FFFFFFF).to(torch.int32)
    h = h ^ ((h >> 16) & 0xFFFF)
    h = h * 0x7FEB352D
    h = h ^ ((h >> 15) & 0x1FFFF)
    h = h * -0x7B935975  # 0x846CA68B as a signed 32-bit value
    h = h ^ ((h >> 16) & 0xFFFF)
    return (h & 0xFFFFFF).float() * (1.0 / (1 << 24))


def _uniform_like_wide(t: torch.Tensor, seed: torch.Tensor) -> torch.Tensor:
    """The same noise for values too large for an int32 index: the hash in int64, each product
    kept below 2^63 by masking to 32 bits."""
    index = torch.arange(t.numel(), dtype=torch.int64, device=t.device).view(t.shape)
    h = ((index + seed) & _LOW32) ^ (index >> 32)
    h = h ^ (h >> 16)
    h = (h * 0x7FEB352D) & _LOW32
    h = h ^ (h >> 15)
    h = (h * 0x846CA68B) & _LOW32
    h = h ^ (h >> 16)
    return (h & 0xFFFFFF).float() * (1.0 / (1 << 24))


def pack_values(x: torch.Tensor, bits: int, group_size: int, stochastic: bool = True):
    """x (any float dtype and shape) -> (packed uint8 [num_groups, G*bits/8], lo fp32, step fp32)."""
    levels = (1 << bits) - 1
    per = 8 // bits
    xg = _groups(x.reshape(-1).float(), group_size)
    lo, hi = xg.amin(dim=1), xg.amax(dim=1)
    step = (hi - lo) * (1.0 / levels)
    recip = torch.where(step > 0, 1.0 / torch.where(step > 0, step, 1.0), 0.0)
    t = (xg - lo[:, None]) * recip[:, None]
    noise = _uniform_like(t) if stochastic else torch.full_like(t, 0.5)
    code = torch.floor(t + noise).clamp(0.0, float(levels))
    code = torch.where(torch.isnan(code), 0.0, code).to(torch.int32)
    if per == 1:
        return code.to(torch.uint8), lo, step
    cv = code.view(code.shape[0], group_size // per, per)
    packed = cv[:, :, 0]
    for k in range(1, per):
        packed = packed | (cv[:, :, k] << (bits * k))
    return packed.to(torch.uint8), lo, step


def unpack_values(packed: torch.Tensor, lo: torch.Tensor, step: torch.Tensor, like: torch.Tensor, bits: int):
    """The inverse of :func:`pack_values`, shaped and typed like ``like`` (only its shape and dtype
    are read: it may be a fake tensor or an expanded zero)."""
    per = 8 // bits
    shift = torch.arange(per, dtype=torch.int32, device=packed.device) * bits
    code = (packed[:, :, None].to(torch.int32) >> shift) & ((1 << bits) - 1)
    values = code.float() * step[:, None, None] + lo[:, None, None]
    return values.reshape(-1)[: like.numel()].view(like.shape).to(like.dtype)


def pack_mask(mask: torch.Tensor) -> torch.Tensor:
    """bool (any shape) -> uint8 [ceil(n / 8)], bit k of byte j = mask.flatten()[8 * j + k]."""
    bits = _groups(mask.reshape(-1).to(torch.int32), 8)
    packed = bits[:, 0]
    for k in range(1, 8):
        packed = packed | (bits[:, k] << k)
    return packed.to(torch.uint8)


def unpack_mask(packed: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """The inverse of :func:`pack_mask`, shaped like ``like``."""
    shift = torch.arange(8, dtype=torch.int32, device=packed.device)
    bits = (packed[:, None].to(torch.int32) >> shift) & 1
    return bits.reshape(-1)[: like.numel()].view(like.shape).to(torch.bool)


def packed_value_bytes(numel: int, bits: int, group_size: int) -> int:
    num_groups = -(-numel // group_size)
    return num_groups * (group_size * bits // 8 + 8)


def packed_mask_bytes(numel: int) -> int:
    return -(-numel // 8)
