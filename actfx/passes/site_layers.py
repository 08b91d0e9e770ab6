"""Sites for layers with weights and normalisations: conv, linear, addmm, BatchNorm,
LayerNorm / GroupNorm / InstanceNorm, RMSNorm."""

from __future__ import annotations

import operator

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.fx import Node
from torch.fx.node import map_arg

from actfx.passes.graph_facts import attribute
from actfx.passes.signatures import bind
from actfx.passes.site import Site, _bias_node, _env, _get
from actfx.passes.site_elementwise import _recompute_site, several_pointwise_site
from actfx.variants import (
    batchnorm, conv, embedding, gather, grid_sample, grouped_mm, linear, masked_select, normalize, norms, rmsnorm,
    vector_norm,
)
from actfx.variants.pointwise_several import Several, several_callables


# ---------------------------------------------------------------- convolution and linear

def _without_weight(runs: list) -> list:
    """The runs flat, the computed weight's own slot None: the variant reads it from its weight
    argument (torch.compile refuses one tensor passed twice to an autograd.Function)."""
    return [*runs[0], *([None, *runs[1][1:]] if len(runs) > 1 else ())]


def _conv_site(node, path, x, weight, bias, transposed, nd, stride, padding, dilation, output_padding,
               groups, pad=None, kind="conv"):
    computed = isinstance(weight, Node) and weight.op != "get_attr"  # a weight the graph computes

    def emit(graph, env, specs, runs, pack=None):
        # read at run time where the graph computes it (StyleGAN2's modulated conv: groups = batch)
        geometry = _env(env, (transposed, nd, stride, padding, dilation, output_padding, groups, pad))
        w = weight(graph) if callable(weight) else _env(env, weight)
        b = bias(graph) if callable(bias) else _env(env, bias)
        return graph.call_function(conv.conv, (geometry, tuple(specs), w, b, *_without_weight(runs))), {}

    return Site(node, kind, path, [x, weight] if computed else [x], emit)


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
    if a is None:
        return None

    def tup(v):
        return tuple(v) if isinstance(v, (tuple, list)) else (v,) * nd

    padding = a["padding"]
    if isinstance(padding, str):
        padding = _string_padding(padding, a["weight"], tup(a["dilation"]))
        if padding is None:
            return None
    return _conv_site(node, None, a["input"], a["weight"], a["bias"], transposed, nd, tup(a["stride"]),
                      tup(padding), tup(a["dilation"]),
                      tup(a.get("output_padding", 0)), a["groups"],
                      kind="conv_transpose" if transposed else "conv")


def _string_padding(padding: str, weight, dilation: tuple) -> tuple | None:
    """``padding="valid"`` (SigLIP's patch embedding) as numbers; ``"same"`` where the padding
    is symmetric and the kernel's size is known from the graph (torch.export records it), else
    None (the call stays as it is: ``"same"`` with an odd total pads one side more)."""
    if padding == "valid":
        return (0,) * len(dilation)
    value = weight.meta.get("val") if isinstance(weight, Node) else weight
    if value is None and isinstance(weight, Node) and weight.op == "get_attr":
        value = _attribute(weight)  # an fx trace records no values: the weight itself has the size
    if padding != "same" or not isinstance(value, torch.Tensor):
        return None
    totals = [d * (k - 1) for d, k in zip(dilation, value.shape[2:])]
    return tuple(t // 2 for t in totals) if all(t % 2 == 0 for t in totals) else None


def _attribute(node: Node):
    """The tensor a ``get_attr`` node reads from its graph's module, or None."""
    return attribute(node.graph.owning_module, node.target)


_GRID_MODES = {"bilinear": 0, "nearest": 1, "bicubic": 2}
_GRID_PADDINGS = {"zeros": 0, "border": 1, "reflection": 2}
_GRID_SAMPLERS = (F.grid_sample, torch.grid_sampler, torch.ops.aten.grid_sampler.default)


def grid_sample_site(node):
    """``F.grid_sample`` (or the ``grid_sampler`` it calls): input packed, grid exact."""
    if node.target is F.grid_sample:
        a = bind("grid_sample", node.args, node.kwargs)
        if a is None or a["mode"] not in _GRID_MODES or a["padding_mode"] not in _GRID_PADDINGS:
            return None
        mode, padding = _GRID_MODES[a["mode"]], _GRID_PADDINGS[a["padding_mode"]]
        align = bool(a["align_corners"])  # None is False (F.grid_sample warns about it itself)
    else:
        a = bind("grid_sampler", node.args, node.kwargs)
        if a is None:
            return None
        mode, padding, align = a["interpolation_mode"], a["padding_mode"], a["align_corners"]
    if not all(isinstance(v, int) for v in (mode, padding)) or not isinstance(align, bool):
        return None
    x, grid = a["input"], a["grid"]

    def emit(graph, env, specs, runs, pack=None):
        return graph.call_function(grid_sample.grid_sample, (specs[0], mode, padding, align, _env(env, grid),
                                                             *runs[0])), {}

    return Site(node, "grid_sample", None, [x], emit)


def grouped_mm_implementation(target) -> str | None:
    """Which grouped matmul an fx target is (``variants/grouped_mm.IMPLEMENTATIONS``), if any;
    transformers' op is matched by name, so transformers need not be imported."""
    if target in (torch._grouped_mm, torch.ops.aten._grouped_mm.default):
        return "aten"
    if isinstance(target, torch._ops.OpOverload) and target.name() == "transformers::grouped_mm_fallback":
        return "transformers"
    return None


def grouped_mm_site(node):
    """A mixture-of-experts grouped matmul: tokens packed; experts, group ends exact. Calls with
    a bias or an output dtype stay as they are."""
    implementation = grouped_mm_implementation(node.target)
    schema = torch.ops.aten._grouped_mm.default._schema  # (self, mat2, offs, bias, out_dtype)
    names = [a.name for a in schema.arguments]
    a = dict(zip(names, node.args)) | {names[0] if k == "input" else names[1] if k == "weight" else k: v
                                       for k, v in node.kwargs.items()}
    if a.get("bias") is not None or a.get("out_dtype") is not None or not isinstance(a.get("offs"), Node):
        return None
    x, weight, offs = a["self"], a["mat2"], a["offs"]

    def emit(graph, env, specs, runs, pack=None):
        return graph.call_function(grouped_mm.grouped_mm, (specs[0], implementation, _env(env, weight),
                                                           _env(env, offs), *runs[0])), {}

    return Site(node, "grouped_mm", None, [x], emit)


def _linear_site(node, path, x, weight, bias):
    computed = isinstance(weight, Node) and weight.op != "get_attr"  # a LoRA's merged weight

    def emit(graph, env, specs, runs, pack=None):
        w = weight(graph) if callable(weight) else _env(env, weight)
        b = bias(graph) if callable(bias) else _env(env, bias)
        return graph.call_function(linear.linear, (tuple(specs), w, b, *_without_weight(runs))), {}

    return Site(node, "linear", path, [x, weight] if computed else [x], emit)


def _addmm(node):
    """``addmm(bias, x, w)`` (GPT-2's Conv1D) is ``F.linear(x, w.t(), bias)``, bit for bit; with
    ``beta`` / ``alpha`` it is recomputed from its packed factors as ``baddbmm`` is."""
    a = bind("addmm", node.args, node.kwargs)
    if a is None or any(isinstance(a[k], Node) for k in ("beta", "alpha")):
        return None
    if a["beta"] != 1 or a["alpha"] != 1:
        return _recompute_site(node, None, "matmul", torch.addmm, (a["input"], a["mat1"], a["mat2"]),
                               {"beta": a["beta"], "alpha": a["alpha"]}, shape_only=True)

    def emit(graph, env, specs, runs, pack=None):
        weight = graph.call_method("t", (_env(env, a["mat2"]),))
        return graph.call_function(linear.linear, ((specs[0],), weight, _env(env, a["input"]), *runs[0])), {}

    return Site(node, "linear", None, [a["mat1"]], emit)


# ---------------------------------------------------------------- batch norm

COPY = "#copy"  # the key suffix of BatchNorm's second pack of x̂ (batchnorm.second_copy)


def _batch_norm_site(node, path, x, normalized, copy, call):
    """BatchNorm packs its *normalised* input (see variants/batchnorm.py) and returns ``γ, β``:
    its output is ``γ x̂ + β`` per channel, so a ReLU -> conv chain after it rebuilds the conv's
    input from that pack. ``normalized(graph, env)``, ``copy(graph, env, xhat)`` and
    ``call(graph, env, specs, run)`` emit the three calls of the module or functional form."""

    def emit(graph, env, specs, runs, pack=None):
        xhat = normalized(graph, env)
        spec, run = pack(xhat, node)
        spec2, run2 = pack(copy(graph, env, xhat), node, COPY)
        node_call = call(graph, env, (spec, spec2), [*run, *run2])
        out, gamma, beta = (graph.call_function(operator.getitem, (node_call, i)) for i in range(3))
        # backward reads x through x̂ = (x - mean) / std (the planner's noise model follows it)
        reads = [(x, ("unnormalized", node.name, ("normalized", node.name)))]
        return out, {"affine": (gamma, beta), "affine_of": (spec, run, 1, ("normalized", node.name)), "reads": reads}

    return Site(node, "batch_norm", path, [], emit)


def _batch_norm_module(node, path, m):
    if len(node.args) != 1 or node.kwargs:
        return None
    x = node.args[0]
    return _batch_norm_site(
        node, path, x,
        lambda graph, env: graph.call_function(batchnorm.batch_norm_module_normalized, (_get(graph, path), env[x])),
        lambda graph, env, xhat: graph.call_function(batchnorm.module_second_copy, (_get(graph, path), xhat, env[x])),
        lambda graph, env, spec, run: graph.call_function(
            batchnorm.batch_norm_module, (_get(graph, path), spec, env[x], *run)))


def _batch_norm_functional(node):
    a = bind("batch_norm", node.args, node.kwargs)
    if a is None:
        return None
    x = a["input"]

    def args(env, *keys):
        return [_env(env, a[k]) for k in keys]

    return _batch_norm_site(
        node, None, x,
        lambda graph, env: graph.call_function(batchnorm.batch_norm_normalized, (
            env[x], *args(env, "running_mean", "running_var", "training", "eps", "weight", "bias"))),
        lambda graph, env, xhat: graph.call_function(batchnorm.second_copy, (xhat, *args(env, "training"), env[x])),
        lambda graph, env, spec, run: graph.call_function(batchnorm.batch_norm_functional, (
            spec, *args(env, "running_mean", "running_var", "weight", "bias", "training", "momentum", "eps"),
            env[x], *run)))


# ---------------------------------------------------------------- LayerNorm / GroupNorm / InstanceNorm

def _norm_site(node, path, kind, x, static, weight, bias):
    """static: (normalized_shape,) / (num_groups,) / () followed by eps; weight/bias: nodes,
    None, or callables making get_attr nodes for a module's parameters."""

    if kind == "layer_norm":
        return _layer_norm_site(node, path, x, static, weight, bias)

    def emit(graph, env, specs, runs, pack=None):
        # like LayerNorm, the normalised input is what is packed (see variants/norms.py)
        w = weight(graph) if callable(weight) else _env(env, weight)
        b = bias(graph) if callable(bias) else _env(env, bias)
        *head, eps = static
        if kind == "instance_norm":
            xhat = graph.call_function(norms.instance_norm_normalized, (env[x], eps, w, b))
            copy = graph.call_function(norms.instance_norm_copy, (xhat, env[x]))
        else:
            xhat = graph.call_function(norms.group_norm_normalized, (env[x], *head, eps, w, b))
            copy = graph.call_function(norms.group_norm_copy, (xhat, *head, env[x]))
        (spec, run), (spec2, run2) = pack(xhat, node), pack(copy, node, COPY)
        variant = norms.instance_norm if kind == "instance_norm" else norms.group_norm
        return graph.call_function(variant, ((spec, spec2), *head, w, b, eps, env[x], *run, *run2)), {}

    return Site(node, kind, path, [], emit)


def _layer_norm_site(node, path, x, static, weight, bias):
    """LayerNorm keeps its *normalised* input packed (see variants/norms.py, layer_norm_normalized).
    With a weight and a bias over one dim, its output is ``w * x̂ + b``: a consumer that saves it
    (the next linear) rebuilds it from that pack instead of packing it again."""
    shape, eps = static

    def emit(graph, env, specs, runs, pack=None):
        w = weight(graph) if callable(weight) else _env(env, weight)
        b = bias(graph) if callable(bias) else _env(env, bias)
        size = map_arg(shape, lambda n: env[n])  # (h.shape[-1],) in functional code: read at run time
        xhat = graph.call_function(norms.layer_norm_normalized, (env[x], size, eps, w, b))
        spec, run = pack(xhat, node)
        spec2, run2 = pack(graph.call_function(norms.last_dims_copy, (xhat, size, env[x])), node, COPY)
        out = graph.call_function(norms.layer_norm_from_normalized,
                                  ((spec, spec2), size, w, b, eps, env[x], *run, *run2))
        one_dim = isinstance(shape, int) or (isinstance(shape, (tuple, list)) and len(shape) == 1)
        if one_dim and isinstance(w, Node) and isinstance(b, Node):
            return out, {"affine": (w, b), "affine_of": (spec, run, -1, ("pack", node.name))}
        return out, {}

    return Site(node, "layer_norm", path, [], emit)


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
    if isinstance(static[-1], Node) or (kind == "group_norm" and isinstance(static[0], Node)):
        return None  # eps and the group count must be constants; a shape may be read from a size
    return _norm_site(node, None, kind, a["input"], static, a["weight"], a["bias"])


def _rms_norm_site(node, path, x, shape, weight, eps):
    """RMSNorm keeps its normalised input packed (and a copy over few features), as LayerNorm."""

    def emit(graph, env, specs, runs, pack=None):
        w = weight(graph) if callable(weight) else _env(env, weight)
        size = map_arg(shape, lambda n: env[n])  # read at run time where it comes from x.shape
        xhat = graph.call_function(rmsnorm.rms_norm_normalized, (env[x], size, eps, w))
        (spec, run), (spec2, run2) = pack(xhat, node), pack(
            graph.call_function(norms.last_dims_copy, (xhat, size, env[x])), node, COPY)
        return graph.call_function(rmsnorm.rms_norm, ((spec, spec2), size, w, eps, env[x], *run, *run2)), {}

    return Site(node, "rms_norm", path, [], emit)


def normalize_site(node):
    """``F.normalize(x, 2, dim, eps)``: its output packed (and a copy over few features) with the
    exact 1/norm (``variants/normalize.py``); other norms stay element-wise recomputes (None)."""
    a = bind("normalize", node.args, node.kwargs)
    if (a is None or a["p"] not in (2, 2.0) or not isinstance(a["dim"], int) or isinstance(a["eps"], Node)
            or a["out"] is not None):
        return None
    return _normalized_site(node, a["input"], a["dim"], "clamp", a["eps"])


def divided_by_norm_site(node):
    """``x / ||x||`` (or ``+ eps``, ``clamp(min=eps)``) collapsed by ``passes/norm_divisions.py``:
    as ``F.normalize``."""
    return _normalized_site(node, *node.args)


def _normalized_site(node, x, dim: int, mode: str, eps):
    """``x`` over its norm along ``dim`` (``variants/normalize.py``'s modes): the output packed,
    a copy over few features, the exact 1/norm."""
    def emit(graph, env, specs, runs, pack=None):
        pair = graph.call_function(normalize.normalized, (env[x], dim, eps, mode))
        (spec, run), (spec2, run2) = pack(graph.call_function(normalize.output_of, (pair,)), node), pack(
            graph.call_function(normalize.row_copy, (pair, dim, env[x])), node, COPY)
        return graph.call_function(normalize.normalize, ((spec, spec2), dim, eps, env[x], pair, *run, *run2),
                                   {"mode": mode}), {}

    return Site(node, "normalize", None, [], emit)


def vector_norm_site(node):
    """``torch.linalg.vector_norm(x, 2, dim, keepdim)`` over given dims (F.normalize's and cosine
    attention's norm, as torch.export records it): input packed, norm exact."""
    return _two_norm_site(node, ("input", "ord", "dim", "keepdim", "dtype"), default_order=2)


def torch_norm_site(node):
    """``torch.norm(x, p, dim, keepdim)`` / ``x.norm(...)`` with p 2 or "fro" over given dims
    (ConvNeXt-V2's GRN): the same 2-norm as ``vector_norm``."""
    return _two_norm_site(node, ("input", "p", "dim", "keepdim", "out", "dtype"), default_order="fro")


def linalg_norm_site(node):
    """``torch.linalg.norm(x, ord, dim, keepdim)``: with ``ord`` None the 2-norm over ``dim``
    (Frobenius over two dims), with a number over one dim a vector p-norm: ``vector_norm``'s
    either way. A matrix norm (a number over two dims) is not covered."""
    names = ("input", "ord", "dim", "keepdim", "out", "dtype")
    a = {**dict(zip(names, node.args)), **node.kwargs}
    dim = a.get("dim")
    if a.get("ord") is None:
        a["ord"] = 2
    elif not (isinstance(dim, int) or (isinstance(dim, (tuple, list)) and len(dim) == 1)):
        return None
    return _two_norm_site(node, names, 2, a)


def _two_norm_site(node, names: tuple, default_order, a: dict | None = None):
    a = a if a is not None else {**dict(zip(names, node.args)), **node.kwargs}
    x, ord_, dim, keepdim = a.get("input"), a.get(names[1], default_order), a.get("dim"), a.get("keepdim", False)
    if ord_ not in (2, 2.0, "fro"):
        return _row_norm_site(node, a, names)
    if (not isinstance(x, Node) or a.get("dtype") is not None or dim is None
            or a.get("out") is not None
            or isinstance(dim, Node) or isinstance(keepdim, Node) or set(a) - set(names)):
        return None
    dim = dim if isinstance(dim, int) else tuple(dim)

    def emit(graph, env, specs, runs, pack=None):
        return graph.call_function(vector_norm.vector_norm, (specs[0], dim, keepdim, *runs[0])), {}

    return Site(node, "vector_norm", None, [x], emit, reads_own=(0,))


def _row_norm_site(node, a: dict, names: tuple):
    """A p-norm (p not 2) over one dim: its backward reads the input nonlinearly, so each row's
    Jacobian is kept packed instead (``variants/pointwise_several.py``)."""
    x, dim = a.get("input"), a.get("dim")
    dim = dim[0] if isinstance(dim, (tuple, list)) and len(dim) == 1 else dim
    if (not isinstance(x, Node) or not isinstance(dim, int) or not isinstance(a.get(names[1]), (int, float))
            or not isinstance(a.get("keepdim", False), bool) or a.get("out") is not None or set(a) - set(names)
            or isinstance(a.get("dtype"), Node)):
        return None
    fn, options = node.target, {k: v for k, v in a.items() if k != "input"}

    def call(value):
        return fn(value, **options) if callable(fn) else getattr(value, fn)(**options)

    calls = several_callables(Several(call, node.name, 1, kind="vector_norm", dim=dim, keepdim=a.get("keepdim", False)))
    return several_pointwise_site(node, calls, (x,), kind="vector_norm")


def _rms_norm_module(node, path, m):
    if len(node.args) != 1 or node.kwargs:
        return None
    weight = (lambda g: _get(g, path, "weight")) if m.weight is not None else None
    return _rms_norm_site(node, path, node.args[0], tuple(m.normalized_shape), weight, m.eps)


def embedding_site(node, path=None, module=None):
    """Embedding (``F.embedding`` or ``nn.Embedding``): its indices kept compact
    (``variants/embedding.py``); nothing is packed."""
    if module is not None:
        if len(node.args) != 1 or node.kwargs:
            return None
        a = {"input": node.args[0], "padding_idx": module.padding_idx, "max_norm": module.max_norm,
             "norm_type": module.norm_type, "scale_grad_by_freq": module.scale_grad_by_freq, "sparse": module.sparse}
        weight = lambda g: _get(g, path, "weight")  # noqa: E731
    else:
        a = bind("embedding", node.args, node.kwargs)
        if a is None:
            return None
        weight = a["weight"]
    if any(isinstance(a[k], Node) for k in ("padding_idx", "max_norm", "norm_type", "scale_grad_by_freq", "sparse")):
        return None

    def emit(graph, env, specs, runs, pack=None):
        w = weight(graph) if callable(weight) else _env(env, weight)
        return graph.call_function(embedding.embedding, (_env(env, a["input"]), w, a["padding_idx"], a["max_norm"],
                                                         a["norm_type"], a["scale_grad_by_freq"], a["sparse"])), {}

    return Site(node, "embedding", path, [], emit)


GATHERS = (torch.gather, torch.ops.aten.gather.default, "gather")


def gather_site(node):
    """``torch.gather`` / ``x.gather`` (dense): its index kept compact (``variants/gather.py``)."""
    a = dict(zip(("input", "dim", "index"), node.args)) | {"input" if k == "self" else k: v for k, v in node.kwargs.items()}
    if a.get("sparse_grad") or not isinstance(a.get("dim"), int) or not isinstance(a.get("index"), Node):
        return None

    def emit(graph, env, specs, runs, pack=None):
        return graph.call_function(gather.gather, (_env(env, a["input"]), a["dim"], _env(env, a["index"]))), {}

    return Site(node, "gather", None, [], emit)


MASKED_SELECTS = (torch.masked_select, torch.ops.aten.masked_select.default, "masked_select")


def masked_select_site(node):
    """``torch.masked_select`` / ``x.masked_select``: only the mask kept (``variants/masked_select.py``)."""
    a = dict(zip(("input", "mask"), node.args)) | {"input" if k == "self" else k: v for k, v in node.kwargs.items()}
    if not isinstance(a.get("input"), Node) or "mask" not in a or "out" in a:
        return None

    def emit(graph, env, specs, runs, pack=None):
        return graph.call_function(masked_select.masked_select, (_env(env, a["input"]), _env(env, a["mask"]))), {}

    return Site(node, "masked_select", None, [], emit)


def rms_normalize_site(node):
    """Hand-written RMS normalisation collapsed by ``passes/rms_regions.py``: keeps the packed
    normalised value (shared with the weight's product), a copy over few features, and the exact
    1/rms."""
    x, dims, eps, square = node.args

    def emit(graph, env, specs, runs, pack=None):
        pair = graph.call_function(rmsnorm.rms_normalized, (env[x], dims, eps, square))
        normalized, scale = (graph.call_function(operator.getitem, (pair, i)) for i in range(2))
        spec, run = pack(normalized, node)
        spec2, run2 = pack(graph.call_function(rmsnorm.rms_copy, (normalized, dims, env[x])), node, COPY)
        out = graph.call_function(rmsnorm.rms_from_normalized, ((spec, spec2), dims, env[x], scale, *run, *run2))
        return out, {"packed_output": (spec, run)}

    return Site(node, "rms_norm", None, [], emit)


def _rms_norm_functional(node):
    a = bind("rms_norm", node.args, node.kwargs)
    if a is None or isinstance(a["eps"], Node):
        return None
    return _rms_norm_site(node, None, a["input"], a["normalized_shape"], a["weight"], a["eps"])
