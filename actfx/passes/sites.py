"""Recognise the fx nodes actfx has a compressed-save variant for, in module, functional and method form.

``find_site(node, modules)`` returns a ``Site`` (see site.py) from the family modules
``site_layers``, ``site_activations``, ``site_elementwise``, ``site_attention`` and
``site_reductions``; nodes without
a variant get ``None`` and stay as they are (correct, uncompressed, reported), except the ops
``saves_nothing`` knows keep nothing worth compressing.
"""

from __future__ import annotations

import functools
import operator

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.amp.autocast_mode import _enter_autocast, _exit_autocast
from torch.fx import Node

from actfx.passes.site import Site, _bias_node, _get
from actfx.passes.site_activations import (
    AMINMAXES, _ADAPTIVE_MAX_FUNCS, _EXTREMUM_FUNCS, _EXTREMUM_METHODS, _GLU_FUNCS, _MAX_POOL_FUNCS, _PRELU_FUNCS,
    _REDUCED_EXTREMA, _RELU_FUNCS, _WITH_INDICES, _dropout_site, _max_pool_functional, _max_pool_module,
    _relu_functional, _relu_like_site, _relu_module, _threshold_functional, extremum_site, glu_functional, glu_site,
    aminmax_site, prelu_functional, prelu_site, reduced_extremum_site,
)
from actfx.passes.site_attention import (
    _ADDCMUL, _PRODUCT_FUNCS, _PRODUCT_METHODS, _RECOMPUTED_MODULES, RECURRENT_OPS, _module_recompute_site, _product,
    recurrent_op_site, _sdpa,
    _softmax_functional, _softmax_site, addcmul_site,
)
from actfx.passes.site_elementwise import (
    _ELEMENTWISE, _ELEMENTWISE_METHODS, _SHAPE_ONLY, INDEX_ADDS, _module_as_call, _recompute_functional, _recompute_method,
    _recompute_site, baddbmm_site, cross_entropy_site, custom_function_site, einsum_site, index_add_site,
    inplace_pointwise_site, nll_loss_site, interpolate_site, pad_site, pointwise_site, several_pointwise_site,
    softmax_then_site,
)
from actfx.passes.site_layers import (
    _CONV_FUNCS, _addmm, _batch_norm_functional, _batch_norm_module, _conv_functional, _conv_module,
    _GRID_SAMPLERS, _linear_site, _norm_functional, _norm_module, _rms_norm_functional, _rms_norm_module,
    GATHERS, MASKED_SELECTS, divided_by_norm_site, embedding_site, gather_site, grid_sample_site,
    grouped_mm_implementation, grouped_mm_site, linalg_norm_site, masked_select_site, normalize_site, rms_normalize_site,
    torch_norm_site, vector_norm_site,
)
from actfx.passes.site_reductions import (
    CDISTS, DEVIATIONS, EXTREMA_OVER_A_DIM, LOGSUMEXPS, ROW_DISTANCES, SCATTER_REDUCES, SELECTIONS, cdist_site,
    deviation_site, kl_div_site,
    logsumexp_site, loss_site, row_distance_module_site, row_distance_site, scatter_reduce_site, selection_site,
)
from actfx.variants.loss_gradient import LOSS_MODULES, LOSSES
from actfx.passes.capture import has_hooks
from actfx.passes.signatures import bind
from actfx.variants.normalize import divided_by_norm
from actfx.variants.rmsnorm import rms_normalize

__all__ = ["Site", "checkpoint_site", "find_site", "saves_nothing"]


# ---------------------------------------------------------------- dispatch

def _loss_weight(node, path, m):
    return (lambda g: _get(g, path, "weight")) if getattr(m, "weight", None) is not None else None


_MODULE_HANDLERS = [
    ((nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d), _conv_module),
    ((nn.Linear,), lambda node, path, m: (len(node.args) == 1 and not node.kwargs) and _linear_site(
        node, path, node.args[0], lambda g: _get(g, path, "weight"), lambda g: _bias_node(g, path, m)) or None),
    ((nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d), _batch_norm_module),
    ((nn.LayerNorm, nn.GroupNorm, nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d), _norm_module),
    ((nn.RMSNorm,), _rms_norm_module),
    ((nn.CosineSimilarity, nn.PairwiseDistance), row_distance_module_site),
    ((nn.Embedding,), lambda node, path, m: embedding_site(node, path, m)),
    (_RECOMPUTED_MODULES, _module_recompute_site),
    ((nn.Softmax,), lambda node, path, m: m.dim is not None and len(node.args) == 1 and _softmax_site(
        node, path, node.args[0], m.dim, None) or None),
    ((nn.Softmin,), lambda node, path, m: m.dim is not None and len(node.args) == 1 and _softmax_site(
        node, path, node.args[0], m.dim, None, negated=True) or None),
    ((nn.Softmax2d,), lambda node, path, m: len(node.args) == 1 and _softmax_site(node, path, node.args[0], -3, None)),
    ((nn.ReLU, nn.LeakyReLU, nn.Hardtanh, nn.ReLU6, nn.Threshold), _relu_module),
    ((nn.GLU,), lambda node, path, m: len(node.args) == 1 and not node.kwargs and glu_site(
        node, path, node.args[0], m.dim) or None),
    ((nn.PReLU,), lambda node, path, m: len(node.args) == 1 and not node.kwargs and prelu_site(
        node, path, node.args[0], lambda g: _get(g, path, "weight")) or None),
    ((nn.CrossEntropyLoss,), lambda node, path, m: len(node.args) == 2 and not node.kwargs and cross_entropy_site(
        node, path, node.args[0], node.args[1], _loss_weight(node, path, m), m.ignore_index, m.reduction,
        m.label_smoothing) or None),
    ((nn.KLDivLoss,), lambda node, path, m: kl_div_site(node, path, m)),
    (tuple(LOSS_MODULES), lambda node, path, m: loss_site(node, m, path, LOSS_MODULES[type(m)])),
    ((nn.NLLLoss,), lambda node, path, m: nll_loss_site(node, path, m)),
    ((nn.Dropout,), lambda node, path, m: len(node.args) == 1 and _dropout_site(
        node, path, node.args[0], None, None, m.inplace, module=True) or None),
    ((nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d,
      nn.AdaptiveMaxPool3d), _max_pool_module),
]

_LAZY = (nn.modules.lazy.LazyModuleMixin,)

# Ops whose backward needs no activation (or only sizes): nothing to compress, nothing to report.
_NOTHING_SAVED_FUNCTIONS = {
    operator.add, operator.sub, operator.neg, operator.getitem, operator.iadd, operator.isub, torch.add,
    torch.sub, torch.cat, torch.stack, torch.flatten, torch.reshape, torch.transpose, torch.permute,
    torch.squeeze, torch.unsqueeze, torch.chunk, torch.split, torch.narrow, torch.mean, torch.sum,
    torch.neg, F.pad, F.interpolate, F.adaptive_avg_pool1d, torch.unbind, torch.movedim, getattr,
    torch.zeros_like, torch.ones_like, torch.arange, torch.zeros, torch.ones, torch.full, torch.empty,
    F.one_hot, torch.where, torch.roll, torch.tile, torch.repeat_interleave,
    F.dropout1d, F.dropout2d, F.dropout3d, F.feature_alpha_dropout,  # a mask of one value per channel
    F.max_unpool1d, F.max_unpool2d, F.max_unpool3d,  # the indices, which the max pooling returned
    _enter_autocast, _exit_autocast,  # an autocast block's bounds (passes/autocast_regions.py)
}
_NOTHING_SAVED_METHODS = {
    "add", "sub", "neg", "view", "reshape", "flatten", "unflatten", "squeeze", "unsqueeze", "transpose",
    "permute", "t", "expand", "expand_as", "contiguous", "narrow", "select", "chunk", "split", "unbind",
    "view_as", "reshape_as", "detach", "size", "dim", "numel", "mean", "sum", "to", "float", "half",
    "bfloat16", "type_as", "repeat", "masked_fill", "add_", "sub_", "zero_", "fill_", "clone", "__getitem__",
    "movedim", "swapaxes", "roll", "flip", "long", "int", "bool", "new_zeros", "new_ones", "new_empty",
}
_NOTHING_SAVED_MODULES = (nn.Flatten, nn.Unflatten, nn.Identity, nn.Upsample, nn.ZeroPad2d, nn.ConstantPad2d,
                          nn.Dropout1d, nn.Dropout2d, nn.Dropout3d,  # a mask of one value per channel
                          nn.MaxUnpool1d, nn.MaxUnpool2d, nn.MaxUnpool3d)


def saves_nothing(node: Node, modules: dict) -> bool:
    """True for ops whose backward keeps no activation worth compressing (adds, views, cats, ...)."""
    if node.op == "call_function":
        return node.target in _NOTHING_SAVED_FUNCTIONS
    if node.op == "call_method":
        return node.target in _NOTHING_SAVED_METHODS
    if node.op == "call_module":
        return isinstance(modules.get(node.target), _NOTHING_SAVED_MODULES)
    return False


def checkpoint_site(node: Node, path: str, module, target: str | None = None) -> Site:
    """A module ``Config.recompute_modules`` names: rerun in backward from its exact inputs
    (``module`` at ``target``, where that is not ``path``)."""
    return _module_recompute_site(node, path, module, checkpoint=True, target=target)


# Sites that read only the node, keyed by function, ATen overload or (for a method) its name.
def _extremum_or_selection(node, op, fn):
    """``torch.max(a, b)`` is element-wise; ``torch.max(x, dim)`` selects along a dim (compact indices)."""
    over_a_dim = (len(node.args) > 1 and isinstance(node.args[1], int)) or "dim" in node.kwargs
    return selection_site(node, EXTREMA_OVER_A_DIM[op]) if over_a_dim else extremum_site(node, op=op, fn=fn)


_NODE_SITES = {
    **{t: functools.partial(_extremum_or_selection, op=op, fn=fn)
       for t, (op, fn) in {**_EXTREMUM_FUNCS, **_EXTREMUM_METHODS}.items()},
    **{t: functools.partial(reduced_extremum_site, op=op) for t, op in _REDUCED_EXTREMA.items()},
    **dict.fromkeys(AMINMAXES, aminmax_site),
    **dict.fromkeys(_PRELU_FUNCS, prelu_functional),
    **dict.fromkeys(_GLU_FUNCS, glu_functional),
    **dict.fromkeys(_ADDCMUL, addcmul_site),
    **dict.fromkeys(_GRID_SAMPLERS, grid_sample_site),
    **dict.fromkeys(GATHERS, gather_site),
    **dict.fromkeys(MASKED_SELECTS, masked_select_site),
    **dict.fromkeys(DEVIATIONS, deviation_site),
    **dict.fromkeys(LOGSUMEXPS, logsumexp_site),
    **dict.fromkeys(SCATTER_REDUCES, scatter_reduce_site),
    **dict.fromkeys(ROW_DISTANCES, row_distance_site),
    **dict.fromkeys(CDISTS, cdist_site),
    **dict.fromkeys(RECURRENT_OPS, recurrent_op_site),
    **dict.fromkeys(SELECTIONS, selection_site),
    **dict.fromkeys(INDEX_ADDS, index_add_site),
}


def find_site(node: Node, modules: dict) -> Site | None:
    """The Site for ``node``, or None when actfx has no variant for it."""
    if node.op == "call_module":
        m = modules.get(node.target)
        if m is None or isinstance(m, _LAZY) or has_hooks(m):
            return None
        for types, handler in _MODULE_HANDLERS:
            if type(m) in types:
                return handler(node, node.target, m) or None
        return _module_as_call(node, node.target, m)
    if node.op == "call_function":
        t = node.target
        if hasattr(t, "actfx_function"):  # a custom autograd.Function (passes/autograd_functions.py)
            return custom_function_site(node)
        if hasattr(t, "actfx_softmax_then"):  # folded by passes/softmax_regions.py
            return softmax_then_site(node, t.actfx_softmax_then)
        calls = getattr(t, "actfx_pointwise", None)
        if calls is not None:  # a region collapsed by passes/pointwise_regions.py
            if len(node.args) > 1 or getattr(t, "actfx_several", False):
                return several_pointwise_site(node, calls, node.args, kind=t.actfx_kind)
            return pointwise_site(node, None, calls, node.args[0], kind=t.actfx_kind)
        if t in _CONV_FUNCS:
            return _conv_functional(node)
        if t in (torch.baddbmm, torch.ops.aten.baddbmm.default):
            return baddbmm_site(node)
        if t in (torch.einsum, torch.ops.aten.einsum.default):
            return einsum_site(node)
        if t is torch.bilinear:  # nn.Bilinear, traced through (capture.py): each gradient is linear in each input
            return _recompute_site(node, None, "bilinear", t, node.args, node.kwargs)
        if t in (torch.linalg.vector_norm, torch.ops.aten.linalg_vector_norm.default):
            return vector_norm_site(node)
        if t is torch.norm:
            return torch_norm_site(node)
        if t is torch.linalg.norm:
            return linalg_norm_site(node)
        if t in (torch.addmm, torch.ops.aten.addmm.default):
            return _addmm(node)
        if t is F.linear:
            a = bind("linear", node.args, node.kwargs)
            return a and _linear_site(node, None, a["input"], a["weight"], a["bias"])
        if t is F.batch_norm:
            return _batch_norm_functional(node)
        if t in (F.layer_norm, F.group_norm, F.instance_norm):
            return _norm_functional(node)
        if t is F.rms_norm:
            return _rms_norm_functional(node)
        if t is F.embedding:
            return embedding_site(node)
        if t is rms_normalize:  # collapsed by passes/rms_regions.py
            return rms_normalize_site(node)
        if t is divided_by_norm:  # collapsed by passes/norm_divisions.py
            return divided_by_norm_site(node)
        if t is F.scaled_dot_product_attention:
            return _sdpa(node)
        if t in (F.softmax, torch.softmax, F.softmin):
            return _softmax_functional(node)
        if t is operator.pow:
            return _recompute_site(node, None, "pow", torch.pow, node.args, node.kwargs)
        if t in _RELU_FUNCS or t in (F.relu6, F.hardtanh, F.hardtanh_, F.leaky_relu, F.leaky_relu_):
            return _relu_functional(node)
        if t in (F.threshold, F.threshold_):
            return _threshold_functional(node)
        if t is F.dropout:
            a = bind("dropout", node.args, node.kwargs)
            return a and _dropout_site(node, None, a["input"], a["p"], a["training"], bool(a["inplace"]))
        if t is torch.dropout:
            a = bind("torch_dropout", node.args, node.kwargs)
            return a and _dropout_site(node, None, a["input"], a["p"], a["train"], False)
        if t in _MAX_POOL_FUNCS or t in _ADAPTIVE_MAX_FUNCS or t in _WITH_INDICES:
            return _max_pool_functional(node)
        if t in _PRODUCT_FUNCS:
            return _product(node, _PRODUCT_FUNCS[t])
        if t in _NODE_SITES:
            return _NODE_SITES[t](node)
        if grouped_mm_implementation(t) is not None:
            return grouped_mm_site(node)
        if t is F.cross_entropy:
            a = bind("cross_entropy", node.args, node.kwargs)
            if a is None or a["size_average"] is not None or a["reduce"] is not None:
                return None  # the deprecated arguments: left as is
            return cross_entropy_site(node, None, a["input"], a["target"], a["weight"], a["ignore_index"],
                                      a["reduction"], a["label_smoothing"])
        if t is F.normalize:
            return normalize_site(node) or _recompute_functional(node)
        if t is F.pad:
            return pad_site(node)
        if t is F.interpolate:
            return interpolate_site(node)
        if t is F.kl_div:
            return kl_div_site(node)
        if t in LOSSES:
            return loss_site(node, t, elementwise=LOSSES[t])
        if t in _ELEMENTWISE or t in _SHAPE_ONLY:
            return _recompute_functional(node)
        return inplace_pointwise_site(node)
    if node.op == "call_method":
        name = node.target
        if name in ("relu", "relu_"):
            return _relu_like_site(node, None, "relu", node.args[0], name == "relu_", (), None)
        if name in _PRODUCT_METHODS:
            return _product(node, _PRODUCT_METHODS[name])
        if name in _NODE_SITES:
            return _NODE_SITES[name](node)
        if name == "softmax":
            return _softmax_functional(node)
        if name == "norm":
            return torch_norm_site(node)
        if name.rstrip("_") in _ELEMENTWISE_METHODS:
            return _recompute_method(node)
        return inplace_pointwise_site(node)
    return None
