"""Noise-degree analysis over a backward graph: which saved values may be stored with noise.

Why: stochastic rounding is unbiased only where the gradient is linear in the rounded value. For
every node this pass computes, per *source* (a saved value that would be stored packed, each with
its own independent noise), the degree of the node in that source's noise: 0 (independent of
it), ``DILUTE`` (only through a large sum), 1 (linear) or more (biased). Rules per ATen op come
from ``actfx.rules``. A source is safe to pack when every backward output has degree <= 1 in it.

Degrees also find *frontier* nodes: values of the backward that depend only on saved values (not
on the incoming gradient) and feed gradient computations; where such a node is nonlinear in a
source (GELU's derivative, a ReLU mask, ``x * x``) the rewrite computes it in forward instead
and saves it (``actfx/passes/pack_saved.py``).
"""

from __future__ import annotations

import math
import operator

import torch
from torch import fx
from torch._functorch._aot_autograd.utils import _is_tangent

from actfx.rules import DILUTION_MIN, Kind, power_rule, rule_for

ZERO, DILUTE, ONE, MANY = 0.0, 0.5, 1.0, math.inf

Degrees = dict  # fx.Node (source) -> degree


def tangent_dependent(graph: fx.Graph) -> set[fx.Node]:
    """Nodes whose value depends on an incoming gradient (AOT's tangent placeholders)."""
    dep: set[fx.Node] = set()
    for node in graph.nodes:
        if node.op == "placeholder":
            if _is_tangent(node):
                dep.add(node)
        elif any(a in dep for a in node.all_input_nodes):
            dep.add(node)
    return dep


def _product(a: float, b: float) -> float:
    if a == ZERO:
        return b
    if b == ZERO:
        return a
    if {a, b} == {DILUTE, ONE}:
        return ONE  # x_i * sum_j(g_j x_j): bias O(1/R)
    return MANY


def _hint(v) -> int | None:
    if isinstance(v, int):
        return v
    try:
        return int(v.node.hint) if v.node.hint is not None else None
    except AttributeError:
        return None


def _reduced_count(node: fx.Node) -> int:
    """How many input values each output value of a reduction sums (0 when unknown)."""
    try:
        n_in = _hint(node.args[0].meta["val"].numel())
        n_out = _hint(node.meta["val"].numel())
    except (AttributeError, KeyError, IndexError):
        return 0
    if not n_in or not n_out:
        return 0
    return n_in // n_out


def _arg_degrees(node: fx.Node, degrees: dict) -> list[tuple[int | None, fx.Node, Degrees]]:
    out = []
    for i, arg in enumerate(node.args):
        items = arg if isinstance(arg, (list, tuple)) else (arg,)
        for item in items:
            if isinstance(item, fx.Node) and degrees.get(item):
                out.append((i, item, degrees[item]))
    for name, arg in node.kwargs.items():
        items = arg if isinstance(arg, (list, tuple)) else (arg,)
        for item in items:
            if isinstance(item, fx.Node) and degrees.get(item):
                out.append((_schema_position(node.target, name), item, degrees[item]))
    return out


def _schema_position(target, name: str) -> int | None:
    """A keyword argument's position in the op's schema, so rules name it as they name the rest
    (``attn_mask`` of ``_scaled_dot_product_flash_attention_for_cpu_backward``)."""
    schema = getattr(target, "_schema", None)
    names = [a.name for a in schema.arguments] if schema is not None else []
    return names.index(name) if name in names else None


def node_degrees(node: fx.Node, degrees: dict, dependent: set = frozenset()) -> Degrees:
    """This node's degree per source, from its arguments' (``degrees``) and its op's rule.

    An op without a rule is taken as nonlinear in its arguments, except those that depend on the
    incoming gradient (``dependent``) where the op is not elementwise: a backward graph is linear
    in the gradient, so such an op (``_scaled_dot_product_flash_attention_for_cpu_backward``'s
    grad_out) passes their degree on. An elementwise op without a rule is nonlinear in the
    gradient too: a hook or a custom backward that clamps it (gradient clipping) makes
    ``clamp(g * x)`` of a packed x, whose mean is not ``clamp(g * x)`` of the exact one.
    """
    if node.target is operator.getitem and isinstance(node.args[0], fx.Node):
        parent = node.args[0]
        outputs = rule_for(parent.target).outputs
        if outputs is not None and node.args[1] < len(outputs):
            keep = set(outputs[node.args[1]])
            args = [(pos, arg, deg) for pos, arg, deg in _arg_degrees(parent, degrees) if pos in keep]
            return _combine(parent, rule_for(parent.target), rule_for(parent.target).kind, args, dependent)
    args = _arg_degrees(node, degrees)
    if not args:
        return {}
    rule = rule_for(node.target)
    kind = rule.kind
    if node.target is torch.ops.aten.pow.Tensor_Scalar:
        kind = power_rule(node.args[1]) or Kind.NONLINEAR
    return _combine(node, rule, kind, args, dependent)


def _combine(node: fx.Node, rule, kind: Kind, args: list, dependent) -> Degrees:
    out: Degrees = {}
    if kind is Kind.NONLINEAR:
        elementwise = isinstance(node.target, torch._ops.OpOverload) and torch.Tag.pointwise in node.target.tags
        for _, arg, deg in args:
            for src, d in deg.items():
                if arg in dependent and not elementwise:
                    out[src] = max(out.get(src, ZERO), d)
                elif d > ZERO:
                    out[src] = MANY
        return out
    factors: list[Degrees] = []
    for pos, _, deg in args:
        if pos in rule.shape_only:
            continue
        if pos in rule.exact:
            for src, d in deg.items():
                if d > ZERO:
                    out[src] = MANY
            continue
        if kind is Kind.PRODUCT and pos not in (rule.linear_args or ()):
            factors.append(deg)
        else:
            for src, d in deg.items():
                out[src] = max(out.get(src, ZERO), d)
    if factors:
        if node.target in (torch.ops.aten.pow.Tensor_Scalar,):
            factors = factors * 2
        prod: Degrees = {}
        for deg in factors:
            for src, d in deg.items():
                prod[src] = _product(prod.get(src, ZERO), d)
        for src, d in prod.items():
            out[src] = max(out.get(src, ZERO), d)
    if kind is Kind.REDUCTION and _reduced_count(node) >= DILUTION_MIN:
        out = {src: (DILUTE if d == ONE else d) for src, d in out.items()}
    return out


def degrees(graph: fx.Graph, sources) -> dict[fx.Node, Degrees]:
    """Degree of every node in each of ``sources`` (placeholders stored with independent noise)."""
    sources = set(sources)
    dependent = tangent_dependent(graph)
    result: dict[fx.Node, Degrees] = {}
    for node in graph.nodes:
        if node in sources:
            result[node] = {node: ONE}
        elif node.op == "call_function":
            result[node] = node_degrees(node, result, dependent)
        else:
            result[node] = {}
    return result


def biased_at_output(graph: fx.Graph, result: dict) -> set[fx.Node]:
    """The sources some backward output is nonlinear in, from ``degrees(graph, ...)``'s result."""
    output = next(iter(graph.find_nodes(op="output")))
    return {src for out in output.all_input_nodes for src, d in result.get(out, {}).items() if d > ONE}


def biased_sources(graph: fx.Graph, sources) -> dict[fx.Node, fx.Node]:
    """Sources some backward output is nonlinear in, each with the first op (in graph order) that
    made it so; found in one pass over the graph."""
    result = degrees(graph, sources)
    biased = biased_at_output(graph, result)
    culprit: dict[fx.Node, fx.Node] = {}
    for node in graph.nodes:
        if len(culprit) == len(biased):
            break
        for src, d in result.get(node, {}).items():
            if d > ONE and src in biased and src not in culprit:
                culprit[src] = node
    for src in biased:
        culprit.setdefault(src, src)
    return culprit
