"""PReLU: an exact 1-bit mask of ``x > 0`` for the input's gradient, and ``x`` packed for the
slope's gradient ``sum(g * x)`` over the non-positive positions, which is linear in ``x``
(unbiased). PyTorch keeps ``x`` whole for both."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from actfx.kernels import pack_bits, unpack_bits
from actfx.variants.common import needs_saving, not_a_view, refuse_double_backward
from actfx.variants.saved import materialize_all, split_all


class _PReLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, spec, weight, *run):
        x = run[0]
        out = F.prelu(x, weight)
        plans, storage = split_all([spec], run) if ctx.needs_input_grad[1] else ([None], [])
        ctx.plans, ctx.shape, ctx.dtype = plans, x.shape, x.dtype
        ctx.save_for_backward(pack_bits((x.detach() > 0).contiguous()), weight, *storage)
        return not_a_view(out)

    @staticmethod
    def backward(ctx, grad_out):
        refuse_double_backward("prelu")
        positive, weight, *storage = ctx.saved_tensors
        positive = unpack_bits(positive, ctx.shape)
        channel = 1 if len(ctx.shape) >= 2 else 0
        slope = weight
        if weight.numel() > 1:
            slope = weight.view([-1 if d == channel else 1 for d in range(len(ctx.shape))])
        g = grad_out
        gx = torch.where(positive, g, slope * g) if ctx.needs_input_grad[2] else None
        gw = None
        if ctx.needs_input_grad[1]:
            x = materialize_all(ctx.plans, storage)[0].to(g.dtype)
            per_element = torch.where(positive, torch.zeros_like(g), x * g)
            if weight.numel() == 1:
                gw = per_element.sum().reshape(weight.shape)
            else:
                gw = per_element.sum([d for d in range(len(ctx.shape)) if d != channel]).reshape(weight.shape)
            gw = gw.to(weight.dtype)
        return (None, gw, gx) + (None,) * (len(ctx.needs_input_grad) - 3)


def prelu(spec, weight, *run):
    x = run[0]
    if not needs_saving(x, weight) or not x.is_floating_point() or x.dim() == 0:
        return F.prelu(x, weight)
    return _PReLU.apply(spec, weight, *run)
