"""Softmax that keeps its packed *output*, shared with the consumer that reads it.

Softmax's backward needs its output ``y``: dx = y * (g - sum(g * y)). Its input often holds
-inf (masked attention scores), which no per-group quantizer can store, while ``y`` is finite
in [0, 1] (masked entries exactly 0, which the packed format restores exactly). In attention
the next matmul needs the same ``y``: the rewrite packs it once for both. The graph computes
``y`` without autograd, packs it, then ``from_packed_output`` attaches the backward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from actfx.variants import hooked_vjp
from actfx.variants.common import needs_saving, not_a_view, refuse_double_backward
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
    if not needs_saving(x):
        return run[0]
    return _SoftmaxFromPacked.apply(spec, dim, x, *run)


def log_softmax_probabilities(x, dim, dtype=None):
    """softmax(x): what log_softmax's backward reads (exp of its output), finite where the output
    is -inf. None when nothing needs saving."""
    if not needs_saving(x):
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
        return not_a_view(out)

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
    if not needs_saving(x) or run[0] is None:
        return torch.log_softmax(x, dim, dtype=dtype)
    return _LogSoftmaxFromPacked.apply(spec, dim, dtype, x, *run)


def _class_dim(x) -> int:
    return 1 if x.dim() > 1 else 0


def _packs_cross_entropy(x, target, label_smoothing) -> bool:
    """Class-index targets: F.cross_entropy is nll_loss(log_softmax(x, class_dim)) (ATen's own
    decomposition), plus, with label smoothing, a weighted sum of the same log-probabilities.
    Class-probability targets that need no gradient (mixup, distillation): ``_soft_nll``. Either
    way the loss is linear in the log-probabilities, so its backward needs only the probabilities."""
    if not isinstance(target, torch.Tensor) or not isinstance(x, torch.Tensor) or x.dim() < 1:
        return False
    if isinstance(label_smoothing, torch.Tensor) or not 0.0 <= label_smoothing <= 1.0:
        return False  # F.cross_entropy itself refuses these; let it say so
    if target.is_floating_point():
        return target.shape == x.shape and not target.requires_grad
    return True


def _along_classes(weight, log_p):
    """Class weights shaped to broadcast along ``log_p``'s class dim."""
    dim = _class_dim(log_p)
    return weight.view([-1 if d == dim else 1 for d in range(log_p.dim())])


def _soft_nll(log_p, target, weight, reduction, label_smoothing=0.0):
    """F.cross_entropy of class probabilities as a function of the log-probabilities (linear)."""
    dim = _class_dim(log_p)
    if label_smoothing:
        target = target * (1 - label_smoothing) + label_smoothing / log_p.shape[dim]
    if weight is not None:
        target = target * _along_classes(weight, log_p)
    loss = -(target * log_p).sum(dim)
    if reduction == "mean":
        return loss.sum() / (log_p.numel() // log_p.shape[dim]) if log_p.dim() > 1 else loss
    return loss.sum() if reduction == "sum" else loss


def _index_nll(log_p, target, weight, ignore_index, reduction, label_smoothing):
    """F.cross_entropy of class indices as a function of the log-probabilities (linear): nll_loss,
    and with smoothing ATen's uniform term, normalised as ATen normalises it (by the summed
    weights of the targets not ignored, for "mean")."""
    nll = F.nll_loss(log_p, target, weight, ignore_index=ignore_index, reduction=reduction)
    if not label_smoothing:
        return nll
    dim = _class_dim(log_p)
    ignored = target == ignore_index
    if weight is not None:
        log_p = log_p * _along_classes(weight, log_p)
    uniform = (-log_p.sum(dim)).masked_fill(ignored, 0.0)
    if reduction == "mean":
        kept = (~ignored).sum() if weight is None else weight[target.masked_fill(ignored, 0)].masked_fill(ignored, 0).sum()
        uniform = uniform.sum() / kept
    elif reduction == "sum":
        uniform = uniform.sum()
    return (1 - label_smoothing) * nll + uniform * (label_smoothing / log_p.shape[dim])


def cross_entropy_probabilities(x, target, label_smoothing):
    """softmax over the class dim (what the loss's backward reads), or None when nothing is packed."""
    if not _packs_cross_entropy(x, target, label_smoothing):
        return None
    return log_softmax_probabilities(x, _class_dim(x))


class _CrossEntropyFromPacked(torch.autograd.Function):
    """Forward: F.cross_entropy itself. Backward: the gradient of nll_loss w.r.t. the
    log-probabilities (it depends only on target, weight and shape, so it is taken at zeros),
    then log_softmax's backward with the packed probabilities. Keeping nll_loss in the graph would
    not do: autograd saves its full-size input (the log-probabilities) for the shape alone."""

    @staticmethod
    def forward(ctx, spec, weight, ignore_index, reduction, label_smoothing, x, target, *run):
        out = F.cross_entropy(x, target, weight, ignore_index=ignore_index, reduction=reduction,
                              label_smoothing=label_smoothing)
        plans, storage = split_all([spec], run)
        ctx.plans, ctx.ignore_index, ctx.reduction, ctx.smoothing = plans, ignore_index, reduction, label_smoothing
        ctx.x_shape, ctx.x_dtype, ctx.has_weight = x.shape, x.dtype, weight is not None
        ctx.save_for_backward(target, *((weight,) if weight is not None else ()), *storage)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        refuse_double_backward("cross_entropy")
        target, *rest = ctx.saved_tensors
        weight = rest.pop(0) if ctx.has_weight else None
        p = materialize_all(ctx.plans, rest)[0]
        zeros = torch.zeros(ctx.x_shape, dtype=p.dtype, device=p.device)
        if target.is_floating_point():
            _, pullback = hooked_vjp.vjp(
                lambda z: _soft_nll(z, target.to(p.dtype), weight, ctx.reduction, ctx.smoothing), zeros)
        else:
            _, pullback = hooked_vjp.vjp(
                lambda z: _index_nll(z, target, weight, ctx.ignore_index, ctx.reduction, ctx.smoothing), zeros)
        g = pullback(grad_out.to(p.dtype))[0]
        gx = g - p * g.sum(_class_dim(p), keepdim=True)
        return (None,) * 5 + (gx.to(ctx.x_dtype),) + (None,) * (len(ctx.needs_input_grad) - 6)


def cross_entropy(spec, weight, ignore_index, reduction, label_smoothing, x, target, *run):
    """F.cross_entropy whose backward reads packed class probabilities instead of the saved
    log-probabilities (for a language model, the largest single tensor training keeps)."""
    if not needs_saving(x) or run[0] is None:
        return F.cross_entropy(x, target, weight, ignore_index=ignore_index, reduction=reduction,
                               label_smoothing=label_smoothing)
    return _CrossEntropyFromPacked.apply(spec, weight, ignore_index, reduction, label_smoothing, x, target, *run)
