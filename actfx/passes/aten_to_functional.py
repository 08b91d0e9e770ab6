"""Turn the ATen calls of a torch.export graph back into the Python-level calls actfx recognises.

torch.export's training IR records ``aten.linear.default``, ``aten.view.default``, ...; actfx's
matchers (``sites.py``) and graph facts (``graph_facts.py``) know ``F.linear``, ``x.view(...)``.
Every replacement here is a call that dispatches to the very same ATen op with the same
arguments, so outputs are bitwise identical. Views, shape reads and in-place ops become Tensor
method calls so the analysis sees what aliases, what writes and what is not a tensor. Ops
without a mapping are left as they are.
"""

from __future__ import annotations

import operator
from typing import Callable

import torch
import torch.nn.functional as F
from torch.fx import Graph, Node

from actfx.passes.norm_divisions import fold_normalize_calls

aten = torch.ops.aten


def schema_arguments(node: Node) -> dict:
    """The node's arguments by ATen schema name, defaults filled in."""
    out = {}
    for i, arg in enumerate(node.target._schema.arguments):
        if not arg.kwarg_only and i < len(node.args):
            out[arg.name] = node.args[i]
        elif arg.name in node.kwargs:
            out[arg.name] = node.kwargs[arg.name]
        elif arg.has_default_value():
            out[arg.name] = arg.default_value
    return out


def _call(fn, *positional: str, keywords: tuple = (), fixed: dict | None = None, when=None):
    """A builder: ``fn(a[p0], a[p1], ..., k=a[k]..., **fixed)`` from the schema arguments ``a``.

    ``keywords`` are names passed by keyword (the same name in the schema and in ``fn``);
    ``when(a)`` returns False for calls ``fn`` cannot express exactly (left alone).
    """

    def build(a: dict):
        if when is not None and not when(a):
            return None
        kwargs = {k: a[k] for k in keywords}
        kwargs.update(fixed or {})
        return "call_function", fn, tuple(a[p] for p in positional), kwargs

    return build


def _embedding(a: dict):
    # F.embedding turns padding_idx None into -1 and a negative one into size + index, so only
    # -1 and non-negative indices come from it.
    idx = a["padding_idx"]
    if not isinstance(idx, int) or idx < -1:
        return None
    return "call_function", F.embedding, (a["indices"], a["weight"]), {
        "padding_idx": None if idx == -1 else idx, "scale_grad_by_freq": a["scale_grad_by_freq"],
        "sparse": a["sparse"]}


_REDUCTIONS = ("none", "mean", "sum")  # ATen's Reduction enum, by value


def _reduced(fn, *positional: str, extra: tuple = ()):
    """A builder for an element-wise loss F.<loss> calls with its reduction string turned into the
    enum (``extra``: keyword arguments of the same name in both)."""

    def build(a: dict):
        reduction = a["reduction"]
        if not isinstance(reduction, int) or not 0 <= reduction < len(_REDUCTIONS):
            return None
        kwargs = {"reduction": _REDUCTIONS[reduction], **{k: a[k] for k in extra}}
        return "call_function", fn, tuple(a[p] for p in positional), kwargs

    return build


def _loss(fn, *extra: str):
    """A builder for a loss op F.<loss> calls with its reduction string turned into the enum."""

    def build(a: dict):
        reduction = a["reduction"]
        if not isinstance(reduction, int) or not 0 <= reduction < len(_REDUCTIONS):
            return None
        kwargs = {"ignore_index": a["ignore_index"], "reduction": _REDUCTIONS[reduction], **{k: a[k] for k in extra}}
        return "call_function", fn, (a["self"], a["target"], a["weight"]), kwargs

    return build


def _alpha_one(a: dict) -> bool:
    return a.get("alpha", 1) == 1


def _not_half_to_float(a: dict) -> bool:
    return a["half_to_float"] is False


_CONV = (aten.conv1d, F.conv1d), (aten.conv2d, F.conv2d), (aten.conv3d, F.conv3d)
_CONV_T = ((aten.conv_transpose1d.default, F.conv_transpose1d), (aten.conv_transpose2d.input, F.conv_transpose2d),
           (aten.conv_transpose3d.input, F.conv_transpose3d))
_CONV_ARGS = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
_CONV_T_ARGS = ("input", "weight", "bias", "stride", "padding", "output_padding", "groups", "dilation")

# ATen overload -> builder(schema arguments) -> (op, target, args, kwargs) or None
_FUNCTIONS: dict = {
    aten.linear.default: _call(F.linear, "input", "weight", "bias"),
    **{packet.default: _call(fn, *_CONV_ARGS) for packet, fn in _CONV},
    **{packet.padding: _call(fn, *_CONV_ARGS) for packet, fn in _CONV},
    **{op: _call(fn, *_CONV_T_ARGS) for op, fn in _CONV_T},
    aten.relu.default: _call(torch.relu, "self"),
    aten.relu_.default: _call(torch.relu_, "self"),
    aten.relu6.default: _call(F.relu6, "self"),
    aten.hardtanh.default: _call(F.hardtanh, "self", "min_val", "max_val"),
    aten.hardtanh_.default: _call(F.hardtanh, "self", "min_val", "max_val", fixed={"inplace": True}),
    aten.leaky_relu.default: _call(F.leaky_relu, "self", "negative_slope"),
    aten.leaky_relu_.default: _call(F.leaky_relu, "self", "negative_slope", fixed={"inplace": True}),
    aten.gelu.default: _call(F.gelu, "self", keywords=("approximate",)),
    aten.silu.default: _call(F.silu, "self"),
    aten.silu_.default: _call(F.silu, "self", fixed={"inplace": True}),
    aten.sigmoid.default: _call(torch.sigmoid, "self"),
    aten.tanh.default: _call(torch.tanh, "self"),
    aten.layer_norm.default: _call(F.layer_norm, "input", "normalized_shape", "weight", "bias", "eps"),
    aten.group_norm.default: _call(F.group_norm, "input", "num_groups", "weight", "bias", "eps"),
    aten.rms_norm.default: _call(F.rms_norm, "input", "normalized_shape", "weight", "eps"),
    # nn.InstanceNorm*d (torchvision's RAFT encoder): F.instance_norm calls this op (cuDNN flag as for batch_norm)
    aten.instance_norm.default: _call(F.instance_norm, "input", "running_mean", "running_var", "weight", "bias",
                                      "use_input_stats", "momentum", "eps"),
    # F.batch_norm is what nn.BatchNorm*d calls; it passes the live cudnn flag, which export
    # records as False because it traces with cuDNN switched off. Running-stat updates happen
    # inside the op on the buffers it is given, as in eager.
    aten.batch_norm.default: _call(F.batch_norm, "input", "running_mean", "running_var", "weight", "bias",
                                   "training", "momentum", "eps"),
    aten.dropout.default: _call(torch.dropout, "input", "p", "train"),
    aten.dropout_.default: _call(F.dropout, "self", "p", "train", fixed={"inplace": True}),
    aten.scaled_dot_product_attention.default: _call(
        F.scaled_dot_product_attention, "query", "key", "value",
        keywords=("attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")),
    aten.mul.Tensor: _call(operator.mul, "self", "other"),
    aten.multiply.Tensor: _call(operator.mul, "self", "other"),  # ConvBert spells it torch.multiply
    aten.div.Tensor: _call(operator.truediv, "self", "other"),
    aten.divide.Tensor: _call(operator.truediv, "self", "other"),
    aten.true_divide.Tensor: _call(operator.truediv, "self", "other"),
    aten.add.Tensor: _call(operator.add, "self", "other", when=_alpha_one),
    aten.sub.Tensor: _call(operator.sub, "self", "other", when=_alpha_one),
    aten.neg.default: _call(operator.neg, "self"),
    aten.matmul.default: _call(torch.matmul, "self", "other"),
    aten.bmm.default: _call(torch.bmm, "self", "mat2"),
    aten.softmax.int: _call(torch.softmax, "self", "dim", keywords=("dtype",)),
    aten._softmax.default: _call(torch.softmax, "self", "dim", when=_not_half_to_float),
    aten.log_softmax.int: _call(torch.log_softmax, "self", "dim", keywords=("dtype",)),
    aten._log_softmax.default: _call(torch.log_softmax, "self", "dim", when=_not_half_to_float),
    aten.max_pool1d.default: _call(F.max_pool1d, "self", "kernel_size", "stride", "padding", "dilation", "ceil_mode"),
    aten.max_pool2d.default: _call(F.max_pool2d, "self", "kernel_size", "stride", "padding", "dilation", "ceil_mode"),
    aten.max_pool3d.default: _call(F.max_pool3d, "self", "kernel_size", "stride", "padding", "dilation", "ceil_mode"),
    # (values, indices): max pooling asked for its indices, adaptive max pooling always
    **{getattr(aten, f"max_pool{n}d_with_indices").default: _call(
        getattr(F, f"max_pool{n}d_with_indices"), "self", "kernel_size", "stride", "padding", "dilation", "ceil_mode")
       for n in (1, 2, 3)},
    **{getattr(aten, f"adaptive_max_pool{n}d").default: _call(
        getattr(F, f"adaptive_max_pool{n}d_with_indices"), "self", "output_size") for n in (1, 2, 3)},
    aten.avg_pool1d.default: _call(F.avg_pool1d, "self", "kernel_size", "stride", "padding", "ceil_mode",
                                   "count_include_pad"),
    aten.avg_pool2d.default: _call(F.avg_pool2d, "self", "kernel_size", "stride", "padding", "ceil_mode",
                                   "count_include_pad", "divisor_override"),
    aten.avg_pool3d.default: _call(F.avg_pool3d, "self", "kernel_size", "stride", "padding", "ceil_mode",
                                   "count_include_pad", "divisor_override"),
    aten.adaptive_avg_pool1d.default: _call(F.adaptive_avg_pool1d, "self", "output_size"),
    aten.adaptive_avg_pool2d.default: _call(F.adaptive_avg_pool2d, "self", "output_size"),
    aten.adaptive_avg_pool3d.default: _call(F.adaptive_avg_pool3d, "self", "output_size"),
    aten.embedding.default: _embedding,
    aten.cross_entropy_loss.default: _loss(F.cross_entropy, "label_smoothing"),  # Hugging Face's loss functions
    aten.nll_loss_nd.default: _loss(F.nll_loss),
    aten.mse_loss.default: _reduced(F.mse_loss, "self", "target"),
    aten.l1_loss.default: _reduced(F.l1_loss, "self", "target"),
    aten.smooth_l1_loss.default: _reduced(F.smooth_l1_loss, "self", "target", extra=("beta",)),
    aten.huber_loss.default: _reduced(F.huber_loss, "self", "target", extra=("delta",)),
    aten.soft_margin_loss.default: _reduced(F.soft_margin_loss, "self", "target"),
    aten.binary_cross_entropy.default: _reduced(F.binary_cross_entropy, "self", "target", extra=("weight",)),
    aten.binary_cross_entropy_with_logits.default: _reduced(
        F.binary_cross_entropy_with_logits, "self", "target", extra=("weight", "pos_weight")),
    aten.cat.default: _call(torch.cat, "tensors", "dim"),
    # torch.fft's functions are these ATen ops under their own names (FNO's spectral convolutions)
    **{getattr(aten, f"fft_{name}").default: _call(getattr(torch.fft, name), "self", "n" if name[-1] == "t" else "s",
                                                  "dim", "norm")
       for name in ("fft", "rfft", "fft2", "rfft2", "fftn", "rfftn")},
    aten.stack.default: _call(torch.stack, "tensors", "dim"),
}

# ATen overload -> Tensor method taking the same arguments in the same order (schema names and
# Tensor method names come from the same native function declarations).
_METHODS = {
    aten.sym_size.int: "size",
    aten.view.default: "view",
    aten.reshape.default: "reshape",
    aten.permute.default: "permute",
    aten.transpose.int: "transpose",
    aten.t.default: "t",
    aten.unsqueeze.default: "unsqueeze",
    aten.squeeze.default: "squeeze",
    aten.squeeze.dim: "squeeze",
    aten.squeeze.dims: "squeeze",
    aten.expand.default: "expand",
    aten.contiguous.default: "contiguous",
    aten.flatten.using_ints: "flatten",
    aten.unflatten.int: "unflatten",
    aten.split.Tensor: "split",
    aten.split_with_sizes.default: "split",
    aten.chunk.default: "chunk",
    aten.unbind.int: "unbind",
    aten.select.int: "select",
    aten.narrow.default: "narrow",
    aten.detach.default: "detach",
    aten.to.dtype: "to",
    aten.mean.default: "mean",
    aten.mean.dim: "mean",
    aten.sum.default: "sum",
    aten.sum.dim_IntList: "sum",
}

# Methods whose Python binding takes fewer arguments by position than the schema: how many it
# takes (self included); the rest go by their schema names. Export records
# ``x.to(torch.float32, memory_format=...)`` (Qwen3-Next's gated delta rule) with the memory
# format fifth by position, which ``Tensor.to`` refused, so the captured graph did not run.
_POSITIONAL_LIMIT = {aten.to.dtype: 4}


def _inplace_method(target) -> str | None:
    """``add_`` for ``aten.add_.Tensor`` and other ops writing into their first argument."""
    schema = target._schema
    if not schema.arguments or not schema.name.startswith("aten::"):
        return None
    first = schema.arguments[0].alias_info
    name = schema.name[len("aten::"):]
    if first is None or not first.is_write or not name.endswith("_") or not hasattr(torch.Tensor, name):
        return None
    return name


def _replacement(node: Node) -> tuple | None:
    """(op, target, args, kwargs) for ``node``, or None when it stays as it is."""
    if node.op != "call_function" or not isinstance(node.target, torch._ops.OpOverload):
        return None
    build: Callable | None = _FUNCTIONS.get(node.target)
    if build is not None:
        try:
            return build(schema_arguments(node))
        except KeyError as err:
            raise ValueError(f"actfx: {node.format_node()} lacks the argument {err} its schema requires") from None
    method = _METHODS.get(node.target) or _inplace_method(node.target)
    if method is not None and not _holes_in_optional_lists(node):
        limit = _POSITIONAL_LIMIT.get(node.target, len(node.args))
        names = [a.name for a in node.target._schema.arguments]
        return "call_method", method, tuple(node.args[:limit]), {**dict(zip(names[limit:], node.args[limit:])),
                                                                 **node.kwargs}
    return None


def _holes_in_optional_lists(node: Node) -> bool:
    """A ``Tensor?[]`` argument holding None (``out[:, idx] = v`` is ``index_put_(out, [None, idx],
    v)``): the Tensor methods take tensors only there, so the ATen op stays."""
    for argument, value in zip(node.target._schema.arguments, node.args):
        if str(argument.type) == "List[Optional[Tensor]]" and isinstance(value, (list, tuple)) and None in value:
            return True
    return False


def to_functional(graph: Graph) -> bool:
    """Rewrite ``graph``'s ATen calls in place (see the module docstring); True if any changed."""
    changed = fold_normalize_calls(graph)  # before its division becomes an operator
    for node in list(graph.nodes):
        new = _replacement(node)
        if new is None:
            continue
        op, target, args, kwargs = new
        with graph.inserting_before(node):
            replacement = graph.create_node(op, target, args, kwargs)
        replacement.meta.update(node.meta)
        node.replace_all_uses_with(replacement)
        graph.erase_node(node)
        changed = True
    if changed:
        graph.lint()
        if graph.owning_module is not None:
            graph.owning_module.recompile()
    return changed
