"""LayerNorm, GroupNorm and InstanceNorm with a packed input and exact statistics.

Their backward, like BatchNorm's, needs the input and the per-row mean and 1/std. Recomputing
the statistics from a packed input would inflate the variance by the quantization noise and
bias every gradient (measured: InstanceNorm at 2 bits doubled the error of a 16-sample mean).
So forward keeps the exact mean and rstd (one value per normalized row: tiny) and backward
evaluates the ATen gradient at the unpacked input with them.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from actfx.variants.common import needs_saving, not_a_view, refuse_double_backward
from actfx.variants.saved import materialize_all, split_all


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


def _autocast_fp32(device_type: str, *tensors):
    """Autocast runs the norms in fp32; calling the ATen op directly must do the same cast."""
    if torch.is_autocast_enabled(device_type):
        return tuple(t.float() if isinstance(t, torch.Tensor) and t.is_floating_point() else t for t in tensors)
    return tensors


def layer_norm_normalized(x, normalized_shape, eps, weight=None, bias=None):
    """``(x - mean) * rstd`` over the normalised dims (fp32, outside autograd): what LayerNorm
    keeps packed instead of ``x`` (for x's gradient and for the weight's), or None when no
    backward will run.

    Why: a group of 256 stored values spans rows when a row is shorter (or ends mid-group);
    with ``x`` packed, a row of small spread (a ViT's class token at initialisation) shares its
    group's step with a wide one, and backward multiplies that rounding noise by the row's
    ``rstd``: the built-in vit_tiny's gradient at 2 bits was 980x its own norm off. Normalised
    rows have unit spread, so the noise backward sees is bounded by the rounding step itself.
    """
    if not (isinstance(x, torch.Tensor) and needs_saving(x, weight, bias)):
        return None
    shape = [normalized_shape] if isinstance(normalized_shape, int) else list(normalized_shape)
    dims = tuple(range(-len(shape), 0))
    with torch.no_grad():
        xf = x.detach().float()
        var, mean = torch.var_mean(xf, dims, correction=0, keepdim=True)
        return (xf - mean) * torch.rsqrt(var + eps)


class _LayerNormFromNormalized(torch.autograd.Function):
    @staticmethod
    def forward(ctx, spec, shape, eps, weight, bias, x, *run):
        xc, w, b = _autocast_fp32(x.device.type, x, weight, bias)
        out, _, rstd = torch.native_layer_norm(xc, shape, w, b, eps)
        plans, storage = split_all([spec], run)
        ctx.plans, ctx.shape, ctx.compute, ctx.x_dtype = plans, shape, xc.dtype, x.dtype
        ctx.save_for_backward(w, b, rstd, *storage)  # the mean is not needed: x̂ is centred
        return not_a_view(out)

    @staticmethod
    def backward(ctx, grad_out):
        refuse_double_backward("layer_norm")
        w, b, rstd, *storage = ctx.saved_tensors
        xhat = materialize_all(ctx.plans, storage)[0]
        # An input ATen's backward normalises back to x̂: x̂ / rstd about a zero mean.
        x = (xhat.float() / rstd.float()).to(ctx.compute)
        mean = torch.zeros_like(rstd)
        mask = [ctx.needs_input_grad[5], w is not None and ctx.needs_input_grad[3],
                b is not None and ctx.needs_input_grad[4]]
        gx, gw, gb = torch.ops.aten.native_layer_norm_backward(
            grad_out.to(ctx.compute).contiguous(), x, ctx.shape, mean, rstd, w, b, mask
        )
        return (None, None, None, gw if mask[1] else None, gb if mask[2] else None,
                gx.to(ctx.x_dtype) if mask[0] else None) + (None,) * (len(ctx.needs_input_grad) - 6)


def layer_norm_from_normalized(spec, normalized_shape, weight, bias, eps, x, *run):
    """``F.layer_norm``, whose backward reads the packed normalised input (run's head: it)."""
    shape = [normalized_shape] if isinstance(normalized_shape, int) else list(normalized_shape)
    if run[0] is None or not needs_saving(x, weight, bias):
        return F.layer_norm(x, shape, weight, bias, eps)
    return _LayerNormFromNormalized.apply(spec, shape, eps, weight, bias, x, *run)


class _PackedGroupNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, spec, groups, eps, weight, bias, *run):
        x, w, b = _autocast_fp32(run[0].device.type, run[0], weight, bias)
        n, c = x.shape[0], x.shape[1]
        hw = math.prod(x.shape[2:])
        out, mean, rstd = torch.native_group_norm(x, w, b, n, c, hw, groups, eps)
        plans, storage = split_all([spec], run)
        ctx.plans, ctx.dims, ctx.compute, ctx.x_dtype = plans, (n, c, hw, groups), x.dtype, run[0].dtype
        ctx.save_for_backward(w, mean, rstd, *storage)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        refuse_double_backward("group_norm")
        w, mean, rstd, *storage = ctx.saved_tensors
        x = materialize_all(ctx.plans, storage)[0].to(ctx.compute)
        mask = [ctx.needs_input_grad[5], w is not None and ctx.needs_input_grad[3], ctx.needs_input_grad[4]]
        n, c, hw, groups = ctx.dims
        gx, gw, gb = torch.ops.aten.native_group_norm_backward(
            grad_out.to(ctx.compute).contiguous(), x.contiguous(), mean, rstd, w, n, c, hw, groups, mask
        )
        return (None, None, None, gw if mask[1] else None, gb if mask[2] else None,
                gx.to(ctx.x_dtype) if mask[0] else None) + (None,) * (len(ctx.needs_input_grad) - 6)


def group_norm(spec, num_groups, weight, bias, eps, *run):
    if not needs_saving(run[0], weight, bias):
        return F.group_norm(run[0], num_groups, weight, bias, eps)
    return _PackedGroupNorm.apply(spec, num_groups, eps, weight, bias, *run)


class _PackedInstanceNorm(torch.autograd.Function):
    """F.instance_norm is batch norm over a (1, N*C, ...) view with repeated affine parameters;
    running the same op here keeps the output identical and yields the exact statistics."""

    @staticmethod
    def forward(ctx, spec, eps, weight, bias, *run):
        x = run[0]
        n, c = x.shape[0], x.shape[1]
        flat = x.contiguous().view(1, n * c, *x.shape[2:])
        w = weight.repeat(n) if weight is not None else None
        b = bias.repeat(n) if bias is not None else None
        out, mean, invstd, reserve, impl = torch._batch_norm_impl_index(
            flat, w, b, None, None, True, 0.0, eps, torch.backends.cudnn.enabled
        )
        plans, storage = split_all([spec], run)
        ctx.plans, ctx.impl, ctx.eps, ctx.nc = plans, impl, eps, (n, c)
        ctx.save_for_backward(w, mean, invstd, reserve, *storage)
        # The same memory reshaped, but not a view: a view made inside a Function cannot be
        # modified in place afterwards, and models do `instance_norm(x).relu_()`.
        shaped = out.view(x.shape)
        if torch.compiler.is_compiling():
            return shaped
        return out.new_empty(0).set_(out.untyped_storage(), out.storage_offset(), shaped.shape, shaped.stride())

    @staticmethod
    def backward(ctx, grad_out):
        refuse_double_backward("instance_norm")
        w, mean, invstd, reserve, *storage = ctx.saved_tensors
        n, c = ctx.nc
        x = materialize_all(ctx.plans, storage)[0]
        flat = x.contiguous().view(1, n * c, *x.shape[2:])
        mask = [ctx.needs_input_grad[4], w is not None and ctx.needs_input_grad[2], ctx.needs_input_grad[3]]
        gx, gw, gb = batch_norm_backward(ctx.impl, flat, grad_out.contiguous().view(flat.shape), w, None, None,
                                         mean, invstd, True, ctx.eps, mask, reserve)
        gw = gw.view(n, c).sum(0) if mask[1] else None
        gb = gb.view(n, c).sum(0) if mask[2] else None
        return (None, None, gw, gb, gx.view(x.shape) if mask[0] else None) + (None,) * (
            len(ctx.needs_input_grad) - 5)


def instance_norm(spec, weight, bias, eps, *run):
    """F.instance_norm with use_input_stats=True and no running statistics."""
    if not needs_saving(run[0], weight, bias):
        return F.instance_norm(run[0], None, None, weight, bias, True, 0.0, eps)
    return _PackedInstanceNorm.apply(spec, eps, weight, bias, *run)
