"""LayerNorm, GroupNorm and InstanceNorm with a packed normalised input and exact statistics.

Their backward, like BatchNorm's, needs the input and the per-row mean and 1/std. Recomputing
the statistics from a packed input would inflate the variance by the quantization noise and
bias every gradient (measured: InstanceNorm at 2 bits doubled the error of a 16-sample mean).
So forward keeps the exact 1/std (one value per normalized row: tiny), packs the normalised input
x̂ instead of x (a group of 256 stored values may span rows of very different spread, and backward
multiplies a narrow row's rounding by its 1/std), and backward evaluates the ATen gradient at x̂.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch._prims_common import suggest_memory_format

from actfx.variants.batchnorm import batch_norm_from_normalized, batch_norm_two_reads, per_channel
from actfx.variants.common import needs_saving, not_a_view, refuse_double_backward
from actfx.variants.saved import materialize_all, split_all
from actfx.variants.second_pack import add_rounding_variance, copy_for_small_rows


_PROBES = {"layer_norm": lambda t: F.layer_norm(t, [2]), "group_norm": lambda t: F.group_norm(t, 1)}


def _autocast_fp32(norm: str, device_type: str, *tensors):
    """The tensors cast as autocast casts ``norm``'s inputs (calling the ATen op directly skips
    autocast). The policy differs by device: CUDA runs the norms in fp32, the CPU in the input's
    bf16 (casting there gave a converted Linear -> LayerNorm an fp32 output 0.008 off); so ask
    autocast itself, with a two-element call of the norm."""
    x = tensors[0]
    if not torch.is_autocast_enabled(device_type) or x.dtype == torch.float32:
        return tensors
    probe = _PROBES[norm](torch.zeros(1, 1, 2, dtype=x.dtype, device=x.device))
    if probe.dtype == x.dtype:
        return tensors
    return tuple(t.to(probe.dtype) if isinstance(t, torch.Tensor) and t.is_floating_point() else t for t in tensors)


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


def last_dims_copy(xhat, normalized_shape, x):
    """LayerNorm's and RMSNorm's second pack of x̂ where a row holds few values (``second_pack``)."""
    if xhat is None:
        return None
    width = math.prod([normalized_shape] if isinstance(normalized_shape, int) else normalized_shape)
    return copy_for_small_rows(xhat, xhat.numel() // max(width, 1), x)


class _LayerNormFromNormalized(torch.autograd.Function):
    @staticmethod
    def forward(ctx, specs, shape, eps, weight, bias, x, *run):
        xc, w, b = _autocast_fp32("layer_norm", x.device.type, x, weight, bias)
        out, _, rstd = torch.native_layer_norm(xc, shape, w, b, eps)
        plans, storage = split_all(list(specs), run)
        ctx.plans, ctx.shape, ctx.compute, ctx.x_dtype = plans, shape, xc.dtype, x.dtype
        ctx.save_for_backward(w, b, rstd, *storage)  # the mean is not needed: x̂ is centred
        return not_a_view(out)

    @staticmethod
    def backward(ctx, grad_out):
        refuse_double_backward("layer_norm")
        w, b, rstd, *storage = ctx.saved_tensors
        xhat, copy = materialize_all(ctx.plans, storage)
        # An input ATen's backward normalises back to x̂: x̂ / rstd about a zero mean.
        x = (xhat.float() / rstd.float()).to(ctx.compute)
        mean = torch.zeros_like(rstd)
        mask = [ctx.needs_input_grad[5], w is not None and ctx.needs_input_grad[3],
                b is not None and ctx.needs_input_grad[4]]
        grad_out = grad_out.to(ctx.compute).contiguous()
        gx, gw, gb = torch.ops.aten.native_layer_norm_backward(grad_out, x, ctx.shape, mean, rstd, w, b, mask)
        if copy is not None and mask[0]:  # the diagonal term's rounding variance (second_pack)
            weighted = grad_out if w is None else grad_out.float() * w.float()
            gx = add_rounding_variance(gx, weighted, xhat, copy, rstd.float() / math.prod(ctx.shape))
        return (None, None, None, gw if mask[1] else None, gb if mask[2] else None,
                gx.to(ctx.x_dtype) if mask[0] else None) + (None,) * (len(ctx.needs_input_grad) - 6)


def layer_norm_from_normalized(specs, normalized_shape, weight, bias, eps, x, *run):
    """``F.layer_norm``, whose backward reads the packed normalised input and its copy
    (``specs``, ``run``: theirs)."""
    shape = [normalized_shape] if isinstance(normalized_shape, int) else list(normalized_shape)
    if run[0] is None or not needs_saving(x, weight, bias):
        return F.layer_norm(x, shape, weight, bias, eps)
    return _LayerNormFromNormalized.apply(specs, shape, eps, weight, bias, x, *run)


def _as_group_norm_reads(x):
    """x in the layout ATen's group_norm hands native_group_norm (which refuses any other): a
    transposed input (GroupNorm over a (batch, time, channels) tensor's channels) is copied."""
    return x.contiguous(memory_format=suggest_memory_format(x))


def group_norm_normalized(x, groups, eps, weight=None, bias=None):
    """What GroupNorm packs: its normalised input (ATen's GroupNorm without weight and bias, in
    the dtype it computes in), or None when no backward will run. Why not x: where a group of 256
    stored values spans normalisation groups of different spread (small maps), backward
    multiplies the narrow one's rounding by its 1/std (a 2x2-map test: the input's gradient
    7e5x its norm off at 2 bits)."""
    if not (isinstance(x, torch.Tensor) and x.dim() >= 2 and needs_saving(x, weight, bias)):
        return None
    (xc,) = _autocast_fp32("group_norm", x.device.type, x)
    n, c = xc.shape[0], xc.shape[1]
    with torch.no_grad():
        return torch.native_group_norm(_as_group_norm_reads(xc.detach()), None, None, n, c,
                                       math.prod(xc.shape[2:]), groups, eps)[0]


def group_norm_copy(xhat, groups, x):
    """GroupNorm's second pack of x̂ where a group holds few values (``second_pack``)."""
    return None if xhat is None else copy_for_small_rows(xhat, xhat.shape[0] * groups, x)


class _GroupNormFromNormalized(torch.autograd.Function):
    @staticmethod
    def forward(ctx, specs, groups, eps, weight, bias, x, *run):
        xc, w, b = _autocast_fp32("group_norm", x.device.type, x, weight, bias)
        n, c = xc.shape[0], xc.shape[1]
        hw = math.prod(xc.shape[2:])
        out, _, rstd = torch.native_group_norm(_as_group_norm_reads(xc), w, b, n, c, hw, groups, eps)
        plans, storage = split_all(list(specs), run)
        ctx.plans, ctx.dims, ctx.x_dtype = plans, (n, c, hw, groups), x.dtype
        ctx.save_for_backward(w, rstd, *storage)  # the mean is not needed: x̂ is centred
        return out

    @staticmethod
    def backward(ctx, grad_out):
        refuse_double_backward("group_norm")
        w, rstd, *storage = ctx.saved_tensors
        xhat, copy = materialize_all(ctx.plans, storage)
        n, c, hw, groups = ctx.dims
        # An input ATen's backward normalises back to x̂: x̂ / rstd about a zero mean.
        x = (xhat.reshape(n, groups, -1).float() / rstd.float().reshape(n, groups, 1)).to(xhat.dtype).reshape(xhat.shape)
        mask = [ctx.needs_input_grad[5], w is not None and ctx.needs_input_grad[3], ctx.needs_input_grad[4]]
        grad_out = grad_out.to(xhat.dtype).contiguous()
        gx, gw, gb = torch.ops.aten.native_group_norm_backward(
            grad_out, x.contiguous(), torch.zeros_like(rstd), rstd, w, n, c, hw, groups, mask
        )
        if copy is not None and mask[0]:  # the diagonal term's rounding variance (second_pack)
            weighted = grad_out if w is None else grad_out.float() * per_channel(w.float(), grad_out)
            per_group = (n, groups, -1)  # rstd is per (sample, group)
            scale = (rstd.float() / (c // groups * hw)).reshape(n, groups, 1)
            gx = add_rounding_variance(gx.reshape(per_group), weighted.reshape(per_group), xhat.reshape(per_group),
                                       copy.reshape(per_group), scale).reshape(gx.shape)
        return (None, None, None, gw if mask[1] else None, gb if mask[2] else None,
                gx.to(ctx.x_dtype) if mask[0] else None) + (None,) * (len(ctx.needs_input_grad) - 6)


def group_norm(specs, num_groups, weight, bias, eps, x, *run):
    """``F.group_norm``, whose backward reads the packed normalised input and its copy (``specs``,
    ``run``: theirs)."""
    if run[0] is None or not needs_saving(x, weight, bias):
        return F.group_norm(x, num_groups, weight, bias, eps)
    return _GroupNormFromNormalized.apply(specs, num_groups, eps, weight, bias, x, *run)


def _instance_view(x: torch.Tensor) -> torch.Tensor:
    """InstanceNorm is BatchNorm over a (1, N*C, ...) view."""
    return x.contiguous().view(1, x.shape[0] * x.shape[1], *x.shape[2:])


def instance_norm_normalized(x, eps, weight=None, bias=None):
    """What InstanceNorm packs: its normalised input, or None when no backward will run (the
    reason is GroupNorm's, with one plane per (sample, channel))."""
    if not (isinstance(x, torch.Tensor) and x.dim() >= 3 and needs_saving(x, weight, bias)):
        return None
    with torch.no_grad():
        flat = torch.batch_norm(_instance_view(x.detach()), None, None, None, None, True, 0.0, eps,
                                torch.backends.cudnn.enabled)
    return flat.view(x.shape)


def instance_norm_copy(xhat, x):
    """InstanceNorm's second pack of x̂ where a plane holds few values (``second_pack``)."""
    return None if xhat is None else copy_for_small_rows(xhat, xhat.shape[0] * xhat.shape[1], x)


class _InstanceNormFromNormalized(torch.autograd.Function):
    """F.instance_norm is batch norm over a (1, N*C, ...) view with repeated affine parameters;
    running the same op here keeps the output identical and yields the exact statistics."""

    @staticmethod
    def forward(ctx, specs, eps, weight, bias, x, *run):
        n, c = x.shape[0], x.shape[1]
        w = weight.repeat(n) if weight is not None else None
        b = bias.repeat(n) if bias is not None else None
        out, _, invstd, _, _ = torch._batch_norm_impl_index(
            _instance_view(x), w, b, None, None, True, 0.0, eps, torch.backends.cudnn.enabled
        )
        plans, storage = split_all(list(specs), run)
        ctx.plans, ctx.nc = plans, (n, c)
        ctx.save_for_backward(w, invstd, *storage)
        # The same memory reshaped, but not a view: a view made inside a Function cannot be
        # modified in place afterwards, and models do `instance_norm(x).relu_()`.
        shaped = out.view(x.shape)
        if torch.compiler.is_compiling():
            return shaped
        return out.new_empty(0).set_(out.untyped_storage(), out.storage_offset(), shaped.shape, shaped.stride())

    @staticmethod
    def backward(ctx, grad_out):
        refuse_double_backward("instance_norm")
        w, invstd, *storage = ctx.saved_tensors
        n, c = ctx.nc
        xhat, copy = materialize_all(ctx.plans, storage)
        mask = [ctx.needs_input_grad[4], w is not None and ctx.needs_input_grad[2], ctx.needs_input_grad[3]]
        flat_grad, flat_xhat = _instance_view(grad_out), _instance_view(xhat)
        if copy is not None and mask[0]:
            gx, gw, gb = batch_norm_two_reads(flat_grad, flat_xhat, _instance_view(copy), w, invstd, mask)
        else:
            gx, gw, gb = batch_norm_from_normalized(flat_grad, flat_xhat.to(grad_out.dtype), w, invstd, True, mask)
        gw = gw.view(n, c).sum(0).to(w.dtype) if mask[1] else None
        gb = gb.view(n, c).sum(0).to(w.dtype if w is not None else grad_out.dtype) if mask[2] else None
        return (None, None, gw, gb, gx.view(xhat.shape) if mask[0] else None) + (None,) * (
            len(ctx.needs_input_grad) - 5)


def instance_norm(specs, weight, bias, eps, x, *run):
    """F.instance_norm with use_input_stats=True and no running statistics; backward reads the
    packed normalised input and its copy (``specs``, ``run``: theirs)."""
    if run[0] is None or not needs_saving(x, weight, bias):
        return F.instance_norm(x, None, None, weight, bias, True, 0.0, eps)
    return _InstanceNormFromNormalized.apply(specs, eps, weight, bias, x, *run)
