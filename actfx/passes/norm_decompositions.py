"""GroupNorm's backward written through its normalised input, for ``actfx.compile``'s graphs.

Why: Inductor's decomposition of ``native_group_norm_backward`` reads the raw input ``x`` in
sums and products with per-group coefficients (``rstd * w * dy + c2 * x + c3``). Packed raw, a
256-value pack group spans groups of very different spread (a per-head GroupNorm after a
retention or attention matmul), and the coefficients multiply each small group's share of the
large step by its large ``rstd``: a RetNet block's 2-bit gradient came out ~10^7 times its norm
off under ``actfx.compile`` (``actfx.convert``, which packs the normalised value, 1.2x). Written
here as LayerNorm's is, through ``x̂ = (x - mean) * rstd``, backward reads ``x`` only to rebuild
``x̂``, so the pass stores ``x̂`` (``hoist.normalised_inputs``): unit spread in every group.
The same gradients as PyTorch's formula, in another order of operations.
"""

from __future__ import annotations

import torch

aten = torch.ops.aten


def group_norm_backward(grad_out, input, mean, rstd, weight, N, C, HxW, group, output_mask):
    """``aten.native_group_norm_backward`` from ``x̂`` (mean and rstd are ``[N, group]``)."""
    per_group = C // group
    compute = torch.float32 if input.dtype in (torch.float16, torch.bfloat16) else input.dtype
    rows = input.to(compute).reshape(N, group, per_group * HxW)
    xhat = ((rows - mean.to(compute).reshape(N, group, 1)) * rstd.to(compute).reshape(N, group, 1))
    xhat = xhat.reshape(N, group, per_group, HxW)
    dy = grad_out.to(compute).reshape(N, group, per_group, HxW)
    g = dy if weight is None else dy * weight.to(compute).reshape(1, group, per_group, 1)
    grad_input = grad_weight = grad_bias = None
    if output_mask[0]:
        count = per_group * HxW
        centred = g - g.sum((2, 3), keepdim=True) / count - xhat * ((g * xhat).sum((2, 3), keepdim=True) / count)
        grad_input = (centred * rstd.to(compute).reshape(N, group, 1, 1)).reshape(input.shape).to(input.dtype)
    if output_mask[1] and weight is not None:
        grad_weight = (dy * xhat).sum((0, 3)).reshape(C).to(weight.dtype)
    if output_mask[2]:
        grad_bias = dy.sum((0, 3)).reshape(C).to(grad_out.dtype if weight is None else weight.dtype)
    return grad_input, grad_weight, grad_bias


def compiled_decompositions() -> dict:
    """Inductor's decomposition table with actfx's overrides: what ``actfx.compile`` traces with."""
    from torch._inductor.decomposition import select_decomp_table

    return {**select_decomp_table(), aten.native_group_norm_backward.default: group_norm_backward}
