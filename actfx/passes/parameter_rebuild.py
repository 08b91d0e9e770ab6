"""A weight computed from parameters alone is made again in backward, not kept for it.

Why: a layer that computes its weight each step (timm's NF-Nets and BiT ResNets standardise
each convolution's weight with a ``batch_norm`` over it, a LoRA or DoRA layer adds ``B @ A`` to
its frozen weight, weight norm's ``g * v / ||v||``) hands that weight to its convolution or
linear, whose backward reads it. Kept, it is one weight-sized copy per layer per step: on an
NF-ResNet-26 at batch 2, 64 px those copies were most of what the converted model held (1.11x
below PyTorch). Backward makes the weight again from the parameters, which stay alive anyway.

A value qualifies when the ops between it and the parameters are plain calls or
parametrizations (``torch.nn.utils.parametrize``, traced into their ops here), none draws random
numbers or writes into a tensor (checked on meta tensors, through the ATen ops the calls reach:
spectral norm's power iteration updates its vectors, so it is kept), and no op of the graph
writes into those parameters or buffers in place (backward would read their new values). The
rebuild holds no module: it reads the parameters by name from the converted model's own graph,
so a copy of the model rebuilds from its own. It runs under the autocast state the forward had.
Where the computation's own ops keep values of their own for backward (BiT's and mmcv's
hand-written ``(w - mean) / std`` keeps ``w - mean``, weight-sized), forward runs it as a
checkpoint (``variants/parameter_chain.py``) and its ops are made again too.
"""

from __future__ import annotations

import torch
from torch.fx import Graph, GraphModule, Node, Tracer
from torch.nn.utils import parametrize
from torch.utils._python_dispatch import TorchDispatchMode

from actfx.passes.graph_facts import GraphFacts, attribute
from actfx.rules import is_pure


class _Effects(TorchDispatchMode):
    """Whether any ATen op run under it is not pure (``rules.is_pure``: random, or writing)."""

    def __init__(self):
        super().__init__()
        self.impure = False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.impure |= not is_pure(func)
        return func(*args, **(kwargs or {}))


class _IntoEverything(Tracer):
    """Traces a parametrization's own modules (``_WeightNorm`` lives under ``torch.nn``)."""

    def is_leaf_module(self, m, qualname) -> bool:
        return False


class ParameterRebuild:
    """The computation of one value from the parameters ``leaves`` names (read in that order).
    ``keeps``: its own ops keep values of their own for backward (a hand-written standardisation's
    ``(w - mean) / std`` keeps ``w - mean``), so forward runs it as a checkpoint; ``nodes``: its
    ops in the graph it was found in."""

    def __init__(self, body: GraphModule, name: str, keeps: bool = False, nodes: tuple = ()):
        self.body = body
        self.name = name
        self.keeps = keeps
        self.nodes = nodes

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


def _ancestors(gm: GraphModule, value: Node, facts: GraphFacts) -> list[Node] | None:
    """The nodes behind ``value`` back to its parameters, in graph order; None where something
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
    return [n for n in value.graph.nodes if n in seen]


class _Body:
    """The rebuild's graph as it is written: each parameter a placeholder, named by its path."""

    def __init__(self):
        self.graph = Graph()
        self.leaves: dict[str, Node] = {}

    def leaf(self, target: str) -> Node:
        if target not in self.leaves:
            self.leaves[target] = self.graph.placeholder(f"leaf_{len(self.leaves)}")
        return self.leaves[target]

    def inline(self, module: torch.nn.Module, prefix: str) -> Node:
        """A parametrization's ops, its parameters read from ``prefix``."""
        traced = _IntoEverything().trace(module)
        env: dict[Node, Node] = {}
        for node in traced.nodes:
            if node.op == "get_attr":
                env[node] = self.leaf(f"{prefix}.{node.target}")
            elif node.op == "output":
                return env[node.args[0]]
            elif node.op in ("call_function", "call_method"):
                env[node] = self.graph.node_copy(node, lambda n: env[n])
            else:
                raise TypeError(f"a parametrization's {node.op} node")
        raise TypeError("a parametrization without output")


def _on_meta(rebuild: GraphModule, tensors: list):
    """One run of ``rebuild`` on meta copies of ``tensors``, with gradients: (its output, whether
    an op was not pure, the sizes of the values its own ops keep for backward: not a parameter,
    nor a view of one); None where an op has no meta kernel."""
    leaves = [torch.empty_like(t, device="meta").requires_grad_(t.is_floating_point()) for t in tensors]
    effects, kept = _Effects(), []

    def pack(t):
        if not any(t is leaf or t._base is leaf for leaf in leaves):
            kept.append(t.numel())
        return t

    try:
        with effects, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), torch.enable_grad():
            out = rebuild(*leaves)
    except Exception:  # noqa: BLE001 - an op without a meta kernel: kept, as before
        return None
    return out, effects.impure, kept


def parameter_rebuild(gm: GraphModule, facts: GraphFacts, value: Node, written: set,
                      min_numel: int) -> tuple[ParameterRebuild, list[str]] | None:
    """How backward makes ``value`` (a computation of parameters alone) again, and the parameters
    and buffers it reads (attribute paths of ``gm``); None where it is kept instead (a view of a
    parameter holds nothing of its own; too small to matter; something on the way is not a
    plain, pure call)."""
    if value.op == "get_attr":
        return None
    nodes = _ancestors(gm, value, facts)
    if nodes is None or any(facts.same_storage(value, n) for n in nodes if n.op == "get_attr"):
        return None  # a view of a parameter
    body = _Body()
    env: dict[Node, Node] = {}
    try:
        for node in nodes:
            if node.op == "get_attr":
                env[node] = body.leaf(node.target)
            elif node.op == "call_module":
                env[node] = body.inline(gm.get_submodule(node.target), node.target)
            else:
                env[node] = body.graph.node_copy(node, lambda n: env[n])
    except Exception:  # noqa: BLE001 - a parametrization fx cannot trace: kept, as before
        return None
    body.graph.output(env[value])
    read = [n for n in gm.graph.find_nodes(op="get_attr") if n.target in body.leaves]
    tensors = [attribute(gm, target) for target in body.leaves]
    if any(facts.same_storage(n, w) for n in read for w in written) or not all(
            isinstance(t, torch.Tensor) for t in tensors):
        return None
    rebuild = GraphModule(torch.nn.Module(), body.graph, f"Rebuild_{value.name}")
    found = _on_meta(rebuild, tensors)
    if found is None:
        return None
    out, impure, kept = found
    if impure or not isinstance(out, torch.Tensor) or out.numel() < min_numel:
        return None
    # worth a checkpoint (the ops run a third time) where a kept value is a good part of the
    # weight, not for a standardisation's per-channel statistics (NF-ResNet-26: 18% slower steps)
    keeps = any(size >= max(min_numel, out.numel() // 4) for size in kept)
    computations = tuple(n for n in nodes if n.op != "get_attr")
    return ParameterRebuild(rebuild, value.name, keeps, computations), list(body.leaves)
