"""Losses that keep the packed gradient of their result instead of their inputs.

Why: a loss reduced to a scalar, ``L(a, b, ...)``, has the backward ``g * dL/da``: linear in the
gradient, which forward can compute right away (the loss's own backward, once, moved earlier).
Stored packed, it keeps the gradient unbiased, where autograd kept every input whole (a
regression head's prediction and target, a per-pixel BCE's logits). An element-wise loss left
unreduced (``reduction="none"``) works the same way: each output reads only its own inputs, so
the derivative at each element is what backward multiplies. The width is ``Config.op_bits["loss"]``
(8 by default): this gradient seeds every other one.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from actfx.variants import hooked_vjp
from actfx.variants.common import needs_saving, not_a_view, refuse_double_backward
from actfx.variants.recompute import fill
from actfx.variants.saved import materialize_all, split_all

# Loss functions and modules -> whether the loss is element-wise before its reduction (a sum of
# per-element terms); the others qualify only reduced to a scalar.
LOSSES = {
    **dict.fromkeys((F.mse_loss, F.l1_loss, F.smooth_l1_loss, F.huber_loss, F.binary_cross_entropy,
                     F.binary_cross_entropy_with_logits, F.soft_margin_loss, F.poisson_nll_loss, F.gaussian_nll_loss,
                     F.margin_ranking_loss, F.hinge_embedding_loss), True),
    **dict.fromkeys((F.triplet_margin_loss, F.cosine_embedding_loss, F.multilabel_soft_margin_loss,
                     F.multi_margin_loss), False),
}
LOSS_MODULES = {
    **dict.fromkeys((nn.MSELoss, nn.L1Loss, nn.SmoothL1Loss, nn.HuberLoss, nn.BCELoss, nn.BCEWithLogitsLoss,
                     nn.SoftMarginLoss, nn.PoissonNLLLoss, nn.GaussianNLLLoss, nn.MarginRankingLoss,
                     nn.HingeEmbeddingLoss), True),
    **dict.fromkeys((nn.TripletMarginLoss, nn.CosineEmbeddingLoss, nn.MultiLabelSoftMarginLoss,
                     nn.MultiMarginLoss), False),
}


def _function(fn):
    """A loss module, or the name of a loss in torch.nn.functional (fx prints no function arguments)."""
    return getattr(F, fn) if isinstance(fn, str) else fn


def input_gradients(fn, static, *values):
    """Per tensor slot of ``static`` (args template, kwargs template, whether ``fn`` is element-wise
    before its reduction; ``fn``: see ``_function``): the gradient of ``fn``'s result at that input
    (its derivative element by element when the result is not a scalar), computed now; None for
    inputs without a gradient, and for all when none will run backward or the result is neither
    a scalar nor element-wise in every input that needs one."""
    fn, nothing = _function(fn), (None,) * len(values)
    wanted = [i for i, v in enumerate(values)
              if isinstance(v, torch.Tensor) and v.is_floating_point() and needs_saving(v)]
    if not wanted:
        return nothing
    args_t, kwargs_t, elementwise = static
    inputs = [v.detach() if isinstance(v, torch.Tensor) else v for v in values]

    def loss(*differentiated):
        table = list(inputs)
        for i, v in zip(wanted, differentiated):
            table[i] = v
        return fn(*fill(args_t, table), **dict(fill(kwargs_t, table)))

    out, pullback = hooked_vjp.vjp(loss, *[inputs[i] for i in wanted])
    if not isinstance(out, torch.Tensor) or (out.dim() != 0 and (
            not elementwise or any(inputs[i].shape != out.shape for i in wanted))):
        return nothing
    grads = pullback(torch.ones_like(out))
    found = list(nothing)
    for i, g in zip(wanted, grads):
        found[i] = None if g is None else g.detach()
    return tuple(found)


class _FromPackedGradients(torch.autograd.Function):
    @staticmethod
    def forward(ctx, fn, static, specs, n, *flat):
        fn, values, runs = _function(fn), flat[:n], flat[n:]
        args_t, kwargs_t, _ = static
        with torch.no_grad():
            out = fn(*fill(args_t, values), **dict(fill(kwargs_t, values)))
        ctx.plans, storage = split_all(specs, runs)
        ctx.name, ctx.like = getattr(fn, "__name__", type(fn).__name__), [
            (v.shape, v.dtype) if isinstance(v, torch.Tensor) else None for v in values]
        ctx.save_for_backward(*storage)
        return not_a_view(out)

    @staticmethod
    def backward(ctx, grad_out):
        refuse_double_backward(ctx.name)
        derivatives = materialize_all(ctx.plans, ctx.saved_tensors)
        grads = [None] * 4
        for i, (d, like) in enumerate(zip(derivatives, ctx.like)):
            wanted = ctx.needs_input_grad[4 + i] and isinstance(d, torch.Tensor)
            grads.append((grad_out * d).to(like[1]) if wanted else None)
        return (*grads, *[None] * (len(ctx.needs_input_grad) - len(grads)))


def loss(fn, static, specs, n, *flat):
    """``fn(*args, **kwargs)`` (the template ``static`` filled with the first ``n`` of ``flat``)
    whose backward reads the packed input gradients (the runs after them)."""
    runs = flat[n:]
    if not any(isinstance(r, torch.Tensor) for r in runs):
        values, fn = flat[:n], _function(fn)
        return fn(*fill(static[0], values), **dict(fill(static[1], values)))
    return _FromPackedGradients.apply(fn, static, specs, n, *flat)
