"""Casts of parameters are made again in backward rather than saved for it.

Why: under autocast every matmul reads a bfloat16 copy of its float32 weight, and the partitioner
saved those copies for backward: 2 bytes per weight value per step, beside the float32 weights
that stay alive anyway (three 256 x 256 linears under bf16 autocast held 262 KB of weight copies
against 5.8 KB of packed activations; torch.compile holds the same copies). A cast is one pass
over the weight, so backward makes it again from the parameter. Marked on the joint graph with
PyTorch's own checkpoint policy, which the min-cut partitioner honours.
"""

from __future__ import annotations

import torch
from torch import fx
from torch._functorch._aot_autograd.utils import _is_primal
from torch.utils.checkpoint import CheckpointPolicy

aten, prims = torch.ops.aten, torch.ops.prims

_CASTS = (prims.convert_element_type.default, aten._to_copy.default)


def _cast_or_view(node: fx.Node) -> bool:
    if node.target in _CASTS:
        return True
    schema = getattr(node.target, "_schema", None)
    return schema is not None and len(schema.returns) == 1 and schema.returns[0].alias_info is not None \
        and not schema.returns[0].alias_info.is_write


def recompute_parameter_casts(joint: fx.GraphModule, static_indices) -> int:
    """Mark casts computed from parameters alone, and views of them, as recomputed in backward;
    returns how many casts were marked. Views of parameters themselves are left alone (they hold
    nothing new, and a graph without marks partitions as before). ``static_indices``: the
    positions of parameters and buffers among the primal inputs (the partitioner's
    ``static_lifetime_input_indices``)."""
    primals = [n for n in joint.graph.find_nodes(op="placeholder") if _is_primal(n)]
    parameters = {primals[i] for i in (static_indices or ()) if i < len(primals)}
    copies: set = set()
    for node in joint.graph.nodes:
        if node.op != "call_function" or not node.all_input_nodes or "recompute" in node.meta:
            continue
        inputs = node.all_input_nodes
        if not all(a in parameters or a in copies for a in inputs):
            continue
        if node.target in _CASTS or (any(a in copies for a in inputs) and _cast_or_view(node)):
            copies.add(node)
            node.meta["recompute"] = CheckpointPolicy.MUST_RECOMPUTE
        elif _cast_or_view(node):
            parameters.add(node)  # a view of a parameter
    return sum(node.target in _CASTS for node in copies)
