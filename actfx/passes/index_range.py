"""The smallest integer type a saved index fits, from the ATen op that produced it.

Why: backward reads integer values exactly (gather and scatter indices, max-pool and top-k
positions), so the compiled path cannot round them; but an index into a dimension of 300 needs
9 bits, and PyTorch keeps it in 64. The op that made the index bounds it: ``topk(x, k, dim)``'s
indices lie in ``[0, x.size(dim))``, max pooling's in ``[0, H * W)``. Such a value is saved in
the narrowest signed type that holds the bound and widened again where backward reads it, so
every value backward sees is the one forward made. An index an embedding looks up in forward is
bounded by the table's rows, whatever computed it.
"""

from __future__ import annotations

import math
import operator

import torch
import torch._inductor.inductor_prims  # noqa: F401 - registers the prims Inductor's max-pool decomposition emits
from torch import fx

from actfx.passes.aten_to_functional import schema_arguments

aten = torch.ops.aten
prims = torch.ops.prims

# Ops whose value is an index along ``dim`` of their input ``self`` (all of it when dim is None).
_INDEX = {aten.argmax, aten.argmin}
# Ops whose second output is one.
_SECOND_IS_INDEX = {aten.max, aten.min, aten.topk, aten.sort, aten.kthvalue, aten.mode, aten.median,
                    aten.nanmedian, aten.cummax, aten.cummin}
# Pools whose second output indexes the flattened spatial dimensions (that many trailing dims).
_POOL_INDEX = {aten.max_pool2d_with_indices: 2, aten.max_pool3d_with_indices: 3, aten.adaptive_max_pool2d: 2,
               aten.adaptive_max_pool3d: 3}
# Ops that pass values through unchanged (rearranged, repeated or a subset of them).
_SAME_VALUES = {aten.view, aten._unsafe_view, aten.reshape, aten.unsqueeze, aten.squeeze, aten.permute,
                aten.transpose, aten.t, aten.expand, aten.clone, aten.slice, aten.select, aten.alias, aten.contiguous}

_NARROW = (torch.int8, torch.int16, torch.int32)


def compact_dtype(node: fx.Node) -> torch.dtype | None:
    """The narrowest integer type holding every value ``node`` can take, if narrower than its
    own; None when unknown or no narrower."""
    value = node.meta.get("val")
    if not isinstance(value, torch.Tensor) or value.dtype not in (torch.int64, torch.int32):
        return None
    bound = _bound(node)
    if bound is None:
        return None
    for dtype in _NARROW:
        if bound - 1 <= torch.iinfo(dtype).max:
            return dtype if torch.iinfo(dtype).bits < torch.iinfo(value.dtype).bits else None
    return None


def _bound(node: fx.Node) -> int | None:
    """An exclusive upper bound on ``node``'s values (all >= 0), or None."""
    rows = _embedding_rows(node)
    if rows is not None:
        return rows
    while node.op == "call_function" and _packet(node.target) in _SAME_VALUES:
        node = node.args[0]
    if node.op != "call_function":
        return None
    if node.target is prims._low_memory_max_pool_offsets_to_indices.default:
        return _static(math.prod(schema_arguments(node)["input_size"]))
    if _packet(node.target) in _INDEX:
        return _along(node)
    if node.target is operator.getitem and node.args[1] == 1 and isinstance(node.args[0], fx.Node):
        source = node.args[0]
        packet = _packet(source.target)
        if packet in _SECOND_IS_INDEX and "dim" in schema_arguments(source):
            return _along(source)
        if packet in _POOL_INDEX:
            shape = source.args[0].meta["val"].shape
            return _static(math.prod(shape[-_POOL_INDEX[packet]:]))
    return None


def _embedding_rows(node: fx.Node) -> int | None:
    """The rows of the table an ``embedding`` in forward looks ``node`` up in: forward refuses an
    index outside ``[0, rows)``, so every value lies there (T5's and WavLM's relative-position
    buckets, computed with log and min, were kept as int64)."""
    for user in node.users:
        if user.target is aten.embedding.default and len(user.args) > 1 and user.args[1] is node:
            weight = user.args[0].meta.get("val") if isinstance(user.args[0], fx.Node) else None
            if isinstance(weight, torch.Tensor) and weight.dim() == 2:
                return _static(weight.shape[0])
    return None


def _along(node: fx.Node) -> int | None:
    shape = node.args[0].meta["val"].shape
    dim = schema_arguments(node)["dim"]
    return _static(math.prod(shape) if dim is None else (shape[dim] if shape else 1))


def _packet(target):
    return target.overloadpacket if isinstance(target, torch._ops.OpOverload) else None


def _static(size) -> int | None:
    return size if isinstance(size, int) else None
