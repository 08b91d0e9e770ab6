"""``torch.masked_select`` that keeps only its mask for backward.

Why: backward scatters the selected values' gradient back where the mask is true, which needs
the mask and the input's shape; autograd keeps the whole input as well (for ``zeros_like``), so
selecting the valid tokens of a loss held the full activation next to its mask (4 of every 5
bytes the op kept). The gradient is the one PyTorch computes.
"""

from __future__ import annotations

import torch

from actfx.variants.common import needs_saving, refuse_double_backward


class _MaskKept(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, mask):
        ctx.save_for_backward(mask)
        ctx.like = (x.shape, x.dtype)
        return torch.masked_select(x, mask)

    @staticmethod
    def backward(ctx, grad_out):
        refuse_double_backward("masked_select")
        (mask,) = ctx.saved_tensors
        shape, dtype = ctx.like
        full = torch.broadcast_shapes(shape, mask.shape)
        grad = grad_out.new_zeros(full, dtype=dtype).masked_scatter_(mask.expand(full), grad_out.to(dtype))
        return grad.sum_to_size(shape), None


def masked_select(x, mask):
    """``torch.masked_select(x, mask)``, keeping the mask alone when ``x`` needs a gradient."""
    if not (isinstance(x, torch.Tensor) and isinstance(mask, torch.Tensor) and needs_saving(x)
            and mask.dtype == torch.bool and not x.is_complex()):
        return torch.masked_select(x, mask)
    return _MaskKept.apply(x, mask)
