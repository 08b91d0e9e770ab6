"""One forward node per value: hoisting copies backward regions into forward, and those copies
recompute what forward already has.

A mask hoisted from ResNet's backward is ``le(relu_in, 0)`` with ``relu_in`` rebuilt from the saved
convolution outputs: the BatchNorm, the residual sum and, through it, the previous block's ReLU,
which the backward had as ``where(y <= 0, 0, y)``. Copied as they are, a stage's last mask rebuilt
every block before it (ResNet-50's forward: 2,549 lines of C++ for one such kernel), and each copy
is code Inductor generates and compiles. Merging them into the forward's own nodes computes each
value once, as plain ``torch.compile`` does.
"""

from __future__ import annotations

import operator

import torch
from torch import fx

from actfx.passes import hoist
from actfx.passes.saved_pair import ORDER_KEEPING_VIEWS, val
from actfx.rules import is_pure

aten = torch.ops.aten


def merge_copies(run) -> int:
    """Replace each forward node that repeats an earlier one (same op, same inputs) by that
    node; a recomputed ReLU written as ``where(y <= 0, 0, y)`` is the forward's ``relu(y)``.
    Returns how many nodes were merged."""
    first: dict = {}
    merged = 0
    user_outputs = set(run.g.outputs()[:run.g.num_fwd_outputs])
    for node in list(run.g.fwd.nodes):
        same = None if node in user_outputs else _view_of_itself(node)
        if same is not None:
            _replace(run, node, same)
            merged += 1
            continue
        key = _key(node)
        if key is None:
            continue
        earlier = first.get(key)
        if earlier is None:
            first[key] = node
            continue
        if earlier.target is not node.target and node.target is aten.relu.default:
            continue  # the forward's own ReLU stays the ReLU (a select differs in the sign of zero)
        if not _same_meta(earlier, node):
            continue
        _replace(run, node, earlier)
        merged += 1
    if merged:
        run.g.fwd.eliminate_dead_code()
        run.g.renumber()
    return merged


# order-keeping views, and those that add or drop a dimension of size one
_VIEWS = frozenset(ORDER_KEEPING_VIEWS | {aten.unsqueeze.default, aten.squeeze.dim, aten.squeeze.dims,
                                          aten.squeeze.default})


def _view_of_itself(node: fx.Node) -> fx.Node | None:
    """The node a chain of views (``view(squeeze(t))``) leads back to with the same shape,
    strides and dtype: the same tensor. Why: a backward decomposition reads BatchNorm's
    ``[1, C, 1, 1]`` mean as ``view(squeeze(mean))``; hoisted, its x̂ differed from the forward's
    by that chain alone, and both were stored (ResNet-50's layer3 and layer4 packed twice).
    The caller leaves the model's outputs alone (their aliasing is recorded); a saved view
    becomes its saved source."""
    if node.op != "call_function" or node.target not in _VIEWS:
        return None
    here = val(node)
    if not isinstance(here, torch.Tensor):
        return None
    source = node.args[0]
    while isinstance(source, fx.Node) and source.op in ("call_function", "placeholder"):
        there = val(source)
        if isinstance(there, torch.Tensor) and there.shape == here.shape and there.dtype == here.dtype and \
                there.stride() == here.stride() and there.storage_offset() == here.storage_offset():
            return source
        if source.op != "call_function" or source.target not in _VIEWS:
            return None
        source = source.args[0]
    return None


def _key(node: fx.Node):
    if node.op != "call_function" or not _pure(node.target):
        return None
    relu = hoist.zero_select(node)
    if relu is not None:
        return aten.relu.default, (_hashable(relu[1]),), ()
    try:
        return node.target, _hashable(node.args), _hashable(tuple(sorted(node.kwargs.items())))
    except TypeError:
        return None


def _pure(target) -> bool:
    """Deterministic ATen/prims ops without side effects, and tuple indexing."""
    if target is operator.getitem:
        return True
    if not isinstance(target, torch._ops.OpOverload) or target.namespace not in ("aten", "prims"):
        return False
    return is_pure(target)


def _hashable(value):
    if isinstance(value, fx.Node):
        return value  # nodes merged earlier were replaced in their users, so identity is the value
    if isinstance(value, (list, tuple)):
        return tuple(_hashable(v) for v in value)
    if isinstance(value, (torch.SymInt, torch.SymFloat, torch.SymBool)):
        raise TypeError("symbolic argument")  # equal symbols need not be one node: leave them
    hash(value)
    return type(value), value


def _same_meta(a: fx.Node, b: fx.Node) -> bool:
    va, vb = val(a), val(b)
    if isinstance(va, torch.Tensor) and isinstance(vb, torch.Tensor):
        return va.shape == vb.shape and va.dtype == vb.dtype and va.stride() == vb.stride()
    return type(va) is type(vb)


def _replace(run, node: fx.Node, earlier: fx.Node) -> None:
    """``node``'s readers read ``earlier``; a saved ``node`` becomes a saved ``earlier`` (once)."""
    placeholder = run.g.placeholder_of.get(node)
    if placeholder is not None:
        kept = run.g.placeholder_of.get(earlier) or run.g.add_saved(earlier, like=node)
        placeholder.replace_all_uses_with(kept)
        run.g.drop_saved(node)
        if node.name in run.hoisted:
            run.hoisted.setdefault(earlier.name, run.hoisted.pop(node.name))
    node.replace_all_uses_with(earlier)
    run.g.fwd.erase_node(node)
