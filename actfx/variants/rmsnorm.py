"""RMSNorm (``F.rms_norm`` / ``nn.RMSNorm``) with a packed input and the exact 1/rms.

As with the other norms, recomputing the statistic from a packed input would bias gradients,
so forward keeps the exact per-row ``rstd`` (tiny) and backward evaluates the closed-form
gradient at the unpacked input:
    y = x * rstd * w,  dx = rstd * (g*w - x * rstd^2 * mean(g*w*x)),  dw = sum(g * x * rstd).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from actfx.variants.common import needs_saving, not_a_view, refuse_double_backward
from actfx.variants.saved import materialize_all, split_all


class _PackedRMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, spec, shape, eps, weight, *run):
        x = run[0]
        out = F.rms_norm(x, shape, weight, eps)
        dims = tuple(range(-len(shape), 0))
        eps_value = torch.finfo(x.dtype).eps if eps is None else eps
        rstd = torch.rsqrt(x.float().square().mean(dims, keepdim=True) + eps_value)
        plans, storage = split_all([spec], run)
        ctx.plans, ctx.dims, ctx.x_dtype = plans, dims, x.dtype
        ctx.save_for_backward(weight, rstd, *storage)
        return not_a_view(out)

    @staticmethod
    def backward(ctx, grad_out):
        refuse_double_backward("rms_norm")
        weight, rstd, *storage = ctx.saved_tensors
        x = materialize_all(ctx.plans, storage)[0].float()
        g = grad_out.float()
        gw_in = g * weight.float() if weight is not None else g
        gx = gw = None
        if ctx.needs_input_grad[4]:
            inner = (gw_in * x).mean(ctx.dims, keepdim=True)
            gx = (rstd * (gw_in - x * rstd.square() * inner)).to(ctx.x_dtype)
        if weight is not None and ctx.needs_input_grad[3]:
            gw = (g * x * rstd).reshape(-1, *weight.shape).sum(0).to(weight.dtype)
        return (None, None, None, gw, gx) + (None,) * (len(ctx.needs_input_grad) - 5)


def rms_norm(spec, normalized_shape, weight, eps, *run):
    shape = [normalized_shape] if isinstance(normalized_shape, int) else list(normalized_shape)
    if not needs_saving(run[0], weight):
        return F.rms_norm(run[0], shape, weight, eps)
    return _PackedRMSNorm.apply(spec, tuple(shape), eps, weight, *run)


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


class _FromNormalized(torch.autograd.Function):
    @staticmethod
    def forward(ctx, spec, dims, x, scale, *run):
        y = run[0]
        plans, storage = split_all([spec], run)
        ctx.plans, ctx.dims, ctx.x_dtype = plans, dims, x.dtype
        ctx.save_for_backward(scale, *storage)
        return y.view_as(y)

    @staticmethod
    def backward(ctx, grad_out):
        refuse_double_backward("rms_normalize")
        scale, *storage = ctx.saved_tensors
        n = materialize_all(ctx.plans, storage)[0].float()
        g = grad_out.float()
        # y = x * r(x), r = (mean(x²) + eps)^-1/2:  dx = r * (g - n * mean(g * n)), n = x * r
        gx = scale.float() * (g - n * (g * n).mean(ctx.dims, keepdim=True))
        return (None, None, gx.to(ctx.x_dtype), None) + (None,) * (len(ctx.needs_input_grad) - 4)


def rms_from_normalized(spec, dims, x, scale, *run):
    """The normalised value (``run``'s head), whose backward reads its pack and the exact 1/rms."""
    if not needs_saving(x) or run[0] is None:
        return run[0]
    return _FromNormalized.apply(spec, dims, x, scale, *run)
