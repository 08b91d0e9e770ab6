"""``torch.gather`` that keeps its index in the narrowest integer type holding the gathered dim.

Why: gather's backward needs only the index, exactly, and autograd keeps it as int64. Token
selection builds it at the output's full size (ViT-MAE's random masking gathers the kept patches
with ``ids_keep.unsqueeze(-1).repeat(1, 1, dim)``): an int64 index twice the bytes of the fp32
values it selects. uint8 / int16 / int32 hold it exactly at 1/8 to 1/2 of that.
"""

from __future__ import annotations

import torch

from actfx.variants.common import needs_saving, not_a_view, refuse_double_backward
from actfx.variants.embedding import narrowest_index_dtype


class _CompactGather(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, dim, index):
        out = torch.gather(x, dim, index)
        ctx.dim, ctx.like, ctx.index_shape = dim, (x.shape, x.dtype), index.shape
        ctx.save_for_backward(_unexpanded(index).to(narrowest_index_dtype(x.shape[dim])))
        return not_a_view(out)

    @staticmethod
    def backward(ctx, grad_out):
        refuse_double_backward("gather")
        (index,) = ctx.saved_tensors
        shape, dtype = ctx.like
        index = index.long().expand(ctx.index_shape)
        grad = grad_out.new_zeros(shape, dtype=dtype).scatter_add_(ctx.dim, index, grad_out)
        return grad, None, None


def _unexpanded(index: torch.Tensor) -> torch.Tensor:
    """``index`` without the dims an ``expand`` repeated (stride 0): ``idx[:, None].expand(-1, d)``
    holds one value a row, and a copy at its full size would hold d of them."""
    return index[tuple(slice(0, 1) if stride == 0 else slice(None) for stride in index.stride())]


def gather(x, dim: int, index):
    """``torch.gather(x, dim, index)``, the index kept compact when ``x`` needs a gradient."""
    if (not needs_saving(x) or x.is_complex() or index.dtype not in (torch.int64, torch.int32)
            or x.dim() == 0 or narrowest_index_dtype(x.shape[dim]).itemsize >= index.element_size()):
        return torch.gather(x, dim, index)
    return _CompactGather.apply(x, dim, index)
