"""Which original op each node of a rewritten graph was emitted for.

The rewrite emits, for one original op, a short run of nodes (packs of its inputs, one or more
variant calls, unpacking of their outputs) and copies the original node's ``meta`` onto the one
that stands for its result. To read a conversion record op by op, this pass takes the original
module traced again, tags a copy of every node with its name in ``meta``, runs the same rewrite,
and checks that the result is the recorded graph node for node. The tags then name each recorded node's
source: a node without one belongs to the next node that has one (the run ends with the
result). The decisions of this rewrite are the record's, graph by graph.
"""

from __future__ import annotations

import dataclasses

from torch.fx import Graph, GraphModule, Node

from actfx.config import Config
from actfx.passes.analyze import CALLS, module_path, target_name
from actfx.passes.capture import copy_graph
from actfx.passes.graph_facts import is_traced_constant
from actfx.passes.outline_recompute import BLOCK_PATH, outline_recomputed
from actfx.passes.rewrite import rewrite_graph

SOURCE_KEY = "actfx_source"


@dataclasses.dataclass
class Provenance:
    sources: dict  # rewritten Node -> original node name
    ops: dict  # original node name -> (op name, module path), for the original's call nodes
    decisions: dict  # original node name -> Decision, for the ops that got a variant


def provenance(rewritten: Graph, traced: GraphModule, config: Config, path: str = "",
               captured: bool = False) -> Provenance | None:
    """Sources of the nodes of ``rewritten`` (the record's training graph for ``path``), or None
    when rewriting ``traced`` (the original module at ``path``, traced as ``convert`` traced it:
    ``actfx.passes.analyze.trace_like``) does not reproduce it (the model changed since, say).
    ``captured``: torch.export captured it, so the blocks to recompute were outlined first."""
    gm = GraphModule(traced, copy_graph(traced.graph))  # the rewrite adds nodes to the graph it reads
    ops = {}
    for node in gm.graph.nodes:
        node.meta[SOURCE_KEY] = node.name
        if node.op in CALLS:
            ops[node.name] = (target_name(node, gm), module_path(node, path))
    if captured:
        outline_recomputed(gm, config.recompute_modules, path)
        for node in gm.graph.find_nodes(op="call_module"):
            if BLOCK_PATH in node.meta:  # an outlined block: one row, its ops' bytes before
                node.meta[SOURCE_KEY] = node.name
                ops[node.name] = ("checkpoint", module_path(node, path))
    graph, decisions, _ = rewrite_graph(gm, config, path)
    mine, theirs = list(graph.nodes), list(rewritten.nodes)
    if len(mine) != len(theirs) or any(_differ(a, b) for a, b in zip(mine, theirs)):
        return None
    sources, pending = {}, []
    for a, b in zip(mine, theirs):
        pending.append(b)
        tag = a.meta.get(SOURCE_KEY)
        if tag is not None:
            sources.update(dict.fromkeys(pending, tag))
            pending = []
    return Provenance(sources, ops, {d.node: d for d in decisions})


def _differ(a: Node, b: Node) -> bool:
    if is_traced_constant(a) and is_traced_constant(b):
        return False  # named anew by each trace (show's "before" column read "?" for such models)
    return a.op != b.op or a.name != b.name or _target(a) != _target(b)


def _target(node: Node):
    # Collapsed element-wise regions and compact-index selections get fresh functions each
    # rewrite; their names are stable (a MoE's top-k router left every show row without "before")
    fresh = hasattr(node.target, "actfx_pointwise") or getattr(node.target, "actfx_fresh", False)
    return node.target.__name__ if fresh else node.target
