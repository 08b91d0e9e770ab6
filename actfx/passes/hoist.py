"""Hoist: compute in forward the backward values that saved values feed nonlinearly.

A backward value that depends on saved values alone and is nonlinear in one that will be packed
(a ReLU's ``x <= 0``, GELU's derivative after ``linearize``, ``x * x``) would be biased by the
rounding noise; computed in forward and saved instead, it is exact (a mask) or packed itself, and
the backward reads it linearly. Views and negations of one value hoist that value once.
"""

from __future__ import annotations

import functools

import torch
from torch import fx

from actfx.passes import noise_degree
from actfx.passes.graph_emit import emit, relu_select
from actfx.passes.graph_memory import view_base
from actfx.passes.saved_pair import (is_normalisation_statistic, is_tensor, numel, op_name, reshape_base,
                                     static_shape, val, view_like)

aten = torch.ops.aten


# A hoisted value may be at most this many times larger than the values it frees.
MAX_HOIST_GROWTH = 4


def hoist(run, rounds: int = 3) -> None:
    """Hoist until nothing changes: a hoisted value may itself be read nonlinearly (a
    recomputed variance squares a hoisted normalised value)."""
    for _ in range(rounds):
        if not _hoist_round(run):
            return


def _hoist_round(run) -> bool:
    bwd = run.g.bwd
    sources = run.sources()
    if not sources:
        return False
    count = len(run.hoisted)
    degrees = noise_degree.degrees(bwd, sources)
    dependent = noise_degree.tangent_dependent(bwd)
    output = next(iter(bwd.find_nodes(op="output")))
    # Masks first: a comparison of a packed value must be exact, and once it is, the ops it
    # selects with (ReLU as where(x <= 0, 0, x)) are linear and can stay recomputed.
    for node in list(bwd.nodes):
        if node.op == "call_function" and node not in dependent and is_tensor(node) \
                and val(node).dtype == torch.bool and _biased(node, degrees):
            hoist_one(run, node, _biased(node, degrees), sources)
    degrees = noise_degree.degrees(bwd, sources)
    for node in list(bwd.nodes):
        if node.op != "call_function" or node in dependent or not is_tensor(node) or not node.users:
            continue
        if not any(u in dependent or u is output for u in node.users):
            continue
        root = _linear_root(run, node, degrees)
        biased = _biased(root, degrees)
        if biased and hoist_one(run, root, biased, sources):
            degrees = noise_degree.degrees(bwd, sources)
    bwd.eliminate_dead_code()
    return len(run.hoisted) > count


def _linear_root(run, node: fx.Node, degrees: dict) -> fx.Node:
    """Through views and negations (permute, view, neg, expand) to the value they re-present:
    P, -P and P transposed all read one hoisted P."""
    while view_like(node):
        parent = node.all_input_nodes[0]
        if parent.op != "call_function" or not is_tensor(parent) or val(parent).dtype != val(node).dtype:
            break
        if not all(view_like(u) for u in parent.users) and not _biased(parent, degrees):
            break  # the parent's other readers are fine as they are: hoisting it would not help them
        node = parent  # (a parent hoisted anyway serves the view too: attention's P and P transposed)
    return node


def _biased(node: fx.Node, degrees: dict) -> list:
    return [s for s, d in degrees.get(node, {}).items() if d > noise_degree.ONE]


def hoist_one(run, node: fx.Node, biased: list, sources: dict) -> list:
    """Compute ``node`` in forward and save it in its place; the forward nodes made, in graph
    order (the hoisted value last), or an empty list where it was not hoisted."""
    region, leaves = backward_region(run, node)
    if region is None:
        return []
    freed = sum(numel(s) for s in biased)
    if numel(node) > MAX_HOIST_GROWTH * freed:
        return []
    fwd_leaves = {leaf: _fwd_of(run, leaf) for leaf in leaves}
    if any(v is None for v in fwd_leaves.values()):
        return []
    anchor = max(fwd_leaves.values(), key=lambda n: run.g.order[n])
    after = anchor.next
    env = dict(fwd_leaves)
    with run.g.fwd.inserting_before(after):
        for inner in region:
            env[inner] = run.g.fwd.node_copy(inner, lambda a: env[a])
            env[inner].meta.pop("autograd_backward", None)
    hoisted = env[node]
    hoisted.meta["nn_module_stack"] = anchor.meta.get("nn_module_stack")
    run.g.renumber()
    like = next(fwd for fwd, _ in run.g.saved_tensors())
    placeholder = run.g.add_saved(hoisted, like)
    node.replace_all_uses_with(placeholder)
    run.hoisted[hoisted.name] = op_name(node)
    return [env[inner] for inner in region]


def _reads_any(node: fx.Node, leaves: list) -> bool:
    """Whether ``node`` depends on any of ``leaves`` (placeholders)."""
    stack, seen = [node], set()
    while stack:
        n = stack.pop()
        if n in leaves:
            return True
        if n not in seen:
            seen.add(n)
            stack.extend(n.all_input_nodes)
    return False


def backward_region(run, node: fx.Node):
    """The backward ops computing ``node`` from saved values, in graph order, and those values."""
    region, leaves, stack, seen = [], set(), [node], set()
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        if n.op == "placeholder":
            leaves.add(n)
        elif n.op == "call_function":
            region.append(n)
            stack.extend(n.all_input_nodes)
        else:
            return None, None
    order = {n: i for i, n in enumerate(run.g.bwd.nodes)}
    return sorted(region, key=order.get), leaves


def _fwd_of(run, placeholder: fx.Node):
    return next((fwd for fwd, bwd in run.g.saved_tensors() if bwd is placeholder), None)


def relu_as_select(run) -> None:
    """Recomputed ``relu(y)`` becomes ``where(y <= 0, 0, y)``: linear in y once the mask is exact."""
    dependent = noise_degree.tangent_dependent(run.g.bwd)
    for node in list(run.g.bwd.nodes):
        if (node.op == "call_function" and node.target is aten.relu.default and node not in dependent
                and static_shape(node.args[0])):  # emitted ops are traced for static sizes
            select = emit(run.g.bwd, relu_select, [node.args[0]], before=node, key="relu_select")
            node.replace_all_uses_with(select)
            run.g.bwd.erase_node(node)


def masks_once(run) -> None:
    """``le(where(m, 0, y), 0)`` with ``m = le(y, 0)`` (a ReLU's mask taken again from its
    recomputed output) is ``m``: one mask instead of two."""
    for node in list(run.g.bwd.nodes):
        if node.target is not aten.le.Scalar or node.args[1] != 0:
            continue
        found = zero_select(node.args[0])
        if found is not None:
            node.replace_all_uses_with(found[0])


def zero_select(select: fx.Node):
    """(mask, y) when ``select`` is where(mask, 0, y) with mask = (y <= 0): ReLU as a select."""
    if not (isinstance(select, fx.Node) and select.target is aten.where.self):
        return None
    mask, zero, y = select.args
    if (isinstance(mask, fx.Node) and mask.target is aten.le.Scalar and mask.args[1] == 0
            and _same_value(mask.args[0], y) and _is_zero(zero)):
        return mask, y
    return None


def _is_zero(node) -> bool:
    """A 0 built from nothing (``full(size, 0)``, ``scalar_tensor(0)``): relu_select's zero."""
    if not (isinstance(node, fx.Node) and node.op == "call_function" and not node.all_input_nodes):
        return False
    if node.target is aten.full.default:
        return node.args[1] == 0
    return node.target is aten.scalar_tensor.default and node.args[0] == 0


def _same_value(a, b, depth: int = 12) -> bool:
    """Whether two forward values are one computation (hoisting copies regions, so a BatchNorm
    output can appear twice before Inductor's CSE merges them)."""
    if a is b:
        return True
    if not (isinstance(a, fx.Node) and isinstance(b, fx.Node)) or depth == 0:
        return not isinstance(a, fx.Node) and not isinstance(b, fx.Node) and a == b
    if a.op != "call_function" or a.target != b.target or len(a.args) != len(b.args) or a.kwargs != b.kwargs:
        return False
    return all(_same_value(x, y, depth - 1) for x, y in zip(a.args, b.args))


def saved_masks_once(run) -> None:
    """Saved ``<= 0`` masks of one value are one mask: ``relu(y) <= 0`` (through aliases, ReLU as
    where(y <= 0, 0, y)) is ``y <= 0``, and hoisting can copy a value's computation (ResNet: one
    mask per ReLU instead of two or three)."""
    kept: list = []  # (compared value, backward placeholder)
    for fwd, bwd in list(run.g.saved_tensors()):
        if fwd.target is not aten.le.Scalar or fwd.args[1] != 0:
            continue
        value = fwd.args[0]
        while isinstance(value, fx.Node) and value.target is aten.alias.default:
            value = value.args[0]
        found = zero_select(value)
        value = found[1] if found is not None else value
        same = next((placeholder for other, placeholder in kept if _same_value(other, value)), None)
        if same is None:
            kept.append((value, bwd))
            continue
        bwd.replace_all_uses_with(same)
        run.g.drop_saved(fwd)


def normalised_inputs(run, *, biased_only: bool = False) -> None:
    """Store a normalisation's output instead of its input: where backward reads packable saved
    values only to rebuild ``(v - mean) * rstd`` (LayerNorm's decomposed backward; ``v`` maybe
    recomputed from them, as a position embedding's sum) with exact per-row statistics, that
    product is computed in forward and saved in their place. Same bytes, but each group of the
    pack then holds values of one scale: packed raw, a group spanning a row of small values (a
    zero-initialised class token plus position embedding) and a row of large ones rounds the
    small row with the large row's step, and backward multiplies that error by the small row's
    1/std (torchvision ViT-tiny, 2 bits: one step's gradient error ~100x the gradient's norm,
    from that one value).

    ``biased_only`` (after decorrelate's splits): only where an input is still biased, and even
    where other backward ops read the inputs too: they would stay exact (DINOv2's LayerScale
    outputs, read by the scale's gradient, rebuild the residual stream its norms read)."""
    sources = run.sources()
    dependent = noise_degree.tangent_dependent(run.g.bwd)
    first: list = []
    for scaled in list(run.g.bwd.nodes):
        if _normalised(scaled, sources, dependent) is None:
            continue
        same = next((c for c in first if _same_value(c, scaled)), None)
        if same is None:
            first.append(scaled)
        else:  # backward rebuilt it twice (for the weight's and the input's gradient): one copy
            scaled.replace_all_uses_with(same)
    run.g.bwd.eliminate_dead_code()
    candidates: dict = {}
    for scaled in first:
        region, leaves = backward_region(run, scaled)
        if region is not None:
            candidates[scaled] = (set(region), leaves)
    inside = set().union(*(r for r, _ in candidates.values()))
    biased = noise_degree.biased_sources(run.g.bwd, sources) if biased_only and candidates else {}
    for scaled, (region, leaves) in candidates.items():
        packed = [leaf for leaf in leaves if leaf in sources]
        if not packed:
            continue
        if biased_only:
            if not any(leaf in biased for leaf in packed):
                continue
        elif not all(u in inside for leaf in packed for u in leaf.users):
            continue  # another backward op still reads the input: storing both would cost more
        if not all(u in inside for n in region if n is not scaled and _reads_any(n, packed) for u in n.users):
            continue  # (a view of a statistic may be read elsewhere too: the statistic stays saved)
        hoist_one(run, scaled, packed, sources)
    run.g.bwd.eliminate_dead_code()  # the rebuilt ops, and with them the last reads of the inputs


def denormalised(xhat: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor, *, shape: tuple) -> torch.Tensor:
    """The input a normalisation's ``xhat = (x - mean) * rstd`` came from, shaped ``shape``."""
    return (xhat / rstd + mean).reshape(shape)


def _saved_statistic(node: fx.Node, sources: dict) -> bool:
    """A saved exact tensor, or a reshape of one (GroupNorm's ``[N, group]`` statistics viewed
    against its rows, ``norm_decompositions``)."""
    while node.op == "call_function" and view_like(node):
        node = node.all_input_nodes[0]
    return node.op == "placeholder" and node not in sources and is_tensor(node)


def _normalised(scaled: fx.Node, sources: dict, dependent: set):
    """``(v - mean) * rstd`` with ``v`` free of the incoming gradient and the statistics saved,
    exact and at most 1/16 of v's size; None otherwise."""
    if scaled.op != "call_function" or scaled.target is not aten.mul.Tensor or scaled in dependent:
        return None
    centred = next((a for a in scaled.args if isinstance(a, fx.Node) and a.target is aten.sub.Tensor), None)
    if centred is None or len(centred.users) != 1 or not is_tensor(scaled):
        return None
    value, mean = centred.args
    rstd = next((a for a in scaled.args if a is not centred), None)
    stats = [mean, rstd]
    if not isinstance(value, fx.Node) or value in dependent or not is_tensor(value):
        return None
    if not all(isinstance(s, fx.Node) and _saved_statistic(s, sources) and numel(s) * 2 <= numel(value)
               for s in stats):
        return None
    if val(scaled).shape != val(value).shape or val(scaled).dtype != val(value).dtype:
        return None
    return value


def raw_reads_from_normalised(run) -> None:
    """Read a normalisation's input from its saved normalised value where both are saved.

    The partitioner may save a norm's input ``x`` twice: reshaped for the norm's own backward,
    which stores ``xhat = (x - mean) * rstd`` instead (``normalised_inputs``, or ``hoist`` as a
    biased value), and whole for ops that recompute the norm's output (``x * rstd * w + ...``,
    the next layer's weight gradient). Packed raw, that second copy rounds a group of small
    spread with a large neighbour's step, and the recompute multiplies it by the group's rstd (a
    GroupNorm after a matmul: 132x the gradient's norm; LayerNorm likewise). Its readers get
    ``xhat / rstd + mean`` instead, each group rounded at its own scale, and it is no longer saved."""
    sources = run.sources()
    for fwd, xhat in list(run.g.saved_tensors()):
        found = _normalised_forward(fwd)
        if found is None or not static_shape(fwd):
            continue
        value, mean, rstd = found
        base = reshape_base(value)
        raw = [(f, b) for f, b in run.g.saved_tensors() if b in sources and b.users and f is not fwd
               and reshape_base(f) is base and numel(f) == numel(value) and static_shape(f)
               and val(f).dtype == val(value).dtype]
        if not raw or not val(base).is_contiguous():
            continue
        stats = [run.g.placeholder_of.get(s) or run.g.add_saved(s, fwd) for s in (mean, rstd)]
        order = {n: i for i, n in enumerate(run.g.bwd.nodes)}
        for f, b in raw:
            first = min(b.users, key=order.__getitem__)
            shape = tuple(val(f).shape)
            x = emit(run.g.bwd, functools.partial(denormalised, shape=shape), [xhat, *stats], before=first,
                     key=("denormalised", shape))
            b.replace_all_uses_with(x)
            run.g.drop_saved(f)


def _normalised_forward(node: fx.Node):
    """(x, mean, rstd) where forward computes ``node = (x - mean) * rstd`` with a normalisation's
    own statistics (never 0: rstd is ``rsqrt(var + eps)``) of at most half x's size, else None."""
    if node.op != "call_function" or node.target is not aten.mul.Tensor or len(node.args) != 2:
        return None
    centred = next((a for a in node.args if isinstance(a, fx.Node) and a.target is aten.sub.Tensor), None)
    rstd = next((a for a in node.args if a is not centred), None)
    if centred is None or not isinstance(rstd, fx.Node) or not all(isinstance(a, fx.Node) for a in centred.args):
        return None
    value, mean = centred.args
    if not (is_tensor(value) and is_tensor(mean) and is_tensor(rstd)) or val(node).shape != val(value).shape:
        return None
    if any(numel(s) * 2 > numel(value) or not is_normalisation_statistic(view_base(s)) for s in (mean, rstd)):
        return None  # (a scale that may be 0, a layer scale, must not divide)
    return value, mean, rstd
