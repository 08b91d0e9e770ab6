"""Any single-output op whose backward is cheap to re-derive: keep inputs packed, recompute in backward.

Used for ops whose backward is linear in the packed inputs or only diluted by them (``x ** 2``,
average pools, attention, normalisations, ops of two activations) where writing the backward by
hand buys nothing: forward runs the original function (identical output); backward rebuilds the
inputs from their packed form, runs the function again under autograd and takes its
vector-Jacobian product. Parameters ride along unpacked. Element-wise ops non-linear in their
input (SiLU, sigmoid, ...) keep their packed derivative instead (``derivative.py``): recomputing
them at a packed input is biased.
"""

from __future__ import annotations

import contextlib
import operator

import torch

from actfx.variants import hooked_vjp
from actfx.variants.common import autocast_state, needs_saving, not_a_view, refuse_double_backward
from actfx.variants.saved import head_positions, materialize_all, rewatch, same_storage, split_all, values_of

SLOT = "actfx.slot"
CHAIN = "actfx.chain"  # (CHAIN, steps, source): ops replayed on a stored source (passes/expansion.py)
PREV = "actfx.prev"  # (PREV,) in a chain step's arguments: the value the chain has built so far


def fill(template, values, prev=None):
    """Replace ("actfx.slot", i) markers in a nested args template with values[i], and replay
    (CHAIN, steps, source) markers on their filled source (``actfx/passes/expansion.py``)."""
    if isinstance(template, tuple):
        if len(template) == 2 and template[0] == SLOT:
            return values[template[1]]
        if len(template) == 1 and template[0] == PREV:
            return prev
        if len(template) == 3 and template[0] == CHAIN:
            value = fill(template[2], values)
            for ref, args_t, kwargs_t in template[1]:
                value = _resolve(ref)(*fill(args_t, values, value), **dict(fill(kwargs_t, values, value)))
            if (isinstance(value, torch.Tensor) and value.is_leaf and value.is_floating_point()
                    and not value.requires_grad and any(v.requires_grad for v in _slot_tensors(template, values))):
                # Replayed in a Function's forward (no grad), it stands in for a value that
                # required grad; kernels choose by that flag (CPU SDPA's fused kernel refuses a
                # mask that requires grad, and would round differently).
                value.requires_grad_(True)
            return value
        return tuple(fill(t, values, prev) for t in template)
    if isinstance(template, list):
        return [fill(t, values, prev) for t in template]
    return template


def _slot_tensors(template, values):
    if isinstance(template, (tuple, list)):
        if len(template) == 2 and template[0] == SLOT:
            value = values[template[1]]
            return [value] if isinstance(value, torch.Tensor) else []
        return [t for part in template for t in _slot_tensors(part, values)]
    return []


def _resolve(ref: tuple):
    """The callable a chain step names: ("method", name), ("aten", packet, overload),
    ("operator" | "torch" | "F", name)."""
    space, name = ref[0], ref[1]
    if space == "method":
        return lambda self, *args, **kwargs: getattr(self, name)(*args, **kwargs)
    if space == "aten":
        return getattr(getattr(torch.ops.aten, name), ref[2])
    return getattr({"operator": operator, "torch": torch, "F": torch.nn.functional}[space], name)


def _rng_state(device: torch.device):
    """The generator state that dropout inside a recomputed op reads, to replay it in backward."""
    if device.type == "cuda":
        return device, torch.cuda.get_rng_state(device)
    return device, torch.get_rng_state()


@contextlib.contextmanager
def _replay_rng(state):
    """Run with the generator state forward saw; the global stream is restored afterwards."""
    device, rng = state
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        if device.type == "cuda":
            torch.cuda.set_rng_state(rng, device)
        else:
            torch.set_rng_state(rng)
        yield


class _Recompute(torch.autograd.Function):
    @staticmethod
    def forward(ctx, fn, static, *flat):
        args_t, kwargs_t, specs, inplace = static[:4]
        values = values_of(specs, flat)
        args, kwargs = fill(args_t, values), dict(fill(kwargs_t, values))
        device = next((v.device for v in values if isinstance(v, torch.Tensor)), torch.device("cpu"))
        ctx.rng = _rng_state(device) if len(static) > 4 and static[4] else None
        out = fn(*args, **kwargs)
        plans, storage = split_all(specs, flat)
        if inplace:
            # Backward must read the input as it was: a value kept exact (too small to pack, or
            # unpackable) is the very tensor about to be overwritten, so keep a copy of it.
            target = values[0]
            storage = [t.clone() if same_storage(t, target) else t for t in storage]
            target.copy_(out)
            ctx.mark_dirty(target)
            out = target
            plans = rewatch(plans)  # the write is this op's own, not a later edit
        ctx.fn, ctx.static, ctx.plans = fn, static, plans
        ctx.heads = head_positions(specs, 2)
        ctx.autocast = autocast_state(device.type)
        ctx.save_for_backward(*storage)
        return out if inplace else not_a_view(out)

    @staticmethod
    def backward(ctx, grad_out):
        refuse_double_backward(getattr(ctx.fn, "__name__", "op"))
        args_t, kwargs_t = ctx.static[:2]
        values = materialize_all(ctx.plans, ctx.saved_tensors)
        diff = [i for i, head in enumerate(ctx.heads)
                if isinstance(values[i], torch.Tensor) and ctx.needs_input_grad[head]]
        grads = [None] * len(ctx.needs_input_grad)
        if not diff:
            return tuple(grads)

        def run(*diff_values):
            # torch.func.vjp rather than autograd.grad: torch.compile traces it without a break.
            vals = list(values)
            for i, v in zip(diff, diff_values):
                vals[i] = v
            args, kwargs = fill(args_t, vals), dict(fill(kwargs_t, vals))
            if ctx.autocast is not None:
                with torch.autocast(ctx.autocast[0], dtype=ctx.autocast[1]):
                    return ctx.fn(*args, **kwargs)
            return ctx.fn(*args, **kwargs)

        # a random op replays its draws through autograd, as the forward drew them (hooked_vjp.vjp)
        with _replay_rng(ctx.rng) if ctx.rng is not None else contextlib.nullcontext():
            out, pullback = hooked_vjp.vjp(run, *[values[i] for i in diff], eager=ctx.rng is not None)
        got = pullback(grad_out.to(out.dtype))
        for i, g in zip(diff, got):
            grads[ctx.heads[i]] = g
        return tuple(grads)


def make_recompute_variant(fn, name: str):
    """A graph-callable wrapper around ``fn``: ``variant(static, *flat)`` with
    static = (args template, kwargs template, specs, inplace[, replay_rng]); replay_rng makes
    backward recompute with the generator state forward saw (ops that draw dropout masks)."""

    def variant(static, *flat):
        args_t, kwargs_t, specs, inplace = static[:4]
        values = values_of(specs, flat)
        if not needs_saving(*values):
            args, kwargs = fill(args_t, values), dict(fill(kwargs_t, values))
            if inplace:
                kwargs["inplace"] = True
            return fn(*args, **kwargs)
        return _Recompute.apply(fn, static, *flat)

    variant.__name__ = variant.__qualname__ = f"recompute_{name}"
    return variant
