"""Attention whose backward reads the probabilities, not softmax(q k^T) recomputed from q and k.

Why: the fused variant (``recompute``) reruns SDPA in backward from packed q, k, v. Softmax is
nonlinear in q and k, so they stay at 8 bits or more (``NONLINEAR_BITS``): about 30% of a small
ViT's bytes at 2 bits, out of a plan's reach. Here forward runs the original SDPA call (the same
output) and also computes the probabilities P; backward is written out, linear in every value it
reads:

    dV = P^T dO,   dP = dO V^T,   dS = P (dP - rowsum(P' dP)),   dQ = s dS K,   dK = s dS^T Q

P and P' are two packs of the same probabilities, rounded independently: ``P rowsum(P dP)`` from
one pack multiplies its rounding by itself (a bias); from two the expectation factors. Every other
product pairs independently rounded packs, so q, k, v and the probabilities may take any width.
Used where ``Config.attention_math`` is set (``actfx.plan`` sets it where it plans a lower
gradient variance that way) and the call has no dropout. It holds ``2 S`` values per query row
more than the fused variant, so it pays only for short rows at narrow widths.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from actfx.passes.signatures import bind
from actfx.variants.common import needs_saving, not_a_view, refuse_double_backward
from actfx.variants.recompute import fill
from actfx.variants.saved import head_positions, materialize_all, split_all, values_of

_SAFE_SOFTMAX = getattr(torch.ops.aten, "_safe_softmax", None)


def _operands(args, kwargs) -> tuple:
    """(q, k, v, mask, scale, is_causal) of an SDPA call, k and v repeated to q's heads under
    ``enable_gqa``."""
    given = bind("sdpa", args, kwargs)
    q, k, v = given["query"], given["key"], given["value"]
    if given["enable_gqa"] and k.shape[-3] != q.shape[-3]:
        k = k.repeat_interleave(q.shape[-3] // k.shape[-3], -3)
        v = v.repeat_interleave(q.shape[-3] // v.shape[-3], -3)
    scale = given["scale"]
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    return q, k, v, given["attn_mask"], scale, bool(given["is_causal"])


def _scores(q, k, mask, scale, causal):
    work = torch.float32 if q.dtype in (torch.float16, torch.bfloat16) else q.dtype
    s = (q.to(work) @ k.to(work).transpose(-2, -1)) * scale
    if causal:
        keep = torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool, device=q.device).tril()
        s = s.masked_fill(~keep, float("-inf"))
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else s + mask.to(work)
    return s


def probabilities(static, *flat):
    """softmax(q k^T s + mask) of the call (a fully masked row is zeros, as PyTorch's math
    backend makes it), outside autograd; None when nothing will be saved."""
    args_t, kwargs_t, specs = static
    values = values_of(specs, flat)
    if not needs_saving(*values):
        return None
    with torch.no_grad():
        q, k, _, mask, scale, causal = _operands(fill(args_t, values), dict(fill(kwargs_t, values)))
        s = _scores(q, k, mask, scale, causal)
        return _SAFE_SOFTMAX(s, -1) if _SAFE_SOFTMAX is not None else torch.softmax(s, -1).nan_to_num_(0.0)


def _sum_to(grad, shape):
    """``grad`` summed over the dimensions broadcasting added to a value of ``shape``."""
    while grad.dim() > len(shape):
        grad = grad.sum(0)
    dims = [i for i, (g, n) in enumerate(zip(grad.shape, shape)) if n == 1 and g != 1]
    return grad.sum(dims, keepdim=True) if dims else grad


class _MathAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, static, *flat):
        args_t, kwargs_t, specs, prob_specs = static
        values = values_of(specs, flat)
        out = F.scaled_dot_product_attention(*fill(args_t, values), **dict(fill(kwargs_t, values)))
        plans, storage = split_all([*specs, *prob_specs], flat)
        ctx.static, ctx.plans = static, plans
        ctx.heads = head_positions(specs, 1)
        ctx.save_for_backward(*storage)
        return not_a_view(out)

    @staticmethod
    def backward(ctx, grad_out):
        refuse_double_backward("scaled_dot_product_attention")
        args_t, kwargs_t, specs, _ = ctx.static
        values = materialize_all(ctx.plans, ctx.saved_tensors)
        p, p2 = values[len(specs):]
        values = values[:len(specs)]
        diff = [i for i, head in enumerate(ctx.heads) if isinstance(values[i], torch.Tensor)
                and values[i].is_floating_point() and ctx.needs_input_grad[head]]
        grads = [None] * len(ctx.needs_input_grad)
        if not diff:
            return tuple(grads)
        _, _, _, mask, scale, _ = _operands(fill(args_t, values), dict(fill(kwargs_t, values)))
        mask_grad = isinstance(mask, torch.Tensor) and mask.is_floating_point()

        def operands(*diff_values):  # the saved values -> the call's (repeated) q, k, v, float mask
            vals = list(values)
            for i, v in zip(diff, diff_values):
                vals[i] = v
            q, k, v, m, _, _ = _operands(fill(args_t, vals), dict(fill(kwargs_t, vals)))
            return (q, k, v, m) if mask_grad else (q, k, v)

        full, pullback = torch.func.vjp(operands, *[values[i] for i in diff])
        q, k, v = full[:3]
        work = p.dtype
        g = grad_out.to(work)
        dv = p.transpose(-2, -1) @ g
        dp = g @ v.to(work).transpose(-2, -1)
        ds = p * (dp - (p2 * dp).sum(-1, keepdim=True))
        dq = (ds @ k.to(work)) * scale
        dk = (ds.transpose(-2, -1) @ q.to(work)) * scale
        cotangents = [dq, dk, dv] + ([ds] if mask_grad else [])
        got = pullback(tuple(_sum_to(c, t.shape).to(t.dtype) for c, t in zip(cotangents, full)))
        for i, g_i in zip(diff, got):
            grads[ctx.heads[i]] = g_i
        return tuple(grads)


def attention(static, *flat):
    """``static`` = (args template, kwargs template, specs of the saved values, specs of the two
    probability packs); ``flat``: the saved values' runs, then the two packs' runs."""
    args_t, kwargs_t, specs, _ = static
    values = values_of(specs, flat)
    if not needs_saving(*values):
        return F.scaled_dot_product_attention(*fill(args_t, values), **dict(fill(kwargs_t, values)))
    return _MathAttention.apply(static, *flat)

