"""``logsumexp`` that keeps the packed probabilities ``exp(x - out)`` instead of its input.

Its backward is ``g * exp(x - out)``: non-linear in ``x`` but linear in those probabilities, which
lie in [0, 1] where ``x`` may hold -inf (masked scores, which no per-group quantizer stores).
MoE routers' z-loss and contrastive losses reduce their logits this way.
"""

from __future__ import annotations

import torch

from actfx.variants.common import needs_saving, not_a_view, refuse_double_backward, with_reduced_dims
from actfx.variants.saved import materialize_all, split_all


def logsumexp_probabilities(x, dim, keepdim):
    """``exp(x - logsumexp(x))``: what backward reads, or None when nothing needs saving."""
    if not needs_saving(x):
        return None
    with torch.no_grad():
        x = x.detach()
        return (x - torch.logsumexp(x, dim, keepdim=True)).exp()


class _LogSumExpFromPacked(torch.autograd.Function):
    @staticmethod
    def forward(ctx, spec, dim, keepdim, x, *run):
        out = torch.logsumexp(x, dim, keepdim)
        plans, storage = split_all([spec], run)
        ctx.plans, ctx.dim, ctx.keepdim, ctx.x_dtype = plans, dim, keepdim, x.dtype
        ctx.save_for_backward(*storage)
        return not_a_view(out)

    @staticmethod
    def backward(ctx, grad_out):
        refuse_double_backward("logsumexp")
        p = materialize_all(ctx.plans, ctx.saved_tensors)[0]
        g = grad_out.to(p.dtype)
        g = g if ctx.keepdim else with_reduced_dims(g, ctx.dim, p.dim())
        return (None, None, None, (g * p).to(ctx.x_dtype)) + (None,) * (len(ctx.needs_input_grad) - 4)


def logsumexp(spec, dim, keepdim, x, *run):
    """``torch.logsumexp(x, dim, keepdim)``; ``run``: the saved-value run of the probabilities."""
    if not needs_saving(x) or run[0] is None:
        return torch.logsumexp(x, dim, keepdim)
    return _LogSumExpFromPacked.apply(spec, dim, keepdim, x, *run)
