"""A custom ``torch.autograd.Function`` of one tensor that turns out element-wise keeps its
packed *derivative* instead of what its own forward saves.

Why: "memory-efficient" activations are written as Functions whose forward saves the input and
whose backward evaluates ``g * f'(x)`` (timm's ``*_me`` activations, EfficientNet-PyTorch's
``MemoryEfficientSwish``, BLOOM's ``GeLUFunction``). Their input was kept exact: BLOOM converted
held 3.1x less than PyTorch against 10.9x under actfx.compile. The Function runs once, as
written (same output, same random draws); its own backward, asked with a gradient of ones, gives
``f'(x)`` there, and backward is then ``g * f'(x)``: linear in what is stored, so unbiased.

Whether the Function is element-wise is asked of its backward, once per call site, at its first
call with a gradient: a gradient of random values must come back as ``f'(x)`` times itself
(a Function mixing values, a cumulative sum or a normalisation, does not, and then runs as
written from then on). The random values come from a generator of their own, so the model's
random draws are those of PyTorch.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch._subclasses import FakeTensor

from actfx.variants.common import needs_saving, not_a_view
from actfx.variants.pointwise import _FromPackedDerivative, keep_derivative
from actfx.variants.saved import same_storage

_TOLERANCE = 1e-3  # relative: an element-wise backward differs from f'(x) * g by rounding only


class ElementwiseCheck:
    """Whether one call site's Function has an element-wise backward (None: not asked yet)."""

    def __init__(self, name: str):
        self.name = name
        self.elementwise: bool | None = None

    def holds(self, y: torch.Tensor, x: torch.Tensor, d: torch.Tensor) -> bool:
        if isinstance(y, FakeTensor):
            return self.elementwise is not False  # a dry run (show, report): no values to ask with
        if self.elementwise is None:
            generator = torch.Generator(device=y.device).manual_seed(0)
            g = torch.randn(y.shape, generator=generator, device=y.device, dtype=y.dtype)
            (dg,) = torch.autograd.grad(y, x, g, retain_graph=True, allow_unused=True)
            self.elementwise = dg is not None and bool(
                (dg - d * g).norm() <= _TOLERANCE * (d * g).norm() + torch.finfo(d.dtype).tiny)
        return self.elementwise


def output_and_derivative(apply: Callable, check: ElementwiseCheck, x, args: tuple, kwargs: dict):
    """(``apply(*args)``'s output, ``f'(x)``), both detached, where the Function is element-wise
    in ``x`` here; else (the output with its own autograd history, None)."""
    if not needs_saving(x) or not x.is_floating_point() or check.elementwise is False:
        return apply(*args, **kwargs), None
    with torch.enable_grad():
        y = apply(*args, **kwargs)
    if not (isinstance(y, torch.Tensor) and y.requires_grad and y.is_floating_point() and y.shape == x.shape
            and y.dtype == x.dtype and not same_storage(y, x)):
        return y, None  # not element-wise in shape, or in place (``ctx.mark_dirty``)
    try:
        (d,) = torch.autograd.grad(y, x, torch.ones_like(y), retain_graph=True, allow_unused=True)
        elementwise = d is not None and d.shape == x.shape and check.holds(y, x, d)
    except RuntimeError:  # a backward that refuses to be asked here: the Function runs as written
        check.elementwise, elementwise = False, False
    if not elementwise:
        return y, None
    return y.detach(), d.detach()


class _FromPackedDerivativeOutput(_FromPackedDerivative):
    """Its parent's backward (``g * f'(x)``) for an output the Function computed already: ``y``
    stands where the parent takes the function."""

    @staticmethod
    def forward(ctx, y, name, spec, x, *run):
        keep_derivative(ctx, name, spec, x, run)
        return not_a_view(y.view_as(y))


def with_packed_derivative(name: str, spec, y, x, *run):
    """``y`` (the Function's output) whose backward reads the packed derivative run (its head:
    ``f'(x)``); ``y`` itself, with its own history, where no derivative was taken."""
    if run[0] is None:
        return y
    return _FromPackedDerivativeOutput.apply(y, name, spec, x, *run)
