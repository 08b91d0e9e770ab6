"""``torch.cdist(x1, x2)`` (p = 2) with packed inputs and its exact output.

The gradient of ``d_ij = ||x1_i - x2_j||`` is ``(x1_i - x2_j) / d_ij``: nonlinear in the inputs
alone, but with d kept exact (PyTorch keeps it too) it is linear in them, so packed x1 and x2
give it unbiased: ``g_x1 = x1 * rowsum(w) - w @ x2`` and ``g_x2 = x2 * colsum(w) - w^T @ x1``,
``w = g / d`` (0 where d is 0, as PyTorch's own backward). Point-cloud kNN blocks and
prototype distances keep both inputs at full precision otherwise.
"""

from __future__ import annotations

import torch

from actfx.variants.common import needs_saving, not_a_view, refuse_double_backward
from actfx.variants.saved import materialize_all, spec_width, split_all, values_of


# the spellings, by the name the graph carries: torch's (compute_mode a string) and ATen's (an int or None)
SPELLINGS = {"torch.cdist": torch.cdist, "aten.cdist": torch.ops.aten.cdist.default}


class _PackedCdist(torch.autograd.Function):
    @staticmethod
    def forward(ctx, specs, fn, compute_mode, *flat):
        x1, x2 = values_of(specs, flat)
        d = SPELLINGS[fn](x1, x2, 2.0, compute_mode)
        plans, storage = split_all(list(specs), flat)
        ctx.plans, ctx.like = plans, [(x.shape, x.dtype) for x in (x1, x2)]
        ctx.second = 3 + spec_width(specs[0])
        ctx.save_for_backward(d, *storage)
        return not_a_view(d)

    @staticmethod
    def backward(ctx, grad_out):
        refuse_double_backward("cdist")
        d, *saved = ctx.saved_tensors
        x1, x2 = materialize_all(ctx.plans, saved)
        w = torch.where(d == 0, 0.0, grad_out / d).to(x1.dtype)
        grads = [None] * len(ctx.needs_input_grad)
        if ctx.needs_input_grad[3]:
            g1 = x1 * w.sum(-1, keepdim=True) - w @ x2
            grads[3] = g1.sum_to_size(ctx.like[0][0]).to(ctx.like[0][1])
        if ctx.needs_input_grad[ctx.second]:
            g2 = x2 * w.sum(-2).unsqueeze(-1) - w.mT @ x1
            grads[ctx.second] = g2.sum_to_size(ctx.like[1][0]).to(ctx.like[1][1])
        return tuple(grads)


def cdist(specs, fn, compute_mode, *flat):
    """``fn(x1, x2, 2.0, compute_mode)`` for ``fn`` a cdist spelling's name (``SPELLINGS``);
    ``flat`` holds both inputs' saved-value runs."""
    x1, x2 = values_of(specs, flat)
    if not needs_saving(x1, x2) or not (x1.is_floating_point() and x2.is_floating_point()):
        return SPELLINGS[fn](x1, x2, 2.0, compute_mode)
    return _PackedCdist.apply(specs, fn, compute_mode, *flat)
