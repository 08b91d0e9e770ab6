"""Max pooling (1d/2d/3d, adaptive) that keeps compact indices instead of int64 ones.

Backward of max pooling routes each output gradient to the position of its maximum; nothing
else is needed. PyTorch keeps those positions as int64 flat indices into the input plane
(8 bytes per output). They fit in 16 bits whenever the plane has fewer than 32768 positions
(ResNet's 112x112 stem has 12544) and in 32 bits otherwise. Exact, so gradients are unchanged.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from actfx.variants.common import refuse_double_backward

_MAX_POOL = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}
_ADAPTIVE_MAX_POOL = {1: F.adaptive_max_pool1d, 2: F.adaptive_max_pool2d, 3: F.adaptive_max_pool3d}


def compact_index_dtype(plane: int) -> torch.dtype:
    return torch.int16 if plane < 2**15 else torch.int32 if plane < 2**31 else torch.int64


class _CompactMaxPool(torch.autograd.Function):
    @staticmethod
    def forward(ctx, fn, nd, args, x):
        out, idx = fn(x, *args, return_indices=True)
        small = idx.to(compact_index_dtype(math.prod(x.shape[-nd:])))
        ctx.in_shape, ctx.spatial = x.shape, nd
        ctx.save_for_backward(small)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        refuse_double_backward("max_pool")
        (small,) = ctx.saved_tensors
        spatial = ctx.spatial
        lead = ctx.in_shape[: len(ctx.in_shape) - spatial]
        plane = math.prod(ctx.in_shape[-spatial:])
        grad_in = grad_out.new_zeros((math.prod(lead), plane))
        grad_in.scatter_add_(1, small.reshape(math.prod(lead), -1).long(), grad_out.reshape(math.prod(lead), -1))
        return None, None, None, grad_in.reshape(ctx.in_shape)


def _pool(fn, nd, args, x):
    if not (torch.is_grad_enabled() and x.requires_grad):
        return fn(x, *args)
    return _CompactMaxPool.apply(fn, nd, args, x)


def max_pool(nd, kernel_size, stride, padding, dilation, ceil_mode, x):
    """F.max_poolNd without returned indices."""
    return _pool(_MAX_POOL[nd], nd, (kernel_size, stride, padding, dilation, ceil_mode), x)


def adaptive_max_pool(nd, output_size, x):
    return _pool(_ADAPTIVE_MAX_POOL[nd], nd, (output_size,), x)
