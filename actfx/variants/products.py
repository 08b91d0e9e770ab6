"""Products of activations (mul, div, matmul/bmm) with packed operands.

Each operand's gradient is linear in the *other* operand, so packed operands give unbiased
gradients. Division keeps its denominator exact (1/b of a packed b is biased and unbounded near
zero); only the numerator is packed. An operand is kept only when the other one's gradient is
needed (as autograd does): ``x * noise`` with a constant ``noise`` (stochastic depth, a mask)
keeps the noise alone.
"""

from __future__ import annotations

import operator

import torch

from actfx.variants.common import needs_saving, not_a_view, refuse_double_backward
from actfx.variants.saved import materialize, spec_width, split_all, values_of


def _kept_factors(specs, flat, width: int, keep) -> tuple[list, list]:
    """(plans, storage) of the two factors' runs (``flat[:width]``, ``flat[width:]``), each split
    for saving only where ``keep`` says its partner's gradient reads it (else a None plan)."""
    plans, storage = [], []
    for spec, run, kept in zip(specs, (flat[:width], flat[width:]), keep):
        plan, store = split_all([spec], run) if kept else ([None], [])
        plans += plan
        storage += store
    return plans, storage


def _as_input(grad, shape, dtype):
    """A gradient summed over the dims broadcasting added, in its input's dtype."""
    return (grad.sum_to_size(shape) if grad.shape != shape else grad).to(dtype)


def _matmul_grads(a, b, g, compute, vector_a: bool, vector_b: bool):
    """``torch.matmul(a, b)``'s operand gradients (None for an operand not kept). A vector operand
    is a matrix of one row (a) or one column (b) here, as matmul reads it; ``h @ v`` with a
    parameter vector (GAT's attention logits, a scalar head) kept h exact before."""
    shape = list(g.shape)
    if vector_a:
        shape.insert(len(shape) - (0 if vector_b else 1), 1)
    if vector_b:
        shape.append(1)
    g = g.reshape(shape)
    a = None if a is None else (a.to(compute).unsqueeze(0) if vector_a else a.to(compute))
    b = None if b is None else (b.to(compute).unsqueeze(-1) if vector_b else b.to(compute))
    ga = None if b is None else g @ b.mT
    gb = None if a is None else a.mT @ g
    return (ga.squeeze(-2) if vector_a and ga is not None else ga), (gb.squeeze(-1) if vector_b and gb is not None else gb)


class _Product(torch.autograd.Function):
    @staticmethod
    def forward(ctx, op, specs, *flat):
        a, b = values_of(specs, flat)
        out = {"mul": operator.mul, "div": operator.truediv, "matmul": torch.matmul}[op](a, b)
        width = spec_width(specs[0])
        ctx.second = 2 + width
        need_a, need_b = ctx.needs_input_grad[2], ctx.needs_input_grad[ctx.second]
        # a is read by b's gradient (and by a division's gradient for b); b by both gradients of a division
        plans, storage = _kept_factors(specs, flat, width, (need_b, need_a or (op == "div" and need_b)))
        ctx.op, ctx.plans, ctx.compute = op, plans, out.dtype
        ctx.like = [(v.shape, v.dtype) if isinstance(v, torch.Tensor) else None for v in (a, b)]
        ctx.save_for_backward(*storage)
        return not_a_view(out)

    @staticmethod
    def backward(ctx, grad_out):
        refuse_double_backward(ctx.op)
        it = iter(ctx.saved_tensors)
        a, b = (None if plan is None else materialize(plan, it) for plan in ctx.plans)
        need_a, need_b = ctx.needs_input_grad[2], ctx.needs_input_grad[ctx.second]
        g = grad_out
        ga = gb = None
        if ctx.op == "mul":
            ga = g * b if need_a else None
            gb = g * a if need_b else None
        elif ctx.op == "div":
            ga = g / b if need_a else None
            gb = -g * a / (b * b) if need_b else None
        else:
            ga, gb = _matmul_grads(a, b, g.to(ctx.compute), ctx.compute, *(len(like[0]) == 1 for like in ctx.like))
        grads = [None] * len(ctx.needs_input_grad)
        for pos, grad, like in ((2, ga, ctx.like[0]), (ctx.second, gb, ctx.like[1])):
            if grad is not None and like is not None:
                grads[pos] = _as_input(grad, *like)
        return tuple(grads)


def product(op, specs, *flat, inplace=False):
    """``op`` in {"mul", "div", "matmul"}; ``flat`` holds the two operands' saved-value runs.
    ``inplace`` (``a.mul_(b)``, ``a.div_(b)``): computed out of place, then written into ``a``."""
    a, b = values_of(specs, flat)
    if inplace:
        if not isinstance(a, torch.Tensor) or (a.requires_grad and a.is_leaf):
            return {"mul": a.mul_, "div": a.div_}[op](b)  # what PyTorch does (and refuses) itself
        # a kept as it is (too small to pack) would be saved, then changed by the copy below, and
        # backward refused it: its own copy is saved instead (as PyTorch's in-place ops do)
        first = spec_width(specs[0])
        out = product(op, specs, a.clone(), *flat[1:first], *flat[first:])
        if out.shape != a.shape or out.dtype != a.dtype:
            return {"mul": a.mul_, "div": a.div_}[op](b)
        return a.copy_(out)
    fn = {"mul": operator.mul, "div": operator.truediv, "matmul": torch.matmul}[op]
    tensors = [v for v in (a, b) if isinstance(v, torch.Tensor)]
    if not needs_saving(*tensors):
        return fn(a, b)
    if op == "matmul" and (a.dim() < 1 or b.dim() < 1):
        return fn(a, b)  # torch.matmul refuses 0-d operands itself
    if op != "matmul" and not all(isinstance(v, torch.Tensor) for v in (a, b)):
        return fn(a, b)  # a scalar factor: autograd saves nothing for the tensor side
    return _Product.apply(op, specs, *flat)


class _AddCMul(torch.autograd.Function):
    """``addcmul(input, t1, t2, value)``: each factor's gradient is linear in the other factor,
    which is kept (packed) only when that gradient is needed; ``input`` needs nothing."""

    @staticmethod
    def forward(ctx, value, specs, base, *flat):
        t1, t2 = values_of(specs, flat)
        out = torch.addcmul(base, t1, t2, value=value)
        width = spec_width(specs[0])
        ctx.second = 3 + width
        need_1, need_2 = ctx.needs_input_grad[3], ctx.needs_input_grad[ctx.second]
        plans, storage = _kept_factors(specs, flat, width, (need_2, need_1))
        ctx.plans, ctx.value = plans, value
        ctx.like = [(v.shape, v.dtype) for v in (base, t1, t2)]
        ctx.save_for_backward(*storage)
        return not_a_view(out)

    @staticmethod
    def backward(ctx, grad_out):
        refuse_double_backward("addcmul")
        it = iter(ctx.saved_tensors)
        t1, t2 = (None if plan is None else materialize(plan, it) for plan in ctx.plans)
        g = grad_out
        grads = [None] * len(ctx.needs_input_grad)
        wanted = ((2, g, ctx.like[0]),
                  (3, g * t2 * ctx.value if ctx.needs_input_grad[3] else None, ctx.like[1]),
                  (ctx.second, g * t1 * ctx.value if ctx.needs_input_grad[ctx.second] else None, ctx.like[2]))
        for pos, grad, (shape, dtype) in wanted:
            if grad is not None and ctx.needs_input_grad[pos]:
                grads[pos] = _as_input(grad, shape, dtype)
        return tuple(grads)


def addcmul(value, specs, base, *flat):
    """``torch.addcmul(base, t1, t2, value=value)``; ``flat`` holds the factors' saved-value runs."""
    t1, t2 = values_of(specs, flat)
    tensors = [v for v in (base, t1, t2) if isinstance(v, torch.Tensor)]
    if len(tensors) != 3 or not needs_saving(*tensors) or not all(t.is_floating_point() for t in tensors):
        return torch.addcmul(base, t1, t2, value=value)
    return _AddCMul.apply(value, specs, base, *flat)
