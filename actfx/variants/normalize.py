"""``F.normalize`` (p = 2 along one dim) with its packed output and the exact 1/norm.

Why not its input, recomputed in backward as an element-wise op is: ``x / ||x||`` is nonlinear in
x, so that backward was biased (cosine similarity ``h @ h^T`` of normalised 32-feature rows at 2
bits: the mean of 128 gradients stayed 0.41 of one step's error away from the exact gradient).
Backward is ``dx = s (g - n sum(g n))``, n the output and s = 1 / max(||x||, eps) (``s g`` alone
where the norm is below eps): linear in n except ``n_i g_i n_i``, whose rounding variance a second
pack gives back on rows of fewer than 128 values (``second_pack``). The same serves ``x / ||x||``
and ``x / (||x|| + eps)`` written out (``passes/norm_divisions.py``), with ``g / (||x|| + eps) -
n sum(g n) / ||x||`` for the latter.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from actfx.variants.common import needs_saving, refuse_double_backward
from actfx.variants.saved import materialize_all, split_all
from actfx.variants.second_pack import add_rounding_variance, copy_for_small_rows


def divided_by_norm(x, dim: int, mode: str, eps: float):
    """``x`` over its 2-norm along ``dim``: ``mode`` "plain" (the norm), "add" (norm + eps) or
    "clamp" (max(norm, eps), ``F.normalize``), computed as those spellings compute it."""
    if mode == "clamp":
        return F.normalize(x, 2.0, dim, eps)
    norm = torch.linalg.vector_norm(x, 2, dim, keepdim=True)
    return x / (norm + eps if mode == "add" else norm)


def normalized(x, dim, eps, mode="clamp"):
    """(``divided_by_norm(x)``, 1/denominator, the norm's share of backward: d(denominator)/d(norm)
    / norm) outside autograd, or None when no backward will run."""
    if not (isinstance(x, torch.Tensor) and needs_saving(x)):
        return None
    with torch.no_grad():
        norm = x.norm(2, dim, keepdim=True)
        if mode == "clamp":
            denominator = norm.clamp_min(eps)
            return F.normalize(x, 2.0, dim, eps), denominator.reciprocal(), (norm > eps) / denominator
        through = torch.where(norm > 0, norm.reciprocal(), 0.0)  # the norm's gradient at 0 is 0, as ATen's
        return divided_by_norm(x, dim, mode, eps), (norm + eps if mode == "add" else norm).reciprocal(), through


def output_of(pair):
    return None if pair is None else pair[0]


def row_copy(pair, dim, x):
    """The output again, packed apart, where a row holds fewer than 128 values (``second_pack``)."""
    if pair is None:
        return None
    out = pair[0]
    return copy_for_small_rows(out, out.numel() // max(out.shape[dim], 1), x)


class _NormalizeFromOutput(torch.autograd.Function):
    @staticmethod
    def forward(ctx, specs, dim, x, scale, projected, *run):
        plans, storage = split_all(list(specs), run)
        ctx.plans, ctx.dim, ctx.x_dtype = plans, dim, x.dtype
        ctx.save_for_backward(scale, projected, *storage)
        return run[0].view_as(run[0])

    @staticmethod
    def backward(ctx, grad_out):
        refuse_double_backward("normalize")
        scale, projected, *storage = ctx.saved_tensors
        n, copy = materialize_all(ctx.plans, storage)
        n, g, s = n.float(), grad_out.float(), projected.float()
        gx = scale.float() * g - s * n * (g * n).sum(ctx.dim, keepdim=True)
        if copy is not None:
            gx = add_rounding_variance(gx, g, n, copy, s)
        return (None, None, gx.to(ctx.x_dtype), None, None) + (None,) * (len(ctx.needs_input_grad) - 5)


def normalize(specs, dim, eps, x, pair, *run, mode="clamp"):
    """``divided_by_norm(x, dim, mode, eps)`` (``F.normalize`` by default); backward reads the
    packed output, its copy (``specs``, ``run``) and the exact 1/norm (``pair``: from
    :func:`normalized`)."""
    if pair is None or run[0] is None:
        return divided_by_norm(x, dim, mode, eps)
    return _NormalizeFromOutput.apply(specs, dim, x, pair[1], pair[2], *run)
