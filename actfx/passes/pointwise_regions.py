"""Collapse each element-wise function of one tensor into one node whose backward reads its
packed derivative (``actfx/variants/pointwise.py``).

Why: activations in the wild are spelled out (GPT-2's ``0.5 * x * (1 + tanh(c * (x + 0.044715 *
pow(x, 3))))``, ``x * sigmoid(1.702 * x)``, ``x.pow(2)``) or are single ops nobody listed. Each op
of such a chain saves its own inputs, and most of them are used non-linearly in backward, so
packing them is biased. The whole chain is one element-wise ``y = f(x)``: keeping ``f'(x)``
packed is unbiased and stores one tensor instead of several.

A region is found by ATen facts, not spellings (``actfx.rules``): its nodes are element-wise ops
(ATen's ``pointwise`` tag) whose tensor arguments are the region's one input ``x`` or other
nodes of the region (everything else is a constant, and so are tensors made from a shape or a
Python number: ``zeros_like(x)``, ``x.new_tensor(0.0)``), only the last node is read outside it, and
it holds something non-linear (otherwise backward saves nothing). Ops with an exact 1-bit mask
variant (ReLU and its kin) are never part of a region.
"""

from __future__ import annotations

import operator

import torch
from torch.fx import Graph, GraphModule, Node

from actfx.passes.graph_facts import GraphFacts, is_traced_constant
from actfx.rules import SIGN_ONLY, Kind, aten, aten_packet, is_pointwise, rule_for
from actfx.variants.pointwise import Pointwise, pointwise_callables
from actfx.variants.pointwise_several import Several, several_callables

# Alone, these have a variant with an analytic derivative.
_OWN_VARIANT = {aten.gelu, aten.silu}
_CASTS = {aten.to, aten._to_copy}
# Boolean results: inside a region (``where(x > 0, ...)``) they are fine; a region cannot end in one.
_COMPARISONS = {aten.gt, aten.ge, aten.lt, aten.le, aten.eq, aten.ne, aten.logical_not, aten.logical_and,
                aten.logical_or, aten.isnan, aten.isinf, aten.isfinite, aten.sign}
_CONSTANTS = (int, float, bool, str, type(None), torch.dtype)
# Tensors made from a tensor's shape alone, or from a Python number: inside a region they are
# constants (``torch.maximum(x, torch.zeros_like(x))``, ``torch.minimum(x, x.new_tensor(0.0))``).
_SHAPE_FACTORIES = {aten.zeros_like, aten.ones_like, aten.full_like}
_FACTORY_OPTIONS = (*_CONSTANTS, torch.device, torch.layout, torch.memory_format)
_SCALAR = (int, float, bool)
# A region reading more tensors keeps more partials than its ops' own saves would be
MAX_INPUTS = 3


def _traced_scalar(node: Node):
    """The 0-dim tensor fx stored for a ``torch.tensor(c)`` made in forward, else None."""
    if not is_traced_constant(node):
        return None
    value = getattr(node.graph.owning_module, node.target, None)
    return value if isinstance(value, torch.Tensor) and value.dim() == 0 and not value.requires_grad else None


def _constant_tensor(node: Node) -> bool:
    """A node whose value reads no tensor's values: ``zeros_like(t)`` and kin, or a 0-dim tensor
    of a Python number (``t.new_tensor(0.0)``, ``torch.tensor(0.0)``, as a call or as the
    constant fx traced it to)."""
    if _traced_scalar(node) is not None:
        return True
    options = (*node.args[1:], *node.kwargs.values())
    if any(isinstance(a, Node) or not isinstance(a, _FACTORY_OPTIONS) for a in options):
        return False
    if node.op == "call_method" and node.target == "new_tensor":
        return len(node.args) == 2 and isinstance(node.args[1], _SCALAR)
    if node.op == "call_function" and node.target in (torch.tensor, torch.scalar_tensor):
        return len(node.args) == 1 and isinstance(node.args[0], _SCALAR)
    return aten_packet(node.op, node.target) in _SHAPE_FACTORIES and len(node.all_input_nodes) == 1


def _packet(node: Node):
    if _constant_tensor(node):
        return aten.full_like
    if node.op not in ("call_function", "call_method"):
        return None
    if node.op == "call_method" and node.target.endswith("_"):
        return None  # in place: it writes a value other nodes may read
    if node.kwargs.get("inplace") or "out" in node.kwargs:
        return None
    packet = aten_packet(node.op, node.target)
    if packet is None or packet.__name__.endswith("_") or packet in SIGN_ONLY or not is_pointwise(packet):
        return None  # in place (relu_, add_), masked, or not element-wise
    constants = [a for a in (*node.args, *node.kwargs.values()) if not isinstance(a, Node)]
    if not all(isinstance(c, _CONSTANTS) for c in constants):
        return None
    return packet


def _nonlinear(node: Node, packet) -> bool:
    if packet in _CASTS:
        return False
    kind = rule_for(packet).kind
    if kind is Kind.PRODUCT:
        return len([a for a in node.all_input_nodes if not _constant_tensor(a)]) > 1  # x * x, x * sigmoid(x)
    return kind is not Kind.LINEAR


def _regions(graph: Graph, facts: GraphFacts) -> list[tuple[list[Node], list[Node], Node]]:
    """(inputs, members, both in graph order, output) of every region worth collapsing.

    From the last node back, each element-wise node not yet taken grows a region over its
    element-wise inputs whose every reader is already in it; the region stands if what it reads
    from outside is one tensor, else the output op alone is tried. Nodes of a region that does
    not stand are tried again as outputs of smaller ones. A region reading two or three tensors
    stands where it holds a truly nonlinear op (``atan2(a, b)``, ``silu(a) * b``): it keeps one
    packed partial per input (``actfx/variants/pointwise_several.py``).
    """
    nodes = list(graph.nodes)
    order = {node: i for i, node in enumerate(nodes)}
    packets = {node: p for node in nodes if (p := _packet(node)) is not None
               and (node.all_input_nodes or p in _SHAPE_FACTORIES)}
    taken: set = set()
    found = []
    for out in reversed(nodes):
        if out not in packets or out in taken or packets[out] in _COMPARISONS or packets[out] in _SHAPE_FACTORIES:
            continue
        region = _grown(out, lambda a: a in packets and a not in taken)
        # one input first: ``exp(A * dt)`` (Mamba), ``exp(a - b)`` (RWKV) read two values, their
        # last op alone one; then several, around a truly nonlinear op (products have their
        # sites); then the largest part reading one of its members alone
        tries = [region] if len(_reads(region)) == 1 or len(region) == 1 else [
            *([{out}] if len(_reads({out})) == 1 else []), region, *_one_input_parts(region, out, order), {out}]
        chosen = next((r for r in tries if _stands(r, out, packets, facts)), None)
        if chosen is None:
            continue
        taken |= chosen
        found.append((sorted(_reads(chosen), key=order.__getitem__), sorted(chosen, key=order.__getitem__), out))
    return found


def _grown(out: Node, admits) -> set:
    """``out`` and, back from it, every input ``admits`` takes whose readers are all inside."""
    region, stack = {out}, [out]
    while stack:
        for a in stack.pop().all_input_nodes:
            if a not in region and admits(a) and all(u in region for u in a.users):
                region.add(a)
                stack.append(a)
    return region


def _one_input_parts(region: set, out: Node, order: dict) -> list:
    """The parts of ``region`` ending in ``out`` that read one of its members alone, largest first.

    A region grown over a whole computation can read several tensors where its end reads one
    value through several paths: the batch-hard triplet distance ``sqrt(d + m * 1e-16) * (1 - m)``
    with ``m = (d == 0).float()`` reads ``d`` alone. Collapsed as one function of d, its derivative
    is 0 where m is 1; split at the product, the sqrt's derivative (5e7 there) set its groups'
    step and every other value rounded to the group's minimum: 8-bit gradients 34% off, biased."""
    parts = []
    for cut in sorted(region - {out}, key=order.__getitem__):
        part = _grown(out, lambda a: a is not cut and a in region)  # noqa: B023 (called at once)
        if len(part) > 1 and _reads(part) == {cut}:
            parts.append(part)
    return sorted(parts, key=len, reverse=True)


def _stands(region: set, out: Node, packets: dict, facts: GraphFacts) -> bool:
    """Whether ``region`` (ending in ``out``) is worth collapsing."""
    outside = _reads(region)
    if not outside or any(facts.is_non_tensor(x) or facts.is_parameter_like(x) for x in outside):
        return False
    if len(outside) > 1 and not (len(outside) <= MAX_INPUTS and _each_read_nonlinearly(region, outside, packets)):
        return False
    if len(region) == 1 and packets[out] in _OWN_VARIANT and len(outside) == 1:
        return False
    return any(_nonlinear(m, packets[m]) for m in region)


def _each_read_nonlinearly(region: set, outside: set, packets: dict) -> bool:
    """Several inputs: the region holds a truly nonlinear op (products alone have their own
    sites), and each input is read by a product or a nonlinear op. An input that only a sum reads
    (``gate + tanh(h)``) has a constant partial: the nonlinear part alone keeps less."""
    def bent(m):
        return rule_for(packets[m]).kind is not Kind.LINEAR and packets[m] not in _CASTS

    def reaches_bent(x):
        # through linear steps of that one value too (``exp(-sigma * d)`` reads sigma by a
        # negation), not through sums with other inputs (CBAM's ``sigmoid(a + b) * x``: the
        # product's own site reuses x's pack, and the gate stays small apart)
        seen, stack = set(), [m for m in region if x in m.all_input_nodes]
        while stack:
            m = stack.pop()
            if bent(m):
                return True
            seen.add(m)
            if len(m.all_input_nodes) == 1:
                stack.extend(u for u in m.users if u in region and u not in seen)
        return False

    return (any(rule_for(packets[m]).kind is Kind.NONLINEAR and packets[m] not in _CASTS for m in region)
            and all(reaches_bent(x) for x in outside))


def _reads(region: set) -> set:
    """The nodes outside ``region`` that its members read."""
    return {a for m in region for a in m.all_input_nodes if a not in region}


def collapsed_region(node) -> Pointwise | None:
    """The one-input, out-of-place region ``node`` calls (collapsed here), or None: the later
    passes (``row_regions``, ``softmax_regions``) fold such a region with its neighbours."""
    if not isinstance(node, Node) or node.op != "call_function" or len(node.args) != 1 or node.kwargs:
        return None
    region = getattr(node.target, "actfx_region", None)
    return None if region is None or region.inplace else region


def collapse_pointwise_regions(gm: GraphModule) -> int:
    """Replace each region of ``gm``'s graph by one call of its ``Pointwise`` (in place);
    returns how many were collapsed."""
    graph, count = gm.graph, 0
    while True:  # a region's remainder (nodes after its output) can form the next one
        regions = _regions(graph, GraphFacts(graph))
        if not regions:
            break
        for xs, region, out in regions:
            _collapse(graph, xs, region, out, aten_packet(out.op, out.target))
        count += len(regions)
    if count:
        graph.lint()
        gm.recompile()
    return count


def _collapse(graph: Graph, xs: list[Node], region: list[Node], out: Node, packet) -> None:
    sub = Graph()
    env = {x: sub.placeholder(f"x{i}" if len(xs) > 1 else "x") for i, x in enumerate(xs)}
    for m in region:
        env[m] = sub.node_copy(m, lambda n: env[n])
    sub.output(env[out])
    constants = {m.target: _traced_scalar(m) for m in region if m.op == "get_attr"}
    fn = GraphModule(constants or torch.nn.Module(), sub, class_name=f"Pointwise_{out.name}")
    kind = packet.__name__.split(".")[-1] if len(region) == 1 else "pointwise"  # one op keeps its name
    # fn.forward, not fn: a module call under torch.func.vjp hands its wrapped tensors to global
    # module hooks (the planner's MemTracker cannot read them, and its step estimate failed)
    gated = tuple(i for i, x in enumerate(xs) if _relu_output(x))
    if len(xs) == 1:
        plain, _, _ = pointwise_callables(Pointwise(fn.forward, out.name, kind=kind, gated=bool(gated)))
    else:
        plain, _, _ = several_callables(Several(fn.forward, out.name, len(xs), kind=kind, gated=gated))
    # ``out`` becomes the call: it keeps its name and meta, so decisions and reports name the op
    # after the original output.
    out.meta["actfx_replaces"] = [m.name for m in region]
    out.op, out.target, out.args, out.kwargs = "call_function", plain, tuple(xs), {}
    for m in reversed(region):
        if m is not out:
            graph.erase_node(m)


# Ops that move values without changing them (by ATen op, so any spelling and export's graphs):
# a ReLU's zeros stay where its mask is 0
_SAME_VALUES = {aten.view, aten._unsafe_view, aten.reshape, aten.flatten, aten.unflatten, aten.squeeze,
                aten.unsqueeze, aten.transpose, aten.permute, aten.t, aten.expand, aten.expand_as, aten.contiguous,
                aten.narrow, aten.select, aten.slice, aten.view_as, aten.reshape_as, aten.movedim, aten.alias}


def _relu_output(node: Node) -> bool:
    """Whether ``node`` is a ReLU's output or a view of it (its values moved, not changed): the
    ReLU's backward zeroes the gradient wherever it is 0, so a partial there is never read."""
    while node.op in ("call_function", "call_method") and (
            node.target is operator.getitem or aten_packet(node.op, node.target) in _SAME_VALUES):
        if not node.args or not isinstance(node.args[0], Node):
            return False
        node = node.args[0]
    if node.op == "call_module":
        owner = node.graph.owning_module
        try:
            return owner is not None and type(owner.get_submodule(node.target)) is torch.nn.ReLU
        except AttributeError:
            return False
    return node.op in ("call_function", "call_method") and aten_packet(node.op, node.target) is aten.relu
