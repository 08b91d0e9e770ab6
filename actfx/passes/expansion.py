"""Values backward can rebuild from smaller stored tensors by replaying the ops that made them.

Why: grouped-query attention repeats each key/value head for several query heads
(``k[:, :, None].expand(b, kv, n, s, d).reshape(b, kv * n, s, d)``, HF's ``repeat_kv``) and hands
the repeated copy to attention; T5 hands SDPA a float mask built as
``where(padding (b,1,s,s) broadcast, position bias (1,h,s,s), min)``, batch x heads x s x s. Storing
those values stores each head n times, or each bias once per sample. Storing the small inputs and
replaying the same ops in backward stores them once; forward is unchanged (the op reads the
replay of the exact inputs: the same ops on the same values).

A chain runs from the value back to one *source*, through ops of one tensor that never drop
values (reshapes, unsqueezes, full slices, copies) or enlarge it (expand, repeat,
repeat_interleave). Where the chain's result is kept exact (a mask), element-wise ops are allowed
too: their other tensor inputs become *side* inputs, stored as well. Of the possible cut points
the one storing fewest bytes is taken, and only when it stores fewer than the value itself.
A packed value's chain has no element-wise steps: replaying a nonlinear op on a packed input
would bias its gradient.
"""

from __future__ import annotations

import operator

import torch
import torch.nn.functional as F
from torch.fx import Node

from actfx.passes.graph_facts import NON_TENSOR_ATTRS, NON_TENSOR_METHODS
from actfx.rules import aten_packet, is_pointwise
from actfx.variants.recompute import CHAIN, PREV

_KEEPS = {"reshape", "view", "_unsafe_view", "unsqueeze", "flatten", "contiguous", "clone", "alias", "slice",
          "getitem"}
_ENLARGES = {"expand", "repeat", "repeat_interleave"}
_FULL_END = 2 ** 62
_MAX_STEPS = 8


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


def _is_tensor(node: Node) -> bool:
    """Whether a graph value is a tensor (not a size): from its recorded value where there is one
    (export graphs), else from the op (``x.size(1)``, ``x.shape``, arithmetic on those)."""
    value = node.meta.get("val", node.meta.get("example_value"))
    if value is not None:
        return isinstance(value, torch.Tensor)
    if node.op == "call_method":
        return node.target not in NON_TENSOR_METHODS
    if node.op == "call_function" and node.target is getattr:
        return node.args[1] not in NON_TENSOR_ATTRS
    if node.op == "call_function" and node.target is operator.getitem:
        return _is_tensor(node.args[0])
    if node.op == "call_function" and getattr(node.target, "__module__", None) in ("_operator", "math", "builtins"):
        return any(_is_tensor(a) for a in node.all_input_nodes)
    return True


def _callable_ref(node: Node) -> tuple | None:
    """A printable name for the op ``node`` calls (graph code holds it as a constant)."""
    target = node.target
    if node.op == "call_method":
        return ("method", target)
    if isinstance(target, torch._ops.OpOverload):
        return ("aten", target._opname, target._overloadname)
    name = getattr(target, "__name__", None)
    for space, module in (("operator", operator), ("torch", torch), ("F", F)):
        if name and getattr(module, name, None) is target:
            return (space, name)
    return None


def _bytes(node: Node, views_free: bool = False) -> int | None:
    """Bytes ``node`` takes stored (kept as it is, ``views_free``: an expand is a view of its
    input's storage; packed, it is packed whole), or None when its size is not recorded."""
    if views_free and _name(node) == "expand" and isinstance(node.args[0], Node):
        return _bytes(node.args[0], views_free)
    value = node.meta.get("val")
    if not isinstance(value, torch.Tensor):
        return None
    numel = value.numel()
    try:
        numel = int(numel) if isinstance(numel, int) else int(numel.node.hint)
    except (TypeError, AttributeError):
        return None
    return numel * value.element_size()


def _step(node: Node, pointwise: bool) -> tuple[Node, list[Node]] | None:
    """(main input, side tensor inputs) when ``node`` may be a chain step, else None."""
    if _callable_ref(node) is None or not node.args:
        return None
    tensors = [a for a in node.all_input_nodes if _is_tensor(a)]
    name = _name(node)
    if name in _KEEPS or name in _ENLARGES:
        first = node.args[0]
        if not _keeps_all(node, name) or not isinstance(first, Node) or tensors != [first]:
            return None
        return first, []
    packet = aten_packet(node.op, node.target)
    if not pointwise or packet is None or not is_pointwise(packet) or str(name).endswith("_") or not tensors:
        return None
    sizes = [_bytes(t, True) for t in tensors]
    if None in sizes:
        return None
    main = tensors[sizes.index(max(sizes))]
    return main, [t for t in tensors if t is not main]


def replay_chain(node: Node, pointwise: bool = False) -> tuple[Node, list[Node]] | None:
    """(source, chain nodes from the source's reader to ``node``) when storing the source (and
    the chain's side inputs) takes fewer bytes than ``node``; ``pointwise`` allows element-wise
    steps (for values kept exact). None when there is no such chain."""
    path, current = [], node
    while len(path) < _MAX_STEPS:
        step = _step(current, pointwise)
        if step is None:
            break
        path.append((current, *step))
        current = step[0]
    whole = _bytes(node)
    if whole is None:  # no recorded sizes (an fx trace): views only, with an enlarging one
        if any(sides for _, _, sides in path) or not any(_name(n) in _ENLARGES for n, _, _ in path):
            return None
        return path[-1][1], [n for n, _, _ in reversed(path)]
    best, sides = None, 0
    for k, (_, main, side) in enumerate(path, 1):
        side_bytes = [_bytes(s, True) for s in side]
        if None in side_bytes:
            break
        sides += sum(side_bytes)
        source = _bytes(main, views_free=pointwise)  # a packed source is packed whole
        if source is not None and source + sides < whole and (best is None or source + sides < best[0]):
            best = (source + sides, k)
    if best is None:
        return None
    chain = path[: best[1]]
    return chain[-1][1], [n for n, _, _ in reversed(chain)]


def chain_inputs(source: Node, chain: list[Node]) -> set[Node]:
    """The graph tensors a replay reads: the source and every side input."""
    found = {source}
    previous = source
    for node in chain:
        found.update(a for a in node.all_input_nodes if a is not previous and _is_tensor(a))
        previous = node
    return found


def chain_template(source_slot, chain: list[Node], source: Node, mark) -> tuple:
    """A template ``actfx.variants.recompute.fill`` replays: (CHAIN, steps, source slot), each
    step (callable name, args, kwargs) with PREV where the chain's value goes; ``mark`` turns
    each other graph value a step reads (a size, a side input) into a slot."""
    steps, previous = [], source

    def arg(a, prev):
        return (PREV,) if a is prev else mark(a)

    for node in chain:
        args = torch.fx.node.map_arg(tuple(node.args), lambda a, p=previous: arg(a, p))
        kwargs = tuple((k, torch.fx.node.map_arg(v, lambda a, p=previous: arg(a, p))) for k, v in node.kwargs.items())
        steps.append((_callable_ref(node), args, kwargs))
        previous = node
    return CHAIN, tuple(steps), source_slot
