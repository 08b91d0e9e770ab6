"""Inline the ``torch.autocast`` regions torch.export captured as ``wrap_with_autocast`` calls.

Why: a forward that enters ``torch.autocast`` (EfficientViT's attention turns it off to run in
fp32) is captured as one higher-order call around a subgraph. actfx did not look inside, so the
region's ops kept their inputs exact next to packs of the same values (timm efficientvit_b0:
84 against 52 KiB per block, more than PyTorch). Here the subgraph's ops are copied into the
graph between ``_enter_autocast`` and ``_exit_autocast`` calls, the form fx gives an autocast
block, so they run under the same autocast state and each meets its variant. A region whose
subgraph reads attributes of its own (not handed in as arguments; a region nested in it is one)
is left as it is.
"""

from __future__ import annotations

import operator

import torch
from torch.amp.autocast_mode import _enter_autocast, _exit_autocast
from torch.fx import Graph, GraphModule, Node

__all__ = ["inline_autocast_regions"]


def inline_autocast_regions(graph: Graph, owner: torch.nn.Module) -> None:
    """Inline each ``wrap_with_autocast`` call of ``graph`` (subgraphs looked up on ``owner``)."""
    hop = getattr(torch.ops.higher_order, "wrap_with_autocast", None)
    for node in list(graph.nodes):
        if node.op == "call_function" and node.target is hop and _inlinable(node, owner):
            _inline(graph, node, getattr(owner, node.args[4].target))


def _inlinable(node: Node, owner) -> bool:
    sub = node.args[4] if len(node.args) > 4 else None
    body = getattr(owner, sub.target, None) if isinstance(sub, Node) and sub.op == "get_attr" else None
    return (isinstance(body, GraphModule) and not node.kwargs
            and all(n.op != "get_attr" for n in body.graph.nodes)
            and all(u.op == "call_function" and u.target is operator.getitem for u in node.users))


def _inline(graph: Graph, node: Node, body: GraphModule) -> None:
    device, dtype, enabled, cache, sub, *operands = node.args
    inner_inputs = [n for n in body.graph.nodes if n.op == "placeholder"]
    env = dict(zip(inner_inputs, operands))
    with graph.inserting_before(node):
        mode = graph.call_function(_enter_autocast, (device, dtype, enabled, cache))
        for inner in body.graph.nodes:
            if inner.op == "placeholder":
                continue
            if inner.op == "output":
                outputs = torch.fx.node.map_arg(inner.args[0], env.__getitem__)
                break
            env[inner] = graph.node_copy(inner, env.__getitem__)
        graph.call_function(_exit_autocast, (mode,))
    for user in list(node.users):
        user.replace_all_uses_with(outputs[user.args[1]])
        graph.erase_node(user)
    graph.erase_node(node)
    if not sub.users:
        graph.erase_node(sub)
