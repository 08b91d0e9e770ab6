"""A value divided by its own 2-norm, ``x / x.norm(dim=d, keepdim=True)`` (or by ``norm + eps``
or ``norm.clamp(min=eps)``), as one node whose backward reads the packed quotient and the exact
1/norm per row (``variants/normalize.py``), as ``F.normalize`` does; and ``F.normalize`` as
torch.export records it (norm, clamp, expand, divide) folded back into that call.

Why: op by op the norm and the division each kept a pack of ``x``, the same pack, and the
norm's backward multiplied the division's gradient for the norm (which reads ``x``) by ``x``
again: that rounding read twice is biased (CLIP-style ``h / h.norm(dim=-1, keepdim=True)`` at
2 bits: the mean of 1024 gradients 1.42x the unbiased error, growing with the count; Hugging
Face Swinv2's exported cosine attention: query weight 41% off, 11% expected). Matched by ATen
op (``rules.node_packet``), so ``torch.norm``, ``x.norm``, ``torch.linalg.norm`` /
``vector_norm`` and ``/``, ``torch.div``, ``.div`` all qualify.
"""

from __future__ import annotations

import dataclasses
import operator

import torch
import torch.nn.functional as F
from torch.fx import Graph, GraphModule, Node

from actfx.rules import aten, node_packet
from actfx.variants.normalize import divided_by_norm

# per spelling of a norm: its arguments by position, and the order it takes when none is given
_NORMS = {aten.norm: (("input", "p", "dim", "keepdim", "dtype"), "fro"),
          aten.linalg_vector_norm: (("input", "ord", "dim", "keepdim", "dtype"), 2),
          aten.linalg_norm: (("input", "ord", "dim", "keepdim", "dtype"), None)}
_DIVISIONS = (operator.truediv, torch.div, torch.true_divide, aten.div.Tensor)


@dataclasses.dataclass(frozen=True)
class NormDivision:
    """``x`` divided by its own ``order``-norm over ``dim`` (an int, or a tuple of dims), kept:
    by the norm ("plain"), ``norm + eps`` ("add") or ``norm.clamp(min=eps)`` ("clamp"),
    ``expanded`` back to ``x``'s shape first or not; ``nodes``: those the division replaces."""

    x: Node
    order: int | float
    dim: object
    mode: str
    eps: float
    expanded: bool
    nodes: tuple


def _packet(node) -> object:
    if isinstance(node, Node) and node.op == "call_function" and node.target is torch.norm:
        return aten.norm
    return node_packet(node)


def _norm_of(node) -> tuple | None:
    """(x, order, dim) when ``node`` is a vector norm of x over given dims, kept (keepdim=True)."""
    spelling = _NORMS.get(_packet(node))
    if spelling is None:
        return None
    names, default_order = spelling
    if node.op == "call_function" and node.target is torch.norm:
        names = ("input", "p", "dim", "keepdim", "out", "dtype")
    args = dict(zip(names, node.args)) | {"input" if k == "self" else k: v for k, v in node.kwargs.items()}
    order = args.get("p", args.get("ord", default_order))
    order = 2 if order in ("fro", None) and default_order in ("fro", None) else order
    dim = args.get("dim")
    if isinstance(dim, (list, tuple)):
        dim = dim[0] if len(dim) == 1 else tuple(dim)
    if (set(args) - set(names) or not isinstance(order, (int, float)) or isinstance(order, bool)
            or not (isinstance(dim, int) or isinstance(dim, tuple) and dim) or args.get("keepdim") is not True
            or args.get("dtype") is not None or args.get("out") is not None or not isinstance(args.get("input"), Node)):
        return None
    return args["input"], order, dim


def _denominator(node) -> tuple:
    """(norm node, mode, eps) for a divisor that is a norm, ``norm + eps`` or ``norm.clamp(min=eps)``."""
    packet, args, kwargs = _packet(node), node.args, node.kwargs
    if packet is aten.add and len(args) == 2 and not kwargs:
        norm, eps = (args[0], args[1]) if isinstance(args[0], Node) else (args[1], args[0])
        if isinstance(eps, (int, float)) and not isinstance(eps, bool) and eps >= 0:
            return norm, "add", float(eps)
    if packet in (aten.clamp, aten.clamp_min) and isinstance(args[0], Node):
        low = args[1] if len(args) > 1 else kwargs.get("min")
        if packet is aten.clamp and (len(args) > 2 or kwargs.get("max") is not None):
            return node, "plain", 0.0
        if isinstance(low, (int, float)) and not isinstance(low, bool) and low >= 0:
            return args[0], "clamp", float(low)
    return node, "plain", 0.0


def norm_division(div: Node) -> NormDivision | None:
    """The division ``div`` as a ``NormDivision``, when it is one whose steps nothing else reads."""
    if (_packet(div) is not aten.div or len(div.args) != 2 or div.kwargs
            or div.op == "call_function" and div.target not in _DIVISIONS):
        return None
    x, divisor = div.args
    if not isinstance(x, Node) or not isinstance(divisor, Node):
        return None
    expanded = _packet(divisor) is aten.expand_as and len(divisor.args) == 2 and divisor.args[1] is x
    inner = divisor.args[0] if expanded else divisor
    if not isinstance(inner, Node):
        return None
    norm, mode, eps = _denominator(inner)
    found = _norm_of(norm)
    steps = tuple(dict.fromkeys((divisor, inner, norm)))  # the divisor's chain, each once
    if found is None or found[0] is not x or any(
            list(node.users) != [user] for node, user in zip(steps, (div, *steps))):
        return None
    return NormDivision(x, found[1], found[2], mode, eps, expanded, steps)


def _replace(graph: Graph, div: Node, found: NormDivision, target, args: tuple) -> None:
    with graph.inserting_before(div):
        folded = graph.call_function(target, args)
    folded.meta.update(div.meta)
    div.replace_all_uses_with(folded)
    graph.erase_node(div)
    for node in found.nodes:
        graph.erase_node(node)


def fold_normalize_calls(graph: Graph) -> bool:
    """``F.normalize`` as torch.export records it (any order, any dims) back into one call;
    True if any."""
    changed = False
    for div in list(graph.nodes):
        found = norm_division(div)
        if found is not None and found.expanded and found.mode == "clamp":
            _replace(graph, div, found, F.normalize, (found.x, found.order, found.dim, found.eps))
            changed = True
    return changed


def collapse_norm_divisions(gm: GraphModule) -> bool:
    """Each ``x`` over its 2-norm along one dim in ``gm`` as one ``divided_by_norm`` call; True if any."""
    changed = False
    for div in list(gm.graph.nodes):
        found = norm_division(div)
        if found is not None and found.order == 2 and isinstance(found.dim, int):
            _replace(gm.graph, div, found, divided_by_norm, (found.x, found.dim, found.mode, found.eps))
            changed = True
    if changed:
        gm.recompile()
    return changed
