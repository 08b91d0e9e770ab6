"""GLU ``a * sigmoid(b)`` (``x`` split in halves ``a, b`` along ``dim``) that keeps two packed
half-size factors instead of ``x``: ``sigmoid(b)`` for ``a``'s gradient and
``a * sigmoid(b) * (1 - sigmoid(b))`` for ``b``'s. Backward is linear in each (unbiased); storing
``x`` and recomputing the sigmoid at a rounded ``b`` would not be. Conformer convolution modules
(torchaudio, Wav2Vec2-Conformer) and gated CNNs use it."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from actfx.variants.common import needs_saving, not_a_view, refuse_double_backward
from actfx.variants.saved import materialize_all, split_all, spec_width


def factors(x, dim: int):
    """(sigmoid(b), a * sigmoid'(b)) in x's dtype, outside autograd; (None, None) without backward."""
    if not (isinstance(x, torch.Tensor) and needs_saving(x)) or x.shape[dim] % 2:
        return None, None  # an odd size: F.glu itself raises its own error
    with torch.no_grad():
        a, b = x.detach().chunk(2, dim)
        s = torch.sigmoid(b.float())
        return s.to(x.dtype), (a.float() * s * (1.0 - s)).to(x.dtype)


class _GLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, dim, specs, x, *runs):
        out = F.glu(x, dim)
        ctx.plans, storage = split_all(specs, runs)
        ctx.dim, ctx.dtype = dim, x.dtype
        ctx.save_for_backward(*storage)
        return not_a_view(out)

    @staticmethod
    def backward(ctx, grad_out):
        refuse_double_backward("glu")
        s, d = materialize_all(ctx.plans, ctx.saved_tensors)
        grad = torch.cat([grad_out * s.to(grad_out.dtype), grad_out * d.to(grad_out.dtype)], ctx.dim)
        return (None, None, grad.to(ctx.dtype)) + (None,) * (len(ctx.needs_input_grad) - 3)


def glu(dim, specs, x, *runs):
    if runs[0] is None or not needs_saving(x) or runs[spec_width(specs[0])] is None:
        return F.glu(x, dim)
    return _GLU.apply(dim, specs, x, *runs)
