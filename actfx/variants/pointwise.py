"""Element-wise functions of one tensor that keep their packed *derivative* instead of their input.

Why: backward of ``y = f(x)`` element-wise is ``g * f'(x)``. Storing ``x`` packed and
re-evaluating ``f'`` at the rounded ``x`` is biased wherever ``f'`` is not linear (tanh, sigmoid,
exp, ``pow(x, 3)``, a GELU spelled as its tanh formula); storing ``f'(x)`` packed makes backward
linear in what is stored, so stochastic rounding keeps the gradient unbiased, at the same bits.
``f'`` comes from autograd on the very ops of the forward, once, in forward: any spelling and any
op with a derivative works, one op or a chain of them (``actfx/passes/pointwise_regions.py``).
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import torch

from actfx.variants import hooked_vjp
from actfx.variants.common import needs_saving, not_a_view, refuse_double_backward
from actfx.variants.saved import materialize_all, split_all


def keep_derivative(ctx, name: str, spec, x, run) -> None:
    """Keep the derivative run for :class:`_FromPackedDerivative`'s backward."""
    plans, storage = split_all([spec], run)
    ctx.plans, ctx.name, ctx.x_dtype = plans, name, x.dtype
    ctx.save_for_backward(*storage)


class _FromPackedDerivative(torch.autograd.Function):
    @staticmethod
    def forward(ctx, fn, name, spec, x, *run):
        with torch.no_grad():
            out = fn(x)
        keep_derivative(ctx, name, spec, x, run)
        return not_a_view(out)

    @staticmethod
    def backward(ctx, grad_out):
        refuse_double_backward(ctx.name)
        d = materialize_all(ctx.plans, ctx.saved_tensors)[0]
        return (None, None, None, (grad_out * d).to(ctx.x_dtype)) + (None,) * (len(ctx.needs_input_grad) - 4)


def from_packed_derivative(fn, name: str, spec, x, *run, in_place: bool = False):
    """``fn(x)`` (element-wise) whose backward is ``g * d``, ``d`` read from the packed run (its
    head: the derivative); plain ``fn(x)`` when no backward will run, or when the derivative was
    too small to pack: then PyTorch's own saves, often shared with the next op (an exp's output,
    which the product after it keeps anyway), cost no more than an exact copy of ``d``. Not for
    an op ``in_place`` (its result is copied into ``x``, which ``fn`` may have saved)."""
    if run[0] is None or not needs_saving(x) or (spec[0] == "packed" and run[1] is None and not in_place):
        return fn(x)
    return _FromPackedDerivative.apply(fn, name, spec, x, *run)


@dataclasses.dataclass(frozen=True, eq=False)
class Pointwise:
    """``fn``: an element-wise, out-of-place function of one tensor (its other arguments fixed).
    ``inplace``: the op wrote its result into its input (``x.sigmoid_()``, ``inplace=True``)."""

    fn: Callable
    name: str
    inplace: bool = False
    kind: str = "pointwise"  # the op kind reports and ``Config.op_bits`` use
    # x is a ReLU's output (or a view of it): the derivative is kept only where x > 0, since the
    # ReLU's backward zeroes the rest (``log(relu(h) + 1e-10)``: 1e10 there set the groups' range)
    gated: bool = False

    def derivative(self, x):
        """``f'(x)`` element-wise, or None when no backward will run (nothing to keep)."""
        return self.derivative_at(x) if needs_saving(x) else None

    def derivative_at(self, x):
        """``f'(x)`` element-wise, or None where ``f`` has none here (an integer or broadcast
        result); also at a value no backward will read (``softmax_then`` asks at probabilities)."""
        try:
            # torch.func.vjp rather than autograd.grad: torch.compile traces it without a graph
            # break (under saved-tensor hooks, which torch.func refuses, hooked_vjp takes autograd)
            y, pullback = hooked_vjp.vjp(self.fn, x.detach())
        except RuntimeError as err:
            if "must be floating-point" in str(err):
                return None  # an integer or boolean result has no gradient: nothing to keep
            raise
        if not (isinstance(y, torch.Tensor) and y.is_floating_point() and y.shape == x.shape):
            return None  # not differentiable here, or broadcast: autograd keeps what it needs
        (d,) = pullback(torch.ones_like(y))
        if d is not None and self.gated:
            d = torch.where(x > 0, d, 0.0)
        return None if d is None else d.detach()

    def apply(self, spec, x, *run):
        """``fn(x)``, with a backward that reads the packed derivative run (its head: ``f'(x)``)."""
        out = from_packed_derivative(self.fn, self.name, spec, x, *run, in_place=self.inplace)
        if self.inplace:
            return x.copy_(out)  # a view keeps its base's history through CopySlices
        return out


def pointwise_callables(region: Pointwise) -> tuple[Callable, Callable, Callable]:
    """Graph-callable functions for ``region``: (plain call, derivative, variant), named after it
    so the rewritten graph's code reads ``pointwise_<name>(...)``."""

    def plain(x):
        out = region.fn(x)
        return x.copy_(out) if region.inplace else out

    def derivative(x):
        return region.derivative(x)

    def variant(spec, x, *run):
        return region.apply(spec, x, *run)

    calls = named_calls((plain, derivative, variant), "derivative", region.name, region.kind)
    plain.actfx_region = region  # passes/softmax_regions.py folds a softmax before it into one op
    return calls


def named_calls(calls: tuple, middle: str, name: str, kind: str) -> tuple:
    """(plain, ``middle``, variant) named ``pointwise_<name>``, ``<middle>_<name>`` and
    ``pointwise_packed_<name>`` for the rewritten graph's code, each knowing the other two
    (``actfx_pointwise``) and the op kind reports use (``actfx_kind``)."""
    for f, prefix in zip(calls, ("pointwise", middle, "pointwise_packed")):
        f.__name__ = f.__qualname__ = f"{prefix}_{name}"
        f.actfx_pointwise = calls
        f.actfx_kind = kind
    return calls
