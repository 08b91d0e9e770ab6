"""Rematerialize: recompute in backward the saved values that short elementwise forward chains
compute from other saved values (ReLU(BN(x) + shortcut) from BN's packed input, its statistics,
the mask and the shortcut) instead of storing them too; with the ReLU's mask exact, the chain is
linear in what it reads, so one packed input serves both. A float value computed from booleans
and constants alone (an attention mask, ``where(causal, 0, -inf)``, which a fused attention
backward reads) is rebuilt from the booleans, stored as 1-bit masks: exact, 32x less than fp32.
A constant (``full``, ``zeros``: ``rules.CONSTANT_FACTORIES``) and views of it are rebuilt in
backward from nothing (Hugging Face's GPT-NeoX, Gemma, Mixtral saved a [batch, heads, seq, seq]
zero tensor that a backward ``slice_scatter`` reads). A saved product of an activation and a
fixed factor (computed from constants, parameters and buffers alone: RetNet's decay mask) is
saved as the activation, the product rebuilt in backward (``fixed_factors``). A value computed
from parameters alone and repeated over the batch is held as its source and repeated again in
backward (``repeated_parameter_copies``).
"""

from __future__ import annotations

import torch
from torch import fx

from actfx.passes.saved_pair import RANDOM_OPS, is_tensor, numel, pointwise, static_shape, val, view_like
from actfx.rules import CONSTANT_FACTORIES, Kind, rule_for

aten = torch.ops.aten


def rematerialize(run) -> None:
    """Recompute in backward the saved values that short elementwise forward chains compute
    from other saved values and parameters (ReLU(BN(x) + shortcut) from BN's input, its
    statistics, weight, bias and the shortcut), instead of storing them too: with the ReLU's
    mask exact, such a chain is linear in what it reads, so one packed input serves both.
    Parameters it reads are saved by reference (they are held anyway), small values as is."""
    available: dict[fx.Node, fx.Node] = {fwd: bwd for fwd, bwd in run.g.saved_tensors()}
    recipes: dict[fx.Node, list] = {}
    for fwd, placeholder in run.g.saved_tensors():
        if run.packable(fwd) is not None or not val(fwd).is_floating_point() or not placeholder.users:
            continue
        found = _chain(run, fwd, {**available, **recipes}) or _from_booleans(run, fwd)
        if found is None:
            continue
        chain, extra = found
        for value in extra:
            if value not in available:
                available[value] = run.g.add_saved(value, fwd)
        recipes[fwd] = chain
    for fwd in recipes:
        placeholder = available[fwd]
        if placeholder.users:
            rebuilt = _rebuild(run, fwd, recipes, available, run.first_use(placeholder), {})
            placeholder.replace_all_uses_with(rebuilt)


def fixed_factors(run) -> None:
    """Save ``a`` instead of a saved product ``a * c`` whose factor ``c`` is fixed (computed from
    constants, index ranges, parameters and buffers alone), and rebuild the product in backward.

    Why: the product's range is the activation's times the factor's. RetNet's decay mask spans
    orders of magnitude along each row (``gamma ** (i - j)``), so ``(q k^T) * D`` packed in groups
    of 256 rounded every small entry with the largest one's step; stored as ``q k^T`` each entry
    is rounded at the activation's scale and then multiplied by its own factor. Same bytes
    (``c`` broadcasts into ``a``'s shape); the gradient stays linear in what is packed."""
    available: dict[fx.Node, fx.Node] = {fwd: bwd for fwd, bwd in run.g.saved_tensors()}
    for fwd, placeholder in list(run.g.saved_tensors()):
        if not placeholder.users or run.packable(fwd) is not None or not val(fwd).is_floating_point():
            continue
        product, views = fwd, []  # the value saved may be a view of the product (a matmul's operand)
        while product.op == "call_function" and view_like(product):
            views.append(product)
            product = product.all_input_nodes[0]
        if product.op != "call_function" or product.target is not aten.mul.Tensor or product in available:
            continue
        split = _activation_and_fixed(run, product)
        if split is None:
            continue
        activation, chain, leaves = split
        if activation not in available and run.packable(activation) is not None:
            continue  # it would be kept exact (a graph input, a forward output): the product packs
        for value in (activation, *leaves):
            if value not in available:
                available[value] = run.g.add_saved(value, fwd)
        recipe = [*chain, product, *reversed(views)]
        rebuilt = _rebuild(run, fwd, {fwd: recipe}, available, run.first_use(placeholder), {})
        placeholder.replace_all_uses_with(rebuilt)
        run.g.drop_saved(fwd)
        del available[fwd]


def _activation_and_fixed(run, product: fx.Node):
    """(the activation factor of ``product``, the forward ops computing the fixed factor, the
    parameters and small values those read) or None."""
    tensors = [a for a in product.args if isinstance(a, fx.Node)]
    if len(tensors) != 2:
        return None

    def leaf(n):
        # a parameter or buffer (saved by reference), or a small value computed from them;
        # a large one computed from them is recomputed from them instead
        held = n.op == "placeholder" or (is_tensor(n) and static_shape(n) and numel(n) < run.config.min_numel)
        return True if run.read_as_is(n) and held else None

    for activation, factor in (tensors, tensors[::-1]):
        if (not is_tensor(activation) or not static_shape(activation) or numel(activation) != numel(product)
                or val(activation).dtype != val(product).dtype or activation in run.params):
            continue
        if factor.op == "placeholder":
            found = ([], [factor]) if run.read_as_is(factor) else None
        else:
            found = _walk(run, factor, leaf, index_ranges=True)
        if found is not None:
            return activation, *found
    return None


def _rebuild(run, value: fx.Node, recipes: dict, available: dict, before: fx.Node, done: dict) -> fx.Node:
    """``value`` computed in backward before ``before``, from saved values (rebuilding those
    that are themselves recipes there too)."""
    if value in done:
        return done[value]
    if value not in recipes:
        return available[value]
    env: dict[fx.Node, fx.Node] = {}

    def lookup(a: fx.Node) -> fx.Node:
        if a in env:
            return env[a]
        return _rebuild(run, a, recipes, available, before, done)

    for node in recipes[value]:
        for a in node.all_input_nodes:
            if a not in env:
                env[a] = lookup(a) if (a in recipes or a in available) else env.get(a)
        with run.g.bwd.inserting_before(before):
            env[node] = run.g.bwd.node_copy(node, lambda a: env[a])
        env[node].meta["autograd_backward"] = True
    done[value] = env[value]
    return env[value]


def _chain(run, value: fx.Node, available: dict):
    """(forward ops computing ``value`` from saved values, parameters and small values, in
    order; the parameters and small values not saved yet) or None when it needs anything else or
    more than ``_LIMIT`` ops (elementwise ops, ReLU and views only)."""

    def leaf(n):
        if n in available:
            return False  # saved already
        if (n.op == "placeholder" and run.read_as_is(n)) or (
                is_tensor(n) and static_shape(n) and numel(n) < run.config.min_numel):
            return True  # a parameter, or a small value (statistics): saved as is
        return None

    return _walk(run, value, leaf)


def _from_booleans(run, value: fx.Node):
    """(forward ops computing ``value`` from boolean tensors and small values alone, in order; those
    booleans and small values) or None."""

    def leaf(n):
        if is_tensor(n) and static_shape(n) and (val(n).dtype == torch.bool or numel(n) < run.config.min_numel):
            return True  # a boolean (stored as a 1-bit mask) or a small value (as is)
        return None

    found = _walk(run, value, leaf)
    if found is None or not any(val(n).dtype == torch.bool for n in found[1]):
        return None
    return found


_LIMIT = 24  # ops in a chain recomputed in backward
_RANGES = {aten.arange.default, aten.arange.start, aten.arange.start_step, torch.ops.prims.iota.default,
           aten.scalar_tensor.default}


def _walk(run, value: fx.Node, leaf, index_ranges: bool = False):
    """(the elementwise ops and views between ``value`` and its leaves, in graph order; the leaves
    ``leaf`` returns True for) or None. ``leaf(node)``: True, a leaf to return; False, a leaf
    already at hand; None, not a leaf. ``index_ranges``: ``arange`` / ``iota`` (and 0-d
    ``scalar_tensor``) count as constants (a decay mask's ``i - j``, its fill value)."""
    chain, leaves, stack, seen = [], [], [value], set()
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        kind = None if n is value else leaf(n)
        if kind is not None:
            if kind:
                leaves.append(n)
            continue
        if n.op != "call_function" or n.target in RANDOM_OPS or len(chain) >= _LIMIT:
            return None
        view = rule_for(n.target).kind is Kind.LINEAR and len(n.all_input_nodes) == 1
        # a float constant; a boolean one (``ones(t, t).tril()``'s) stays with the masks built from it
        constant = not n.all_input_nodes and (
            (n.target in CONSTANT_FACTORIES and val(n).is_floating_point()) or (index_ranges and n.target in _RANGES))
        if not (pointwise(n) or view or constant or n.target is aten.relu.default):
            return None
        chain.append(n)
        stack.extend(n.all_input_nodes)
    return sorted(chain, key=run.g.order.get), leaves


# Ops that lay a value out again without computing: a parameter copy rebuilt through them is
# the same values (``repeat`` over the batch: DeBERTa's relative-position projections)
_LAYOUT = {aten.repeat.default, aten.expand.default, aten.clone.default}


def repeated_parameter_copies(run) -> None:
    """Save the small source of a value computed from parameters alone and laid out again larger
    (``repeat`` / ``expand`` over the batch, with views), and redo the layout in backward.

    Why: such a value stays exact (parameters and what is computed from them alone are never
    packed), and the layout makes it batch-sized: DeBERTa-v2's relative-position key and query
    projections, ``repeat``ed over batch x heads, were 56% of what a tiny model held under
    actfx.compile (at batch 32, span 512, 12 heads: 2 x 50 MB a layer). Rebuilt from the source,
    the values are the same, and only the source (one batch's worth) is held."""
    for fwd, placeholder in list(run.g.saved_tensors()):
        if fwd not in run.params or fwd.op != "call_function" or not placeholder.users or not static_shape(fwd):
            continue
        chain, source = [], fwd
        while source.op == "call_function" and len(source.all_input_nodes) == 1 and source in run.params and (
                view_like(source) or source.target in _LAYOUT):
            chain.append(source)
            source = source.all_input_nodes[0]
        if not any(n.target in _LAYOUT and n.target is not aten.clone.default for n in chain) \
                or 2 * numel(source) > numel(fwd) or not is_tensor(source) or not static_shape(source) \
                or source in run.written:
            continue
        held = {source: run.g.placeholder_of.get(source) or run.g.add_saved(source, fwd)}
        rebuilt = _rebuild(run, fwd, {fwd: chain[::-1]}, held, run.first_use(placeholder), {})
        placeholder.replace_all_uses_with(rebuilt)
        run.g.drop_saved(fwd)
