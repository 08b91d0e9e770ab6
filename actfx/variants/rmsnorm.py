"""RMSNorm (``F.rms_norm`` / ``nn.RMSNorm``) with a packed normalised input and the exact 1/rms.

As with the other norms, recomputing the statistic from a packed input would bias gradients,
so forward keeps the exact per-row ``rstd`` (tiny). What is packed is ``x̂ = x * rstd``, not x:
a group of 256 stored values spans rows when a row is shorter (per-head norms over 64 or 128
features), and with x packed a row of small scale rounds with a large row's step while backward
multiplies that by its rstd (64 rows over 64 features, scales 1e-2..1e2, 2 bits: the input's
gradient was 6.9e6x its norm off). Backward, linear in x̂ but for the term ``second_pack``
corrects: ``y = x̂ w``, ``dx = rstd (g w - x̂ mean(g w x̂))``, ``dw = sum(g x̂)``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from actfx.variants.common import needs_saving, not_a_view, refuse_double_backward
from actfx.variants.saved import materialize_all, split_all
from actfx.variants.second_pack import add_rounding_variance, copy_for_small_rows


def _rstd(x, dims, eps):
    eps_value = torch.finfo(x.dtype).eps if eps is None else eps
    return torch.rsqrt(x.float().square().mean(dims, keepdim=True) + eps_value)


def rms_norm_normalized(x, normalized_shape, eps, weight=None):
    """``x * rstd`` in fp32 (what RMSNorm packs), or None when no backward will run."""
    if not (isinstance(x, torch.Tensor) and needs_saving(x, weight)):
        return None
    shape = [normalized_shape] if isinstance(normalized_shape, int) else list(normalized_shape)
    with torch.no_grad():
        return x.detach().float() * _rstd(x.detach(), tuple(range(-len(shape), 0)), eps)


def _input_grad(g, xhat, copy, rstd, dims):
    """``rstd (g - x̂ mean(g x̂))`` over ``dims`` in fp32, the rounding variance of the diagonal
    term given back from ``copy`` where there is one (``second_pack``); ``g``: the output's
    gradient times the weight."""
    gx = rstd * (g - xhat * (g * xhat).mean(dims, keepdim=True))
    if copy is None:
        return gx
    return add_rounding_variance(gx, g, xhat, copy, rstd / _width(xhat, dims))


class _RMSNormFromNormalized(torch.autograd.Function):
    @staticmethod
    def forward(ctx, specs, shape, eps, weight, x, *run):
        out = F.rms_norm(x, shape, weight, eps)
        dims = tuple(range(-len(shape), 0))
        rstd = _rstd(x, dims, eps)
        plans, storage = split_all(list(specs), run)
        ctx.plans, ctx.dims, ctx.x_dtype = plans, dims, x.dtype
        ctx.save_for_backward(weight, rstd, *storage)
        return not_a_view(out)

    @staticmethod
    def backward(ctx, grad_out):
        refuse_double_backward("rms_norm")
        weight, rstd, *storage = ctx.saved_tensors
        xhat, copy = materialize_all(ctx.plans, storage)
        xhat = xhat.float()
        g = grad_out.float()
        gw_in = g * weight.float() if weight is not None else g
        gx = gw = None
        if ctx.needs_input_grad[4]:
            gx = _input_grad(gw_in, xhat, copy, rstd, ctx.dims).to(ctx.x_dtype)
        if weight is not None and ctx.needs_input_grad[3]:
            gw = (g * xhat).reshape(-1, *weight.shape).sum(0).to(weight.dtype)
        return (None, None, None, gw, gx) + (None,) * (len(ctx.needs_input_grad) - 5)


def rms_norm(specs, normalized_shape, weight, eps, x, *run):
    """``F.rms_norm``, whose backward reads the packed normalised input and its copy (``specs``,
    ``run``: theirs)."""
    shape = [normalized_shape] if isinstance(normalized_shape, int) else list(normalized_shape)
    if run[0] is None or not needs_saving(x, weight):
        return F.rms_norm(x, shape, weight, eps)
    return _RMSNormFromNormalized.apply(specs, tuple(shape), eps, weight, x, *run)


# ---------------------------------------------------------------- hand-written RMS normalisation


def _scale(x, dims, eps, square):
    """1 / rms as the original code computes it, op for op (so the output is bit for bit the same)."""
    if square[0] == "pow":
        sq = x.pow(square[1])
    elif square[0] == "square":
        sq = x.square()
    else:
        sq = x * x
    return torch.rsqrt(sq.mean(dims, keepdim=True) + eps)


def rms_normalize(x, dims, eps, square):
    """``x * rsqrt(mean(x²) + eps)`` as written (``passes/rms_regions.py`` collapses it into this)."""
    return x * _scale(x, dims, eps, square)


def rms_normalized(x, dims, eps, square):
    """(normalised value, 1/rms) outside autograd: what the variant packs and keeps."""
    with torch.no_grad():
        scale = _scale(x, dims, eps, square)
        return x * scale, scale


def rms_copy(normalized, dims, x):
    """The normalised value again, packed apart, where a row holds few values (``second_pack``)."""
    if normalized is None:
        return None
    return copy_for_small_rows(normalized, normalized.numel() // max(_width(normalized, dims), 1), x)


def _width(value, dims) -> int:
    """The values in one normalised row (``dims``: an int or a tuple of them)."""
    return math.prod(value.shape[d] for d in ((dims,) if isinstance(dims, int) else dims))


class _FromNormalized(torch.autograd.Function):
    @staticmethod
    def forward(ctx, specs, dims, x, scale, *run):
        y = run[0]
        plans, storage = split_all(list(specs), run)
        ctx.plans, ctx.dims, ctx.x_dtype = plans, dims, x.dtype
        ctx.save_for_backward(scale, *storage)
        return y.view_as(y)

    @staticmethod
    def backward(ctx, grad_out):
        refuse_double_backward("rms_normalize")
        scale, *storage = ctx.saved_tensors
        n, copy = materialize_all(ctx.plans, storage)
        # y = x * r(x), r = (mean(x²) + eps)^-1/2:  dx = r * (g - n * mean(g * n)), n = x * r
        gx = _input_grad(grad_out.float(), n.float(), copy, scale.float(), ctx.dims)
        return (None, None, gx.to(ctx.x_dtype), None) + (None,) * (len(ctx.needs_input_grad) - 4)


def rms_from_normalized(specs, dims, x, scale, *run):
    """The normalised value (``run``'s head), whose backward reads its pack, its copy over few
    values a row (``specs``, ``run``: theirs) and the exact 1/rms."""
    if not needs_saving(x) or run[0] is None:
        return run[0]
    return _FromNormalized.apply(specs, dims, x, scale, *run)
