"""Element-wise functions of several tensors that keep one packed partial derivative per input.

Why: ``atan2(a, b)``, ``hypot``, ``lerp(a, b, w)``, ``clamp(a, min=b)`` or a chain such as SwiGLU's
``silu(a) * b`` save their inputs, and backward is nonlinear in them (so packing them is biased),
or, for a chain, each op saves its own (SwiGLU: silu's derivative, ``silu(a)`` and ``b``). Backward
of ``y = f(x_1, ..., x_k)`` element-wise is ``g * df/dx_i`` summed to ``x_i``'s shape: linear in
each partial, so keeping the partials packed is unbiased, one per input that needs a gradient.

The same holds for functions that reduce each row along one dim to one number
(``cosine_similarity``, ``pairwise_distance``): the Jacobian of a row is one row-shaped vector, so
``g`` (unsqueezed at that dim) times the packed partials is the gradient.

A partial that does not vary along the dims an input was broadcast over (a squeeze-excitation
gate: ``d(x * sigmoid(s))/dx = sigmoid(s)``) is kept at that input's smaller shape; the check is
exact (``torch.equal``), so only values that are truly constant are narrowed.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Callable

import torch
from torch._subclasses.fake_tensor import FakeTensor, unset_fake_temporarily

from actfx.variants import hooked_vjp
from actfx.variants.common import needs_saving, not_a_view, refuse_double_backward
from actfx.variants.pointwise import named_calls
from actfx.variants.saved import head_positions, materialize_all, split_all


class _FromPackedPartials(torch.autograd.Function):
    @staticmethod
    def forward(ctx, region, specs, *inputs_and_runs):
        count = region.count
        xs, runs = inputs_and_runs[:count], inputs_and_runs[count:]
        with torch.no_grad():
            out = region.fn(*xs)
        plans, storage = split_all(specs, runs)
        ctx.plans, ctx.name, ctx.count, ctx.reduced = plans, region.name, count, region.reduced_dim(out)
        ctx.inputs = [(x.shape, x.dtype) if isinstance(x, torch.Tensor) else None for x in xs]
        ctx.save_for_backward(*storage)
        return not_a_view(out)

    @staticmethod
    def backward(ctx, grad_out):
        refuse_double_backward(ctx.name)
        partials = materialize_all(ctx.plans, ctx.saved_tensors)
        g = grad_out if ctx.reduced is None else grad_out.unsqueeze(ctx.reduced)
        grads = [None if d is None or meta is None or not needed
                 else (g * d.to(g.dtype)).sum_to_size(meta[0]).to(meta[1])
                 for d, meta, needed in zip(partials, ctx.inputs, ctx.needs_input_grad[2:])]
        return (None, None, *grads) + (None,) * (len(ctx.needs_input_grad) - 2 - ctx.count)


def _narrowed(d: torch.Tensor, shapes: list, stand_in: torch.Tensor | None = None) -> torch.Tensor:
    """``d`` at the smallest of ``shapes`` (inputs' shapes, broadcast against ``d``'s) along
    whose size-1 dims it is exactly constant; else ``d``. A fake ``d`` has no values: constancy
    is read on ``stand_in``, the same partial at small random inputs of the same broadcast
    pattern (None: not narrowed)."""
    fake = _without_values(d)
    probe = stand_in if fake else d
    for shape in sorted(shapes, key=lambda s: torch.Size(s).numel()):
        ones = [i for i, n in enumerate(shape) if n == 1 and d.shape[i] != 1]
        if not ones or probe is None:
            continue
        # a stand-in is real, read outside the fake mode (a training step's own d needs nothing)
        with unset_fake_temporarily() if fake else contextlib.nullcontext():
            if not _constant_along(probe, ones):
                continue
        first = d
        for i in ones:
            first = first.narrow(i, 0, 1)
        return first.contiguous()
    return d


def _without_values(d: torch.Tensor | None) -> bool:
    return isinstance(d, FakeTensor) or (d is not None and d.is_meta)


def _constant_along(d: torch.Tensor, dims: list) -> bool:
    first = d
    for i in dims:
        first = first.narrow(i, 0, 1)
    return torch.equal(first.expand_as(d), d)


@dataclasses.dataclass(frozen=True, eq=False)
class Several:
    """``fn``: an element-wise, out-of-place function of ``count`` tensors (its other arguments
    fixed); with ``dim``, one that reduces each row along ``dim`` (of the broadcast inputs) to one
    number, the dim dropped unless ``keepdim``."""

    fn: Callable
    name: str
    count: int
    kind: str = "pointwise"
    dim: int | None = None
    keepdim: bool = False
    # inputs that are a ReLU's output (or a view of it): their partial is kept only where the input
    # is > 0, since the ReLU's backward zeroes the rest (NeRF's ``1 - exp(-relu(h) * d)`` with a
    # far-plane d of 1e10 where relu(h) = 0: that entry set every group's range)
    gated: tuple = ()

    def reduced_dim(self, out: torch.Tensor) -> int | None:
        """Where backward unsqueezes the output's gradient: the reduced dim, counted in ``out``'s
        rank plus one, or None (element-wise, or the dim kept)."""
        if self.dim is None or self.keepdim:
            return None
        return self.dim % (out.dim() + 1)

    def _result_shape(self, shape: torch.Size) -> tuple | None:
        """The output's shape for inputs broadcast to ``shape``."""
        if self.dim is None:
            return tuple(shape)
        if not shape:
            return None
        dim = self.dim % len(shape)
        return (*shape[:dim], *((1,) if self.keepdim else ()), *shape[dim + 1:])

    def partials(self, *xs) -> tuple:
        """``df/dx_i`` element-wise at the output's shape (or narrowed, module docstring), None
        for inputs that need no gradient; all None where the function is not element-wise here."""
        none = (None,) * self.count
        wanted = [i for i, x in enumerate(xs) if isinstance(x, torch.Tensor) and needs_saving(x)
                  and x.is_floating_point()]
        if not wanted:
            return none
        shape = torch.broadcast_shapes(*(x.shape for x in xs if isinstance(x, torch.Tensor)))
        fixed = [x.detach() if isinstance(x, torch.Tensor) else x for x in xs]

        def of_wanted(*values):
            args = list(fixed)
            for i, v in zip(wanted, values):
                args[i] = v
            return self.fn(*args)

        y, pullback = hooked_vjp.vjp(of_wanted, *(fixed[i].expand(shape) for i in wanted))
        if not (isinstance(y, torch.Tensor) and y.is_floating_point() and tuple(y.shape) == self._result_shape(shape)):
            return none
        got = list(pullback(torch.ones_like(y)))
        for k, i in enumerate(wanted):
            if i in self.gated and got[k] is not None:
                got[k] = torch.where(fixed[i] > 0, got[k], 0.0)
        dims = len(shape)
        shapes = [(1,) * (dims - x.dim()) + tuple(x.shape) for x in fixed if isinstance(x, torch.Tensor)]
        broadcast = len(set(shapes)) > 1
        stand_ins = self._at_small_inputs(xs) if broadcast and any(_without_values(d) for d in got) else none
        result = list(none)
        for i, d in zip(wanted, got):
            result[i] = None if d is None else _narrowed(d.detach(), shapes, stand_ins[i]) if broadcast else d.detach()
        return tuple(result)

    def _at_small_inputs(self, xs) -> tuple:
        """The partials at small random real inputs with ``xs``' broadcast pattern (each size
        above 1 made 3), for fake ``xs``: whether a partial is constant along a broadcast dim is
        a property of ``fn``, which fake tensors cannot show (``torch.equal`` on them failed, and
        the measurement of every squeeze-excite gate fell back to a real forward at the planned
        batch). None where that cannot run (integer inputs, constants inside ``fn``)."""
        if not all(x.is_floating_point() for x in xs if isinstance(x, torch.Tensor)):
            return (None,) * self.count
        with unset_fake_temporarily():
            generator = torch.Generator().manual_seed(0)
            small = [torch.randn([1 if n == 1 else 3 for n in x.shape], generator=generator, dtype=x.dtype)
                     .requires_grad_(x.requires_grad) if isinstance(x, torch.Tensor) else x for x in xs]
            try:
                return self.partials(*small)
            except Exception:  # noqa: BLE001 - fn may hold fake constants; then nothing is narrowed
                return (None,) * self.count

    def apply(self, specs, *inputs_and_runs):
        """``fn(*xs)`` whose backward reads the packed partials (the runs after the inputs);
        plain ``fn(*xs)`` where no backward runs or nothing was packed."""
        xs, runs = inputs_and_runs[:self.count], inputs_and_runs[self.count:]
        if all(runs[i] is None for i in head_positions(specs, 0)):
            return self.fn(*xs)
        return _FromPackedPartials.apply(self, specs, *xs, *runs)


def several_callables(region: Several) -> tuple[Callable, Callable, Callable]:
    """Graph-callable (plain call, partials, variant) for ``region``, named after it."""

    def plain(*xs):
        return region.fn(*xs)

    def partials(*xs):
        return region.partials(*xs)

    def variant(specs, *inputs_and_runs):
        return region.apply(specs, *inputs_and_runs)

    calls = named_calls((plain, partials, variant), "partials", region.name, region.kind)
    for f in calls:
        f.actfx_several = True  # one packed partial per input, also for one input (a row function)
    return calls
