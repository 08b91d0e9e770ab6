"""Linearize elementwise gradient chains: a backward region of same-shape pointwise ops reading
one gradient value g (the chain rule through GELU, SiLU, tanh, in any spelling) is ``g * D``.

D depends on saved values only, so ``hoist`` computes it in forward and one packed value replaces
everything the chain read (GELU's input, its tanh, ...): the derivative instead of the input.
"""

from __future__ import annotations

import torch
from torch import fx

from actfx.passes import noise_degree
from actfx.passes.graph_emit import emit, ones
from actfx.passes.saved_pair import is_tensor, pointwise, static_shape, val

aten = torch.ops.aten


def linearize(run) -> None:
    """Rewrite elementwise gradient chains as ``g * D``.

    A backward region of same-shape pointwise ops that reads one gradient value g (the chain
    rule through GELU, SiLU, tanh, in whatever spelling) is linear and elementwise in g, so it
    equals ``g * D`` with D the same region evaluated at g = 1. D depends on saved values only:
    ``hoist`` then computes it in forward and one packed value replaces all the values the
    chain read (GELU's input, its tanh, ...).
    """
    bwd = run.g.bwd
    sources = run.sources()
    if not sources:
        return
    degrees = noise_degree.degrees(bwd, sources)
    dependent = noise_degree.tangent_dependent(bwd)
    done: set[fx.Node] = set()
    for node in reversed(list(bwd.nodes)):
        if node in done or node not in dependent or not pointwise(node):
            continue
        region = _pointwise_region(run, node, dependent)
        if region is None:
            continue
        nodes, entry, free_inputs = region
        done.update(nodes)
        if not _linear_in(nodes, entry):
            continue  # clamp(g * D) (a clipping hook) is not g * clamp(D)
        if not any(d > noise_degree.ONE for f in free_inputs for d in degrees.get(f, {}).values()):
            continue
        _factor_out(run, node, nodes, entry)
    bwd.eliminate_dead_code()


def _pointwise_region(run, exit_node: fx.Node, dependent: set):
    """(region nodes in graph order, the one gradient entry, tangent-free inputs) or None."""
    shape = val(exit_node).shape
    nodes, entries, free, stack = set(), set(), set(), [exit_node]
    while stack:
        n = stack.pop()
        if n in nodes:
            continue
        nodes.add(n)
        for a in n.all_input_nodes:
            if a not in dependent:
                free.add(a)
            elif pointwise(a) and val(a).shape == shape and not _sums_gradients(a, dependent) and all(
                    u in nodes or u is exit_node or u in dependent for u in a.users):
                stack.append(a)
            else:
                entries.add(a)
    if len(entries) != 1:
        return None
    entry = next(iter(entries))
    # one op is already g * D, except a division by saved values (logaddexp's g / (1 + exp(b - a))):
    # as g * (1 / h) the reciprocal is D, which hoist computes in forward and packs
    if len(nodes) < 2 and not (exit_node.target is aten.div.Tensor and exit_node.args[0] is entry):
        return None
    if not is_tensor(entry) or val(entry).shape != shape or not static_shape(entry):
        return None
    # every region node other than the exit may only feed the region
    if any(u not in nodes for n in nodes if n is not exit_node for u in n.users):
        return None
    order = {n: i for i, n in enumerate(run.g.bwd.nodes)}
    return sorted(nodes, key=order.get), entry, free


def _sums_gradients(node: fx.Node, dependent: set) -> bool:
    """Whether ``node`` combines several gradients and reads nothing else (the sum of a value's
    gradients from two readers: Mamba's step size feeds ``exp(A * dt)`` and ``dt * B``). Such a
    node is where the chain starts, its entry: taken into the region, its two inputs made two
    entries, and softplus's ``g * z / (z + 1)`` kept ``z`` exact. (A cast of one gradient stays
    inside: its region keeps the dtype it ends in.)"""
    inputs = set(node.all_input_nodes)
    return len(inputs) > 1 and inputs <= dependent


def _linear_in(nodes: list, entry: fx.Node) -> bool:
    """Whether the region (in graph order) is at most linear in ``entry``: its degree there, with
    ``entry`` as the one source and every op judged by its rule alone."""
    degrees = {entry: {entry: noise_degree.ONE}}
    for n in nodes:
        degrees[n] = noise_degree.node_degrees(n, degrees)
    return degrees[nodes[-1]].get(entry, noise_degree.ZERO) <= noise_degree.ONE


def _factor_out(run, exit_node: fx.Node, nodes: list, entry: fx.Node) -> None:
    bwd = run.g.bwd
    with bwd.inserting_before(exit_node):
        unit = emit(bwd, ones, [entry], before=exit_node, key="ones")
        env = {entry: unit}
        for n in nodes:
            env[n] = bwd.node_copy(n, lambda a: env.get(a, a))
    derivative = env[exit_node]
    with bwd.inserting_before(exit_node):
        product = bwd.call_function(aten.mul.Tensor, (entry, derivative))
    product.meta.update(exit_node.meta)
    exit_node.replace_all_uses_with(product)
