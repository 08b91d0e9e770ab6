"""Keep attention written by hand as math under actfx.compile, where math holds less.

Why: Inductor's joint-graph patterns (``torch/_inductor/fx_passes/fuse_attention.py``) turn
matmul -> scale (-> mask) -> softmax -> matmul into its fused CPU kernel, whose backward
recomputes the probabilities from q and k, so those stay exact. The patterns run before the
partitioner, where ``attention_kernel``'s per-call choice never sees them: ConvBERT's and
MobileViT's attention kept q and k exact (a repro: 2.8x less than torch.compile at 2 bits, 64 KB
of the 82 KB held being q and k). Where math holds less (``attention_kernel.math_holds_less``),
the softmax reads ``max(s, s)`` of its scores instead: the same values (NaN and -inf included),
fused into the softmax's kernel, in none of those patterns.
"""

from __future__ import annotations

import pathlib

import torch
from torch._inductor.custom_graph_pass import CustomGraphPass, get_hash_for_files

from actfx.passes.attention_kernel import math_holds_less

aten = torch.ops.aten

_SOFTMAX = (aten._softmax.default, aten.softmax.int)
_MATMULS = (aten.bmm.default, aten.mm.default, aten.matmul.default)
# ops between the scores' matmul and the softmax: views, the scale, the mask
_BETWEEN = (aten.view.default, aten._unsafe_view.default, aten.reshape.default, aten.div.Tensor, aten.mul.Tensor,
            aten.add.Tensor, aten.sub.Tensor, aten.where.self, aten.masked_fill.Scalar, aten.masked_fill.Tensor,
            aten.expand.default, aten.clone.default)
_MAX_STEPS = 8


class KeepMathAttention(CustomGraphPass):
    """Inductor's ``joint_custom_pre_pass`` for actfx.compile (module docstring)."""

    def __init__(self, attention_bits: int, min_numel: int = 0):
        self.attention_bits, self.min_numel = attention_bits, min_numel

    def __call__(self, graph: torch.fx.Graph) -> None:
        for node in list(graph.nodes):
            readers = _softmax_readers(node)
            if not readers:
                continue
            scores, value = node.args[0], node.args[0].meta.get("val")
            width = _query_width(scores)
            if width is None or not isinstance(value, torch.Tensor) or not isinstance(value.shape[-1], int):
                continue  # (symbolic sizes keep PyTorch's choice, as attention_kernel does)
            query = torch.empty((1, width), dtype=value.dtype, device="meta")
            key = torch.empty((value.shape[-1], width), dtype=value.dtype, device="meta")
            if not math_holds_less(query, key, self.attention_bits, self.min_numel, value.numel()):
                continue
            with graph.inserting_before(readers[0]):
                same = graph.call_function(aten.maximum.default, (scores, scores))
            same.meta.update(scores.meta)
            for reader in readers:
                reader.replace_input_with(scores, same)

    def uuid(self) -> str:
        here = pathlib.Path(__file__)
        return get_hash_for_files((str(here), str(here.with_name("attention_kernel.py"))), repr((self.attention_bits, self.min_numel))).hex()


def _softmax_readers(node: torch.fx.Node) -> list:
    """The nodes of a softmax over the last dim that read its scores: the softmax itself, or, as
    the joint graph has it decomposed, ``amax(s, -1, keepdim)`` and ``s - amax``; else []."""
    if node.op != "call_function" or not node.args or not isinstance(node.args[0], torch.fx.Node):
        return []
    value = node.args[0].meta.get("val")
    if not isinstance(value, torch.Tensor) or not value.is_floating_point():
        return []
    last = (-1, value.dim() - 1)
    if node.target in _SOFTMAX:
        return [node] if node.args[1] in last else []
    if node.target is aten.amax.default and list(node.args[1]) in ([-1], [value.dim() - 1]) and node.args[2:3] == (True,):
        shifts = [u for u in node.args[0].users if u.target is aten.sub.Tensor and u.args == (node.args[0], node)]
        return [node, *shifts] if shifts else []
    return []


def _query_width(scores: torch.fx.Node) -> int | None:
    """The head width of the query whose scores reach the softmax through views, a scale and a
    mask, or None when they do not come from a matmul."""
    node = scores
    for _ in range(_MAX_STEPS):
        if node.op != "call_function":
            return None
        if node.target in _MATMULS:
            query = node.args[0].meta.get("val") if isinstance(node.args[0], torch.fx.Node) else None
            return int(query.shape[-1]) if isinstance(query, torch.Tensor) and isinstance(query.shape[-1], int) else None
        if node.target not in _BETWEEN:
            return None
        floats = [a for a in node.args if isinstance(a, torch.fx.Node) and _floating(a)]
        if not floats:
            return None
        size = scores.meta["val"].numel()
        node = next((a for a in floats if a.meta["val"].numel() == size), floats[0])  # the scores, not the mask
    return None


def _floating(node: torch.fx.Node) -> bool:
    value = node.meta.get("val")
    return isinstance(value, torch.Tensor) and value.is_floating_point()
