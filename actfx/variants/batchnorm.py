"""BatchNorm (1d/2d/3d, train and eval, momentum None, no running stats) with a packed normalised input.

Forward runs the same ATen op as ``F.batch_norm`` (``_batch_norm_impl_index``), so outputs and
running-statistics updates are identical. What is packed is the normalised input
``x̂ = (x - mean) / std`` (``batch_norm_normalized``), not ``x``: a group of 256 stored values
spans channels when a feature map is small (64 channels of a 2x2 map), and with ``x`` packed a
channel of small spread shares its group's step with a wide one while backward multiplies that
rounding noise by the channel's 1/std (EfficientNet-B0 at 64 px and 2 bits: one step's gradient
7.7x its own norm off). Normalised channels have unit spread. Backward is linear in ``x̂``:
``γ/std (g - mean(g) - x̂ mean(g x̂))`` in training, ``γ/std g`` in eval, and ``Σ g x̂`` for the
weight. The op also returns ``γ, β`` so a following ReLU -> conv chain rebuilds its conv input
as ``mask (γ x̂ + β)`` from the same pack instead of packing again.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from actfx.variants.common import needs_saving, refuse_double_backward, unconverted_class
from actfx.variants.second_pack import add_rounding_variance, copy_for_small_rows
from actfx.variants.saved import materialize_all, split_all


def uses_batch_stats(bn: nn.modules.batchnorm._BatchNorm) -> bool:
    """Whether a BatchNorm module normalises with the batch's statistics (else its running ones)."""
    return bn.training or (bn.running_mean is None and bn.running_var is None)


def _batch_norm_args(bn: nn.modules.batchnorm._BatchNorm):
    """Mirror nn.BatchNorm's forward: the momentum factor, training flag and running stats
    (counting this call in ``num_batches_tracked``, as the module does)."""
    factor = 0.0 if bn.momentum is None else bn.momentum
    if bn.training and bn.track_running_stats and bn.num_batches_tracked is not None:
        bn.num_batches_tracked.add_(1)
        factor = 1.0 / float(bn.num_batches_tracked) if bn.momentum is None else bn.momentum
    keep_running = not bn.training or bn.track_running_stats
    rm = bn.running_mean if keep_running else None
    rv = bn.running_var if keep_running else None
    return factor, uses_batch_stats(bn), rm, rv


def per_channel(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """A per-channel vector shaped to broadcast over ``x`` (channels in dim 1)."""
    return t.reshape([1, -1] + [1] * (x.dim() - 2))


def batch_norm_normalized(x, running_mean, running_var, training, eps, weight=None, bias=None):
    """What BatchNorm packs: ``(x - mean) / sqrt(var + eps)`` per channel in ``x``'s dtype, with
    the batch's statistics or the running ones (as its forward uses them), or None when no
    backward will run. ATen's own BatchNorm without weight, bias or running-statistics update
    computes it (2.8x faster on CPU than ``var_mean`` and two pointwise ops)."""
    if not (isinstance(x, torch.Tensor) and x.dim() >= 2 and needs_saving(x, weight, bias)):
        return None
    if not training and (running_mean is None or running_var is None):
        return None  # F.batch_norm refuses this call with its own message
    with torch.no_grad():
        return torch.batch_norm(x.detach(), None, None, None if training else running_mean,
                                None if training else running_var, training, 0.0, eps, torch.backends.cudnn.enabled)


def second_copy(xhat, training: bool, x):
    """BatchNorm's second pack of x̂ where a channel holds few values (``second_pack``); eval
    mode's backward has no ``x̂ mean(g x̂)`` term, so no copy."""
    return copy_for_small_rows(xhat, xhat.shape[1], x) if training and xhat is not None else None


def batch_norm_module_normalized(bn: nn.modules.batchnorm._BatchNorm, x):
    """``batch_norm_normalized`` for a BatchNorm module's call (its mode and statistics)."""
    return batch_norm_normalized(x, bn.running_mean, bn.running_var, uses_batch_stats(bn), bn.eps,
                                 bn.weight, bn.bias)


def module_second_copy(bn: nn.modules.batchnorm._BatchNorm, xhat, x):
    """``second_copy`` for a BatchNorm module's call."""
    return second_copy(xhat, uses_batch_stats(bn), x)


class _PackedBatchNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, specs, eps, factor, training, weight, bias, rm, rv, x, *run):
        out, save_mean, save_invstd, _, _ = torch._batch_norm_impl_index(
            x, weight, bias, rm, rv, training, factor, eps, torch.backends.cudnn.enabled
        )
        invstd = save_invstd if training else torch.rsqrt(rv.float() + eps)
        channels = x.shape[1]
        gamma = weight.detach().float().clone() if weight is not None else x.new_ones(channels, dtype=torch.float)
        beta = bias.detach().float().clone() if bias is not None else x.new_zeros(channels, dtype=torch.float)
        plans, storage = split_all(list(specs), run)
        ctx.plans, ctx.training, ctx.x_dtype = plans, training, x.dtype
        ctx.bias_dtype = None if bias is None else bias.dtype
        ctx.save_for_backward(weight, invstd, *storage)
        ctx.mark_non_differentiable(gamma, beta)
        return out, gamma, beta

    @staticmethod
    def backward(ctx, grad_out, _ga, _gb):
        refuse_double_backward("batch_norm")
        weight, invstd, *storage = ctx.saved_tensors
        xhat, copy = materialize_all(ctx.plans, storage)
        mask = [ctx.needs_input_grad[8], weight is not None and ctx.needs_input_grad[4],
                ctx.needs_input_grad[5]]
        grad_out = grad_out.contiguous()
        if copy is not None and ctx.training and mask[0]:
            gx, gw, gb = batch_norm_two_reads(grad_out, xhat, copy, weight, invstd, mask)
        else:
            gx, gw, gb = batch_norm_from_normalized(grad_out, xhat.to(ctx.x_dtype), weight, invstd, ctx.training, mask)
        return (None, None, None, None, gw.to(weight.dtype) if mask[1] else None,
                gb.to(ctx.bias_dtype) if mask[2] else None, None, None,
                gx if mask[0] else None) + (None,) * (len(ctx.needs_input_grad) - 9)


def _gradient_scale(weight, invstd) -> torch.Tensor:
    """``γ / std`` per channel in fp32, or fp64 for an fp64 model (``1 / std`` without a weight):
    ATen's kernel takes an fp32 weight beside half-precision values only."""
    dtype = torch.float64 if invstd.dtype == torch.float64 else torch.float32
    return invstd.to(dtype) if weight is None else weight.to(dtype) * invstd.to(dtype)


def batch_norm_from_normalized(grad_out, xhat, weight, invstd, training: bool, mask):
    """BatchNorm's gradients from the normalised input: ATen's kernel with unit statistics and
    ``γ/std`` as the weight in training; the eval formula (no batch terms) directly. The
    parameters' gradients come back in fp32."""
    scale = _gradient_scale(weight, invstd)
    if training:
        zeros = torch.zeros_like(scale)
        gx, gw, gb = torch.ops.aten.native_batch_norm_backward(
            grad_out, xhat, scale, None, None, zeros, torch.ones_like(scale), True, 0.0, mask)
        return gx, gw, gb
    dims = [d for d in range(xhat.dim()) if d != 1]
    gx = (grad_out.float() * per_channel(scale, xhat)).to(grad_out.dtype) if mask[0] else None
    gw = (grad_out.float() * xhat.float()).sum(dims) if mask[1] else None
    gb = grad_out.float().sum(dims) if mask[2] else None
    return gx, gw, gb


def batch_norm_two_reads(grad_out, xhat, copy, weight, invstd, mask):
    """Training backward with the diagonal term's rounding variance taken off (``second_pack``)."""
    gx, gw, gb = batch_norm_from_normalized(grad_out, xhat.to(grad_out.dtype), weight, invstd, True, mask)
    count = grad_out.numel() // grad_out.shape[1]
    scale = per_channel(_gradient_scale(weight, invstd), grad_out) / count
    return add_rounding_variance(gx, grad_out, xhat, copy, scale), gw, gb


def batch_norm_module(bn, specs, x, *run):
    """BatchNorm module call; returns (out, γ, β). γ and β are None when nothing is saved.
    ``specs``: x̂'s and its second copy's; ``run``: their tensors."""
    if run[0] is None or not needs_saving(x, bn.weight, bn.bias):
        # its class's own forward: a BatchNorm converted as a unit of its own is ``bn`` itself
        # here, and calling it recursed without end (eval after training: timm's FastViT)
        return unconverted_class(bn).forward(bn, x), None, None
    bn._check_input_dim(x)
    factor, training, rm, rv = _batch_norm_args(bn)
    return _PackedBatchNorm.apply(specs, bn.eps, factor, training, bn.weight, bn.bias, rm, rv, x, *run)


def batch_norm_functional(specs, running_mean, running_var, weight, bias, training, momentum, eps, x, *run):
    """``F.batch_norm`` call form; returns (out, γ, β)."""
    if run[0] is None or not needs_saving(x, weight, bias):
        return F.batch_norm(x, running_mean, running_var, weight, bias, training, momentum, eps), None, None
    return _PackedBatchNorm.apply(specs, eps, momentum, training, weight, bias, running_mean, running_var, x, *run)
