"""Which dimension of a saved value Inductor stores innermost: the row layout packs along it.

Why: an unpack fused into a backward kernel is vectorized only when its loads run along the
dimension that kernel iterates innermost (``graph_pack``'s row layout). Inductor stores a
convolution's output channels-last when it optimizes layouts (``GraphLowering.decide_layout_opt``:
always on CPU with mkldnn, by heuristics on CUDA), and ops that read it elementwise or pool it
keep that order; a view or permute starts a new order. Everything else is stored in its own
order, last dimension innermost.
"""

from __future__ import annotations

import operator

import torch
from torch import fx

from actfx.passes.saved_pair import val

aten = torch.ops.aten


def channels_last_values(graph: fx.Graph) -> set[fx.Node]:
    """The 4-D values of a forward graph that Inductor will store channels-last."""
    if not _layout_optimized(graph):
        return set()
    found: set[fx.Node] = set()
    for node in graph.nodes:
        if node.op != "call_function":
            continue
        if node.target is aten.convolution.default:
            found.add(node)
        elif node.target is operator.getitem:
            if node.args[0] in found and _is_4d(node):
                found.add(node)
        elif not getattr(node.target, "is_view", False) and any(
                n in found and _is_4d(n) for n in node.all_input_nodes):
            found.add(node)  # elementwise, a norm, a pooling: a tuple of outputs is marked for getitem
    return found


def inner_dim(node: fx.Node, channels_last: set[fx.Node]) -> int:
    """The dimension of ``node``'s value stored innermost."""
    return 1 if node in channels_last and _is_4d(node) else val(node).dim() - 1


def _is_4d(node: fx.Node) -> bool:
    value = val(node)
    return isinstance(value, torch.Tensor) and value.dim() == 4


def _layout_optimized(graph: fx.Graph) -> bool:
    """Inductor's own decision for this graph (False where this torch has none to ask)."""
    from torch._inductor.graph import GraphLowering

    decide = getattr(GraphLowering, "decide_layout_opt", None)
    if decide is None:
        return False
    try:
        return bool(decide(graph.owning_module, is_inference=False))
    except (KeyError, AttributeError, TypeError):  # a node without the meta it reads: keep the default order
        return False
