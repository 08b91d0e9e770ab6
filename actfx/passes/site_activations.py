"""Sites for ReLU-family activations and dropout (exact 1-bit masks) and max pooling
(compact indices)."""

from __future__ import annotations

import operator

import torch
import torch.nn as nn
import torch.nn.functional as F

from actfx.passes.signatures import bind
from actfx.passes.site import Site, _env, _get
from actfx.variants import glu, masks, pool, prelu


# ---------------------------------------------------------------- ReLU family and dropout

def _relu_like_site(node, path, kind, x, inplace, params, slope):
    def emit(graph, env, specs, runs, pack=None):
        call = graph.call_function(masks.relu_like, (kind, inplace, params, env[x], getattr(pack, "min_numel", 0)))
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


def _extremum_site(node, op, fn, a, b):
    def emit(graph, env, specs, runs, pack=None):
        return graph.call_function(masks.extremum, (op, fn, env[a], env[b])), {}

    return Site(node, op, None, [], emit)


# max / min of two tensors (torch.max / torch.min only in their binary form): op and the call as
# written ("torch:", "aten:" or "method:" + name), which runs where the operands are not two tensors
_EXTREMUM_FUNCS = {torch.maximum: ("maximum", "torch:maximum"), torch.minimum: ("minimum", "torch:minimum"),
                   torch.max: ("maximum", "torch:max"), torch.min: ("minimum", "torch:min"),
                   torch.ops.aten.maximum.default: ("maximum", "aten:maximum"),
                   torch.ops.aten.minimum.default: ("minimum", "aten:minimum"),
                   torch.ops.aten.max.other: ("maximum", "aten:maximum"),
                   torch.ops.aten.min.other: ("minimum", "aten:minimum")}
_EXTREMUM_METHODS = {name: (op, f"method:{name}") for name, op in
                     (("maximum", "maximum"), ("minimum", "minimum"), ("max", "maximum"), ("min", "minimum"))}


def extremum_site(node, op, fn):
    """Both operands must be graph values (a constant operand goes to the element-wise regions);
    ``fn`` (the call as written, see ``_EXTREMUM_FUNCS``) runs whenever they turn out not to be two float tensors that
    need gradients (``torch.max(x, dim)`` with a computed dim)."""
    args = list(node.args)
    if len(args) != 2 or node.kwargs or not all(isinstance(v, torch.fx.Node) for v in args):
        return None
    if any(v.op == "get_attr" or _an_integer(v) for v in args):
        return None
    return _extremum_site(node, op, fn, *args)


_INTEGER_METHODS = {"dim", "size", "numel", "item", "__len__"}


def _an_integer(node: torch.fx.Node, depth: int = 3) -> bool:
    """A value fx cannot type but that is an int: ``x.dim() - 1``, ``len(x.shape)``."""
    if node.op == "call_method" and node.target in _INTEGER_METHODS:
        return True
    if node.op == "call_function" and node.target in (operator.add, operator.sub, operator.mul, operator.floordiv,
                                                      operator.neg, len, getattr) and depth > 0:
        return any(isinstance(a, torch.fx.Node) and _an_integer(a, depth - 1) for a in node.args) or node.target is len
    value = node.meta.get("val")
    return value is not None and not isinstance(value, torch.Tensor)


_REDUCED_EXTREMA = {torch.amax: "amax", torch.amin: "amin", torch.ops.aten.amax.default: "amax",
                    torch.ops.aten.amin.default: "amin", "amax": "amax", "amin": "amin"}


def reduced_extremum_site(node, op):
    a = bind("amax", node.args, node.kwargs)
    if a is None or isinstance(a["dim"], torch.fx.Node) or not isinstance(a["keepdim"], bool):
        return None
    x, dim, keepdim = a["input"], a["dim"], a["keepdim"]

    def emit(graph, env, specs, runs, pack=None):
        return graph.call_function(masks.reduced_extremum, (op, env[x], dim, keepdim)), {}

    return Site(node, op, None, [], emit)


AMINMAXES = (torch.aminmax, "aminmax", torch.ops.aten.aminmax.default)


def aminmax_site(node):
    """``torch.aminmax`` / ``x.aminmax``: two 1-bit masks (``variants/masks.py``)."""
    kwargs = dict(node.kwargs)
    x = node.args[0] if node.args else kwargs.pop("input", kwargs.pop("self", None))
    dim, keepdim = kwargs.pop("dim", None), kwargs.pop("keepdim", False)
    if (len(node.args) > 1 or kwargs or not isinstance(x, torch.fx.Node) or not isinstance(keepdim, bool)
            or not (dim is None or isinstance(dim, int))):
        return None

    def emit(graph, env, specs, runs, pack=None):
        return graph.call_function(masks.aminmax, (env[x], dim, keepdim)), {}

    return Site(node, "aminmax", None, [], emit)


def prelu_site(node, path, x, weight):
    """``weight``: a node, or (module) a function of the graph giving the module's weight."""
    def emit(graph, env, specs, runs, pack=None):
        w = weight(graph) if callable(weight) else _env(env, weight)
        return graph.call_function(prelu.prelu, (specs[0], w, *runs[0])), {}

    return Site(node, "prelu", path, [x], emit)


_PRELU_FUNCS = (F.prelu, torch.prelu, torch.ops.aten.prelu.default, torch.ops.aten._prelu_kernel.default)


def prelu_functional(node):
    a = bind("prelu", node.args, node.kwargs)
    return a and prelu_site(node, None, a["input"], a["weight"])


def glu_site(node, path, x, dim):
    """GLU keeps its two packed factors (see variants/glu.py)."""
    if not isinstance(x, torch.fx.Node) or not isinstance(dim, int):
        return None

    def emit(graph, env, specs, runs, pack=None):
        both = graph.call_function(glu.factors, (env[x], dim))
        (spec_s, run_s), (spec_d, run_d) = (pack(graph.call_function(operator.getitem, (both, i)), node)
                                            for i in range(2))
        return graph.call_function(glu.glu, (dim, (spec_s, spec_d), env[x], *run_s, *run_d)), {}

    return Site(node, "glu", path, [], emit)


_GLU_FUNCS = (F.glu, torch.ops.aten.glu.default)


def glu_functional(node):
    a = bind("glu", node.args, node.kwargs)
    return a and glu_site(node, None, a["input"], a["dim"])


_RELU_FUNCS = {F.relu: False, torch.relu: False, torch.relu_: True, F.relu_: True}


def _numbers(*values) -> bool:
    return all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)


def _relu_functional(node):
    target = node.target
    if target in (F.relu6,):
        a = bind("relu", node.args, node.kwargs)
        return a and _relu_like_site(node, None, "hardtanh", a["input"], a["inplace"], (0.0, 6.0), None)
    if target in (F.hardtanh, F.hardtanh_):
        a = bind("hardtanh", node.args, node.kwargs)
        if a is None or not _numbers(a["min_val"], a["max_val"]):
            return None  # bounds computed in the graph: the op runs as it is
        inplace = a["inplace"] or target is F.hardtanh_
        return _relu_like_site(node, None, "hardtanh", a["input"], inplace,
                               (float(a["min_val"]), float(a["max_val"])), None)
    if target in (F.leaky_relu, F.leaky_relu_):
        a = bind("leaky_relu", node.args, node.kwargs)
        if a is None or not _numbers(a["negative_slope"]):
            return None
        inplace = a["inplace"] or target is F.leaky_relu_
        return _relu_like_site(node, None, "leaky_relu", a["input"], inplace,
                               (float(a["negative_slope"]),), float(a["negative_slope"]))
    a = bind("relu", node.args, node.kwargs)
    if a is None:
        return None
    return _relu_like_site(node, None, "relu", a["input"], a["inplace"] or _RELU_FUNCS[target], (), None)


def _threshold_site(node, path, x, threshold, value, inplace):
    """F.threshold / nn.Threshold with ``value <= threshold`` (a ReLU at another level): one mask."""
    if not _numbers(threshold, value) or value > threshold or not isinstance(inplace, bool):
        return None
    return _relu_like_site(node, path, "threshold", x, inplace, (float(threshold), float(value)), None)


def _threshold_functional(node):
    a = bind("threshold", node.args, node.kwargs)
    return a and _threshold_site(node, None, a["input"], a["threshold"], a["value"],
                                 a["inplace"] or node.target is F.threshold_)


def _relu_module(node, path, m):
    x = node.args[0]
    if isinstance(m, nn.Threshold):
        return len(node.args) == 1 and _threshold_site(node, path, x, m.threshold, m.value, m.inplace) or None
    if isinstance(m, nn.ReLU):
        return _relu_like_site(node, path, "relu", x, m.inplace, (), None)
    if isinstance(m, nn.LeakyReLU):
        s = float(m.negative_slope)
        return _relu_like_site(node, path, "leaky_relu", x, m.inplace, (s,), s)
    return _relu_like_site(node, path, "hardtanh", x, m.inplace, (float(m.min_val), float(m.max_val)), None)


# ---------------------------------------------------------------- pooling

_MAX_POOL_FUNCS = {F.max_pool1d: 1, F.max_pool2d: 2, F.max_pool3d: 3}
_ADAPTIVE_MAX_FUNCS = {F.adaptive_max_pool1d: 1, F.adaptive_max_pool2d: 2, F.adaptive_max_pool3d: 3}
# What fx records for a pooling called with return_indices=True (F.max_pool2d dispatches on it)
_WITH_INDICES = {getattr(F, f"max_pool{n}d_with_indices"): (n, False) for n in (1, 2, 3)} | {
    getattr(F, f"adaptive_max_pool{n}d_with_indices"): (n, True) for n in (1, 2, 3)}


def _max_pool_site(node, path, nd, x, args, adaptive=False, return_indices=False):
    if not isinstance(return_indices, bool):
        return None

    def emit(graph, env, specs, runs, pack=None):
        fn = pool.adaptive_max_pool if adaptive else pool.max_pool
        return graph.call_function(fn, (nd, *_env(env, args), env[x], return_indices)), {}

    return Site(node, "max_pool", path, [], emit)


def _max_pool_module(node, path, m):
    if len(node.args) != 1:
        return None
    if isinstance(m, nn.modules.pooling._AdaptiveMaxPoolNd):
        nd = {nn.AdaptiveMaxPool1d: 1, nn.AdaptiveMaxPool2d: 2, nn.AdaptiveMaxPool3d: 3}[type(m)]
        return _max_pool_site(node, path, nd, node.args[0], (m.output_size,), True, m.return_indices)
    nd = {nn.MaxPool1d: 1, nn.MaxPool2d: 2, nn.MaxPool3d: 3}[type(m)]
    stride = m.stride if m.stride is not None else m.kernel_size
    return _max_pool_site(node, path, nd, node.args[0],
                          (m.kernel_size, stride, m.padding, m.dilation, m.ceil_mode), False, m.return_indices)


def _max_pool_functional(node):
    t = node.target
    if t in _WITH_INDICES:
        nd, adaptive = _WITH_INDICES[t]
    else:
        adaptive = t in _ADAPTIVE_MAX_FUNCS
        nd = _ADAPTIVE_MAX_FUNCS[t] if adaptive else _MAX_POOL_FUNCS[t]
    a = bind("adaptive_max_pool" if adaptive else "max_pool", node.args, node.kwargs)
    if a is None:
        return None
    returned = t in _WITH_INDICES or a["return_indices"]  # the *_with_indices forms always return them
    if adaptive:
        return _max_pool_site(node, None, nd, a["input"], (a["output_size"],), True, returned)
    stride = a["stride"] if a["stride"] is not None and a["stride"] != [] else a["kernel_size"]
    return _max_pool_site(node, None, nd, a["input"],
                          (a["kernel_size"], stride, a["padding"], a["dilation"], a["ceil_mode"]), False, returned)