"""Collapse a value divided by its own 2-norm, ``x / x.norm(dim=d, keepdim=True)`` (or by
``norm + eps`` or ``norm.clamp(min=eps)``), into one node whose backward reads the packed
quotient and the exact 1/norm per row (``variants/normalize.py``), as ``F.normalize`` does.

Why: op by op the norm and the division each kept a pack of ``x``, the same pack, and the
norm's backward multiplied the division's gradient for the norm (which reads ``x``) by ``x``
again: that rounding read twice is biased (CLIP-style ``h / h.norm(dim=-1, keepdim=True)`` at
2 bits: the mean of 1024 gradients 1.42x the unbiased error, growing with the count). Matched by
ATen op (``rules.aten_packet``), so ``torch.norm``, ``x.norm``, ``torch.linalg.norm`` /
``vector_norm`` and ``/``, ``torch.div``, ``.div`` all qualify.
"""

from __future__ import annotations

import operator

import torch
from torch.fx import GraphModule, Node

from actfx.rules import aten, aten_packet
from actfx.variants.normalize import divided_by_norm

# per spelling of a 2-norm: its arguments by position, and the order it takes when none is given
_NORMS = {aten.norm: (("input", "p", "dim", "keepdim", "dtype"), "fro"),
          aten.linalg_vector_norm: (("input", "ord", "dim", "keepdim", "dtype"), 2),
          aten.linalg_norm: (("input", "ord", "dim", "keepdim", "dtype"), None)}


def _packet(node) -> object:
    if not isinstance(node, Node) or node.op not in ("call_function", "call_method"):
        return None
    if node.op == "call_function" and node.target is torch.norm:
        return aten.norm
    return aten_packet(node.op, node.target)


def _row_norm_of(node) -> tuple | None:
    """(x, dim) when ``node`` is the 2-norm of x over one dim, kept (keepdim=True)."""
    spelling = _NORMS.get(_packet(node))
    if spelling is None:
        return None
    names, default_order = spelling
    if node.op == "call_function" and node.target is torch.norm:
        names = ("input", "p", "dim", "keepdim", "out", "dtype")
    args = dict(zip(names, node.args)) | {"input" if k == "self" else k: v for k, v in node.kwargs.items()}
    order = args.get("p", args.get("ord", default_order))
    dim = args.get("dim")
    if isinstance(dim, (list, tuple)) and len(dim) == 1:
        dim = dim[0]
    if (set(args) - set(names) or order not in (2, 2.0, "fro") and not (order is None and default_order is None)
            or not isinstance(dim, int) or args.get("keepdim") is not True or args.get("dtype") is not None
            or args.get("out") is not None or not isinstance(args.get("input"), Node)):
        return None
    return args["input"], dim


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
            return node, "plain", 0.0  # a clamp with a maximum is no norm: nothing matches it
        if isinstance(low, (int, float)) and not isinstance(low, bool) and low >= 0:
            return args[0], "clamp", float(low)
    return node, "plain", 0.0


def collapse_norm_divisions(gm: GraphModule) -> bool:
    """Each ``x / <x's row norm>`` in ``gm`` as one ``divided_by_norm`` call; True if any."""
    graph, changed = gm.graph, False
    for div in list(graph.nodes):
        if _packet(div) is not aten.div or len(div.args) != 2 or div.kwargs or (
                div.op == "call_function" and div.target not in (operator.truediv, torch.div, aten.div.Tensor)
                and div.target is not torch.true_divide):
            continue
        x, divisor = div.args
        if not isinstance(x, Node) or not isinstance(divisor, Node):
            continue
        norm, mode, eps = _denominator(divisor)
        found = _row_norm_of(norm)
        if found is None or found[0] is not x or list(norm.users) != [divisor if divisor is not norm else div]:
            continue
        if divisor is not norm and list(divisor.users) != [div]:
            continue
        with graph.inserting_before(div):
            folded = graph.call_function(divided_by_norm, (x, found[1], mode, eps))
        folded.meta.update(div.meta)
        div.replace_all_uses_with(folded)
        graph.erase_node(div)
        if divisor is not norm:
            graph.erase_node(divisor)
        graph.erase_node(norm)
        changed = True
    if changed:
        gm.recompile()
    return changed
