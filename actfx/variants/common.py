"""Small pieces every compressed-save variant shares."""

from __future__ import annotations

import torch


def refuse_double_backward(op: str) -> None:
    """Backward of a packed op is computed from approximate values: a second derivative through
    it would be silently wrong, so ``create_graph=True`` is refused instead."""
    if torch.is_grad_enabled():
        raise RuntimeError(
            f"actfx: double backward (create_graph=True) through the compressed {op} is not supported: "
            "its saved activations are quantized, so second derivatives would be wrong. Compute "
            "higher-order gradients (gradient penalties, MAML, Hessian-vector products) with the original, "
            "unconverted model; it shares its parameters with the converted one."
        )


def needs_saving(*tensors) -> bool:
    """True when autograd will call backward: grad mode on and some input requires grad. False
    for complex inputs too: the variants' backward formulas are written for real values (a
    complex product's gradient needs the other factor's conjugate), so complex ops run as
    PyTorch runs them; and for an input with no elements (a batch of zero), which holds nothing
    to pack and which the packing's row and group arithmetic would divide by."""
    tensors = [t for t in tensors if isinstance(t, torch.Tensor)]
    if not torch.is_grad_enabled() or any(t.is_complex() or t.numel() == 0 for t in tensors):
        return False
    return any(t.requires_grad for t in tensors)


def unconverted_class(module) -> type:
    """The class ``module``'s converted class (``actfx.convert``'s) was made from, or its own."""
    cls = type(module)
    while getattr(cls, "_actfx_converted", False):
        cls = cls.__bases__[0]
    return cls


def cast_grad(grad, like):
    """Gradients leave in the dtype of the input they belong to (autocast computes in another)."""
    if grad is None or like is None:
        return grad
    return grad.to(like.dtype) if grad.dtype != like.dtype else grad


def not_a_view(out):
    """``out`` itself, or, when it is a view (``F.linear`` of 3-D input views its 2-D result), the
    same memory without view tracking: autograd forbids in-place edits of views a custom Function
    returns, and models do ``linear(x).relu_()``."""
    if not isinstance(out, torch.Tensor) or out._base is None or torch.compiler.is_compiling():
        return out
    return out.new_empty(0).set_(out.untyped_storage(), out.storage_offset(), out.shape, out.stride())


def with_reduced_dims(value, dim, ndim: int):
    """``value`` (a reduction over ``dim`` of an ``ndim``-d tensor, without keepdim) with the
    reduced dims put back as size 1, so it broadcasts against the input in backward."""
    for d in sorted(d % max(ndim, 1) for d in ((dim,) if isinstance(dim, int) else dim)):
        value = value.unsqueeze(d)
    return value


def autocast_state(device_type: str):
    """(device type, dtype) of the autocast the forward runs under, for a rerun in backward to
    enter again; None where autocast is off (or the device type has none)."""
    try:
        if torch.is_autocast_enabled(device_type):
            return device_type, torch.get_autocast_dtype(device_type)
    except (TypeError, RuntimeError, AttributeError):
        pass
    return None
