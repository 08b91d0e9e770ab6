"""The partitioned forward/backward pair seen as saved values, and small facts about fx nodes.

The partitioner's forward returns the model's outputs, then the saved tensors, then saved
sizes; the backward takes the sizes, then the same saved tensors in the same order, then the
gradients. ``SavedPair`` keeps both sides in step while the compiled-path passes add, replace and
drop saved values.
"""

from __future__ import annotations

import operator
import re

import torch
from torch import fx

from actfx.rules import Kind, rule_for

aten = torch.ops.aten


def val(node):
    return node.meta.get("val") if isinstance(node, fx.Node) else None


def is_tensor(node) -> bool:
    return isinstance(val(node), torch.Tensor)


def hint(n) -> int:
    return n if isinstance(n, int) else int(n.node.hint)


def numel(node) -> int:
    return hint(val(node).numel())


def nbytes(node) -> int:
    return numel(node) * val(node).element_size()


def module_path(node: fx.Node, depth: int = 3) -> str:
    """The module that made ``node`` (dynamo's ``nn_module_stack``). A node the partitioner moved
    from backward into forward (a ReLU's ``le(y, 0)`` mask) has none: it takes the module of its
    first input that has one, up to ``depth`` inputs back (that ReLU's output)."""
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        if depth and node.op == "call_function":
            return next((p for p in (module_path(a, depth - 1) for a in node.all_input_nodes) if p), "")
        return ""
    path = list(stack.values())[-1][0]
    path = re.sub(r"^L\['[^']*'\]\.?", "", path)
    path = re.sub(r"^__self__\.?", "", path)
    # dynamo's sources: ``_modules['gen']``, ``__dict__['_modules']['gen']`` (a module with hooks), ``[0]``
    path = re.sub(r"(?:__dict__\['_modules'\]|_modules)\['([^']*)'\]", r".\1", path)
    path = re.sub(r"\[(\d+)\]", r".\1", path)
    return re.sub(r"\.+", ".", path).strip(".")


def pointwise(node: fx.Node) -> bool:
    return (node.op == "call_function" and isinstance(node.target, torch._ops.OpOverload)
            and torch.Tag.pointwise in node.target.tags and is_tensor(node))


def view_like(node: fx.Node) -> bool:
    rule = rule_for(node.target)
    return node.op == "call_function" and len(node.all_input_nodes) == 1 and rule.kind is Kind.LINEAR \
        and not rule.shape_only


# views that keep the elements in their order: a reshape of a value is a reshape of any of these
ORDER_KEEPING_VIEWS = {aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.alias.default}


def reshape_base(node: fx.Node) -> fx.Node:
    """The value ``node`` reshapes (through ``ORDER_KEEPING_VIEWS``), itself if none."""
    while node.op == "call_function" and node.target in ORDER_KEEPING_VIEWS:
        node = node.args[0]
    return node


def static_shape(node) -> bool:
    return all(isinstance(s, int) for s in val(node).shape)


def op_name(node: fx.Node) -> str:
    target = node.target
    return str(target) if node.op == "call_function" else node.op


RANDOM_OPS = {aten.rand.default, aten.rand_like.default, aten.randn.default, aten.bernoulli.default,
               aten.native_dropout.default}


class SavedPair:
    """The partitioned pair, with the saved tensors as (forward node, backward placeholder).

    Forward outputs after the model's own are the saved values, tensors in the same order as the
    backward's tensor placeholders; every change here keeps both orders in step.
    """

    def __init__(self, fwd: fx.GraphModule, bwd: fx.GraphModule, num_fwd_outputs: int):
        self.fwd, self.bwd = fwd.graph, bwd.graph
        self.fwd_output = next(iter(self.fwd.find_nodes(op="output")))
        self.num_fwd_outputs = num_fwd_outputs
        by_name = {n.name: n for n in self.bwd.find_nodes(op="placeholder")}
        self.placeholder_of: dict[fx.Node, fx.Node] = {}
        for node in self.outputs()[num_fwd_outputs:]:
            if is_tensor(node) and node.name in by_name:
                self.placeholder_of[node] = by_name[node.name]
        self.renumber()

    def outputs(self) -> list:
        return list(self.fwd_output.args[0])

    def saved_tensors(self) -> list[tuple[fx.Node, fx.Node]]:
        return [(node, self.placeholder_of[node]) for node in self.outputs()[self.num_fwd_outputs:]
                if node in self.placeholder_of]

    def inputs_with_gradient(self) -> set[fx.Node]:
        """Forward inputs the backward returns a gradient for. Parameters aside, such an input is
        an activation an earlier graph handed over (a graph break), not data the caller keeps:
        saved exact, it alone stays alive for backward. The backward returns one gradient (or
        None) per forward input, in order; where the counts differ, none is claimed."""
        inputs = list(self.fwd.find_nodes(op="placeholder"))
        grads = next(iter(self.bwd.find_nodes(op="output"))).args[0]
        if not isinstance(grads, (tuple, list)) or len(grads) != len(inputs):
            return set()
        return {node for node, grad in zip(inputs, grads) if isinstance(grad, fx.Node)}

    def set_outputs(self, outputs: list) -> None:
        self.fwd_output.update_arg(0, tuple(outputs))

    def renumber(self) -> None:
        self.order = {n: i for i, n in enumerate(self.fwd.nodes)}

    def _saved_index(self, fwd_node: fx.Node) -> int:
        outputs = self.outputs()
        return next(i for i in range(self.num_fwd_outputs, len(outputs)) if outputs[i] is fwd_node)

    def add_saved(self, fwd_node: fx.Node, like: fx.Node) -> fx.Node:
        """Save ``fwd_node`` too, placed just before the saved value ``like`` on both sides;
        returns its new backward placeholder."""
        outputs = self.outputs()
        index = self._saved_index(like)
        self.set_outputs(outputs[:index] + [fwd_node] + outputs[index:])
        with self.bwd.inserting_before(self.placeholder_of[like]):
            placeholder = self.bwd.placeholder(fwd_node.name)
        # The graph may have renamed it (a backward node has that name); the generated code names
        # the argument after the target, so a stale target would read that other node's value.
        placeholder.target = placeholder.name
        placeholder.meta.update(fwd_node.meta)
        self.placeholder_of[fwd_node] = placeholder
        return placeholder

    def drop_saved(self, fwd_node: fx.Node) -> None:
        outputs = self.outputs()
        index = self._saved_index(fwd_node)
        self.set_outputs(outputs[:index] + outputs[index + 1:])
        placeholder = self.placeholder_of.pop(fwd_node)
        if placeholder.users:
            raise RuntimeError(f"actfx: saved value {fwd_node.format_node()} is still read by backward")
        self.bwd.erase_node(placeholder)


def written_inputs(graph: fx.Graph) -> set[fx.Node]:
    """Nodes the graph writes in place (a buffer the step updates: spectral norm's vectors,
    copied into their buffers at the graph's end). What is computed from them must not be made
    again in backward, which would read the new values."""
    written = set()
    for node in graph.nodes:
        schema = getattr(node.target, "_schema", None)
        if node.op != "call_function" or schema is None or not schema.is_mutable:
            continue
        for argument, value in zip(schema.arguments, node.args):
            if argument.alias_info is not None and argument.alias_info.is_write and isinstance(value, fx.Node):
                written.add(value)
    return written


def parameter_nodes(fwd: fx.Graph, static_indices) -> set[fx.Node]:
    """Forward nodes computed from parameters and buffers alone (their views and casts)."""
    placeholders = list(fwd.find_nodes(op="placeholder"))
    params = {placeholders[i] for i in (static_indices or ()) if i < len(placeholders)}
    for node in fwd.nodes:
        if node.op == "call_function" and node.all_input_nodes and all(a in params for a in node.all_input_nodes):
            params.add(node)
    return params


# Per-row / per-channel statistics of a normalisation: one value per row, tiny next to the rows
# themselves, and every gradient of the norm is scaled by them.
_STATISTICS = {aten.rsqrt.default, aten.mean.dim, aten.var.correction}


def is_normalisation_statistic(node: fx.Node) -> bool:
    """A mean, variance or rstd a normalisation computes (not a view of one)."""
    if node.target is operator.getitem and isinstance(node.args[0], fx.Node):
        source = node.args[0]
        return source.target is aten.var_mean.correction or (
            source.target in (aten.native_layer_norm.default, aten.native_batch_norm.default) and node.args[1] > 0)
    return node.target in _STATISTICS and any(hint(s) == 1 for s in val(node).shape)
