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
