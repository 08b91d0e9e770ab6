"""Static facts about a traced graph that storage decisions depend on.

- which values come only from parameters and buffers (never compressed: casts under autocast,
  transposed weights and frozen weights included);
- which values are not tensors at all (sizes, dtypes);
- which values share storage (views, in-place results), so an in-place write invalidates
  every pack of that storage;
- which values are plain reshapes of another (a consumer can reshape a stored value back).
"""

from __future__ import annotations

import operator

import torch
from torch.fx import Graph, Node

_VIEW_METHODS = {
    "view", "reshape", "flatten", "unflatten", "squeeze", "unsqueeze", "transpose", "permute", "t",
    "expand", "expand_as", "contiguous", "narrow", "select", "chunk", "split", "unbind", "view_as",
    "reshape_as", "detach", "as_strided", "unfold", "movedim", "swapaxes", "swapdims", "type_as",
    "to", "float", "half", "bfloat16", "double", "type", "__getitem__",
}
_VIEW_FUNCTIONS = {
    torch.flatten, torch.reshape, torch.transpose, torch.permute, torch.squeeze, torch.unsqueeze,
    torch.chunk, torch.split, torch.narrow, torch.unbind, torch.movedim, torch.swapaxes, torch.t,
    torch.select, torch.detach, operator.getitem,
}
_RESHAPE_METHODS = {"view", "reshape", "flatten", "unflatten", "squeeze", "unsqueeze", "contiguous",
                    "view_as", "reshape_as", "to", "float", "half", "bfloat16", "type_as"}  # and casts
_RESHAPE_FUNCTIONS = {torch.flatten, torch.reshape, torch.squeeze, torch.unsqueeze}
NON_TENSOR_METHODS = {"size", "dim", "numel", "nelement", "ndimension", "item", "tolist", "stride",
                       "element_size", "get_device", "is_contiguous", "data_ptr"}
NON_TENSOR_ATTRS = {"shape", "dtype", "device", "ndim", "is_cuda", "requires_grad", "layout"}
_INPLACE_OPERATORS = {operator.setitem, operator.iadd, operator.isub, operator.imul, operator.itruediv,
                      operator.ifloordiv, operator.imod, operator.ipow, operator.iand, operator.ior,
                      operator.ixor, operator.ilshift, operator.irshift}


def _node_inputs(node: Node) -> list[Node]:
    return list(node.all_input_nodes)


def is_traced_constant(node: Node) -> bool:
    """A tensor made in forward (``torch.tensor(2.0)``), which fx stores on the traced module under
    the first free ``_tensor_constant<i>``: every trace makes a new tensor, so a second trace of
    the same module names it differently."""
    return node.op == "get_attr" and isinstance(node.target, str) and node.target.startswith("_tensor_constant")


def writes_first_argument(target) -> bool:
    """Whether a called function writes into its first argument: `torch.relu_`-style names, and
    ATen overloads (`aten.add_.Tensor`, from torch.export) whose schema marks the write."""
    if isinstance(target, torch._ops.OpOverload):
        args = target._schema.arguments
        return bool(args) and args[0].alias_info is not None and args[0].alias_info.is_write
    if isinstance(target, torch._ops.OpOverloadPacket):
        target = target.__name__
    name = target if isinstance(target, str) else getattr(target, "__name__", "")
    return name.endswith("_") and not name.startswith("__")


class GraphFacts:
    def __init__(self, graph: Graph):
        self.graph = graph
        self._param_like: dict[Node, bool] = {}
        self._non_tensor: dict[Node, bool] = {}
        self._no_gradient: dict[Node, bool] = {}
        self._root: dict[Node, Node] = {}
        for node in graph.nodes:
            self._classify(node)

    # ------------------------------------------------------------ classification

    def _classify(self, node: Node) -> None:
        ins = _node_inputs(node)
        if node.op == "get_attr":
            self._param_like[node] = True
        elif node.op == "placeholder":
            self._param_like[node] = False
        elif node.op == "call_module" and not ins:
            self._param_like[node] = True  # reads only its own state: a parametrization's weight
        else:
            self._param_like[node] = bool(ins) and all(self._param_like.get(i, False) for i in ins)
        self._non_tensor[node] = self._is_non_tensor(node, ins)
        self._no_gradient[node] = self._is_no_gradient(node, ins)
        self._root[node] = node
        if self._aliases_input(node) and ins:
            self._union(node, ins[0])

    def _is_no_gradient(self, node: Node, ins: list[Node]) -> bool:
        val = node.meta.get("val")
        if self._non_tensor[node] or (isinstance(val, torch.Tensor) and not val.is_floating_point()
                                      and not val.is_complex()):
            return True
        if node.op == "get_attr":  # a buffer, a constant or a frozen parameter
            try:
                value = operator.attrgetter(node.target)(self.graph.owning_module)
            except AttributeError:  # nothing the graph's owner holds (or no owner)
                return False
            return isinstance(value, torch.Tensor) and not value.requires_grad
        if node.op in ("placeholder", "call_module"):
            return False
        return all(self._no_gradient.get(i, False) for i in ins)

    def _is_non_tensor(self, node: Node, ins: list[Node]) -> bool:
        if node.op == "call_method" and node.target in NON_TENSOR_METHODS:
            return True
        if node.op == "call_function" and node.target is getattr and len(node.args) > 1:
            return node.args[1] in NON_TENSOR_ATTRS
        if node.op == "call_function" and getattr(node.target, "__module__", None) in (
            "_operator", "operator", "math", "builtins"):
            return bool(ins) and all(self._non_tensor.get(i, False) for i in ins)
        return False

    def _aliases_input(self, node: Node) -> bool:
        if node.op == "call_method":
            return node.target in _VIEW_METHODS or node.target.endswith("_")
        if node.op == "call_function":
            return (node.target in _VIEW_FUNCTIONS or node.target in _INPLACE_OPERATORS
                    or node.kwargs.get("inplace") is True or writes_first_argument(node.target))
        return False

    def _find(self, node: Node) -> Node:
        while self._root[node] is not node:
            self._root[node] = self._root[self._root[node]]
            node = self._root[node]
        return node

    def _union(self, a: Node, b: Node) -> None:
        if a in self._root and b in self._root:
            self._root[self._find(a)] = self._find(b)

    # ------------------------------------------------------------ queries

    def is_parameter_like(self, node: Node) -> bool:
        return self._param_like.get(node, False)

    def is_non_tensor(self, node: Node) -> bool:
        return self._non_tensor.get(node, False)

    def needs_no_gradient(self, node: Node) -> bool:
        """Computed from buffers, constants, sizes and integer inputs only (RoPE's cos and sin):
        no gradient can reach it. Unknown (a module call, a float input) counts as needing one."""
        return self._no_gradient.get(node, False)

    def same_storage(self, a: Node, b: Node) -> bool:
        return a in self._root and b in self._root and self._find(a) is self._find(b)

    def reshape_source(self, node: Node) -> Node | None:
        """The tensor ``node`` is a pure reshape or float cast of, if it is one (dropout with p=0
        included: attention probabilities pass through one on their way to the value matmul);
        a consumer rebuilds it from the source's stored form (casts to non-float types keep
        the value at run time)."""
        if node.op == "call_method" and node.target in _RESHAPE_METHODS:
            src = node.args[0]
        elif node.op == "call_function" and node.target in _RESHAPE_FUNCTIONS:
            src = node.args[0] if node.args else node.kwargs.get("input")
        elif self._dropout_probability(node) == 0:
            src = node.args[0] if node.args else node.kwargs.get("input")
        else:
            return None
        return src if isinstance(src, Node) else None

    def _dropout_probability(self, node: Node):
        if node.op == "call_function" and node.target in (torch.nn.functional.dropout, torch.dropout):
            p = node.args[1] if len(node.args) > 1 else node.kwargs.get("p", 0.5)
            return p if isinstance(p, (int, float)) else None
        if node.op == "call_module" and len(node.args) == 1:
            module = self._module(node)
            return module.p if type(module) is torch.nn.Dropout else None
        return None

    def add_terms(self, node: Node) -> tuple[Node, Node] | None:
        """(a, b) when ``node`` is a plain ``a + b`` of two tensors (a residual add)."""
        if node.op == "call_function" and node.target in (operator.add, torch.add) and len(node.args) == 2 \
                and not node.kwargs:
            a, b = node.args
        elif node.op == "call_method" and node.target == "add" and len(node.args) == 2 and not node.kwargs:
            a, b = node.args
        else:
            return None
        if not (isinstance(a, Node) and isinstance(b, Node)) or self.is_non_tensor(a) or self.is_non_tensor(b):
            return None
        if self.is_parameter_like(a) or self.is_parameter_like(b):
            return None
        return a, b

    def mutated_input(self, node: Node, site) -> Node | None:
        """The input ``node`` writes into, if it is an in-place op."""
        if site is not None:
            return site.inplace_on
        if node.op == "call_method" and node.target.endswith("_") and not node.target.startswith("__"):
            return node.args[0] if node.args and isinstance(node.args[0], Node) else None
        if node.op == "call_module" and getattr(self._module(node), "inplace", False):
            return node.args[0] if node.args and isinstance(node.args[0], Node) else None
        if node.op == "call_function":
            if node.target in _INPLACE_OPERATORS or node.kwargs.get("inplace") is True or (
                writes_first_argument(node.target)
            ):
                first = node.args[0] if node.args else None
                return first if isinstance(first, Node) else None
        return None

    def _module(self, node: Node):
        root = self.graph.owning_module
        try:
            return root.get_submodule(node.target) if root is not None else None
        except AttributeError:
            return None

    @staticmethod
    def module_path(node: Node) -> str | None:
        """The innermost module a call_function / call_method node was traced inside."""
        stack = node.meta.get("nn_module_stack")
        if not stack:
            return None
        return next(reversed(stack.values()))[0] or None


def attribute(root, target: str):
    """What the dotted path ``target`` (a ``get_attr`` node's) names on ``root``, or None."""
    value = root
    for name in str(target).split("."):
        value = getattr(value, name, None)
    return value
