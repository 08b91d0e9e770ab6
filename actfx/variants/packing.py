"""Packing a value once for all its consumers, with per-model counter-based seeds.

Seeds come from a small per-model module: a base derived from ``torch.initial_seed()`` and a
counter bumped on each forward that saves for backward. Stochastic rounding therefore never
draws from (or perturbs) the global RNG stream that dropout and data augmentation use, stays
reproducible under ``torch.manual_seed``, and needs no host synchronisation (kernels read the
seed tensor on the device).
"""

from __future__ import annotations

import warnings

import torch

from actfx.kernels import FLOAT_DTYPES, pack_groups

_MASK63 = (1 << 63) - 1


def _mix(seed: int, salt: int) -> int:
    """A 63-bit splitmix-style hash so nearby seeds and salts give unrelated streams."""
    z = (seed * 0x9E3779B97F4A7C15 + salt * 0xBF58476D1CE4E5B9 + 0x94D049BB133111EB) & ((1 << 64) - 1)
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & ((1 << 64) - 1)
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & ((1 << 64) - 1)
    return (z ^ (z >> 31)) & _MASK63


class SeedState:
    """The host-side half of a model's rounding seed: its salt and the global seed last seen.

    The device-side half is a non-persistent int64 buffer on the converted module (it moves
    with ``.to()``, stays out of ``state_dict``); ``next_seed`` bumps it in place.
    """

    def __init__(self, salt: int) -> None:
        self.salt = int(salt)
        self.seen = torch.initial_seed()

    def initial_buffer(self) -> torch.Tensor:
        return torch.tensor([_mix(self.seen, self.salt)], dtype=torch.int64)

    def __repr__(self) -> str:
        return f"SeedState(salt={self.salt})"


def next_seed(state: SeedState, seed: torch.Tensor) -> torch.Tensor:
    """The seed tensor for this forward (read by the kernels on the device, no sync)."""
    if not torch.compiler.is_compiling():
        current = torch.initial_seed()
        if current != state.seen:  # the user re-seeded: restart this model's stream from it
            state.seen = current
            seed.fill_(_mix(current, state.salt))
    if torch.is_grad_enabled():
        seed.add_(1)
    return seed


def pack_value(x, seed, stream: int, bits: int, group_size: int, stochastic: bool, min_numel: int):
    """(codes, meta) for ``x``, or (None, None) when nothing will be saved or packing does not pay.
    An expanded value (a stride 0: ``g.expand_as(h)``, a broadcast weight) holds only what it
    repeats; packed at its full size it held more (an 8 x 1 x 64 gate expanded to 8 x 256 x 64:
    128 KiB at 8 bits for 2 KiB), so it is kept as it is. So is a parameter or a view of one
    handed in as an argument (Hugging Face DBRX's experts: ``x.matmul(w1.T)`` with ``w1`` a slice
    of the parent's weight): the model holds it anyway, and a pack was a copy on top."""
    if isinstance(x, torch.Tensor) and x.dtype == torch.float64 and torch.is_grad_enabled():
        warnings.warn("actfx keeps float64 activations exact (it packs float32, float16 and bfloat16): "
                      "train in float32 or lower to have them packed", stacklevel=2)
    if (
        not torch.is_grad_enabled()
        or not isinstance(x, torch.Tensor)
        or x.dtype not in FLOAT_DTYPES
        or x.numel() < max(min_numel, 1)
        or any(stride == 0 and size > 1 for stride, size in zip(x.stride(), x.shape))
        or _of_a_parameter(x)
    ):
        return None, None
    return pack_groups(x.detach(), seed, stream, bits, group_size, stochastic)


def _of_a_parameter(x: torch.Tensor) -> bool:
    return isinstance(x, torch.nn.Parameter) or isinstance(x._base, torch.nn.Parameter)
