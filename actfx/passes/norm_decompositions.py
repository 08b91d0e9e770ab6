"""GroupNorm's and BatchNorm's backwards written through the normalised input, for
``actfx.compile``'s graphs.

Why: Inductor's decomposition of ``native_group_norm_backward`` reads the raw input ``x`` in
sums and products with per-group coefficients (``rstd * w * dy + c2 * x + c3``). Packed raw, a
256-value pack group spans groups of very different spread (a per-head GroupNorm after a
retention or attention matmul), and the coefficients multiply each small group's share of the
large step by its large ``rstd``: a RetNet block's 2-bit gradient came out ~10^7 times its norm
off under ``actfx.compile`` (``actfx.convert``, which packs the normalised value, 1.2x). Written
here as LayerNorm's is, through ``x̂ = (x - mean) * rstd``, backward reads ``x`` only to rebuild
``x̂``, so the pass stores ``x̂`` (``hoist.normalised_inputs``): unit spread in every group.
The same gradients as PyTorch's formula, in another order of operations.

BatchNorm likewise: its decomposed backward read ``x - mean`` in two sums, so x was packed raw. Over
small maps (MobileNetV3's 2x2 stages at 64 px, batch 2: 8 values a channel) a pack group spans
dozens of channels of very different spread, and each channel's share of the step is multiplied
by its ``invstd``: one step's 2-bit gradient 344x its norm off (convert, which packs x̂: 7.4x).
"""

from __future__ import annotations

import functools

import torch
from torch._prims_common import get_computation_dtype

aten = torch.ops.aten


def _centred(g, xhat, dims, count: int):
    """``g`` less its mean and its projection on ``x̂`` over ``dims`` (``count`` values): the
    normalisation's input gradient before the 1/std scale, linear in each read of x̂."""
    return g - g.sum(dims, keepdim=True) / count - xhat * ((g * xhat).sum(dims, keepdim=True) / count)


def group_norm_backward(grad_out, input, mean, rstd, weight, N, C, HxW, group, output_mask):
    """``aten.native_group_norm_backward`` from ``x̂`` (mean and rstd are ``[N, group]``)."""
    per_group = C // group
    compute = get_computation_dtype(input.dtype)
    rows = input.to(compute).reshape(N, group, per_group * HxW)
    xhat = ((rows - mean.to(compute).reshape(N, group, 1)) * rstd.to(compute).reshape(N, group, 1))
    xhat = xhat.reshape(N, group, per_group, HxW)
    dy = grad_out.to(compute).reshape(N, group, per_group, HxW)
    g = dy if weight is None else dy * weight.to(compute).reshape(1, group, per_group, 1)
    grad_input = grad_weight = grad_bias = None
    if output_mask[0]:
        count = per_group * HxW
        centred = _centred(g, xhat, (2, 3), count)
        grad_input = (centred * rstd.to(compute).reshape(N, group, 1, 1)).reshape(input.shape).to(input.dtype)
    if output_mask[1] and weight is not None:
        grad_weight = (dy * xhat).sum((0, 3)).reshape(C).to(weight.dtype)
    if output_mask[2]:
        grad_bias = dy.sum((0, 3)).reshape(C).to(grad_out.dtype if weight is None else weight.dtype)
    return grad_input, grad_weight, grad_bias


def batch_norm_backward(grad_out, input, weight, running_mean, running_var, save_mean, save_invstd, train, eps,
                        output_mask, *, group_size: int = 0):
    """``aten.native_batch_norm_backward`` in training from ``x̂`` (statistics per channel, dim 1)
    where a channel's map is smaller than a pack group of ``group_size`` values (so a group of the
    raw input would span channels); elsewhere, and in evaluation (no batch statistic),
    PyTorch's own decomposition: storing x̂ there also stores a second pack of it (ResNet-50 at 224
    px: 45 -> 64 MB held, step 1.21x -> 1.58x torch.compile's), for no gain in accuracy."""
    from torch._decomp.decompositions import native_batch_norm_backward

    plane = input.numel() // max(input.shape[0] * input.shape[1], 1)
    if not train or save_mean is None or save_invstd is None or plane >= group_size:
        return native_batch_norm_backward(grad_out, input, weight, running_mean, running_var, save_mean,
                                          save_invstd, train, eps, output_mask)
    compute = get_computation_dtype(input.dtype)
    per_channel = [1] * input.dim()
    per_channel[1] = input.shape[1]
    axes = [i for i in range(input.dim()) if i != 1]
    count = input.numel() // input.shape[1]
    invstd = save_invstd.to(compute).reshape(per_channel)
    xhat = (input.to(compute) - save_mean.to(compute).reshape(per_channel)) * invstd
    dy = grad_out.to(compute)
    grad_input = grad_weight = grad_bias = None
    if output_mask[0]:
        scale = invstd if weight is None else invstd * weight.to(compute).reshape(per_channel)
        centred = _centred(dy, xhat, axes, count)
        grad_input = (centred * scale).to(input.dtype)
    dtype = input.dtype if weight is None else weight.dtype
    if output_mask[1]:
        grad_weight = (dy * xhat).sum(axes).to(dtype)
    if output_mask[2]:
        grad_bias = dy.sum(axes).to(dtype)
    return grad_input, grad_weight, grad_bias


class CompiledDecompositions(dict):
    """Inductor's decomposition table with actfx's overrides: what ``actfx.compile`` traces with
    (``group_size``: the packs' group, which decides where BatchNorm's goes through x̂).

    Pickled as its group size. Inductor's FX graph cache keys each graph by the table it was
    given, and 612 of the table's 1101 entries (decorated functions) do not pickle: every graph
    bypassed the cache, so every new process compiled every graph again (a small CNN's warm
    first step: torch.compile read its graphs from disk, actfx.compile generated them anew)."""

    def __init__(self, group_size: int):
        from torch._inductor.decomposition import select_decomp_table

        super().__init__({**select_decomp_table(), aten.native_group_norm_backward.default: group_norm_backward,
                          aten.native_batch_norm_backward.default: functools.partial(batch_norm_backward,
                                                                                     group_size=group_size)})
        self.group_size = group_size

    def __reduce__(self):
        return CompiledDecompositions, (self.group_size,)

