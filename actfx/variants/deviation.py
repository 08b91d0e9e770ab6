"""``std`` and ``var`` (and ``std_mean`` / ``var_mean``) with a packed input (and, for std, the
exact output).

var's gradient is ``2 (x - mean(x)) g / (N - c)``: linear in ``x``, so a packed ``x`` gives it
unbiased. std's is var's taken with ``g / (2 std)``; with std kept exact (one value per reduced
row) it stays linear in ``x``. Recomputed from the packed ``x`` it would not be
(E sqrt(var(x + noise)) > std(x)): the Annotated Transformer's LayerNorm divides by ``x.std(-1)``.
The mean ``var_mean`` also returns has a gradient that reads nothing.
"""

from __future__ import annotations

import torch

from actfx.variants import hooked_vjp
from actfx.variants.common import needs_saving, not_a_view, refuse_double_backward
from actfx.variants.saved import materialize_all, split_all

aten = torch.ops.aten

# the spellings, by the name the graph carries (a plain string prints into fx code)
SPELLINGS = {
    "torch.std": torch.std, "torch.var": torch.var, "Tensor.std": torch.Tensor.std, "Tensor.var": torch.Tensor.var,
    "torch.std_mean": torch.std_mean, "torch.var_mean": torch.var_mean,
    **{op.name(): op for op in (aten.std.correction, aten.std.dim, aten.std.default,
                                aten.var.correction, aten.var.dim, aten.var.default,
                                aten.std_mean.correction, aten.std_mean.dim, aten.std_mean.default,
                                aten.var_mean.correction, aten.var_mean.dim, aten.var_mean.default)},
}
# the spellings that also return the mean
WITH_MEAN = frozenset(name for name in SPELLINGS if "_mean" in name)
# each std spelling and the var that takes the same arguments
AS_VARIANCE = {name: name.replace("std", "var") for name in SPELLINGS if "std" in name}


class _PackedDeviation(torch.autograd.Function):
    @staticmethod
    def forward(ctx, spec, fn, rest, kwargs, *run):
        x = run[0]
        out = SPELLINGS[fn](x, *rest, **dict(kwargs))
        plans, storage = split_all([spec], run)
        ctx.plans, ctx.fn, ctx.rest, ctx.kwargs, ctx.x_dtype = plans, fn, rest, kwargs, x.dtype
        spread = out[0] if fn in WITH_MEAN else out
        ctx.save_for_backward(*((spread,) if fn in AS_VARIANCE else ()), *storage)
        return tuple(map(not_a_view, out)) if fn in WITH_MEAN else not_a_view(out)

    @staticmethod
    def backward(ctx, grad_out, *grad_mean):
        refuse_double_backward("std" if ctx.fn in AS_VARIANCE else "var")
        saved = ctx.saved_tensors
        if ctx.fn in AS_VARIANCE:
            std, saved = saved[0], saved[1:]
            # PyTorch's own std backward: 0 where std is 0
            grad_out = (grad_out / (2 * std)).masked_fill(std == 0, 0)
        x = materialize_all(ctx.plans, saved)[0]
        variance = SPELLINGS[AS_VARIANCE.get(ctx.fn, ctx.fn)]
        _, pullback = hooked_vjp.vjp(lambda v: variance(v, *ctx.rest, **dict(ctx.kwargs)), x)
        grads = tuple(g.to(x.dtype) for g in (grad_out, *grad_mean))  # var_mean's two, or var's one
        (gx,) = pullback(grads if grad_mean else grads[0])
        return (None, None, None, None, gx.to(ctx.x_dtype)) + (None,) * (len(ctx.needs_input_grad) - 5)


def deviation(spec, fn, rest, kwargs, *run):
    """``fn(x, *rest, **kwargs)`` for ``fn`` a std or var spelling's name (``SPELLINGS``);
    ``run``: x's saved-value run."""
    x = run[0]
    if not needs_saving(x):
        return SPELLINGS[fn](x, *rest, **dict(kwargs))
    return _PackedDeviation.apply(spec, fn, rest, kwargs, *run)
