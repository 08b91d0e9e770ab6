"""BatchNorm (1d/2d/3d, train and eval, momentum None, no running stats) with a packed input.

Forward runs the same ATen op as ``F.batch_norm`` (``_batch_norm_impl_index``), so outputs and
running-statistics updates are identical. The exact batch statistics are kept (they are per
channel, tiny); backward evaluates BatchNorm's gradient at the unpacked input, which is linear in
it. The op also returns the per-channel affine map ``out = a * x + b`` so a following
ReLU -> conv chain can rebuild its conv input from this packed input instead of packing again.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from actfx.variants.common import needs_saving, refuse_double_backward
from actfx.variants.saved import materialize_all, split_all


def _batch_norm_args(bn: nn.modules.batchnorm._BatchNorm):
    """Mirror nn.BatchNorm's forward: the momentum factor, training flag and running stats."""
    factor = 0.0 if bn.momentum is None else bn.momentum
    if bn.training and bn.track_running_stats and bn.num_batches_tracked is not None:
        bn.num_batches_tracked.add_(1)
        factor = 1.0 / float(bn.num_batches_tracked) if bn.momentum is None else bn.momentum
    use_batch_stats = bn.training or (bn.running_mean is None and bn.running_var is None)
    keep_running = not bn.training or bn.track_running_stats
    rm = bn.running_mean if keep_running else None
    rv = bn.running_var if keep_running else None
    return factor, use_batch_stats, rm, rv


def _affine(weight, bias, mean, invstd, channels, like):
    """a, b with batch_norm(x) == a * x + b per channel (fp32)."""
    a = invstd.float() if weight is None else weight.float() * invstd.float()
    b = -mean.float() * a
    if bias is not None:
        b = b + bias.float()
    return a.reshape(channels), b.reshape(channels)


def batch_norm_backward(impl, x, grad_out, weight, rm, rv, save_mean, save_invstd, training, eps, mask, reserve):
    """BatchNorm's ATen backward for whichever implementation ran forward (native, cuDNN, MIOpen).

    The native backward is used whenever forward was native, and under torch.compile (whose
    fake-tensor tracing cannot run the dispatching ``_batch_norm_impl_index_backward``).
    """
    if impl == 0 or torch.compiler.is_compiling():
        return torch.ops.aten.native_batch_norm_backward(
            grad_out.contiguous(), x, weight, rm, rv, save_mean, save_invstd, training, eps, mask)
    return torch.ops.aten._batch_norm_impl_index_backward(
        impl, x, grad_out.contiguous(), weight, rm, rv, save_mean, save_invstd, training, eps, mask, reserve)


class _PackedBatchNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, spec, eps, factor, training, weight, bias, rm, rv, *run):
        x = run[0]
        out, save_mean, save_var, reserve, impl = torch._batch_norm_impl_index(
            x, weight, bias, rm, rv, training, factor, eps, torch.backends.cudnn.enabled
        )
        if training:
            mean, invstd = save_mean, save_var
        else:
            mean, invstd = rm, torch.rsqrt(rv.float() + eps)
        a, b = _affine(weight, bias, mean, invstd, x.shape[1], x)
        plans, storage = split_all([spec], run)
        ctx.plans, ctx.impl, ctx.eps, ctx.training = plans, impl, eps, training
        ctx.x_dtype = x.dtype
        ctx.save_for_backward(weight, rm, rv, save_mean, save_var, reserve, *storage)
        ctx.mark_non_differentiable(a, b)
        return out, a, b

    @staticmethod
    def backward(ctx, grad_out, _ga, _gb):
        refuse_double_backward("batch_norm")
        weight, rm, rv, save_mean, save_var, reserve, *storage = ctx.saved_tensors
        x = materialize_all(ctx.plans, storage)[0]
        mask = [ctx.needs_input_grad[8], weight is not None and ctx.needs_input_grad[4],
                ctx.needs_input_grad[5]]
        gx, gw, gb = batch_norm_backward(ctx.impl, x, grad_out, weight, rm, rv, save_mean, save_var,
                                         ctx.training, ctx.eps, mask, reserve)
        return (None, None, None, None, gw if mask[1] else None, gb if mask[2] else None, None, None,
                gx if mask[0] else None) + (None,) * (len(ctx.needs_input_grad) - 9)


def batch_norm_module(bn, spec, *run):
    """BatchNorm module call; returns (out, a, b). a and b are None when nothing is saved."""
    x = run[0]
    if not needs_saving(x, bn.weight, bn.bias):
        return bn(x), None, None
    if x.dim() < 2:
        raise ValueError(f"{type(bn).__name__} expects at least 2-D input, got shape {tuple(x.shape)}")
    bn._check_input_dim(x)
    factor, training, rm, rv = _batch_norm_args(bn)
    return _PackedBatchNorm.apply(spec, bn.eps, factor, training, bn.weight, bn.bias, rm, rv, *run)


def batch_norm_functional(spec, running_mean, running_var, weight, bias, training, momentum, eps, *run):
    """``F.batch_norm`` call form; returns (out, a, b)."""
    x = run[0]
    if not needs_saving(x, weight, bias):
        return F.batch_norm(x, running_mean, running_var, weight, bias, training, momentum, eps), None, None
    return _PackedBatchNorm.apply(spec, eps, momentum, training, weight, bias, running_mean, running_var, *run)
