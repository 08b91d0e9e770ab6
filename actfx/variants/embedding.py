"""Embedding that keeps its indices in the narrowest integer type holding the table's rows.

Why: embedding's backward needs only the indices, exactly; autograd keeps them as int64. Inside
a model they are often computed (T5/MPNet relative-position buckets: one per query-key pair),
and uint8 / int16 / int32 hold them exactly at 1/8 to 1/2 the bytes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from actfx.variants.common import needs_saving, not_a_view, refuse_double_backward
from actfx.variants.pool import compact_index_dtype


def narrowest_index_dtype(rows: int) -> torch.dtype:
    return torch.uint8 if rows <= 256 else compact_index_dtype(rows)


class _CompactEmbedding(torch.autograd.Function):
    @staticmethod
    def forward(ctx, weight, indices, padding_idx, scale_grad_by_freq):
        out = F.embedding(indices, weight, padding_idx, None, 2.0, scale_grad_by_freq, False)
        ctx.rows, ctx.scale = weight.shape[0], scale_grad_by_freq
        # F.embedding's own normalisation: None -> -1, negative -> rows + index
        ctx.padding = -1 if padding_idx is None else padding_idx if padding_idx >= 0 else weight.shape[0] + padding_idx
        ctx.save_for_backward(indices.to(narrowest_index_dtype(weight.shape[0])))
        return not_a_view(out)

    @staticmethod
    def backward(ctx, grad_out):
        refuse_double_backward("embedding")
        (indices,) = ctx.saved_tensors
        grad = torch.ops.aten.embedding_backward(grad_out, indices.long(), ctx.rows, ctx.padding, ctx.scale, False)
        return grad, None, None, None


def embedding(input, weight, padding_idx=None, max_norm=None, norm_type=2.0, scale_grad_by_freq=False,
              sparse=False):
    """``F.embedding``; keeps compact indices when the weight needs a gradient (dense, no
    max_norm: that renormalises the weight in place, which only the plain op does)."""
    if (max_norm is not None or sparse or not needs_saving(weight) or input.dtype not in (torch.int64, torch.int32)
            or input.device.type not in ("cpu", "cuda")):
        return F.embedding(input, weight, padding_idx, max_norm, norm_type, scale_grad_by_freq, sparse)
    return _CompactEmbedding.apply(weight, input, padding_idx, scale_grad_by_freq)
