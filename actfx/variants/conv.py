"""Convolution (1d/2d/3d, transposed) that keeps its input packed.

Forward calls the same functional op as the original, so outputs are bitwise identical.
Backward needs the input only for the weight gradient, which is linear in it: with an unbiased
packed input the weight gradient stays unbiased. A weight the graph computes (a modulated or
dynamic convolution's) is an activation too, and the input's gradient is linear in it: it is
packed the same way.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from actfx.variants.conv_backward import batch_slices, convolution_backward
from actfx.variants.common import cast_grad, needs_saving, not_a_view, refuse_double_backward
from actfx.variants.saved import materialize_all, spec_width, split_all, split_weight, weight_of
from actfx.variants.saved_rows import cuttable, rows, settle

_FORWARD = {
    (False, 1): F.conv1d,
    (False, 2): F.conv2d,
    (False, 3): F.conv3d,
    (True, 1): F.conv_transpose1d,
    (True, 2): F.conv_transpose2d,
    (True, 3): F.conv_transpose3d,
}


def _as_list(value, n):
    return list(value) if isinstance(value, (tuple, list)) else [value] * n


def _run_conv(geometry, x, weight, bias):
    transposed, nd, stride, padding, dilation, output_padding, groups, pad = geometry
    if pad is not None:  # padding_mode reflect / replicate / circular, as nn.ConvNd does it
        x = F.pad(x, pad[0], mode=pad[1])
    fn = _FORWARD[(transposed, nd)]
    if transposed:
        return fn(x, weight, bias, stride, padding, output_padding, groups, dilation)
    return fn(x, weight, bias, stride, padding, dilation, groups)


def _unpad_grad(grad_padded, x_shape, pad, dtype):
    """Gradient through F.pad (linear, so taken at zeros): only shapes matter."""
    zeros = torch.zeros(x_shape, dtype=dtype, device=grad_padded.device)
    _, vjp = torch.func.vjp(lambda t: F.pad(t, pad[0], mode=pad[1]), zeros)
    return vjp(grad_padded)[0]


class _PackedConv(torch.autograd.Function):
    @staticmethod
    def forward(ctx, geometry, specs, weight, bias, *runs):
        x = runs[0]
        out = _run_conv(geometry, x, weight, bias)
        width = spec_width(specs[0])
        # the input only for the weight's gradient (not for a frozen layer's): its values do not
        # enter the input's gradient
        plans, storage = split_all(specs[:1], runs[:width]) if ctx.needs_input_grad[2] else ([None], [])
        # a weight computed in forward (StyleGAN2's modulated convolution) may come packed: the
        # input's gradient is linear in it
        weight_plans, weight_storage = split_weight(specs, runs, width, weight)
        ctx.plans, ctx.weight_plans, ctx.weight_count = plans, weight_plans, len(weight_storage)
        ctx.geometry = geometry
        ctx.x_shape = tuple(x.shape)
        ctx.meta = (x.dtype, weight.dtype, None if bias is None else bias.shape, out.dtype)
        ctx.save_for_backward(*weight_storage, *storage)
        return not_a_view(out)

    @staticmethod
    def backward(ctx, grad_out):
        refuse_double_backward("convolution")
        saved = ctx.saved_tensors
        weight_storage, storage = saved[:ctx.weight_count], saved[ctx.weight_count:]
        weight = weight_of(ctx.weight_plans, weight_storage)
        transposed, nd, stride, padding, dilation, output_padding, groups, pad = ctx.geometry
        x_dtype, w_dtype, bias_shape, compute = ctx.meta
        x_shape = ctx.x_shape

        def prepared(x):
            x = x.to(compute)
            return x if pad is None else F.pad(x, pad[0], mode=pad[1])

        parts = batch_slices(x_shape, compute.itemsize, weight.dim(), weight.device)
        if ctx.plans[0] is None:  # no weight gradient: zeros of the input's shape serve

            def input_rows(part):
                return prepared(grad_out.new_zeros(x_shape if part is None else (part.stop - part.start,) + x_shape[1:],
                                                   dtype=x_dtype))
        elif parts is not None and cuttable(ctx.plans[0]):
            settled = settle(ctx.plans[0], storage)

            def input_rows(part):
                return prepared(rows(*settled, part))
        else:
            x = prepared(materialize_all(ctx.plans, storage)[0])

            def input_rows(part):
                return x if part is None else x[part]
        mask = [ctx.needs_input_grad[4], ctx.needs_input_grad[2], bias_shape is not None and ctx.needs_input_grad[3]]
        gx, gw, gb = convolution_backward(
            grad_out.to(compute),
            input_rows,
            parts,
            weight.to(compute),
            list(bias_shape) if bias_shape is not None else None,
            _as_list(stride, nd),
            _as_list(padding, nd),
            _as_list(dilation, nd),
            transposed,
            _as_list(output_padding, nd),
            groups,
            mask,
        )
        if mask[0] and pad is not None:
            gx = _unpad_grad(gx, x_shape, pad, gx.dtype)
        gx = gx.to(x_dtype) if mask[0] else None
        gw = gw.to(w_dtype) if mask[1] else None
        gb = cast_grad(gb, weight) if mask[2] else None
        return (None, None, gw, gb, gx) + (None,) * (len(ctx.needs_input_grad) - 5)


def conv(geometry, specs, weight, bias, *runs):
    """``geometry`` = (transposed, nd, stride, padding, dilation, output_padding, groups, pad);
    ``runs``: the input's saved-value run (see saved.py), its first element the input itself, then,
    for a weight the graph computes, the weight's; ``specs``: their specs."""
    if not needs_saving(runs[0], weight, bias):
        return _run_conv(geometry, runs[0], weight, bias)
    return _PackedConv.apply(geometry, specs, weight, bias, *runs)
