"""A softmax and an element-wise function of it, ``f(softmax(x))``, as one op that keeps the
packed probabilities ``y`` and ``y * f'(y)`` (``passes/softmax_regions.py`` folds the pair where
``f'`` spans many decades).

Why: the hand-written log-probability ``torch.log(F.softmax(x, -1) + 1e-10)`` (language models,
policy gradients) kept ``f'(y) = 1 / (y + eps)`` packed on its own. Where a confident model gives
some probabilities below eps, that derivative spans 1e10 inside one group; every ordinary entry
then sat below the rounding noise's resolution and rounded to the group minimum in every draw:
the gradient was 98% off at 8 bits and its mean over steps just as far (biased). Backward of the
pair is ``A * g - y * sum(A * g)`` with ``A = y * f'(y)``: ``A = y / (y + eps)`` lies in [0, 1],
and the formula is linear in ``A`` and in ``y`` (rounded independently), so it stays unbiased.
Where the probabilities have other readers too (a policy's entropy ``-(p * log(p + eps)).sum()``)
the op returns them as well, and their gradient joins softmax's own backward formula.
"""

from __future__ import annotations

import dataclasses

import torch

from actfx.variants.common import needs_saving, not_a_view, refuse_double_backward
from actfx.variants.pointwise import Pointwise, named_calls
from actfx.variants.saved import head_positions, materialize_all, split_all


class _SoftmaxThen(torch.autograd.Function):
    @staticmethod
    def forward(ctx, op, specs, x, *runs):
        with torch.no_grad():
            out = op.forward(x)
        plans, storage = split_all(specs, runs)
        ctx.plans, ctx.op, ctx.x_dtype = plans, op, x.dtype
        ctx.save_for_backward(*storage)
        return tuple(not_a_view(o) for o in out) if op.both else not_a_view(out)

    @staticmethod
    def backward(ctx, *grads):
        refuse_double_backward(ctx.op.name)
        y, a = materialize_all(ctx.plans, ctx.saved_tensors)
        g = grads[-1].to(a.dtype) * a
        if ctx.op.both:  # the probabilities' own readers: softmax's backward, y * (g_y - sum(y * g_y))
            g = g + y * grads[0].to(y.dtype)
        gx = g - y * g.sum(ctx.op.dim, keepdim=True)
        return (None, None, gx.to(ctx.x_dtype)) + (None,) * (len(ctx.needs_input_grad) - 3)


@dataclasses.dataclass(frozen=True, eq=False)
class SoftmaxThen:
    """``region.fn(softmax(x, dim, dtype))``; ``region`` is element-wise and out of place.
    ``both``: the probabilities have other readers too, and the op returns (probabilities, f)."""

    region: Pointwise
    dim: int
    dtype: torch.dtype | None
    name: str
    both: bool = False

    def forward(self, x):
        y = torch.softmax(x, self.dim, dtype=self.dtype)
        return (y, self.region.fn(y)) if self.both else self.region.fn(y)

    def stored(self, x) -> tuple:
        """(y, y * f'(y)) for backward, or (None, None) when no backward will run or ``f`` has
        no derivative here."""
        if not needs_saving(x):
            return None, None
        with torch.no_grad():
            y = torch.softmax(x.detach(), self.dim, dtype=self.dtype)
        d = self.region.derivative_at(y)
        return (None, None) if d is None else (y, y * d)

    def apply(self, specs, x, *runs):
        if not needs_saving(x) or any(runs[i] is None for i in head_positions(specs, 0)):
            return self.forward(x)
        return _SoftmaxThen.apply(self, specs, x, *runs)


def softmax_then_callables(op: SoftmaxThen) -> tuple:
    """Graph-callable (plain call, stored values, variant) for ``op``, named after it."""

    def plain(x):
        return op.forward(x)

    def stored(x):
        return op.stored(x)

    def variant(specs, x, *runs):
        return op.apply(specs, x, *runs)

    calls = named_calls((plain, stored, variant), "stored", op.name, "softmax")
    for f in calls:
        f.actfx_softmax_then = calls
    return calls
