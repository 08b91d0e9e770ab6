"""Sites for ops whose backward is re-derived from packed inputs (element-wise activations,
log-softmax, pow/rsqrt/exp...) and linear pools that need only their input's shape."""

from __future__ import annotations

import operator

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.fx import Node

from actfx.passes.expansion import chain_template
from actfx.passes.signatures import bind
from actfx.passes.site import Site
from actfx.rules import SIGN_ONLY, Kind, aten, aten_packet, is_pointwise, rule_for
from actfx.variants import custom_function, derivative, softmax
from actfx.variants.pointwise import Pointwise, pointwise_callables
from actfx.variants.recompute import SLOT, make_recompute_variant


# ---------------------------------------------------------------- recompute-from-packed-input ops

def _template(args, kwargs, chains=None):
    """Replace Node arguments by slot markers; returns (args template, kwargs template, nodes).
    ``chains``: Node -> (source, chain nodes) for arguments to take as a replay of their source
    (``actfx/passes/expansion.py``)."""
    nodes: list = []
    chains = chains or {}

    def mark(n):
        if n in chains:
            source, chain = chains[n]
            return chain_template(mark(source), chain, source, mark)
        nodes.append(n)
        return (SLOT, len(nodes) - 1)

    args_t = torch.fx.node.map_arg(tuple(args), mark)
    kwargs_t = tuple((k, torch.fx.node.map_arg(v, mark)) for k, v in kwargs.items())
    return args_t, kwargs_t, nodes


def _derivative_site(node, path, fn, x, kwargs):
    """GELU / SiLU (not in place): keep the packed derivative (see variants/derivative.py)."""
    kind = "silu" if fn is F.silu else "gelu_tanh" if kwargs.get("approximate") == "tanh" else "gelu"
    kwargs = tuple((k, v) for k, v in kwargs.items() if k != "inplace")

    def emit(graph, env, specs, runs, pack=None):
        d = graph.call_function(derivative.derivative_of, (kind, env[x]))
        spec, run = pack(d, node)
        return graph.call_function(derivative.activation, (spec, kind, kwargs, env[x], *run)), {}

    return Site(node, "silu" if kind == "silu" else "gelu", path, [], emit)


def pointwise_site(node, path, calls, x, inplace=False, kind="pointwise"):
    """An element-wise function of ``x`` (``actfx/variants/pointwise.py``): keep its packed
    derivative. ``calls``: (plain, derivative, variant) from ``pointwise_callables``."""
    _, derivative_of, variant = calls

    def emit(graph, env, specs, runs, pack=None):
        d = graph.call_function(derivative_of, (env[x],))
        spec, run = pack(d, node)
        return graph.call_function(variant, (spec, env[x], *run)), {}

    return Site(node, kind, path, [], emit, inplace_on=x if inplace else None)


def several_pointwise_site(node, calls, xs, kind="pointwise", path=None):
    """An element-wise function of several tensors (``actfx/variants/pointwise_several.py``):
    keep one packed partial derivative per input; each is a second pack of the site's output."""
    _, partials_of, variant = calls

    def emit(graph, env, specs, runs, pack=None):
        packed = _pack_each(graph, graph.call_function(partials_of, tuple(env[x] for x in xs)), len(xs), node, pack)
        return graph.call_function(variant, (tuple(s for s, _ in packed), *(env[x] for x in xs),
                                             *(n for _, run in packed for n in run))), {}

    return Site(node, kind, path, [], emit)


def _pack_each(graph, values, count: int, node, pack) -> list:
    """(spec, run) of each of the ``count`` values of the tuple node ``values``, all packs of
    ``node``'s site (the second and later as further packs of its output, for the planner)."""
    return [pack(graph.call_function(operator.getitem, (values, i)), node, f".d{i}" if i else "") for i in range(count)]


def custom_function_site(node):
    """A custom autograd.Function of one tensor argument (``variants/custom_function.py``): where
    its backward proves element-wise at its first call, keep the packed derivative."""
    function = node.target.actfx_function
    if len(node.all_input_nodes) != 1:
        return None
    x = node.all_input_nodes[0]
    check = custom_function.ElementwiseCheck(function.__name__)

    def output_and_derivative(x_value, *args, **kwargs):
        return custom_function.output_and_derivative(function.apply, check, x_value, args, kwargs)

    output_and_derivative.__name__ = output_and_derivative.__qualname__ = f"derivative_of_{function.__name__}"
    output_and_derivative.actfx_fresh = True  # made anew by each rewrite (provenance compares names)

    def emit(graph, env, specs, runs, pack=None):
        args, kwargs = torch.fx.node.map_arg((node.args, node.kwargs), lambda n: env[n])
        pair = graph.call_function(output_and_derivative, (env[x], *args), kwargs)
        y, d = (graph.call_function(operator.getitem, (pair, i)) for i in (0, 1))
        spec, run = pack(d, node)
        return graph.call_function(custom_function.with_packed_derivative,
                                   (function.__name__, spec, y, env[x], *run)), {}

    return Site(node, "custom_function", None, [], emit)


def softmax_then_site(node, calls):
    """A softmax folded into the element-wise function of it (``actfx/variants/softmax_then.py``):
    keep the packed probabilities and their product with the function's derivative."""
    _, stored_of, variant = calls
    x = node.args[0]
    # the probabilities' other readers read them through ``getitem(node, 0)``: they share the pack
    probabilities = [u for u in node.users if u.target is operator.getitem and u.args[1] == 0]

    def emit(graph, env, specs, runs, pack=None):
        packed = _pack_each(graph, graph.call_function(stored_of, (env[x],)), 2, node, pack)
        out = graph.call_function(variant, (tuple(s for s, _ in packed), env[x], *(n for _, run in packed for n in run)))
        return out, {"packed_outputs": {p: packed[0] for p in probabilities}}

    return Site(node, "softmax", None, [], emit)


def _unary_pointwise_site(node, path, kind, fn, args, kwargs, inplace):
    """``fn(x, constants...)`` for an element-wise ``fn`` (by ATen's tag): its derivative packed."""
    x = args[0] if args else None
    rest = [*args[1:], *kwargs.values()]
    packet = aten_packet("call_function", fn) or aten_packet("call_method", getattr(fn, "__name__", None))
    elementwise = fn in _COMPOSITE_POINTWISE or (packet is not None and is_pointwise(packet))
    if not isinstance(x, Node) or any(isinstance(v, Node) for v in rest) or not elementwise:
        return None
    name = getattr(fn, "__name__", "op")
    if node.op == "call_function" and callable(node.target) and not inplace:
        fn = node.target  # the very callable traced (operator.pow also takes Python numbers)

    def apply(value, _fn=fn, _rest=tuple(args[1:]), _kwargs=dict(kwargs)):
        return _fn(value, *_rest, **_kwargs)

    calls = pointwise_callables(Pointwise(apply, f"{name}_{node.name}", inplace, kind))
    return pointwise_site(node, path, calls, x, inplace, kind)


# Element-wise functions written in Python over ATen ops (no ATen op of their own to read the tag of)
_COMPOSITE_POINTWISE = frozenset({F.softsign, F.tanhshrink})


def inplace_pointwise_site(node):
    """An in-place element-wise op no family lists (``aten.hardswish_``, ``x.erf_()``): computed
    out of place with its packed derivative, then written into its input."""
    packet = aten_packet(node.op, node.target)
    if packet is None or not packet.__name__.endswith("_") or not node.args:
        return None
    base = getattr(aten, packet.__name__[:-1], None)
    if (not isinstance(base, torch._ops.OpOverloadPacket) or base in SIGN_ONLY or not is_pointwise(base)
            or rule_for(base).kind is not Kind.NONLINEAR):
        return None
    return _unary_pointwise_site(node, None, base.__name__, base, node.args, node.kwargs, inplace=True)


_LOG_SOFTMAX = (F.log_softmax, torch.log_softmax, torch.Tensor.log_softmax)


def _log_softmax_site(node, path, fn, args, kwargs):
    """log_softmax with a known dim: keep its packed probabilities (see variants/softmax.py)."""
    # F.log_softmax(input, dim=None, _stacklevel=3, dtype=None); torch. and Tensor.log_softmax(input, dim, dtype=None)
    a = bind("softmax" if fn is F.log_softmax else "torch_softmax", args, kwargs)
    if a is None:
        return None
    x, dim, dtype = a["input"], a["dim"], a["dtype"]
    if not isinstance(x, Node) or not isinstance(dim, int) or isinstance(dtype, Node):
        return None

    def emit(graph, env, specs, runs, pack=None):
        p = graph.call_function(softmax.log_softmax_probabilities, (env[x], dim, dtype))
        spec, run = pack(p, node)
        return graph.call_function(softmax.log_softmax, (spec, dim, dtype, env[x], *run)), {}

    return Site(node, "log_softmax", path, [], emit)


def cross_entropy_site(node, path, x, target, weight, ignore_index, reduction, label_smoothing):
    """F.cross_entropy / nn.CrossEntropyLoss: keep packed class probabilities (variants/softmax.py).

    Whether the split applies (class indices, or class probabilities that need no gradient) is
    decided at run time; otherwise the op runs as it is. ``weight``: None, a node, or (for a loss module's buffer) a
    function that fetches it in the new graph.
    """
    if not isinstance(x, Node) or not isinstance(target, Node):
        return None
    if any(isinstance(v, Node) for v in (ignore_index, reduction, label_smoothing)):
        return None

    def emit(graph, env, specs, runs, pack=None):
        w = weight(graph) if callable(weight) else torch.fx.node.map_arg(weight, lambda n: env[n])
        p = graph.call_function(softmax.cross_entropy_probabilities, (env[x], env[target], label_smoothing))
        spec, run = pack(p, node)
        args = (spec, w, ignore_index, reduction, label_smoothing, env[x], env[target], *run)
        return graph.call_function(softmax.cross_entropy, args), {}

    return Site(node, "cross_entropy", path, [], emit)


def nll_loss_site(node, path=None, module=None):
    """F.nll_loss / nn.NLLLoss (after a log_softmax, which keeps its probabilities packed):
    PyTorch keeps the full log-probabilities for their shape alone (the gradient is -weight at the
    targets); only the shape is kept, the targets and class weights as they are. A module with a
    class weight (its buffer is not a node here) runs as it is."""
    if module is not None:
        if module.weight is not None or len(node.args) != 2 or node.kwargs:
            return None
        args, kwargs = node.args, {"ignore_index": module.ignore_index, "reduction": module.reduction}
    else:
        a = bind("nll_loss", node.args, node.kwargs)
        if a is None or a["size_average"] is not None or a["reduce"] is not None:
            return None  # the deprecated arguments: left as is
        args = (a["input"], a["target"], a["weight"])
        kwargs = {"ignore_index": a["ignore_index"], "reduction": a["reduction"]}
    site = _recompute_site(node, path, "nll_loss", F.nll_loss, args, kwargs, shape_only=True)
    if site is not None:
        site.exact = tuple(range(1, len(site.saved)))
    return site


def _recompute_site(node, path, kind, fn, args, kwargs, inplace=False, shape_only=False, replay_rng=False,
                    chains=None):
    kwargs = dict(kwargs)
    if "inplace" in kwargs:
        inplace = inplace or bool(kwargs["inplace"])
        kwargs["inplace"] = False
    if fn in (F.gelu, F.silu) and not inplace and len(args) == 1 and isinstance(args[0], Node) and all(
            not isinstance(v, Node) for v in kwargs.values()):
        return _derivative_site(node, path, fn, args[0], kwargs)
    if fn in _LOG_SOFTMAX:
        site = _log_softmax_site(node, path, fn, args, kwargs)
        if site is not None:
            return site
    if inplace and not (args and isinstance(args[0], Node)):
        return None
    if not shape_only and not replay_rng:
        site = _unary_pointwise_site(node, path, kind, fn, args, kwargs, inplace)
        if site is not None:
            return site
        if fn not in _RECOMPUTED_LINEARLY:
            # recomputed from rounded inputs, a nonlinear op's gradient is biased (``x ** y`` of two
            # activations, ``F.normalize`` with p != 2): it stays as it is, reported
            return None
    args_t, kwargs_t, nodes = _template(args, kwargs, chains)
    variant = _RECOMPUTE_VARIANTS[fn]

    def emit(graph, env, specs, runs, pack=None):
        flat = [n for run in runs for n in run]
        static = (args_t, kwargs_t, tuple(specs), inplace) + ((True,) if replay_rng else ())
        return graph.call_function(variant, (static, *flat)), {}

    site = Site(node, kind, path, nodes, emit, inplace_on=args[0] if inplace else None, factors=fn in _BILINEAR)
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
    F.softsign: "softsign", F.tanhshrink: "tanhshrink", F.softshrink: "softshrink", F.hardshrink: "hardshrink",
    torch.erf: "erf", torch.log1p: "log1p", torch.expm1: "expm1", torch.reciprocal: "reciprocal",
    torch.square: "square",
}
_ELEMENTWISE_METHODS = {name: getattr(torch.Tensor, name) for name in
                        ("sigmoid", "tanh", "log_softmax", "pow", "rsqrt", "exp", "log", "sqrt", "sin", "cos", "erf",
                         "log1p", "expm1", "reciprocal", "square")}
_SHAPE_ONLY = {**dict.fromkeys((torch.fft.rfft, torch.fft.rfft2, torch.fft.rfftn, torch.fft.fft, torch.fft.fft2,
                                 torch.fft.fftn), "fft"),  # linear: PyTorch keeps the input for its shape
               F.pad: "pad", F.avg_pool1d: "avg_pool", F.avg_pool2d: "avg_pool", F.avg_pool3d: "avg_pool",
               F.adaptive_avg_pool1d: "adaptive_avg_pool", F.adaptive_avg_pool2d: "adaptive_avg_pool",
               F.adaptive_avg_pool3d: "adaptive_avg_pool", F.nll_loss: "nll_loss", F.interpolate: "interpolate"}
# index_add, function and method forms (the in-place method on a tensor nothing else reads)
INDEX_ADDS = {torch.index_add: False, torch.ops.aten.index_add.default: False, "index_add": False, "index_add_": True}
# Products of two activations recomputed from their packed factors: each gradient is linear in them
_BILINEAR = {torch.einsum: "einsum", torch.baddbmm: "baddbmm", torch.addmm: "addmm", torch.bilinear: "bilinear"}
# Ops recomputed from packed inputs whose gradients are linear in each input, or nonlinear only
# where their Site says so (attention: ``Site.nonlinear``)
_RECOMPUTED_LINEARLY = frozenset({*_BILINEAR, F.scaled_dot_product_attention})
_RECOMPUTE_VARIANTS = {
    fn: make_recompute_variant(fn, kind)
    for fn, kind in [*_ELEMENTWISE.items(), *_SHAPE_ONLY.items(), (torch.index_add, "index_add"),
                     *((m, n) for n, m in _ELEMENTWISE_METHODS.items()), *_BILINEAR.items()]
}


def baddbmm_site(node):
    """``baddbmm(input, b1, b2, beta=, alpha=)`` (Bloom's ALiBi attention scores): b1 and b2 are
    packed as a matmul's operands (each gradient is linear in the other), ``input`` is read for
    its shape only (its gradient is ``beta * g``); backward re-derives it."""
    if len(node.args) != 3 or set(node.kwargs) - {"beta", "alpha"}:
        return None
    if any(isinstance(v, Node) for v in node.kwargs.values()):
        return None
    return _recompute_site(node, None, "matmul", torch.baddbmm, node.args, node.kwargs, shape_only=True)


def einsum_site(node):
    """``torch.einsum`` of two or more operands: multilinear, so each operand's gradient is linear
    in every other one (a product of independently rounded packs) and all are packed (as
    matmul's: kind "matmul"); backward re-derives it. Three operands: gated attention scores
    ``bid,bjd,bj->bij``; an activation and two weights."""
    if node.target is torch.einsum:
        equation, operands = (node.args[0], node.args[1:]) if node.args else (None, ())
        if len(operands) == 1 and isinstance(operands[0], (list, tuple)):
            operands = tuple(operands[0])
    else:  # aten.einsum.default(equation, tensors, path=None)
        equation, operands = (node.args + (None, ()))[:2]
        if len(node.args) > 2 or node.kwargs:
            return None
    if not isinstance(equation, str) or len(operands) < 2 or not all(isinstance(o, Node) for o in operands):
        return None
    return _recompute_site(node, None, "matmul", torch.einsum, (equation, *operands), {})


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
        nn.CELU: lambda: (F.celu, (x,), {"alpha": m.alpha, "inplace": m.inplace}),
        nn.LogSigmoid: lambda: (F.logsigmoid, (x,), {}),
        nn.Softsign: lambda: (F.softsign, (x,), {}),
        nn.Tanhshrink: lambda: (F.tanhshrink, (x,), {}),
        nn.Softshrink: lambda: (F.softshrink, (x,), {"lambd": m.lambd}),
        nn.Hardshrink: lambda: (F.hardshrink, (x,), {"lambd": m.lambd}),
    }
    # Exact types only: a subclass (timm's AvgPool2dSame pads first) has a forward of its own.
    if type(m) in _PAD_MODES:
        return _recompute_site(node, path, "pad", F.pad, (x, tuple(m.padding), _PAD_MODES[type(m)]), {},
                               shape_only=True)
    if type(m) in (nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d):
        fn = {nn.AvgPool1d: F.avg_pool1d, nn.AvgPool2d: F.avg_pool2d, nn.AvgPool3d: F.avg_pool3d}[type(m)]
        extra = (m.ceil_mode, m.count_include_pad) + ((m.divisor_override,) if not isinstance(m, nn.AvgPool1d) else ())
        return _recompute_site(node, path, "avg_pool", fn, (x, m.kernel_size, m.stride, m.padding, *extra), {},
                               shape_only=True)
    elif type(m) is nn.Upsample and m.mode == "area":  # adaptive average pooling (``interpolate_site``)
        return _recompute_site(node, path, "interpolate", F.interpolate, (x,),
                               {"size": m.size, "scale_factor": m.scale_factor, "mode": "area"}, shape_only=True)
    elif type(m) in (nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d):
        fn = {nn.AdaptiveAvgPool1d: F.adaptive_avg_pool1d, nn.AdaptiveAvgPool2d: F.adaptive_avg_pool2d,
              nn.AdaptiveAvgPool3d: F.adaptive_avg_pool3d}[type(m)]
        return _recompute_site(node, path, "adaptive_avg_pool", fn, (x, m.output_size), {}, shape_only=True)
    elif type(m) in table:
        fn, args, kwargs = table[type(m)]()
    else:
        return None
    return _recompute_site(node, path, _ELEMENTWISE[fn], fn, args, kwargs)


# Padding modules whose backward PyTorch gives the whole input (for its shape alone)
_PAD_MODES = {**dict.fromkeys((nn.ReflectionPad1d, nn.ReflectionPad2d, nn.ReflectionPad3d), "reflect"),
              **dict.fromkeys((nn.ReplicationPad1d, nn.ReplicationPad2d, nn.ReplicationPad3d), "replicate")}


def pad_site(node):
    """``F.pad`` in reflect / replicate mode: PyTorch keeps the input, its backward needs only the
    shape (CycleGAN's and style-transfer generators pad every conv this way); constant and
    circular padding keep nothing (None)."""
    a = bind("pad", node.args, node.kwargs)
    if a is None or a["mode"] not in ("reflect", "replicate"):
        return None
    return _recompute_site(node, None, "pad", F.pad, (a["input"], a["pad"], a["mode"]), {}, shape_only=True)


def interpolate_site(node):
    """``F.interpolate(mode="area")`` is adaptive average pooling: PyTorch keeps the input, its
    backward needs only the shape (``nn.Upsample`` in that mode: ``_module_as_call``). The other
    modes keep nothing."""
    a = bind("interpolate", node.args, node.kwargs)
    if a is None or a["mode"] != "area" or not isinstance(a["input"], Node):
        return None
    return _recompute_site(node, None, "interpolate", F.interpolate, node.args, node.kwargs, shape_only=True)


def index_add_site(node):
    """``x.index_add(dim, index, source)`` (a graph network's segment sum written by hand, a mixture
    of experts' combine): the gradient of ``source`` is ``g.index_select(dim, index)``, so only its
    shape is kept (PyTorch keeps all of it) and ``index`` exactly. The in-place method is taken
    where nothing else reads ``x`` (``torch.zeros(n, d).index_add_(0, index, messages)``)."""
    inplace = INDEX_ADDS[node.target]
    a = bind("index_add", node.args, {"input" if k == "self" else k: v for k, v in node.kwargs.items()})
    if (a is None or not isinstance(a["dim"], int) or isinstance(a["alpha"], Node)
            or not all(isinstance(a[k], Node) for k in ("input", "index", "source"))
            or len({a["input"], a["index"], a["source"]}) < 3 or (inplace and len(a["input"].users) > 1)):
        return None
    args = (a["input"], a["dim"], a["index"], a["source"])
    site = _recompute_site(node, None, "index_add", torch.index_add, args, {"alpha": a["alpha"]}, shape_only=True)
    # the gradients are g and g.index_select(dim, index): neither reads the accumulator's or the source's values
    site.shape_only = tuple(site.saved.index(a[k]) for k in ("input", "source") if a[k] in site.saved)
    site.exact = (site.saved.index(a["index"]),)
    return site


def _recompute_functional(node):
    fn = node.target
    if fn is F.nll_loss:
        return nll_loss_site(node)
    if fn in _SHAPE_ONLY:
        return _recompute_site(node, None, _SHAPE_ONLY[fn], fn, node.args, node.kwargs, shape_only=True)
    return _recompute_site(node, None, _ELEMENTWISE[fn], fn, node.args, node.kwargs)


def _recompute_method(node):
    name = node.target.rstrip("_")
    inplace = node.target.endswith("_")
    fn = _ELEMENTWISE_METHODS[name]
    return _recompute_site(node, None, name, fn, node.args, node.kwargs, inplace=inplace)
