"""Mixture-of-experts grouped matmul (``torch._grouped_mm``; transformers' CPU/fp32 fallback
``transformers::grouped_mm_fallback``) keeping its token matrix packed. Each expert's weight
gradient is linear in the tokens routed to it and the tokens' gradient needs only the weights,
so a packed input keeps both unbiased. PyTorch keeps the whole (top-k times repeated) token
matrix: with several experts per token it is an MoE layer's largest saved value."""

from __future__ import annotations

import torch

from actfx.variants.common import needs_saving, not_a_view, refuse_double_backward
from actfx.variants.saved import materialize_all, split_all


def _aten_forward(x, weight, offs):
    return torch._grouped_mm(x, weight, offs)


def _aten_backward(x, weight, offs, grad):
    """PyTorch's own formulas: tokens' gradient by the transposed experts, each expert's by its tokens."""
    gx = torch._grouped_mm(grad, weight.transpose(-2, -1), offs)
    gw = torch._grouped_mm(x.t(), grad, offs)
    return gx, gw


def _transformers_forward(x, weight, offs):
    return torch.ops.transformers.grouped_mm_fallback(x, weight, offs)


def _transformers_backward(x, weight, offs, grad):
    return torch.ops.transformers.grouped_mm_fallback_backward(x, weight, offs, grad)


# implementation name -> (forward, backward(x, weight, offs, grad) -> (grad_x, grad_weight))
IMPLEMENTATIONS = {
    "aten": (_aten_forward, _aten_backward),
    "transformers": (_transformers_forward, _transformers_backward),
}


class _PackedGroupedMM(torch.autograd.Function):
    @staticmethod
    def forward(ctx, spec, implementation, weight, offs, *run):
        x = run[0]
        out = IMPLEMENTATIONS[implementation][0](x, weight, offs)
        plans, storage = split_all([spec], run) if ctx.needs_input_grad[2] else ([None], [])
        ctx.plans, ctx.implementation, ctx.like = plans, implementation, (x.shape, x.dtype)
        ctx.save_for_backward(weight, offs, *storage)
        return not_a_view(out)

    @staticmethod
    def backward(ctx, grad_out):
        refuse_double_backward("grouped_mm")
        weight, offs, *storage = ctx.saved_tensors
        need_weight, need_x = ctx.needs_input_grad[2], ctx.needs_input_grad[4]
        shape, dtype = ctx.like
        # the tokens' values enter only the weight's gradient; without it zeros of their shape serve
        x = (materialize_all(ctx.plans, storage)[0].to(dtype) if need_weight
             else grad_out.new_zeros(shape, dtype=dtype))
        gx, gw = IMPLEMENTATIONS[ctx.implementation][1](x, weight, offs, grad_out.contiguous())
        return (None, None, gw if need_weight else None, None, gx if need_x else None) + (None,) * (
            len(ctx.needs_input_grad) - 5)


def grouped_mm(spec, implementation: str, weight, offs, *run):
    """``implementation``'s grouped matmul of tokens ``run[0]`` (S, K) by experts ``weight``
    (E, K, N), groups ending at ``offs``; the tokens packed for backward."""
    x = run[0]
    if (not needs_saving(x, weight) or not x.is_floating_point() or x.dim() != 2 or weight.dim() != 3
            or not isinstance(offs, torch.Tensor)):
        return IMPLEMENTATIONS[implementation][0](x, weight, offs)
    return _PackedGroupedMM.apply(spec, implementation, weight, offs, *run)
