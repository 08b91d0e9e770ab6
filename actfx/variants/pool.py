"""Max pooling (1d/2d/3d, adaptive) that keeps compact indices instead of int64 ones.

Backward of max pooling routes each output gradient to the position of its maximum; nothing
else is needed. PyTorch keeps those positions as int64 flat indices into the input plane
(8 bytes per output). For MaxPoolNd the position *within its window* is enough: one byte
whenever the window has at most 256 elements (3x3 has 9), rebuilt in backward from the output
position, stride, padding and dilation. Adaptive pooling keeps plane indices in 16 bits when
the plane has fewer than 32768 positions, 32 otherwise. Exact, so gradients are unchanged.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from actfx.variants.common import needs_saving, refuse_double_backward

_MAX_POOL = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}
_ADAPTIVE_MAX_POOL = {1: F.adaptive_max_pool1d, 2: F.adaptive_max_pool2d, 3: F.adaptive_max_pool3d}


def compact_index_dtype(plane: int) -> torch.dtype:
    return torch.int16 if plane < 2**15 else torch.int32 if plane < 2**31 else torch.int64


def _tuple(value, nd):
    return tuple(value) if isinstance(value, (tuple, list)) else (value,) * nd


def _origins(out_shape, geometry, device):
    """Per spatial dim, the input coordinate where each output position's window starts."""
    _, stride, padding, _ = geometry
    nd = len(stride)
    origins = []
    for dim in range(nd):
        view = [1] * nd
        view[dim] = -1
        o = torch.arange(out_shape[dim], device=device).view(view)
        origins.append(o * stride[dim] - padding[dim])
    return origins


def _origin_flat(out_shape, in_shape, geometry, device):
    """Flat input index (may be negative: padding) where each output position's window starts."""
    flat = torch.zeros((), dtype=torch.int64, device=device)
    for dim, origin in enumerate(_origins(out_shape, geometry, device)):
        flat = flat + origin * math.prod(in_shape[dim + 1 :])
    return flat


def _window_steps(in_shape, geometry) -> list[int]:
    """Per dim, how far one step inside the window moves the flat index (dilation * row length)."""
    kernel, _, _, dilation = geometry
    return [dilation[d] * math.prod(in_shape[d + 1 :]) for d in range(len(kernel))]


def _offsets_unambiguous(in_shape, geometry) -> bool:
    """False when a window's inner extent reaches a whole outer step (tiny inputs with padding):
    two in-window positions could then share an offset."""
    kernel, steps = geometry[0], _window_steps(in_shape, geometry)
    return all(sum((kernel[e] - 1) * steps[e] for e in range(d, len(kernel))) < steps[d - 1]
               for d in range(1, len(kernel)))


def _window_offsets(in_shape, geometry) -> list[int]:
    """Flat offset from the window's start of each in-window position, in row-major order
    (plain ints from the geometry, so dry runs on fake tensors need no data)."""
    offsets = [0]
    for k, step in zip(geometry[0], _window_steps(in_shape, geometry)):
        offsets = [o + i * step for o in offsets for i in range(k)]
    return offsets


def to_window_index(idx, in_shape, geometry):
    """int64 plane indices -> uint8 positions inside each pooling window.

    A lookup: the offset from the window's start identifies the position (the offsets are
    distinct unless `_offsets_unambiguous` says otherwise), so a table indexed by offset gives it in
    one gather, without the integer divisions that do not vectorize on CPU.
    """
    nd = len(geometry[0])
    if not _offsets_unambiguous(in_shape, geometry):
        return _to_window_index_by_division(idx, in_shape, geometry)
    offsets = _window_offsets(in_shape, geometry)
    table = torch.zeros(offsets[-1] + 1, dtype=torch.uint8, device=idx.device)
    table[torch.tensor(offsets, device=idx.device)] = torch.arange(len(offsets), device=idx.device).to(torch.uint8)
    delta = idx - _origin_flat(idx.shape[-nd:], in_shape, geometry, idx.device)
    return table[delta]


def from_window_index(rel, in_shape, geometry):
    """The inverse of ``to_window_index``: int64 plane indices (window start + offset table)."""
    nd = len(geometry[0])
    offsets = torch.tensor(_window_offsets(in_shape, geometry), device=rel.device)
    return _origin_flat(rel.shape[-nd:], in_shape, geometry, rel.device) + offsets[rel.long()]


def _to_window_index_by_division(idx, in_shape, geometry):
    kernel, _, _, dilation = geometry
    nd = len(kernel)
    coords, rest = [], idx
    for dim in reversed(range(nd)):
        coords.insert(0, rest % in_shape[dim])
        rest = rest // in_shape[dim]
    rel = torch.zeros_like(idx)
    for dim, origin in enumerate(_origins(idx.shape[-nd:], geometry, idx.device)):
        rel = rel * kernel[dim] + (coords[dim] - origin) // dilation[dim]
    return rel.to(torch.uint8)


class _CompactMaxPool(torch.autograd.Function):
    @staticmethod
    def forward(ctx, fn, nd, args, geometry, returned, x):
        out, idx = fn(x, *args, return_indices=True)
        if returned:  # the caller holds the int64 indices (for MaxUnpool): backward reads those
            small, geometry = idx, None
            ctx.mark_non_differentiable(idx)
        elif geometry is not None:
            small = to_window_index(idx, x.shape[-nd:], geometry)
        else:
            small = idx.to(compact_index_dtype(math.prod(x.shape[-nd:])))
        ctx.in_shape, ctx.spatial, ctx.geometry = x.shape, nd, geometry
        ctx.save_for_backward(small)
        return (out, idx) if returned else out

    @staticmethod
    def backward(ctx, grad_out, *_grad_indices):
        refuse_double_backward("max_pool")
        (small,) = ctx.saved_tensors
        spatial = ctx.spatial
        if ctx.geometry is not None:
            small = from_window_index(small, ctx.in_shape[-spatial:], ctx.geometry)
        lead = ctx.in_shape[: len(ctx.in_shape) - spatial]
        plane = math.prod(ctx.in_shape[-spatial:])
        grad_in = grad_out.new_zeros((math.prod(lead), plane))
        grad_in.scatter_add_(1, small.reshape(math.prod(lead), -1).long(), grad_out.reshape(math.prod(lead), -1))
        return None, None, None, None, None, grad_in.reshape(ctx.in_shape)


def _pool(fn, nd, args, x, geometry=None, return_indices=False):
    if not needs_saving(x):
        return fn(x, *args, return_indices=return_indices)
    return _CompactMaxPool.apply(fn, nd, args, geometry, return_indices, x)


def max_pool(nd, kernel_size, stride, padding, dilation, ceil_mode, x, return_indices=False):
    """F.max_poolNd; with ``return_indices`` it returns (values, int64 indices) as PyTorch does
    and keeps those indices, which the caller holds anyway, instead of the input."""
    kernel = _tuple(kernel_size, nd)
    geometry = (kernel, _tuple(stride, nd), _tuple(padding, nd), _tuple(dilation, nd))
    if math.prod(kernel) > 256:
        geometry = None  # window positions do not fit a byte: keep plane indices
    return _pool(_MAX_POOL[nd], nd, (kernel_size, stride, padding, dilation, ceil_mode), x, geometry, return_indices)


def adaptive_max_pool(nd, output_size, x, return_indices=False):
    return _pool(_ADAPTIVE_MAX_POOL[nd], nd, (output_size,), x, return_indices=return_indices)
