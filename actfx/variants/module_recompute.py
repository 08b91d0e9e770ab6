"""A whole module with packed inputs, recomputed in backward (nn.MultiheadAttention,
nn.TransformerEncoderLayer, nn.TransformerDecoderLayer, recurrent layers; ``recompute_op``: the
ATen op torch.export makes of a recurrent layer or cell).

These modules run fused or branchy code that fx treats as one leaf call. Inside, autograd
keeps projections, attention weights (batch x heads x len x len) and dropout masks. Here
forward runs the module itself (identical output) and keeps only its packed inputs and the
generator state; backward rebuilds the inputs, replays the module under ``torch.func.vjp``
with the same dropout masks, and returns input and parameter gradients. The cost is one extra
forward of the module in backward, as with activation checkpointing -- but the checkpoint's
inputs are stored in a few bits.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from torch.utils._pytree import tree_flatten, tree_map, tree_unflatten

from actfx.passes.state_call import call_with_state
from actfx.variants import hooked_vjp
from actfx.variants.common import autocast_state, not_a_view, refuse_double_backward
from actfx.variants.recompute import _replay_rng, _rng_state, fill
from actfx.variants.saved import head_positions, materialize_all, split_all, values_of


def _call_like_caller(module, args, kwargs):
    """Call ``module`` as the caller (grad mode on) would, without keeping autograd state.

    In eval mode nn.MultiheadAttention / TransformerEncoderLayer take a fused, numerically
    different path when grad mode is off, so there the call runs with grad on and its outputs
    are cloned out of the throwaway graph (a detached view would keep that graph alive).
    In train mode the path does not depend on grad mode and no graph is built at all, except for
    recurrent layers (on CPU their kernel without gradients rounds differently: 3e-8).
    """
    if module.training and not isinstance(module, (nn.RNNBase, nn.RNNCellBase)):
        return module(*args, **kwargs)
    # the throwaway graph keeps nothing (its saved tensors would be held until the outputs are cloned)
    with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(_nothing, _nothing):
        out = module(*args, **kwargs)
    return tree_map(lambda o: o.detach().clone() if isinstance(o, torch.Tensor) else o, out)


def _nothing(_value):
    return None


class _RecomputeModule(torch.autograd.Function):
    @staticmethod
    def forward(ctx, module, static, box, n_params, *flat):
        args_t, kwargs_t, specs = static
        params, flat = flat[:n_params], flat[n_params:]
        values = values_of(specs, flat)
        device = next((v.device for v in values if isinstance(v, torch.Tensor)), torch.device("cpu"))
        ctx.rng = _rng_state(device)
        ctx.autocast = autocast_state(device.type)
        out, structure = tree_flatten(_call_like_caller(module, fill(args_t, values), dict(fill(kwargs_t, values))))
        box.append(structure)
        plans, storage = split_all(specs, flat)
        ctx.module, ctx.static, ctx.plans, ctx.n_params = module, static, plans, n_params
        ctx.heads = head_positions(specs, _LEAD + n_params)
        ctx.names = [name for name, _ in module.named_parameters()]
        ctx.save_for_backward(*params, *storage)
        ctx.out_mask = [isinstance(o, torch.Tensor) and o.is_floating_point() for o in out]
        ctx.mark_non_differentiable(*[o for o in out if isinstance(o, torch.Tensor) and not o.is_floating_point()])
        return tuple(not_a_view(o) for o in out)

    @staticmethod
    def backward(ctx, *grads_out):
        refuse_double_backward(type(ctx.module).__name__)
        saved = ctx.saved_tensors
        params, storage = saved[: ctx.n_params], saved[ctx.n_params :]
        args_t, kwargs_t, specs = ctx.static
        values = materialize_all(ctx.plans, storage)
        diff = [i for i, h in enumerate(ctx.heads) if isinstance(values[i], torch.Tensor) and ctx.needs_input_grad[h]]
        want_params = [i for i in range(ctx.n_params) if ctx.needs_input_grad[_LEAD + i]]

        def run(param_values, input_values):
            vals = list(values)
            for i, v in zip(diff, input_values):
                vals[i] = v
            for i in getattr(ctx.module, "written_inputs", ()):  # state the forward updated already
                vals[i] = vals[i].clone()
            table = dict(zip(ctx.names, params))
            table.update({ctx.names[i]: p for i, p in zip(want_params, param_values)})
            # the replay normalises with the batch's statistics as forward did, but updates
            # copies: forward already counted this batch in BatchNorm's running statistics
            table.update({name: b.clone() for name, b in ctx.module.named_buffers()})
            call = lambda: call_with_state(ctx.module, table, fill(args_t, vals), dict(fill(kwargs_t, vals)))  # noqa: E731
            if ctx.autocast is not None:
                with torch.autocast(ctx.autocast[0], dtype=ctx.autocast[1]):
                    out = call()
            else:
                out = call()
            return tuple(o for o in tree_flatten(out)[0] if isinstance(o, torch.Tensor) and o.is_floating_point())

        with _replay_rng(ctx.rng):
            outs, pullback = hooked_vjp.vjp(run, [params[i] for i in want_params], [values[i] for i in diff],
                                            eager=True)
        kept = [g for g, keep in zip(grads_out, ctx.out_mask) if keep]
        cotangents = tuple(g if g is not None else torch.zeros_like(o) for g, o in zip(kept, outs))
        g_params, g_inputs = pullback(cotangents)
        grads = [None] * len(ctx.needs_input_grad)
        for i, g in zip(want_params, g_params):
            grads[_LEAD + i] = g
        for i, g in zip(diff, g_inputs):
            grads[ctx.heads[i]] = g
        return tuple(grads)


def recompute_module(module, static, *flat):
    """``static`` = (args template, kwargs template, specs); ``flat`` = the inputs' runs."""
    from actfx.breakdown import original_of  # noqa: PLC0415 - breakdown imports the variants

    args_t, kwargs_t, specs = static
    values = values_of(specs, flat)
    module = original_of(module)  # a converted root (a bare TransformerEncoderLayer) would call itself
    params = [p for _, p in module.named_parameters()]
    if not (torch.is_grad_enabled() and (any(p.requires_grad for p in params) or any(
            isinstance(v, torch.Tensor) and v.requires_grad for v in values))) or any(
            not isinstance(v, (torch.Tensor, int, float, bool, str, type(None))) for v in values):
        # nothing to save, or an input holding tensors inside (a PackedSequence), which the
        # replay would not differentiate: the module runs as PyTorch runs it
        return module(*fill(args_t, values), **dict(fill(kwargs_t, values)))
    box: list = []  # the structure of the module's outputs (an LSTM's (out, (h, c))), flattened for autograd
    out = _RecomputeModule.apply(module, static, box, len(params), *params, *flat)
    return tree_unflatten(list(out), box[0])


_LEAD = 4  # arguments of _RecomputeModule.forward before the parameters


class _OpCall(nn.Module):
    """An ATen op called as a module, for ``recompute_module``. In eval mode, so the call runs with
    grad on as the original op did (on CPU the recurrent kernels round differently without it)."""

    def __init__(self, op):
        super().__init__()
        self.op = op
        self.train(False)

    def forward(self, *args, **kwargs):
        return self.op(*args, **kwargs)


def recompute_op(op, static, *flat):
    """``recompute_module`` for an ATen op (``aten.lstm``, ``aten.gru_cell``, ...): parameters are
    among its inputs, so their gradients come back as the inputs' do."""
    return recompute_module(_OpCall(op), static, *flat)
