"""Values computed from parameters alone are made again in backward rather than saved for it.

Why: under autocast every matmul reads a bfloat16 copy of its float32 weight, and the partitioner
saved those copies for backward: 2 bytes per weight value per step, beside the float32 weights
that stay alive anyway (three 256 x 256 linears under bf16 autocast held 262 KB of weight copies
against 5.8 KB of packed activations; torch.compile holds the same copies). The same holds for
a weight computed from its parameter each step: weight standardisation (timm's NF-Nets and BiT
ResNets, ``ScaledStdConv2d``/``StdConv2d``: a batch_norm over the weight), weight norm, spectral
norm's division. The partitioner saved each standardised weight (an NF-ResNet-26 at batch 2, 64
px: 10.6 MB of them against 1 MB of packed activations). Each is a pass over a weight, so
backward makes it again from the parameters. Marked on the joint graph with PyTorch's own
checkpoint policy, which the min-cut partitioner honours.

Left to the partitioner: matmuls and convolutions of parameters (a LoRA product: a real
computation), random ops (a mask drawn again would differ), anything computed from a buffer the
graph writes in place (spectral norm's vectors: backward would read the new ones), and views of
parameters themselves (they hold nothing new, and a graph without marks partitions as before).
"""

from __future__ import annotations

import operator

import torch
from torch import fx
from torch._functorch._aot_autograd.utils import _is_primal
from torch.utils.checkpoint import CheckpointPolicy

from actfx.passes.saved_pair import written_inputs
from actfx.rules import is_pure

aten, prims = torch.ops.aten, torch.ops.prims

_CASTS = (prims.convert_element_type.default, aten._to_copy.default)

# Parameter computations left to the partitioner: products that cost a GEMM or a convolution.
_COMPUTATIONS = frozenset({aten.mm.default, aten.addmm.default, aten.bmm.default, aten.baddbmm.default,
                           aten.convolution.default, aten._convolution.default})


def _is_view(node: fx.Node) -> bool:
    schema = getattr(node.target, "_schema", None)
    return schema is not None and len(schema.returns) == 1 and schema.returns[0].alias_info is not None \
        and not schema.returns[0].alias_info.is_write


def _remade(node: fx.Node) -> bool:
    """Whether backward may make this computation of parameters again: functional, not random,
    not a GEMM or convolution."""
    target = node.target
    return isinstance(target, torch._ops.OpOverload) and target not in _COMPUTATIONS and is_pure(target)


def recompute_parameter_computations(joint: fx.GraphModule, static_indices) -> int:
    """Mark computations of parameters alone (casts, weight standardisation, ...), and views of
    them, as recomputed in backward; returns how many were marked. ``static_indices``: the
    positions of parameters and buffers among the primal inputs (the partitioner's
    ``static_lifetime_input_indices``)."""
    primals = [n for n in joint.graph.find_nodes(op="placeholder") if _is_primal(n)]
    parameters = {primals[i] for i in (static_indices or ()) if i < len(primals)} - written_inputs(joint.graph)
    computed: set = set()
    for node in joint.graph.nodes:
        if node.op != "call_function" or not node.all_input_nodes or "recompute" in node.meta:
            continue
        inputs = node.all_input_nodes
        if not all(a in parameters or a in computed for a in inputs):
            continue
        if (_is_view(node) or node.target is operator.getitem) and not any(a in computed for a in inputs):
            # a view of a parameter, or one piece of a split of one (marking the piece alone left
            # the partitioner a list it can neither save nor make again: DeepSeek-V4 crashed)
            parameters.add(node)
        elif node.target is operator.getitem or _remade(node):
            computed.add(node)
            node.meta["recompute"] = CheckpointPolicy.MUST_RECOMPUTE
    return len(computed)
