"""Linear (any leading dims) that keeps its input packed; the weight gradient is linear in it.
A weight computed from parameters alone (a LoRA's merged weight) is made again for the input's
gradient rather than kept (``specs[1]``, see passes/parameter_rebuild.py)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from actfx.variants.common import needs_saving, not_a_view, refuse_double_backward
from actfx.variants.saved import materialize_all, spec_width, split_all, split_weight, weight_of


class _PackedLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, specs, weight, bias, *runs):
        x = runs[0]
        out = F.linear(x, weight, bias)
        width = spec_width(specs[0])
        # what each gradient reads, kept only for the gradients asked for: a frozen layer's input
        # (fine-tuning) or a first layer's computed weight (weight_norm: 4 MiB) are not kept
        plans, storage = split_all(specs[:1], runs[:width]) if ctx.needs_input_grad[1] else ([None], [])
        needs_weight = ctx.needs_input_grad[3]  # the input's gradient reads it
        weight_plans, weight_storage = split_weight(specs, runs, width, weight) if needs_weight else ([], [None])
        ctx.plans, ctx.weight_plans, ctx.weight_count = plans, weight_plans, len(weight_storage)
        ctx.meta = (x.dtype, weight.dtype, None if bias is None else bias.dtype, out.dtype)
        ctx.save_for_backward(*weight_storage, *storage)
        return not_a_view(out)

    @staticmethod
    def backward(ctx, grad_out):
        refuse_double_backward("linear")
        saved = ctx.saved_tensors
        weight_storage, storage = saved[:ctx.weight_count], saved[ctx.weight_count:]
        x_dtype, w_dtype, b_dtype, compute = ctx.meta
        g = grad_out.to(compute)
        gx = gw = gb = None
        if ctx.needs_input_grad[3]:
            gx = (g @ weight_of(ctx.weight_plans, weight_storage).to(compute)).to(x_dtype)
        if ctx.needs_input_grad[1]:
            x = materialize_all(ctx.plans, storage)[0].to(compute)
            gw = (g.reshape(-1, g.shape[-1]).t() @ x.reshape(-1, x.shape[-1])).to(w_dtype)
        if b_dtype is not None and ctx.needs_input_grad[2]:
            gb = g.reshape(-1, g.shape[-1]).sum(0).to(b_dtype)
        return (None, gw, gb, gx) + (None,) * (len(ctx.needs_input_grad) - 4)


def linear(specs, weight, bias, *runs):
    """``F.linear(runs[0], weight, bias)``; ``specs``: the input's storage, then the weight's
    where the graph computes it from parameters."""
    if not needs_saving(runs[0], weight, bias):
        return F.linear(runs[0], weight, bias)
    return _PackedLinear.apply(specs, weight, bias, *runs)
