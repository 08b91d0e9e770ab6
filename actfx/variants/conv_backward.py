"""Convolution backward over slices of the batch, so its input and workspace are a slice's.

On CPU, PyTorch's convolution backward allocates up to three input-sized temporaries (a 1x1
stride-2 convolution: 3x the input for the input gradient, 1.5x for the weight gradient), and in
actfx's backward the input itself is a transient unpacked copy. At ResNet-50's first downsample
these set the step's peak. Slice by slice, the input is rebuilt a slice at a time (when its
pieces can be cut, ``saved_rows``) and every temporary is a slice's; the input gradient goes
into one preallocated tensor and the weight and bias gradients are summed. On CUDA the workspace
is the library's and the call stays whole.
"""

from __future__ import annotations

import math

import torch
from torch._subclasses.fake_tensor import is_fake

# Slices of at most this many input bytes (one sample at least).
SLICE_BYTES = 4 << 20


def batch_slices(shape, element_size: int, weight_dim: int, device) -> list[slice] | None:
    """Ranges of the batch to run one at a time, or None to run whole."""
    if device.type != "cpu" or len(shape) != weight_dim or shape[0] < 2 or torch.compiler.is_compiling():
        return None
    sample_bytes = math.prod(shape[1:]) * element_size
    per = max(1, SLICE_BYTES // max(sample_bytes, 1))
    if per >= shape[0]:
        return None
    count = math.ceil(shape[0] / per)
    per = math.ceil(shape[0] / count)
    return [slice(i, min(i + per, shape[0])) for i in range(0, shape[0], per)]


def convolution_backward(grad_out, input_rows, parts, weight, *args):
    """``aten.convolution_backward(grad_out, input, weight, *args)`` where ``input_rows(part)``
    gives the input's rows ``part`` (``None``: all of it), run whole or slice by slice."""
    mask = args[-1]
    if parts is None:
        return torch.ops.aten.convolution_backward(grad_out, input_rows(None), weight, *args)
    batch = parts[-1].stop
    if is_fake(grad_out):
        # Shapes only (the planner's step on fake tensors): every slice allocates what the first
        # does and frees it before the next, so the first shows the memory; hundreds of slices
        # at a planned batch of 600 would only cost time.
        parts = parts[:1]
    gx = gw = gb = None
    for part in parts:
        gx_part, gw_part, gb_part = torch.ops.aten.convolution_backward(grad_out[part], input_rows(part), weight,
                                                                        *args)
        if mask[0]:
            if gx is None:
                gx = gx_part.new_empty((batch,) + tuple(gx_part.shape[1:]))
            gx[part].copy_(gx_part)
        del gx_part
        gw = gw_part if gw is None else gw.add_(gw_part)
        gb = gb_part if gb is None else gb.add_(gb_part)
    return gx, gw, gb
