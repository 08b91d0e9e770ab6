"""Values that are a broadcast expansion of a smaller one: keep the small one, replay the views.

Why: grouped-query attention repeats each key/value head for several query heads
(``k[:, :, None].expand(b, kv, n, s, d).reshape(b, kv * n, s, d)``, HF's ``repeat_kv``) and hands
the repeated copy to attention. Packing that copy stores every head ``n`` times; packing the
source and replaying the same view ops in backward stores it once, and forward is unchanged
(the op reads the replay of the exact source, the same ops on the same values).

A chain is a run of single-tensor ops that never drop values (reshapes, unsqueezes, full slices,
contiguous copies) with at least one that enlarges (expand, repeat, repeat_interleave); its other
arguments (sizes) may be graph values, which the template carries as slots.
"""

from __future__ import annotations

import operator

import torch
from torch.fx import Node

from actfx.variants.recompute import CHAIN

_KEEPS = {"reshape", "view", "_unsafe_view", "unsqueeze", "flatten", "contiguous", "clone", "alias", "slice",
          "getitem"}
_ENLARGES = {"expand", "repeat", "repeat_interleave"}
_FULL_END = 2 ** 62


def _name(node: Node) -> str | None:
    if node.op == "call_method":
        return node.target
    if node.op != "call_function":
        return None
    if node.target is operator.getitem:
        return "getitem"
    if isinstance(node.target, torch._ops.OpOverload):
        return node.target._opname
    return getattr(node.target, "__name__", None) if getattr(node.target, "__module__", "") == "torch" else None


def _full_index(index) -> bool:
    items = index if isinstance(index, tuple) else (index,)
    return all(i is None or i is Ellipsis or i == slice(None) for i in items)


def _keeps_all(node: Node, name: str) -> bool:
    if name == "getitem":
        return _full_index(node.args[1])
    if name == "slice":  # aten.slice.Tensor(x, dim, start, end, step)
        start, end, step = (list(node.args[2:5]) + [None, None, None])[:3]
        return start in (None, 0) and (end is None or (isinstance(end, int) and end >= _FULL_END)) and step in (None, 1)
    return True


def expansion_chain(node: Node) -> tuple[Node, list[Node]] | None:
    """(source, chain nodes from the source's reader to ``node``) when ``node`` is an expansion
    of ``source`` (see the module docstring), else None."""
    chain, current, enlarged = [], node, False
    while isinstance(current, Node):
        name = _name(current)
        if name not in _KEEPS and name not in _ENLARGES or not _keeps_all(current, name):
            break
        first = current.args[0] if current.args else None
        if not isinstance(first, Node) or any(_is_tensor(a) for a in current.all_input_nodes if a is not first):
            break
        enlarged = enlarged or name in _ENLARGES
        chain.append(current)
        current = first
    if not enlarged:
        return None
    return current, chain[::-1]


def _is_tensor(node: Node) -> bool:
    """Whether a graph value is a tensor (not a size): from its recorded value where there is one
    (export graphs), else from the op (``x.size(1)``, ``x.shape``, arithmetic on those)."""
    value = node.meta.get("val", node.meta.get("example_value"))
    if value is not None:
        return isinstance(value, torch.Tensor)
    if node.op == "call_method":
        return node.target not in ("size", "dim", "numel")
    if node.op == "call_function" and node.target is getattr:
        return node.args[1] not in ("shape", "ndim")
    if node.op == "call_function" and node.target is operator.getitem:
        return _is_tensor(node.args[0])
    if node.op == "call_function" and getattr(node.target, "__module__", None) in ("_operator", "math", "builtins"):
        return any(_is_tensor(a) for a in node.all_input_nodes)
    return True


def chain_template(source_slot, chain: list[Node], mark) -> tuple:
    """A template ``actfx.variants.recompute.fill`` replays: (CHAIN, steps, source slot), each
    step a Tensor method's name and its other arguments; ``mark`` turns each graph value a step
    reads (a size) into a slot. Full slices and aliases are identities and are left out."""
    steps = []
    for node in chain:
        name = _name(node)
        if name in ("slice", "alias"):
            continue
        method = {"getitem": "__getitem__", "_unsafe_view": "reshape"}.get(name, name)
        rest = torch.fx.node.map_arg(tuple(node.args[1:]), mark)
        kwargs = tuple((k, torch.fx.node.map_arg(v, mark)) for k, v in node.kwargs.items())
        steps.append((method, rest, kwargs))
    return CHAIN, tuple(steps), source_slot
