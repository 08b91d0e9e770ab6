"""Collapse hand-written RMS normalisation, ``x * rsqrt(mean(x ** 2, dims, keepdim=True) + eps)``,
into one node whose backward reads the packed normalised value (``variants/rmsnorm.py``).

Why: Hugging Face's Llama/Qwen/Mistral/T5 norms are spelled out this way. Op by op, backward
keeps three values the size of ``x``: ``x ** 2``'s derivative, ``x`` for the product with the
scale, and the normalised value for the weight's product. As one op it keeps the normalised
value (unit spread per row, so its rounding noise is not scaled up by a row's 1/rms) and the
exact 1/rms per row; the weight's product shares that pack. Matched by ATen op (``rules``), so
``x.pow(2)``, ``torch.square(x)``, ``x * x``, ``torch.mean`` or ``.mean`` all qualify.
"""

from __future__ import annotations

from torch.fx import Graph, GraphModule, Node

from actfx.rules import aten, node_packet
from actfx.variants.rmsnorm import rms_normalize


def _only_user(node: Node, user: Node) -> bool:
    return list(node.users) == [user]


def _square_of(node: Node) -> tuple | None:
    """(x, square spelling) when ``node`` is x ** 2, square(x) or x * x."""
    packet, args = node_packet(node), node.args
    if packet is aten.pow and len(args) == 2 and isinstance(args[0], Node) and args[1] in (2, 2.0) and not node.kwargs:
        return args[0], ("pow", args[1])
    if packet is aten.square and len(args) == 1 and isinstance(args[0], Node) and not node.kwargs:
        return args[0], ("square",)
    if packet is aten.mul and len(args) == 2 and args[0] is args[1] and isinstance(args[0], Node) and not node.kwargs:
        return args[0], ("mul",)
    return None


def _mean_of(node: Node) -> tuple | None:
    """(input, dims) when ``node`` is mean(input, dims, keepdim=True) (no dtype)."""
    if node_packet(node) is not aten.mean:
        return None
    args, kwargs = list(node.args), dict(node.kwargs)
    names = ["input", "dim", "keepdim", "dtype"]
    bound = dict(zip(names, args))
    if set(kwargs) - set(names[1:]):
        return None
    bound.update(kwargs)
    dims, keepdim = bound.get("dim"), bound.get("keepdim", False)
    if keepdim is not True or bound.get("dtype") is not None or not isinstance(bound.get("input"), Node):
        return None
    if not (isinstance(dims, int) or (isinstance(dims, (list, tuple)) and dims and all(isinstance(d, int) for d in dims))):
        return None
    return bound["input"], dims


def _match(y: Node) -> tuple | None:
    """(x, dims, eps, square, nodes to erase) when ``y`` is x * rsqrt(mean(x²) + eps)."""
    if node_packet(y) is not aten.mul or len(y.args) != 2 or y.kwargs:
        return None
    for x, r in (y.args, y.args[::-1]):
        if not (isinstance(x, Node) and isinstance(r, Node) and node_packet(r) is aten.rsqrt and _only_user(r, y)):
            continue
        add = r.args[0] if len(r.args) == 1 and not r.kwargs else None
        if node_packet(add) is not aten.add or len(add.args) != 2 or add.kwargs or not _only_user(add, r):
            continue
        var, eps = add.args if isinstance(add.args[0], Node) else add.args[::-1]
        if not isinstance(var, Node) or not isinstance(eps, float) or not _only_user(var, add):
            continue
        mean = _mean_of(var)
        if mean is None or not _only_user(mean[0], var):
            continue
        square = _square_of(mean[0])
        if square is None or square[0] is not x:
            continue
        return x, mean[1], eps, square[1], [r, add, var, mean[0]]
    return None


def collapse_rms_norms(gm: GraphModule) -> int:
    """Replace each match in ``gm``'s graph by one ``rms_normalize`` call (in place; the product
    node keeps its name and meta); returns how many."""
    graph: Graph = gm.graph
    count = 0
    for y in list(graph.nodes):
        found = _match(y)
        if found is None:
            continue
        x, dims, eps, square, dead = found
        y.meta["actfx_replaces"] = [y.name, *(node.name for node in dead)]  # show's "before" per row
        y.op, y.target, y.args, y.kwargs = "call_function", rms_normalize, (x, dims, eps, square), {}
        for node in dead:
            graph.erase_node(node)
        count += 1
    if count:
        graph.lint()
        gm.recompile()
    return count
