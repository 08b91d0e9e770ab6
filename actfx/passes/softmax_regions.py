"""Fold a softmax into an element-wise region that reads it (``actfx/variants/softmax_then.py``):
``torch.log(F.softmax(x, -1) + 1e-10)`` becomes one op that keeps the probabilities and their
product with the region's derivative, both bounded, where the region alone kept a derivative up
to 1e10 that rounding could not carry without bias. The probabilities' other readers read the
pair's first output.
"""

from __future__ import annotations

import operator

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.fx import GraphModule, Node

from actfx.passes.pointwise_regions import collapsed_region
from actfx.passes.signatures import bind
from actfx.rules import aten, aten_packet
from actfx.variants.softmax_then import SoftmaxThen, softmax_then_callables

SOURCE_KEY = "actfx_source"  # provenance.SOURCE_KEY (provenance imports the rewrite, which imports this)


def _softmax(node: Node, modules: dict) -> tuple | None:
    """(input, dim, dtype) of a softmax node with a known dim, else None."""
    if node.op == "call_module":
        m = modules.get(node.target)
        if type(m) is not nn.Softmax or m.dim is None or len(node.args) != 1 or node.kwargs:
            return None
        x, dim, dtype = node.args[0], m.dim, None
    elif node.op in ("call_function", "call_method") and aten_packet(node.op, node.target) is aten.softmax:
        a = bind("softmax" if node.target is F.softmax else "torch_softmax", node.args, node.kwargs)
        if a is None:
            return None
        x, dim, dtype = a["input"], a["dim"], a["dtype"]
    else:
        return None
    if not isinstance(x, Node) or not isinstance(dim, int) or isinstance(dtype, Node):
        return None
    return x, dim, dtype


# Probabilities from underflow to certainty; a derivative whose size spans more than
# _SPAN between them gives groups whose ordinary entries sit far below the rounding's resolution
_PROBABILITIES = (1e-30, 1e-20, 1e-12, 1e-8, 1e-4, 1e-2, 0.1, 0.5, 0.9, 1.0)
_SPAN = 2.0 ** 10


def _spans_decades(region) -> bool:
    """Whether ``region``'s derivative over probabilities spans many decades (``log(y + eps)``:
    1/eps against 1). Only then is the pair folded: where it does not (an entropy's
    ``y * log(y + eps)``), softmax's own backward multiplies the region's rounding by the
    rounded ``y`` (near 0 for the many small probabilities), and the folded form's rounding of
    ``y * f'(y)`` does not shrink there (an entropy's gradient: 9% off at 8 bits, folded 28%)."""
    try:
        d = region.derivative_at(torch.tensor(_PROBABILITIES))
    except Exception:  # noqa: BLE001 - constants on another device, an op without a derivative
        return False
    if d is None:
        return False
    size = d.abs()[torch.isfinite(d)]
    return bool(size.numel() == 0 or size.max() > _SPAN * max(float(size.median()), 1e-30))


def fold_softmax_regions(gm: GraphModule) -> int:
    """Replace each (softmax, element-wise region reading only it) pair by one call (in place);
    returns how many were folded."""
    modules = dict(gm.named_modules())
    count = 0
    for node in list(gm.graph.nodes):
        region = collapsed_region(node)
        if region is None:
            continue
        source = node.args[0]
        found = _softmax(source, modules) if isinstance(source, Node) else None
        if found is None or not _spans_decades(region):
            continue
        x, dim, dtype = found
        both = len(source.users) > 1
        plain, _, _ = softmax_then_callables(SoftmaxThen(region, dim, dtype, node.name, both))
        node.meta["actfx_replaces"] = [source.name, *node.meta.get("actfx_replaces", [node.name])]
        node.target, node.args = plain, (x,)
        if both:  # the pair's outputs: the probabilities for their other readers, then f
            with gm.graph.inserting_after(node):
                result = gm.graph.call_function(operator.getitem, (node, 1))
            node.replace_all_uses_with(result, delete_user_cb=lambda user: user is not result)
            result.meta = dict(node.meta)
            with gm.graph.inserting_after(node):
                probabilities = gm.graph.call_function(operator.getitem, (node, 0))
            # its shape facts, not the source tag: reports name the pair after the region's output
            probabilities.meta = {k: v for k, v in source.meta.items() if k != SOURCE_KEY}
            source.replace_all_uses_with(probabilities)
        gm.graph.erase_node(source)
        count += 1
    if count:
        gm.graph.lint()
        gm.recompile()
    return count
