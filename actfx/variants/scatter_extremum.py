"""``scatter_reduce`` with ``reduce="amax"`` / ``"amin"``, keeping 1-bit masks of the extrema.

Why: max aggregation in graph networks (torch_geometric's MaxAggregation: EdgeCNN, PointNet++,
DGCNN) scatters one message per edge; autograd keeps the messages, the destination and the
result, all at full precision (85% of what EdgeCNN held after conversion). The gradient needs
only *which* messages (and which destination values) equal their extremum, and how many tie:
exact bit masks and the index. The tie count is rebuilt from the masks in backward.
"""

from __future__ import annotations

import torch

from actfx.kernels import pack_bits, unpack_bits
from actfx.variants.common import needs_saving, refuse_double_backward

EXTREMA = ("amax", "amin")


class _ScatterExtremum(torch.autograd.Function):
    @staticmethod
    def forward(ctx, inplace, dim, reduce, include_self, x, index, src):
        before = x.detach().clone() if inplace else x.detach()
        out = x.scatter_reduce_(dim, index, src, reduce, include_self=include_self) if inplace else \
            x.scatter_reduce(dim, index, src, reduce, include_self=include_self)
        if inplace:
            ctx.mark_dirty(x)
        result = out.detach()
        masks = [src.detach() == result.gather(dim, index), before == result]
        if not include_self:  # where a message landed, the destination's own value took no part
            masks.append(torch.zeros_like(result, dtype=torch.bool).scatter_(dim, index, True))
        ctx.save_for_backward(index, *(pack_bits(m.contiguous()) for m in masks))
        ctx.dim, ctx.out_shape = dim, result.shape
        return out

    @staticmethod
    def backward(ctx, grad_out):
        refuse_double_backward("scatter_reduce")
        index, src_bits, self_bits, *landed = ctx.saved_tensors
        src_hit = unpack_bits(src_bits, index.shape).to(grad_out.dtype)
        self_hit = unpack_bits(self_bits, ctx.out_shape).to(grad_out.dtype)
        # ATen's formula: the gradient is shared evenly by the values equal to the extremum (the
        # destination's own counted even where it took no part; NaN where none is equal)
        share = grad_out / self_hit.scatter_add(ctx.dim, index, src_hit)
        grad_self = None
        if ctx.needs_input_grad[4]:
            grad_self = share * self_hit
            if landed:
                grad_self = grad_self.masked_fill(unpack_bits(landed[0], ctx.out_shape), 0)
        grad_src = share.gather(ctx.dim, index) * src_hit if ctx.needs_input_grad[6] else None
        return None, None, None, None, grad_self, None, grad_src


def scatter_extremum(x, dim, index, src, reduce, *, include_self=True, inplace=False):
    """``x.scatter_reduce(dim, index, src, reduce, include_self=...)`` (``scatter_reduce_`` when
    ``inplace``) for reduce in ``EXTREMA``, keeping masks instead of the values."""
    op = x.scatter_reduce_ if inplace else x.scatter_reduce
    if (reduce not in EXTREMA or not isinstance(dim, int) or not needs_saving(x, src) or not src.is_floating_point()
            or src.shape != index.shape or (inplace and (x._base is not None or x.requires_grad and x.is_leaf))):
        return op(dim, index, src, reduce, include_self=include_self)
    return _ScatterExtremum.apply(inplace, dim, reduce, include_self, x, index, src)
