"""How a saved value is laid out for the row layout: the dimension read as columns, and where
its channel is.

Why: an unpack fused into a backward kernel is vectorized only when its loads run along the
dimension that kernel iterates innermost (``graph_pack``'s row layout). Inductor stores a
convolution's output channels-last when it optimizes layouts (``GraphLowering.decide_layout_opt``:
on CPU with mkldnn unless actfx.compile turns it off, by heuristics on CUDA), and ops that read
it elementwise, normalise or pool it keep that order; a view or permute starts a new order.
Everything else is stored in its own order, last dimension innermost. And a quantization group
should stay inside one channel (channels differ in range): dimension 1 of a convolution's values,
the last dimension of anything else.
"""

from __future__ import annotations

import math

import torch
from torch import fx

from actfx.passes.saved_pair import val

aten = torch.ops.aten


class StoredLayouts:
    """The convolution values of one forward graph, and which of them Inductor stores channels-last."""

    def __init__(self, graph: fx.Graph):
        self.convolved = _convolution_values(graph)
        four_d = {n for n in self.convolved if isinstance(val(n), torch.Tensor) and val(n).dim() == 4}
        self.channels_last = four_d if _layout_optimized(graph) else set()

    def columns_and_plane(self, node: fx.Node) -> tuple[int, int | None]:
        """(the dimension read as columns, the rows one channel spans when the channel is another
        dimension: ``graph_pack.Rows``)."""
        ndim = val(node).dim()
        inner = 1 if node in self.channels_last else ndim - 1
        channel = 1 if node in self.convolved and ndim >= 3 else ndim - 1
        if channel == inner:
            return inner, None
        return inner, math.prod(val(node).shape[d] for d in range(channel + 1, ndim) if d != inner)


def _convolution_values(graph: fx.Graph) -> set[fx.Node]:
    """Convolution outputs and what elementwise ops, norms and pools make of them (same rank)."""
    found: set[fx.Node] = set()
    for node in graph.nodes:
        if node.op != "call_function":
            continue
        if node.target is aten.convolution.default:
            found.add(node)
        elif not getattr(node.target, "is_view", False) and any(
                n in found and _same_rank(node, n) for n in node.all_input_nodes):
            found.add(node)  # getitem of a pool's or norm's tuple included
    return found


def _same_rank(node: fx.Node, source: fx.Node) -> bool:
    """Both tensors of one rank (a tuple-valued op, as for pools, counts as its source's rank)."""
    value, other = val(node), val(source)
    if isinstance(value, (tuple, list)):
        value = next((v for v in value if isinstance(v, torch.Tensor)), None)
    if isinstance(other, (tuple, list)):
        other = next((v for v in other if isinstance(v, torch.Tensor)), None)
    return isinstance(value, torch.Tensor) and isinstance(other, torch.Tensor) and value.dim() == other.dim()


def _layout_optimized(graph: fx.Graph) -> bool:
    """Inductor's own decision for this graph (False where this torch has none to ask)."""
    from torch._inductor.graph import GraphLowering

    decide = getattr(GraphLowering, "decide_layout_opt", None)
    if decide is None or graph.owning_module is None:
        return False
    try:
        return bool(decide(graph.owning_module, is_inference=False))
    except (KeyError, AttributeError, TypeError):  # a node without the meta it reads: keep the default order
        return False
