"""ReLU-family activations and dropout with exact 1-bit masks.

Their backward needs only *where* the gradient passes (and dropout's scale), which a 1-bit mask
holds exactly. Deriving the mask from a packed output would bias gradients (values near zero
round to the wrong side), so the mask is taken from the exact output in forward.
The masks are returned to the graph as well: a later consumer of the activation can rebuild it
as ``mask * (something already packed)`` instead of packing it again.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from actfx.kernels import pack_bits, pack_bits_between, scale_by_mask, unpack_bits
from actfx.variants.common import needs_saving, refuse_double_backward

# kind -> (forward(x, inplace, *params), (lo, hi) with mask = lo < out < hi (hi None: no upper
# bound), gradient slope outside the mask)
_RELU_LIKE = {
    "relu": (lambda x, inplace: torch.relu_(x) if inplace else torch.relu(x),
             lambda: (0.0, None), None),
    "hardtanh": (lambda x, inplace, lo, hi: F.hardtanh(x, lo, hi, inplace),
                 lambda lo, hi: (lo, hi), None),
    "leaky_relu": (lambda x, inplace, slope: F.leaky_relu(x, slope, inplace),
                   lambda slope: (0.0, None), "slope"),
    # x where x > threshold, else value: the mask is out > threshold where value <= threshold
    "threshold": (lambda x, inplace, threshold, value: F.threshold(x, threshold, value, inplace),
                  lambda threshold, value: (threshold, None), None),
}


class _MaskedActivation(torch.autograd.Function):
    @staticmethod
    def forward(ctx, kind, inplace, params, min_numel, x):
        fwd, bounds, _ = _RELU_LIKE[kind]
        out = fwd(x, inplace, *params)
        if inplace:
            ctx.mark_dirty(x)
        ctx.kind, ctx.params = kind, params
        result = x if inplace else out  # torch.compile wants the dirty input itself returned
        if out.numel() < min_numel:
            # too small to pack: the next op keeps the output exact (as PyTorch shares it), and a
            # mask beside it held more than the original; the mask is read off the output instead
            ctx.save_for_backward(result)
            return result, None
        bits = pack_bits_between(out.detach(), *bounds(*params))
        ctx.save_for_backward(bits)
        ctx.mark_non_differentiable(bits)
        return result, bits

    @staticmethod
    def backward(ctx, grad_out, _grad_bits):
        refuse_double_backward(ctx.kind)
        (saved,) = ctx.saved_tensors
        outside = ctx.params[0] if _RELU_LIKE[ctx.kind][2] == "slope" else 0.0
        if saved.dtype != torch.uint8:  # the exact output
            lo, hi = _RELU_LIKE[ctx.kind][1](*ctx.params)
            inside = (saved > lo) if hi is None else (saved > lo) & (saved < hi)
            return None, None, None, None, torch.where(inside, grad_out, grad_out * outside)
        return None, None, None, None, scale_by_mask(grad_out.contiguous(), saved, 1.0, outside)


def relu_like(kind, inplace, params, x, min_numel=0):
    """Returns (out, mask bits); mask bits are None when nothing needs saving, or when the output
    has fewer than ``min_numel`` values (then the exact output is saved)."""
    fwd = _RELU_LIKE[kind][0]
    if not needs_saving(x):
        return fwd(x, inplace, *params), None
    if inplace and _eager_view(x):
        return _write_back(x, *_MaskedActivation.apply(kind, False, params, min_numel, x))
    return _MaskedActivation.apply(kind, inplace, params, min_numel, x)


def _eager_view(x: torch.Tensor) -> bool:
    """A view, outside torch.compile (whose tracing handles in-place ops on views itself)."""
    return not torch.compiler.is_compiling() and x._is_view()


def _write_back(view: torch.Tensor, out: torch.Tensor, bits: torch.Tensor):
    """An in-place op on a view, as PyTorch runs it: computed out of place, then copied into the
    view (autograd's CopySlices carries the gradient to the base). A Function that dirties a view
    may return one tensor only, and these also return their mask."""
    view.copy_(out)
    return view, bits


class _MaskedDropout(torch.autograd.Function):
    @staticmethod
    def forward(ctx, p, inplace, x):
        # native_dropout draws exactly the random numbers F.dropout draws (same output, same RNG use).
        out, keep = torch.ops.aten.native_dropout(x, p, True)
        if inplace:
            x.copy_(out)
            ctx.mark_dirty(x)
            out = x
        bits = pack_bits(keep)
        ctx.scale = 1.0 / (1.0 - p) if p < 1 else 0.0
        ctx.save_for_backward(bits)
        ctx.mark_non_differentiable(bits)
        return out, bits

    @staticmethod
    def backward(ctx, grad_out, _grad_bits):
        refuse_double_backward("dropout")
        (bits,) = ctx.saved_tensors
        return None, None, scale_by_mask(grad_out.contiguous(), bits, ctx.scale, 0.0)


def dropout(p, training, inplace, x):
    """F.dropout semantics (module or functional); returns (out, mask bits or None)."""
    if not training or p == 0.0 or not needs_saving(x) or x.numel() == 0:
        return F.dropout(x, p, training, inplace), None
    if p == 1.0:
        return F.dropout(x, p, training, inplace), None
    if inplace and _eager_view(x):
        return _write_back(x, *_MaskedDropout.apply(p, False, x))
    return _MaskedDropout.apply(p, inplace, x)


def dropout_module(module, x):
    return dropout(module.p, module.training, module.inplace, x)


class _Extremum(torch.autograd.Function):
    """``torch.maximum`` / ``minimum`` of two activations. Backward sends the gradient to the
    winner, half to each side of a tie and all to both where a NaN makes them unordered (ATen's
    own formula): three exact 1-bit masks at the output's size instead of both inputs."""

    @staticmethod
    def forward(ctx, op, a, b):
        out = torch.maximum(a, b) if op == "maximum" else torch.minimum(a, b)
        a_, b_ = a.detach(), b.detach()
        a_loses, b_loses = (a_ < b_, a_ > b_) if op == "maximum" else (a_ > b_, a_ < b_)
        ctx.save_for_backward(*(pack_bits(m.expand(out.shape).contiguous()) for m in (a_ == b_, a_loses, b_loses)))
        ctx.op = op
        ctx.like = [(t.shape, t.dtype) for t in (a, b)]
        return out

    @staticmethod
    def backward(ctx, grad_out):
        refuse_double_backward(ctx.op)
        tie, a_loses, b_loses = ctx.saved_tensors
        shared = scale_by_mask(grad_out.contiguous(), tie, 0.5, 1.0)
        grads = []
        for needed, loses, (shape, dtype) in zip(ctx.needs_input_grad[1:], (a_loses, b_loses), ctx.like):
            grad = scale_by_mask(shared, loses, 0.0, 1.0) if needed else None
            grads.append(None if grad is None else grad.sum_to_size(shape).to(dtype))
        return None, *grads


def extremum(op: str, written: str, a, b):
    """``op`` in {"maximum", "minimum"} of two tensors, keeping masks instead of the inputs;
    for anything else the call as ``written`` ("torch:max", "aten:maximum", "method:max")."""
    if (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.is_floating_point()
            and b.is_floating_point() and needs_saving(a, b)):
        return _Extremum.apply(op, a, b)
    kind, name = written.split(":")
    if kind == "method":
        return getattr(a, name)(b)
    return (getattr(torch.ops.aten, name).default if kind == "aten" else getattr(torch, name))(a, b)


def _reduced_dims(dim, ndim: int) -> list[int]:
    dims = [dim] if isinstance(dim, int) else list(dim)
    return sorted(d % ndim for d in dims) if dims else list(range(ndim))


def _with_reduced_dims(t: torch.Tensor, dims: list[int], keepdim: bool) -> torch.Tensor:
    """A reduction's result (or its gradient) with the reduced dims back as size 1."""
    for d in dims if not keepdim else ():
        t = t.unsqueeze(d)
    return t


class _ReducedExtremum(torch.autograd.Function):
    """``amax`` / ``amin`` over dims. Backward spreads the gradient evenly over the elements equal
    to the extremum (ATen's own formula, NaN slices included): one exact 1-bit mask at the
    input's size instead of the input and the output."""

    @staticmethod
    def forward(ctx, op, dim, keepdim, x):
        out = torch.amax(x, dim, keepdim) if op == "amax" else torch.amin(x, dim, keepdim)
        dims = _reduced_dims(dim, x.dim())
        restored = _with_reduced_dims(out.detach(), dims, keepdim)
        ctx.save_for_backward(pack_bits((x.detach() == restored).contiguous()))
        ctx.op, ctx.dims, ctx.keepdim, ctx.shape = op, dims, keepdim, x.shape
        return out

    @staticmethod
    def backward(ctx, grad_out):
        refuse_double_backward(ctx.op)
        (codes,) = ctx.saved_tensors
        mask = unpack_bits(codes, ctx.shape)
        grad = _with_reduced_dims(grad_out, ctx.dims, ctx.keepdim)
        return None, None, None, (grad / mask.sum(ctx.dims, keepdim=True)) * mask


def reduced_extremum(op: str, x, dim=(), keepdim=False):
    """``op`` in {"amax", "amin"}, keeping the mask of the extremum's positions."""
    if not (isinstance(x, torch.Tensor) and x.is_floating_point() and needs_saving(x)) or x.dim() == 0:
        return (torch.amax if op == "amax" else torch.amin)(x, dim, keepdim)
    return _ReducedExtremum.apply(op, dim, keepdim, x)


def aminmax(x, dim=None, keepdim=False):
    """``torch.aminmax`` as ``amin`` and ``amax``, one 1-bit mask each: PyTorch keeps the input
    and both results for the same gradient (the tie-sharing formula of amin / amax)."""
    if not (isinstance(x, torch.Tensor) and x.is_floating_point() and needs_saving(x)) or x.dim() == 0:
        return torch.aminmax(x, dim=dim, keepdim=keepdim)
    dims = () if dim is None else dim
    return torch.return_types.aminmax((reduced_extremum("amin", x, dims, keepdim),
                                       reduced_extremum("amax", x, dims, keepdim)))
