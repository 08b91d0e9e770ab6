"""Linear (any leading dims) that keeps its input packed; the weight gradient is linear in it."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from actfx.variants.common import needs_saving, not_a_view, refuse_double_backward
from actfx.variants.saved import materialize_all, split_all


class _PackedLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, spec, weight, bias, *run):
        x = run[0]
        out = F.linear(x, weight, bias)
        # what each gradient reads, kept only for the gradients asked for: a frozen layer's input
        # (fine-tuning) or a first layer's computed weight (weight_norm: 4 MiB) are not kept
        plans, storage = split_all([spec], run) if ctx.needs_input_grad[1] else ([None], [])
        ctx.plans = plans
        ctx.meta = (x.dtype, weight.dtype, None if bias is None else bias.dtype, out.dtype)
        ctx.save_for_backward(weight if ctx.needs_input_grad[3] else None, *storage)
        return not_a_view(out)

    @staticmethod
    def backward(ctx, grad_out):
        refuse_double_backward("linear")
        weight, *storage = ctx.saved_tensors
        x_dtype, w_dtype, b_dtype, compute = ctx.meta
        g = grad_out.to(compute)
        gx = gw = gb = None
        if ctx.needs_input_grad[3]:
            gx = (g @ weight.to(compute)).to(x_dtype)
        if ctx.needs_input_grad[1]:
            x = materialize_all(ctx.plans, storage)[0].to(compute)
            gw = (g.reshape(-1, g.shape[-1]).t() @ x.reshape(-1, x.shape[-1])).to(w_dtype)
        if b_dtype is not None and ctx.needs_input_grad[2]:
            gb = g.reshape(-1, g.shape[-1]).sum(0).to(b_dtype)
        return (None, gw, gb, gx) + (None,) * (len(ctx.needs_input_grad) - 4)


def linear(spec, weight, bias, *run):
    if not needs_saving(run[0], weight, bias):
        return F.linear(run[0], weight, bias)
    return _PackedLinear.apply(spec, weight, bias, *run)
