"""Softmax that keeps its packed *output*, shared with the consumer that reads it.

Softmax's backward needs its output ``y``: dx = y * (g - sum(g * y)). Its input often holds
-inf (masked attention scores), which no per-group quantizer can store, while ``y`` is finite
in [0, 1] (masked entries exactly 0, which the packed format restores exactly). In attention
the next matmul needs the same ``y``: the rewrite packs it once for both. The graph computes
``y`` without autograd, packs it, then ``from_packed_output`` attaches the backward.
"""

from __future__ import annotations

import torch

from actfx.variants.common import refuse_double_backward
from actfx.variants.saved import materialize_all, split_all


def softmax_forward(x, dim, dtype=None):
    """The exact forward value, outside autograd (the bridge below attaches the gradient)."""
    with torch.no_grad():
        return torch.softmax(x, dim, dtype=dtype)


class _SoftmaxFromPacked(torch.autograd.Function):
    @staticmethod
    def forward(ctx, spec, dim, x, *run):
        y = run[0]
        plans, storage = split_all([spec], run)
        ctx.plans, ctx.dim, ctx.x_dtype = plans, dim, x.dtype
        ctx.save_for_backward(*storage)
        return y.view_as(y)

    @staticmethod
    def backward(ctx, grad_out):
        refuse_double_backward("softmax")
        y = materialize_all(ctx.plans, ctx.saved_tensors)[0]
        g = grad_out.to(y.dtype)
        gx = y * (g - (g * y).sum(ctx.dim, keepdim=True))
        return (None, None, gx.to(ctx.x_dtype)) + (None,) * (len(ctx.needs_input_grad) - 3)


def softmax(spec, dim, dtype, x, *run):
    """``run`` is the saved-value run of the softmax output (first element: the output)."""
    if not (torch.is_grad_enabled() and x.requires_grad):
        return run[0]
    return _SoftmaxFromPacked.apply(spec, dim, x, *run)
