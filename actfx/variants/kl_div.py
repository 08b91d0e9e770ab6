"""``F.kl_div`` (knowledge distillation) that keeps its target packed, not input and target exact.

With a target that needs no gradient (a teacher's probabilities), the input's gradient is
``-p * g`` (scaled by the reduction), ``p`` the target's probabilities (``exp(target)`` under
``log_target``): linear in ``p``, so a packed ``p`` gives it unbiased. PyTorch keeps both full-size
tensors (an LM's vocabulary-wide logits). A target that needs a gradient runs as PyTorch runs it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from actfx.variants.common import needs_saving, refuse_double_backward
from actfx.variants.saved import materialize_all, split_all


def target_probabilities(x, target, log_target: bool):
    """What the input's gradient reads, or None when the op runs as it is."""
    if not needs_saving(x) or not isinstance(target, torch.Tensor) or target.requires_grad or x.shape != target.shape:
        return None
    with torch.no_grad():
        return target.exp() if log_target else target


class _KlDivFromPacked(torch.autograd.Function):
    @staticmethod
    def forward(ctx, spec, reduction, log_target, x, target, *run):
        out = F.kl_div(x, target, reduction=reduction, log_target=log_target)
        plans, storage = split_all([spec], run)
        ctx.plans, ctx.reduction, ctx.x_dtype = plans, reduction, x.dtype
        ctx.save_for_backward(*storage)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        refuse_double_backward("kl_div")
        p = materialize_all(ctx.plans, ctx.saved_tensors)[0]
        g = grad_out
        if ctx.reduction == "mean":
            g = g / p.numel()
        elif ctx.reduction == "batchmean":
            g = g / (p.shape[0] if p.dim() else 1)
        return (None, None, None, (-p * g).to(ctx.x_dtype), None) + (None,) * (len(ctx.needs_input_grad) - 5)


def kl_div(spec, reduction, log_target, x, target, *run):
    """``F.kl_div(x, target, reduction=, log_target=)``; ``run``: the target probabilities' run."""
    if run[0] is None:
        return F.kl_div(x, target, reduction=reduction, log_target=log_target)
    return _KlDivFromPacked.apply(spec, reduction, log_target, x, target, *run)
