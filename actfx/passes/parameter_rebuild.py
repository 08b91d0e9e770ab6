"""A weight computed from parameters alone is made again in backward, not kept for it.

Why: a layer that computes its weight each step (timm's NF-Nets and BiT ResNets standardise
each convolution's weight with a ``batch_norm`` over it, a LoRA or DoRA layer adds ``B @ A`` to
its frozen weight, ``weight_g * v / ||v||`` written out) hands that weight to its convolution
or linear, whose backward reads it. Kept, it is one weight-sized copy per layer per step: on an
NF-ResNet-26 at batch 2, 64 px those copies were most of what the converted model held (1.11x
below PyTorch). Backward makes the weight again from the parameters, which stay alive anyway.

A value qualifies when the ops between it and the parameters are plain calls or parametrizations
(``torch.nn.utils.parametrize``: weight norm's ``g * v / ||v||``), none draws random numbers or
writes into a tensor (checked on meta tensors, through the ATen ops the calls reach: spectral
norm's power iteration updates its vectors, so it is kept), and no op of the graph writes into
those parameters or buffers in place (backward would read their new values). The rebuild runs
under the autocast state the forward had.
"""

from __future__ import annotations

import itertools

import torch
from torch.fx import Graph, GraphModule, Node
from torch.nn.utils import parametrize
from torch.utils._python_dispatch import TorchDispatchMode

from actfx.passes.graph_facts import GraphFacts


class _Effects(TorchDispatchMode):
    """Whether any ATen op run under it draws random numbers or writes into a tensor."""

    def __init__(self):
        super().__init__()
        self.impure = False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if torch.Tag.nondeterministic_seeded in func.tags or func._schema.is_mutable:
            self.impure = True
        return func(*args, **(kwargs or {}))


class ParameterRebuild:
    """The computation of one value from its parameters (``leaves``, read in this order)."""

    def __init__(self, body: GraphModule, name: str):
        self.body = body
        self.name = name

    def __call__(self, *leaves):
        return self.body(*leaves)

    def __repr__(self) -> str:
        return f"ParameterRebuild({self.name})"


def _parametrization(gm: GraphModule, node: Node):
    """The parametrization a no-input module call computes a weight with, or None."""
    if node.op != "call_module" or node.all_input_nodes:
        return None
    module = gm.get_submodule(node.target)
    return module if isinstance(module, parametrize.ParametrizationList) else None


def _ancestors(gm: GraphModule, value: Node, facts: GraphFacts) -> tuple[list[Node], list[Node]] | None:
    """(computation nodes in graph order, get_attr leaves) behind ``value``; None where something
    other than a plain call, a parametrization or a get_attr is on the way."""
    seen, stack = set(), [value]
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        if node.op == "get_attr" or _parametrization(gm, node) is not None:
            continue
        if node.op not in ("call_function", "call_method") or not facts.is_parameter_like(node):
            return None
        stack.extend(node.all_input_nodes)
    ordered = [n for n in value.graph.nodes if n in seen]
    return [n for n in ordered if n.op != "get_attr"], [n for n in ordered if n.op == "get_attr"]


def _attribute(gm: GraphModule, target: str):
    obj = gm
    for part in target.split("."):
        obj = getattr(obj, part, None)
    return obj


def _on_meta(gm: GraphModule, node: Node, tensors: dict):
    """A meta run of ``node`` (a parametrization or a plain call), its inputs from ``tensors``."""
    if node.op == "call_module":
        module = gm.get_submodule(node.target)
        state = {name: torch.empty_like(t, device="meta")
                 for name, t in itertools.chain(module.named_parameters(), module.named_buffers())}
        return torch.func.functional_call(module, state, ())
    args, kwargs = torch.fx.node.map_arg((node.args, node.kwargs), lambda n: tensors[n])
    if node.op == "call_method":
        return getattr(args[0], node.target)(*args[1:], **kwargs)
    return node.target(*args, **kwargs)


def parameter_rebuild(gm: GraphModule, facts: GraphFacts, value: Node, written: set,
                      min_numel: int) -> tuple[ParameterRebuild, list[Node]] | None:
    """How backward makes ``value`` (a computation of parameters alone) again, and the leaves it
    reads; None where it is kept instead (a view of a parameter holds nothing of its own; too
    small to matter; something on the way is not a plain, pure call)."""
    if value.op == "get_attr" or any(facts.same_storage(value, w) for w in written):
        return None
    found = _ancestors(gm, value, facts)
    if found is None:
        return None
    computations, leaves = found
    if any(facts.same_storage(leaf, w) for leaf in leaves for w in written):
        return None
    tensors = [_attribute(gm, leaf.target) for leaf in leaves]
    if not all(isinstance(t, torch.Tensor) for t in tensors):
        return None
    if any(facts.same_storage(value, leaf) for leaf in leaves):
        return None  # a view of a parameter: it holds nothing of its own
    effects = _Effects()
    on_meta = {leaf: torch.empty_like(t, device="meta") for leaf, t in zip(leaves, tensors)}
    try:
        with effects:
            for node in computations:
                on_meta[node] = _on_meta(gm, node, on_meta)
    except Exception:  # noqa: BLE001 - an op without a meta kernel: kept, as before
        return None
    out = on_meta[value]
    if effects.impure or not isinstance(out, torch.Tensor) or out.numel() < min_numel:
        return None
    graph = Graph()
    env = {leaf: graph.placeholder(f"leaf_{i}") for i, leaf in enumerate(leaves)}
    for node in computations:
        env[node] = graph.node_copy(node, lambda n: env[n])
    graph.output(env[value])
    # the root lends the parametrizations it calls (by reference: the model's own modules)
    body = GraphModule(gm, graph, f"Rebuild_{value.name}")
    return ParameterRebuild(body, value.name), leaves
