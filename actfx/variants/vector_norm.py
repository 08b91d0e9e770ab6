"""The 2-norm along dims (``torch.linalg.vector_norm(x, 2, dim)``, what ``F.normalize`` and cosine
attention compute) with a packed input and the exact norm.

Backward is ``x * g / norm`` (0 where the norm is 0): linear in ``x`` once the norm is kept
exact (it is one value per row: tiny), so a packed ``x`` gives an unbiased gradient.
Recomputing the norm from the packed ``x`` would not (E||x + noise|| > ||x||).
"""

from __future__ import annotations

import torch

from actfx.variants.common import needs_saving, not_a_view, refuse_double_backward, with_reduced_dims
from actfx.variants.saved import materialize_all, split_all


class _PackedVectorNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, spec, dim, keepdim, *run):
        x = run[0]
        out = torch.linalg.vector_norm(x, 2, dim, keepdim)
        plans, storage = split_all([spec], run)
        ctx.plans, ctx.dim, ctx.keepdim, ctx.x_dtype = plans, dim, keepdim, x.dtype
        ctx.save_for_backward(out, *storage)
        return not_a_view(out)

    @staticmethod
    def backward(ctx, grad_out):
        refuse_double_backward("vector_norm")
        norm, *storage = ctx.saved_tensors
        x = materialize_all(ctx.plans, storage)[0]
        g = grad_out
        if not ctx.keepdim:
            norm, g = with_reduced_dims(norm, ctx.dim, x.dim()), with_reduced_dims(g, ctx.dim, x.dim())
        scale = (g / norm).masked_fill(norm == 0, 0)
        return (None, None, None, (x * scale).to(ctx.x_dtype)) + (None,) * (len(ctx.needs_input_grad) - 4)


def vector_norm(spec, dim, keepdim, *run):
    """``torch.linalg.vector_norm(x, 2, dim, keepdim)``; ``run``: the input's saved-value run."""
    x = run[0]
    if not needs_saving(x):
        return torch.linalg.vector_norm(x, 2, dim, keepdim)
    return _PackedVectorNorm.apply(spec, dim, keepdim, *run)
