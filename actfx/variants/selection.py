"""Ops that select elements along a dim and return their indices (``sort``, ``topk``, ``cummax``,
``cummin``, ``kthvalue``, ``median`` / ``nanmedian`` / ``mode`` over a dim), keeping only compact
indices for backward.

Why: backward scatters the values' gradient back to where they came from, which needs the
indices and the input's shape, nothing else. PyTorch keeps the indices as int64 (8 bytes a value,
twice a float32 input) and, for ``cummax`` / ``cummin``, the input too. Here they are kept in the
narrowest integer type that holds the dim's length (uint8 up to 256); backward is the same ``scatter_add`` PyTorch
runs, so gradients are identical.
"""

from __future__ import annotations

import torch

from actfx.variants.common import needs_saving, not_a_view, refuse_double_backward
from actfx.variants.pool import compact_index_dtype


class _Selected(torch.autograd.Function):
    @staticmethod
    def forward(ctx, call, dim, reduced, x):
        with torch.no_grad():
            result = call(x)
        values, indices = result[0], result[1]
        size = x.shape[dim]
        ctx.save_for_backward(indices.to(torch.uint8 if size <= 256 else compact_index_dtype(size)))
        ctx.dim, ctx.reduced, ctx.shape, ctx.dtype, ctx.name = dim, reduced, x.shape, x.dtype, type(result).__name__
        ctx.mark_non_differentiable(indices)
        return not_a_view(values), indices

    @staticmethod
    def backward(ctx, grad_values, _grad_indices):
        refuse_double_backward(ctx.name)
        (indices,) = ctx.saved_tensors
        if ctx.reduced:  # the dim was dropped
            grad_values, indices = grad_values.unsqueeze(ctx.dim), indices.unsqueeze(ctx.dim)
        grad = torch.zeros(ctx.shape, dtype=grad_values.dtype, device=grad_values.device)
        return None, None, None, grad.scatter_add_(ctx.dim, indices.long(), grad_values).to(ctx.dtype)


def selecting(op_name: str, call, dim: int, reduced: bool, name: str):
    """A graph-callable ``f(x)``: ``call(x)`` (the selecting op ``op_name``, returning (values,
    indices)) whose backward keeps compact indices; ``reduced``: the op dropped ``dim``
    (``keepdim=False``). It returns the op's own named tuple (``torch.return_types.sort`` ...),
    so ``.values`` and ``[1]`` read as before."""
    result_type = getattr(torch.return_types, op_name)

    def select(x):
        if not (isinstance(x, torch.Tensor) and needs_saving(x) and x.is_floating_point() and x.dim()):
            return call(x)
        return result_type(_Selected.apply(call, dim, reduced, x))

    select.__name__ = select.__qualname__ = f"{op_name}_compact_indices_{name}"
    select.actfx_fresh = True  # made anew by each rewrite (provenance compares names)
    return select
