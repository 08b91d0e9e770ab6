"""1-bit masks (ReLU's `x > 0`, dropout's keep mask) stored as dense bits: 8x smaller than bool.

Layout: bit i of the flattened mask is bit `i % 8` (least-significant first) of byte `i // 8`.
The last byte is zero-padded. Pure PyTorch: the work is memory-bound and one shift-and-sum pass
is already close to a copy, so there is no Triton kernel for it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

__all__ = ["pack_bits_impl", "unpack_bits_impl", "mask_nbytes"]


def mask_nbytes(numel: int) -> int:
    """Bytes that `pack_bits` uses for a mask of `numel` elements: ceil(numel / 8)."""
    return (numel + 7) // 8  # no int(): keeps a SymInt symbolic under tracing


def _bit_weights(device: torch.device) -> torch.Tensor:
    return torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8, device=device)


def pack_bits_impl(mask: torch.Tensor) -> torch.Tensor:
    """bool mask of any shape -> uint8 [ceil(n / 8)]."""
    flat = mask.reshape(-1)
    n = flat.numel()
    nbytes = mask_nbytes(n)
    pad = nbytes * 8 - n
    bits = flat.view(torch.uint8)  # bool is stored as 0/1 bytes
    if pad:
        bits = torch.cat((bits, bits.new_zeros(pad)))
    # Distinct powers of two: the uint8 sum never carries, so it equals the bitwise or.
    return (bits.view(nbytes, 8) * _bit_weights(mask.device)).sum(dim=1, dtype=torch.uint8)


def unpack_bits_impl(codes: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """uint8 [ceil(n / 8)] -> bool mask of `shape` (inverse of `pack_bits_impl`)."""
    n = math.prod(shape)
    bits = torch.bitwise_and(codes.reshape(-1)[:, None], _bit_weights(codes.device)) != 0
    return bits.view(-1)[:n].reshape(tuple(shape))
