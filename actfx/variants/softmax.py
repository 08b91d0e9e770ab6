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


def log_softmax_probabilities(x, dim, dtype=None):
    """softmax(x): what log_softmax's backward reads (exp of its output), finite where the output
    is -inf. None when nothing needs saving."""
    if not (torch.is_grad_enabled() and isinstance(x, torch.Tensor) and x.requires_grad):
        return None
    with torch.no_grad():
        return torch.softmax(x.detach(), dim, dtype=dtype)


class _LogSoftmaxFromPacked(torch.autograd.Function):
    @staticmethod
    def forward(ctx, spec, dim, dtype, x, *run):
        out = torch.log_softmax(x, dim, dtype=dtype)
        plans, storage = split_all([spec], run)
        ctx.plans, ctx.dim, ctx.x_dtype = plans, dim, x.dtype
        ctx.save_for_backward(*storage)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        refuse_double_backward("log_softmax")
        p = materialize_all(ctx.plans, ctx.saved_tensors)[0]
        g = grad_out.to(p.dtype)
        gx = g - p * g.sum(ctx.dim, keepdim=True)  # linear in p: unbiased under stochastic rounding
        return (None, None, None, gx.to(ctx.x_dtype)) + (None,) * (len(ctx.needs_input_grad) - 4)


def log_softmax(spec, dim, dtype, x, *run):
    """log_softmax whose backward reads the packed probabilities (``run``'s head), not its input:
    an input with -inf (masked logits) would make a whole packed group NaN."""
    if not (torch.is_grad_enabled() and x.requires_grad) or run[0] is None:
        return torch.log_softmax(x, dim, dtype=dtype)
    return _LogSoftmaxFromPacked.apply(spec, dim, dtype, x, *run)
