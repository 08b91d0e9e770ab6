"""`actfx::*` custom ops: the packing kernels as opaque graph nodes with shape-only fake versions.

Registering them lets torch.compile / FakeTensor / meta-device dry runs see a pack as one node whose
outputs have known shapes, without tracing into Triton or the PyTorch reference. The real
implementations pick a backend per device (see `actfx.kernels`).
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import pack_bits_dispatch, pack_groups_impl, unpack_groups_impl
from .masks import mask_nbytes, unpack_bits_impl
from .widths import code_bytes

__all__ = ["pack_groups_op", "unpack_groups_op", "pack_bits_op", "unpack_bits_op", "realized_op"]


@torch.library.custom_op(
    "actfx::pack_groups",
    mutates_args=(),
    schema=(
        "(Tensor x, Tensor seed, int stream, float bits, int group_size, bool stochastic)"
        " -> (Tensor, Tensor)"
    ),
)
def pack_groups_op(
    x: Tensor, seed: Tensor, stream: int, bits: float, group_size: int, stochastic: bool
) -> tuple[Tensor, Tensor]:
    return pack_groups_impl(x, seed, stream, bits, group_size, stochastic)


@pack_groups_op.register_fake
def _pack_groups_fake(x, seed, stream, bits, group_size, stochastic):
    num_groups = (x.numel() + group_size - 1) // group_size
    codes = x.new_empty((num_groups, code_bytes(bits, group_size)), dtype=torch.uint8)
    meta = x.new_empty((num_groups, 2), dtype=torch.bfloat16)
    return codes, meta


def _not_differentiable(ctx, inputs, output):
    # Packing is storage, not math: its outputs carry no gradient (autograd saves packs, it does not
    # differentiate through them). Marking them keeps `meta` (a float tensor) from requiring grad.
    outputs = output if isinstance(output, tuple) else (output,)
    ctx.mark_non_differentiable(*outputs)


def _no_gradient(ctx, *grads):
    raise RuntimeError("actfx packing ops are not differentiable")


pack_groups_op.register_autograd(_no_gradient, setup_context=_not_differentiable)


@torch.library.custom_op(
    "actfx::unpack_groups",
    mutates_args=(),
    schema=(
        "(Tensor codes, Tensor meta, SymInt[] shape, ScalarType dtype, float bits, int group_size)"
        " -> Tensor"
    ),
)
def unpack_groups_op(
    codes: Tensor, meta: Tensor, shape: list[int], dtype: torch.dtype, bits: float, group_size: int
) -> Tensor:
    return unpack_groups_impl(codes.contiguous(), meta.contiguous(), shape, dtype, bits, group_size)


@unpack_groups_op.register_fake
def _unpack_groups_fake(codes, meta, shape, dtype, bits, group_size):
    return codes.new_empty(shape, dtype=dtype)


unpack_groups_op.register_autograd(_no_gradient, setup_context=_not_differentiable)


@torch.library.custom_op("actfx::pack_bits", mutates_args=())
def pack_bits_op(mask: Tensor) -> Tensor:
    return pack_bits_dispatch(mask)


@pack_bits_op.register_fake
def _pack_bits_fake(mask):
    return mask.new_empty((mask_nbytes(mask.numel()),), dtype=torch.uint8)


@torch.library.custom_op("actfx::unpack_bits", mutates_args=())
def unpack_bits_op(codes: Tensor, shape: list[int]) -> Tensor:
    return unpack_bits_impl(codes, shape)


@unpack_bits_op.register_fake
def _unpack_bits_fake(codes, shape):
    return codes.new_empty(shape, dtype=torch.bool)


@torch.library.custom_op("actfx::realized", mutates_args=())
def realized_op(x: Tensor) -> Tensor:
    """A copy of ``x`` that Inductor cannot fuse into its readers (``passes/pack_saved.py``: an
    unpack with padding read by a scatter, which Inductor's C++ loops got wrong)."""
    return x.clone()


@realized_op.register_fake
def _realized_fake(x):
    return torch.empty_like(x)
