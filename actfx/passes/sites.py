"""Recognise the fx nodes actfx has a compressed-save variant for, in module, functional and method form.

``find_site(node, modules)`` returns a ``Site``: what kind of op it is, which of its inputs its
backward needs (the rewrite pass decides how each is stored), and how to emit the variant call.
Nodes without a variant get ``None`` and stay as they are (correct, uncompressed, reported).
"""

from __future__ import annotations

import dataclasses
import operator
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.fx import Graph, Node

from actfx.passes.signatures import bind
from actfx.variants import batchnorm, conv, linear, masks, module_recompute, norms, pool, products, rmsnorm, softmax
from actfx.variants.recompute import SLOT, make_recompute_variant

# What a rebuilt value needs from its producer: ReLU-like masks and BatchNorm's affine map.
Emitted = tuple  # (out node, extras dict)


@dataclasses.dataclass
class Site:
    node: Node
    kind: str
    module_path: str | None
    saved: list  # fx args (Nodes or constants) whose values backward needs, in variant order
    emit: Callable  # (graph, env, specs, runs) -> (out node, extras)
    exact: tuple = ()  # positions in `saved` always kept exact (a division's denominator)
    shape_only: tuple = ()  # positions whose backward needs only the shape
    inplace_on: Node | None = None  # the input this op writes into, if any
    source: Node | None = None  # a ReLU-like op's input (its output is mask * input)


def _get(graph: Graph, path: str, attr: str | None = None) -> Node | None:
    return graph.get_attr(f"{path}.{attr}" if attr else path)


def _bias_node(graph, path, module):
    return _get(graph, path, "bias") if getattr(module, "bias", None) is not None else None


def _env(env, value):
    return torch.fx.node.map_arg(value, lambda n: env[n])


# ---------------------------------------------------------------- convolution and linear

def _conv_site(node, path, x, weight, bias, transposed, nd, stride, padding, dilation, output_padding,
               groups, pad=None, kind="conv"):
    def emit(graph, env, specs, runs, pack=None):
        geometry = (transposed, nd, stride, padding, dilation, output_padding, groups, pad)
        w = weight(graph) if callable(weight) else _env(env, weight)
        b = bias(graph) if callable(bias) else _env(env, bias)
        out = graph.call_function(conv.conv, (geometry, specs[0], w, b, *runs[0]))
        return out, {}

    return Site(node, kind, path, [x], emit)


def _conv_module(node, path, m):
    nd = {nn.Conv1d: 1, nn.Conv2d: 2, nn.Conv3d: 3, nn.ConvTranspose1d: 1, nn.ConvTranspose2d: 2,
          nn.ConvTranspose3d: 3}[type(m)]
    transposed = isinstance(m, nn.modules.conv._ConvTransposeNd)
    x = node.args[0] if node.args else node.kwargs.get("input")
    if len(node.args) + len(node.kwargs) != 1:
        return None  # ConvTranspose(output_size=...) is not covered
    padding, pad = m.padding, None
    if isinstance(padding, str):
        padding = _same_padding(m) if padding == "same" else (0,) * nd
        if padding is None:
            return None
    if m.padding_mode != "zeros":
        pad, padding = (tuple(m._reversed_padding_repeated_twice), m.padding_mode), (0,) * nd
    return _conv_site(
        node, path, x, lambda g: _get(g, path, "weight"), lambda g: _bias_node(g, path, m),
        transposed, nd, tuple(m.stride), tuple(padding), tuple(m.dilation),
        tuple(m.output_padding) if transposed else (0,) * nd, m.groups, pad,
        kind="conv_transpose" if transposed else "conv",
    )


def _same_padding(m):
    """'same' padding as a symmetric amount, or None when PyTorch would pad asymmetrically."""
    out = []
    for d, k in zip(m.dilation, m.kernel_size):
        total = d * (k - 1)
        if total % 2:
            return None
        out.append(total // 2)
    return tuple(out)


_CONV_FUNCS = {F.conv1d: (False, 1), F.conv2d: (False, 2), F.conv3d: (False, 3),
               F.conv_transpose1d: (True, 1), F.conv_transpose2d: (True, 2), F.conv_transpose3d: (True, 3)}


def _conv_functional(node):
    transposed, nd = _CONV_FUNCS[node.target]
    a = bind("conv_transpose" if transposed else "conv", node.args, node.kwargs)
    if a is None or isinstance(a["padding"], str):
        return None

    def tup(v):
        return tuple(v) if isinstance(v, (tuple, list)) else (v,) * nd

    return _conv_site(node, None, a["input"], a["weight"], a["bias"], transposed, nd, tup(a["stride"]),
                      tup(a["padding"]), tup(a["dilation"]),
                      tup(a.get("output_padding", 0)), a["groups"],
                      kind="conv_transpose" if transposed else "conv")


def _linear_site(node, path, x, weight, bias):
    def emit(graph, env, specs, runs, pack=None):
        w = weight(graph) if callable(weight) else _env(env, weight)
        b = bias(graph) if callable(bias) else _env(env, bias)
        return graph.call_function(linear.linear, (specs[0], w, b, *runs[0])), {}

    return Site(node, "linear", path, [x], emit)


def _addmm(node):
    """``addmm(bias, x, w)`` (GPT-2's Conv1D) is ``F.linear(x, w.t(), bias)``, bit for bit."""
    a = bind("addmm", node.args, node.kwargs)
    if a is None or a["beta"] != 1 or a["alpha"] != 1:
        return None

    def emit(graph, env, specs, runs, pack=None):
        weight = graph.call_method("t", (_env(env, a["mat2"]),))
        return graph.call_function(linear.linear, (specs[0], weight, _env(env, a["input"]), *runs[0])), {}

    return Site(node, "linear", None, [a["mat1"]], emit)


# ---------------------------------------------------------------- batch norm

def _batch_norm_module(node, path, m):
    if len(node.args) != 1 or node.kwargs:
        return None

    def emit(graph, env, specs, runs, pack=None):
        call = graph.call_function(batchnorm.batch_norm_module, (_get(graph, path), specs[0], *runs[0]))
        out, a, b = (graph.call_function(operator.getitem, (call, i)) for i in range(3))
        return out, {"affine": (a, b)}

    return Site(node, "batch_norm", path, [node.args[0]], emit)


def _batch_norm_functional(node):
    a = bind("batch_norm", node.args, node.kwargs)
    if a is None:
        return None

    def emit(graph, env, specs, runs, pack=None):
        args = [_env(env, a[k]) for k in ("running_mean", "running_var", "weight", "bias", "training",
                                          "momentum", "eps")]
        call = graph.call_function(batchnorm.batch_norm_functional, (specs[0], *args, *runs[0]))
        out, aa, bb = (graph.call_function(operator.getitem, (call, i)) for i in range(3))
        return out, {"affine": (aa, bb)}

    return Site(node, "batch_norm", None, [a["input"]], emit)


# ---------------------------------------------------------------- LayerNorm / GroupNorm / InstanceNorm

def _norm_site(node, path, kind, x, static, weight, bias):
    """static: (normalized_shape,) / (num_groups,) / () followed by eps; weight/bias: nodes,
    None, or callables making get_attr nodes for a module's parameters."""

    def emit(graph, env, specs, runs, pack=None):
        w = weight(graph) if callable(weight) else _env(env, weight)
        b = bias(graph) if callable(bias) else _env(env, bias)
        *head, eps = static
        if kind == "instance_norm":
            return graph.call_function(norms.instance_norm, (specs[0], w, b, eps, *runs[0])), {}
        fn = norms.layer_norm if kind == "layer_norm" else norms.group_norm
        return graph.call_function(fn, (specs[0], *head, w, b, eps, *runs[0])), {}

    return Site(node, kind, path, [x], emit)


def _norm_module(node, path, m):
    if len(node.args) != 1 or node.kwargs:
        return None
    x = node.args[0]
    weight = (lambda g: _get(g, path, "weight")) if getattr(m, "weight", None) is not None else None
    bias = (lambda g: _get(g, path, "bias")) if getattr(m, "bias", None) is not None else None
    if isinstance(m, nn.LayerNorm):
        return _norm_site(node, path, "layer_norm", x, (tuple(m.normalized_shape), m.eps), weight, bias)
    if isinstance(m, nn.GroupNorm):
        return _norm_site(node, path, "group_norm", x, (m.num_groups, m.eps), weight, bias)
    if m.track_running_stats:
        return None  # its running statistics update would need BatchNorm-style handling
    return _norm_site(node, path, "instance_norm", x, (m.eps,), weight, bias)


def _norm_functional(node):
    kind = {F.layer_norm: "layer_norm", F.group_norm: "group_norm", F.instance_norm: "instance_norm"}[node.target]
    a = bind(kind, node.args, node.kwargs)
    if a is None:
        return None
    if kind == "layer_norm":
        static = (a["normalized_shape"], a["eps"])
    elif kind == "group_norm":
        static = (a["num_groups"], a["eps"])
    else:
        if a["running_mean"] is not None or a["running_var"] is not None or a["use_input_stats"] is not True:
            return None
        static = (a["eps"],)
    if any(isinstance(v, Node) for v in static):
        return None
    return _norm_site(node, None, kind, a["input"], static, a["weight"], a["bias"])


def _rms_norm_site(node, path, x, shape, weight, eps):
    def emit(graph, env, specs, runs, pack=None):
        w = weight(graph) if callable(weight) else _env(env, weight)
        return graph.call_function(rmsnorm.rms_norm, (specs[0], shape, w, eps, *runs[0])), {}

    return Site(node, "rms_norm", path, [x], emit)


def _rms_norm_module(node, path, m):
    if len(node.args) != 1 or node.kwargs:
        return None
    weight = (lambda g: _get(g, path, "weight")) if m.weight is not None else None
    return _rms_norm_site(node, path, node.args[0], tuple(m.normalized_shape), weight, m.eps)


def _rms_norm_functional(node):
    a = bind("rms_norm", node.args, node.kwargs)
    if a is None or isinstance(a["normalized_shape"], Node) or isinstance(a["eps"], Node):
        return None
    return _rms_norm_site(node, None, a["input"], a["normalized_shape"], a["weight"], a["eps"])


# ---------------------------------------------------------------- attention

def _sdpa(node):
    """F.scaled_dot_product_attention: q, k, v packed (Config.op_bits["sdpa"], 8 by default),
    backward recomputes attention from them (replaying dropout); the mask is kept exact."""
    a = bind("sdpa", node.args, node.kwargs)
    if a is None:
        return None
    dropout = a["dropout_p"]
    replay = isinstance(dropout, Node) or dropout != 0.0
    args = (a["query"], a["key"], a["value"])
    kwargs = {k: a[k] for k in ("attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")}
    site = _recompute_site(node, None, "sdpa", F.scaled_dot_product_attention, args, kwargs, replay_rng=replay)
    if site is not None and isinstance(a["attn_mask"], Node):
        site.exact = (site.saved.index(a["attn_mask"]),)
    return site


def _softmax_site(node, path, x, dim, dtype):
    def emit(graph, env, specs, runs, pack=None):
        y = graph.call_function(softmax.softmax_forward, (env[x], dim, dtype))
        spec, run = pack(y, node)
        return graph.call_function(softmax.softmax, (spec, dim, dtype, env[x], *run)), {"packed_output": (spec, run)}

    return Site(node, "softmax", path, [], emit)


def _softmax_functional(node, method=False):
    a = bind("softmax", node.args, node.kwargs)
    if a is None or a["dim"] is None or isinstance(a["dim"], Node):
        return None
    return _softmax_site(node, None, a["input"], a["dim"], a["dtype"])


_RECOMPUTED_MODULES = (nn.MultiheadAttention, nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)


def _module_recompute_site(node, path, m):
    args_t, kwargs_t, nodes = _template(node.args, node.kwargs)
    exact = tuple(i for i, n in enumerate(nodes) if n not in node.args[:3])  # masks and flags stay exact

    def emit(graph, env, specs, runs, pack=None):
        flat = [n for run in runs for n in run]
        static = (args_t, kwargs_t, tuple(specs))
        return graph.call_function(module_recompute.recompute_module, (_get(graph, path), static, *flat)), {}

    return Site(node, "attention" if isinstance(m, nn.MultiheadAttention) else "transformer_layer", path, nodes,
                emit, exact=exact)


# ---------------------------------------------------------------- ReLU family and dropout

def _relu_like_site(node, path, kind, x, inplace, params, slope):
    def emit(graph, env, specs, runs, pack=None):
        call = graph.call_function(masks.relu_like, (kind, inplace, params, env[x]))
        out, mask = (graph.call_function(operator.getitem, (call, i)) for i in range(2))
        return out, {"mask": (mask, slope, kind == "relu" or kind == "leaky_relu")}

    return Site(node, kind, path, [], emit, inplace_on=x if inplace else None, source=x)


def _dropout_site(node, path, x, p, training, inplace, module=False):
    def emit(graph, env, specs, runs, pack=None):
        if module:
            call = graph.call_function(masks.dropout_module, (_get(graph, path), env[x]))
        else:
            call = graph.call_function(masks.dropout, (_env(env, p), _env(env, training), inplace, env[x]))
        return graph.call_function(operator.getitem, (call, 0)), {}

    return Site(node, "dropout", path, [], emit, inplace_on=x if inplace else None)


_RELU_FUNCS = {F.relu: False, torch.relu: False, torch.relu_: True, F.relu_: True}


def _relu_functional(node):
    target = node.target
    if target in (F.relu6,):
        a = bind("relu", node.args, node.kwargs)
        return a and _relu_like_site(node, None, "hardtanh", a["input"], a["inplace"], (0.0, 6.0), None)
    if target in (F.hardtanh, F.hardtanh_):
        a = bind("hardtanh", node.args, node.kwargs)
        inplace = a and (a["inplace"] or target is F.hardtanh_)
        return a and _relu_like_site(node, None, "hardtanh", a["input"], inplace,
                                     (float(a["min_val"]), float(a["max_val"])), None)
    if target in (F.leaky_relu, F.leaky_relu_):
        a = bind("leaky_relu", node.args, node.kwargs)
        inplace = a and (a["inplace"] or target is F.leaky_relu_)
        return a and _relu_like_site(node, None, "leaky_relu", a["input"], inplace,
                                     (float(a["negative_slope"]),), float(a["negative_slope"]))
    a = bind("relu", node.args, node.kwargs)
    if a is None:
        return None
    return _relu_like_site(node, None, "relu", a["input"], a["inplace"] or _RELU_FUNCS[target], (), None)


def _relu_module(node, path, m):
    x = node.args[0]
    if isinstance(m, nn.ReLU):
        return _relu_like_site(node, path, "relu", x, m.inplace, (), None)
    if isinstance(m, nn.LeakyReLU):
        s = float(m.negative_slope)
        return _relu_like_site(node, path, "leaky_relu", x, m.inplace, (s,), s)
    return _relu_like_site(node, path, "hardtanh", x, m.inplace, (float(m.min_val), float(m.max_val)), None)


# ---------------------------------------------------------------- pooling

_MAX_POOL_FUNCS = {F.max_pool1d: 1, F.max_pool2d: 2, F.max_pool3d: 3}
_ADAPTIVE_MAX_FUNCS = {F.adaptive_max_pool1d: 1, F.adaptive_max_pool2d: 2, F.adaptive_max_pool3d: 3}


def _max_pool_site(node, path, nd, x, args, adaptive=False):
    def emit(graph, env, specs, runs, pack=None):
        fn = pool.adaptive_max_pool if adaptive else pool.max_pool
        return graph.call_function(fn, (nd, *_env(env, args), env[x])), {}

    return Site(node, "max_pool", path, [], emit)


def _max_pool_module(node, path, m):
    if m.return_indices or len(node.args) != 1:
        return None
    if isinstance(m, nn.modules.pooling._AdaptiveMaxPoolNd):
        nd = {nn.AdaptiveMaxPool1d: 1, nn.AdaptiveMaxPool2d: 2, nn.AdaptiveMaxPool3d: 3}[type(m)]
        return _max_pool_site(node, path, nd, node.args[0], (m.output_size,), adaptive=True)
    nd = {nn.MaxPool1d: 1, nn.MaxPool2d: 2, nn.MaxPool3d: 3}[type(m)]
    stride = m.stride if m.stride is not None else m.kernel_size
    return _max_pool_site(node, path, nd, node.args[0],
                          (m.kernel_size, stride, m.padding, m.dilation, m.ceil_mode))


def _max_pool_functional(node):
    if node.target in _ADAPTIVE_MAX_FUNCS:
        a = bind("adaptive_max_pool", node.args, node.kwargs)
        if a is None or a["return_indices"]:
            return None
        return _max_pool_site(node, None, _ADAPTIVE_MAX_FUNCS[node.target], a["input"], (a["output_size"],), True)
    a = bind("max_pool", node.args, node.kwargs)
    if a is None or a["return_indices"]:
        return None
    stride = a["stride"] if a["stride"] is not None and a["stride"] != [] else a["kernel_size"]
    return _max_pool_site(node, None, _MAX_POOL_FUNCS[node.target], a["input"],
                          (a["kernel_size"], stride, a["padding"], a["dilation"], a["ceil_mode"]))


# ---------------------------------------------------------------- products

def _product_site(node, op, a, b):
    def emit(graph, env, specs, runs, pack=None):
        return graph.call_function(products.product, (op, tuple(specs), *runs[0], *runs[1])), {}

    return Site(node, op, None, [a, b], emit, exact=(1,) if op == "div" else ())


_PRODUCT_FUNCS = {operator.mul: "mul", torch.mul: "mul", operator.truediv: "div", torch.div: "div",
                  torch.true_divide: "div", operator.matmul: "matmul", torch.matmul: "matmul",
                  torch.bmm: "matmul"}
_PRODUCT_METHODS = {"mul": "mul", "div": "div", "true_divide": "div", "matmul": "matmul", "bmm": "matmul"}


def _product(node, op):
    a = bind("div" if op == "div" else "binary", node.args, node.kwargs)
    if a is None or a.get("rounding_mode") is not None:
        return None
    return _product_site(node, op, a["input"], a["other"])


# ---------------------------------------------------------------- recompute-from-packed-input ops

def _template(args, kwargs):
    """Replace Node arguments by slot markers; returns (args template, kwargs template, nodes)."""
    nodes: list = []

    def mark(n):
        nodes.append(n)
        return (SLOT, len(nodes) - 1)

    args_t = torch.fx.node.map_arg(tuple(args), mark)
    kwargs_t = tuple((k, torch.fx.node.map_arg(v, mark)) for k, v in kwargs.items())
    return args_t, kwargs_t, nodes


def _recompute_site(node, path, kind, fn, args, kwargs, inplace=False, shape_only=False, replay_rng=False):
    kwargs = dict(kwargs)
    if "inplace" in kwargs:
        inplace = inplace or bool(kwargs["inplace"])
        kwargs["inplace"] = False
    if inplace and not (args and isinstance(args[0], Node)):
        return None
    args_t, kwargs_t, nodes = _template(args, kwargs)
    variant = _RECOMPUTE_VARIANTS[fn]

    def emit(graph, env, specs, runs, pack=None):
        flat = [n for run in runs for n in run]
        static = (args_t, kwargs_t, tuple(specs), inplace) + ((True,) if replay_rng else ())
        return graph.call_function(variant, (static, *flat)), {}

    site = Site(node, kind, path, nodes, emit, inplace_on=args[0] if inplace else None)
    if shape_only:
        site.shape_only = (0,)
    return site


# Element-wise and normalisation ops: function -> (kind, takes `inplace`)
_ELEMENTWISE = {
    F.silu: "silu", F.gelu: "gelu", torch.sigmoid: "sigmoid", F.sigmoid: "sigmoid", torch.tanh: "tanh",
    F.tanh: "tanh", F.hardswish: "hardswish", F.hardsigmoid: "hardsigmoid", F.mish: "mish",
    F.elu: "elu", F.selu: "selu", F.celu: "celu", F.softplus: "softplus", F.logsigmoid: "logsigmoid",
    F.log_softmax: "log_softmax", torch.pow: "pow", torch.rsqrt: "rsqrt", torch.exp: "exp",
    torch.log: "log", torch.sqrt: "sqrt", torch.sin: "sin", torch.cos: "cos", F.scaled_dot_product_attention: "sdpa",
    torch.log_softmax: "log_softmax", F.normalize: "normalize",
}
_ELEMENTWISE_METHODS = {name: getattr(torch.Tensor, name) for name in
                        ("sigmoid", "tanh", "log_softmax", "pow", "rsqrt", "exp", "log", "sqrt", "sin", "cos")}
_SHAPE_ONLY = {F.avg_pool1d: "avg_pool", F.avg_pool2d: "avg_pool", F.avg_pool3d: "avg_pool",
               F.adaptive_avg_pool1d: "adaptive_avg_pool", F.adaptive_avg_pool2d: "adaptive_avg_pool",
               F.adaptive_avg_pool3d: "adaptive_avg_pool"}
_RECOMPUTE_VARIANTS = {
    fn: make_recompute_variant(fn, kind)
    for fn, kind in [*_ELEMENTWISE.items(), *_SHAPE_ONLY.items(),
                     *((m, n) for n, m in _ELEMENTWISE_METHODS.items())]
}


def _module_as_call(node, path, m):
    """Modules that are one functional call: returns a recompute Site."""
    x = node.args[0] if node.args else None
    if x is None or len(node.args) != 1 or node.kwargs:
        return None

    table = {
        nn.SiLU: lambda: (F.silu, (x,), {"inplace": m.inplace}),
        nn.GELU: lambda: (F.gelu, (x,), {"approximate": getattr(m, "approximate", "none")}),
        nn.Sigmoid: lambda: (torch.sigmoid, (x,), {}),
        nn.Tanh: lambda: (torch.tanh, (x,), {}),
        nn.Hardswish: lambda: (F.hardswish, (x,), {"inplace": getattr(m, "inplace", False)}),
        nn.Hardsigmoid: lambda: (F.hardsigmoid, (x,), {"inplace": getattr(m, "inplace", False)}),
        nn.Mish: lambda: (F.mish, (x,), {"inplace": getattr(m, "inplace", False)}),
        nn.ELU: lambda: (F.elu, (x,), {"alpha": getattr(m, "alpha", 1.0), "inplace": getattr(m, "inplace", False)}),
        nn.SELU: lambda: (F.selu, (x,), {"inplace": getattr(m, "inplace", False)}),
        nn.Softplus: lambda: (F.softplus, (x,), {"beta": getattr(m, "beta", 1.0), "threshold": getattr(m, "threshold", 20.0)}),
        nn.LogSoftmax: lambda: (F.log_softmax, (x,), {"dim": getattr(m, "dim", None)}),
    }
    if isinstance(m, (nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d)):
        fn = {nn.AvgPool1d: F.avg_pool1d, nn.AvgPool2d: F.avg_pool2d, nn.AvgPool3d: F.avg_pool3d}[type(m)]
        extra = (m.ceil_mode, m.count_include_pad) + ((m.divisor_override,) if not isinstance(m, nn.AvgPool1d) else ())
        return _recompute_site(node, path, "avg_pool", fn, (x, m.kernel_size, m.stride, m.padding, *extra), {},
                               shape_only=True)
    elif isinstance(m, (nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d)):
        fn = {nn.AdaptiveAvgPool1d: F.adaptive_avg_pool1d, nn.AdaptiveAvgPool2d: F.adaptive_avg_pool2d,
              nn.AdaptiveAvgPool3d: F.adaptive_avg_pool3d}[type(m)]
        return _recompute_site(node, path, "adaptive_avg_pool", fn, (x, m.output_size), {}, shape_only=True)
    elif isinstance(m, nn.Softmax) and m.dim is not None:
        return _softmax_site(node, path, x, m.dim, None)
    elif type(m) in table:
        fn, args, kwargs = table[type(m)]()
    else:
        return None
    return _recompute_site(node, path, _ELEMENTWISE[fn], fn, args, kwargs)


def _recompute_functional(node):
    fn = node.target
    if fn in _SHAPE_ONLY:
        return _recompute_site(node, None, _SHAPE_ONLY[fn], fn, node.args, node.kwargs, shape_only=True)
    return _recompute_site(node, None, _ELEMENTWISE[fn], fn, node.args, node.kwargs)


def _recompute_method(node):
    name = node.target.rstrip("_")
    inplace = node.target.endswith("_")
    fn = _ELEMENTWISE_METHODS[name]
    return _recompute_site(node, None, name, fn, node.args, node.kwargs, inplace=inplace)


# ---------------------------------------------------------------- dispatch

_MODULE_HANDLERS = [
    ((nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d), _conv_module),
    ((nn.Linear,), lambda node, path, m: (len(node.args) == 1 and not node.kwargs) and _linear_site(
        node, path, node.args[0], lambda g: _get(g, path, "weight"), lambda g: _bias_node(g, path, m)) or None),
    ((nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d), _batch_norm_module),
    ((nn.LayerNorm, nn.GroupNorm, nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d), _norm_module),
    ((nn.RMSNorm,), _rms_norm_module),
    (_RECOMPUTED_MODULES, _module_recompute_site),
    ((nn.ReLU, nn.LeakyReLU, nn.Hardtanh, nn.ReLU6), _relu_module),
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
    F.embedding, F.one_hot, torch.where, torch.roll, torch.tile, torch.repeat_interleave,
}
_NOTHING_SAVED_METHODS = {
    "add", "sub", "neg", "view", "reshape", "flatten", "unflatten", "squeeze", "unsqueeze", "transpose",
    "permute", "t", "expand", "expand_as", "contiguous", "narrow", "select", "chunk", "split", "unbind",
    "view_as", "reshape_as", "detach", "size", "dim", "numel", "mean", "sum", "to", "float", "half",
    "bfloat16", "type_as", "repeat", "masked_fill", "add_", "sub_", "zero_", "fill_", "clone", "__getitem__",
    "movedim", "swapaxes", "roll", "flip", "long", "int", "bool", "new_zeros", "new_ones", "new_empty",
}
_NOTHING_SAVED_MODULES = (nn.Flatten, nn.Unflatten, nn.Identity, nn.Upsample, nn.ZeroPad2d, nn.ConstantPad2d,
                          nn.Embedding, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout)


def saves_nothing(node: Node, modules: dict) -> bool:
    """True for ops whose backward keeps no activation worth compressing (adds, views, cats, ...)."""
    if node.op == "call_function":
        return node.target in _NOTHING_SAVED_FUNCTIONS
    if node.op == "call_method":
        return node.target in _NOTHING_SAVED_METHODS
    if node.op == "call_module":
        return isinstance(modules.get(node.target), _NOTHING_SAVED_MODULES)
    return False


def find_site(node: Node, modules: dict) -> Site | None:
    """The Site for ``node``, or None when actfx has no variant for it."""
    if node.op == "call_module":
        m = modules.get(node.target)
        if m is None or isinstance(m, _LAZY):
            return None
        for types, handler in _MODULE_HANDLERS:
            if type(m) in types:
                return handler(node, node.target, m) or None
        return _module_as_call(node, node.target, m)
    if node.op == "call_function":
        t = node.target
        if t in _CONV_FUNCS:
            return _conv_functional(node)
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
        if t is F.scaled_dot_product_attention:
            return _sdpa(node)
        if t in (F.softmax, torch.softmax):
            return _softmax_functional(node)
        if t is operator.pow:
            return _recompute_site(node, None, "pow", torch.pow, node.args, node.kwargs)
        if t in _RELU_FUNCS or t in (F.relu6, F.hardtanh, F.hardtanh_, F.leaky_relu, F.leaky_relu_):
            return _relu_functional(node)
        if t is F.dropout:
            a = bind("dropout", node.args, node.kwargs)
            return a and _dropout_site(node, None, a["input"], a["p"], a["training"], bool(a["inplace"]))
        if t is torch.dropout:
            a = bind("torch_dropout", node.args, node.kwargs)
            return a and _dropout_site(node, None, a["input"], a["p"], a["train"], False)
        if t in _MAX_POOL_FUNCS or t in _ADAPTIVE_MAX_FUNCS:
            return _max_pool_functional(node)
        if t in _PRODUCT_FUNCS:
            return _product(node, _PRODUCT_FUNCS[t])
        if t in _ELEMENTWISE or t in _SHAPE_ONLY:
            return _recompute_functional(node)
        return None
    if node.op == "call_method":
        name = node.target
        if name in ("relu", "relu_"):
            return _relu_like_site(node, None, "relu", node.args[0], name == "relu_", (), None)
        if name in _PRODUCT_METHODS:
            return _product(node, _PRODUCT_METHODS[name])
        if name == "softmax":
            return _softmax_functional(node)
        if name.rstrip("_") in _ELEMENTWISE_METHODS:
            return _recompute_method(node)
    return None
