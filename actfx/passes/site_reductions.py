"""Sites for reductions whose backward reads their input: ``std`` / ``var`` (input packed, std
exact), ``logsumexp`` (its probabilities packed), ``scatter_reduce`` to an extremum (masks), in
function, method and ATen form, the KL-divergence loss (its target packed), row distances
(``cosine_similarity``, ``pairwise_distance``: their row Jacobians packed), pairwise distances
(``cdist``: inputs packed, distances exact), and ops selecting along a dim (``sort``, ``topk``,
``cummax``...: compact indices)."""

from __future__ import annotations

import operator

import torch
from torch.fx import Node

from actfx.passes.signatures import bind
from actfx.passes.site import Site, _env, _get
from actfx.passes.site_elementwise import _template, several_pointwise_site
from actfx.variants import cdist, deviation, kl_div, logsumexp, loss_gradient, scatter_extremum, selection
from actfx.variants.pointwise_several import Several, several_callables

aten = torch.ops.aten

# fx targets -> the name of the spelling the variant runs (``deviation.SPELLINGS``)
DEVIATIONS = {
    torch.std: "torch.std", torch.var: "torch.var", "std": "Tensor.std", "var": "Tensor.var",
    torch.std_mean: "torch.std_mean", torch.var_mean: "torch.var_mean",
    **{op: name for name, op in deviation.SPELLINGS.items() if isinstance(op, torch._ops.OpOverload)},
}
LOGSUMEXPS = (torch.logsumexp, "logsumexp", aten.logsumexp.default)
# fx targets -> whether the spelling writes into its input
SCATTER_REDUCES = {torch.scatter_reduce: False, "scatter_reduce": False, aten.scatter_reduce.two: False,
                   "scatter_reduce_": True, aten.scatter_reduce_.two: True}


def _split_input(node):
    """(input, other positional args, keyword args) with the input named or first; None when an
    argument other than the input is computed in the graph, or an ``out=`` is given."""
    kwargs = dict(node.kwargs)
    x = node.args[0] if node.args else kwargs.pop("input", kwargs.pop("self", None))
    rest = node.args[1:]
    if not isinstance(x, Node) or "out" in kwargs:
        return None
    if _holds_node((rest, kwargs)):
        return None
    return x, tuple(rest), tuple(kwargs.items())


def _holds_node(value) -> bool:
    found = []
    torch.fx.node.map_arg(value, found.append)
    return bool(found)


def deviation_site(node):
    """``std`` / ``var``: the input packed (std's exact output kept), see ``variants/deviation.py``."""
    parts = _split_input(node)
    if parts is None:
        return None
    x, rest, kwargs = parts
    fn = DEVIATIONS[node.target]

    def emit(graph, env, specs, runs, pack=None):
        return graph.call_function(deviation.deviation, (specs[0], fn, rest, kwargs, *runs[0])), {}

    return Site(node, "std" if fn in deviation.AS_VARIANCE else "var", None, [x], emit, reads_own=(0,))


def logsumexp_site(node):
    """``logsumexp(x, dim, keepdim)``: keeps the packed ``exp(x - out)`` (``variants/logsumexp.py``)."""
    a = bind("logsumexp", node.args, {"input" if k == "self" else k: v for k, v in node.kwargs.items()})
    if a is None:
        return None
    x, dim, keepdim = a["input"], a["dim"], a["keepdim"]
    if (not isinstance(x, Node) or _holds_node((dim, keepdim))
            or not isinstance(dim, (int, tuple, list)) or (not isinstance(dim, int) and not dim)):
        return None
    dim = dim if isinstance(dim, int) else tuple(dim)

    def emit(graph, env, specs, runs, pack=None):
        p = graph.call_function(logsumexp.logsumexp_probabilities, (env[x], dim, keepdim))
        spec, run = pack(p, node)
        return graph.call_function(logsumexp.logsumexp, (spec, dim, bool(keepdim), env[x], *run)), {}

    return Site(node, "logsumexp", None, [], emit)


def kl_div_site(node, path=None, module=None):
    """``F.kl_div`` / ``nn.KLDivLoss`` (distillation): the target's probabilities packed, decided
    at run time (``variants/kl_div.py``)."""
    if module is not None:
        if len(node.args) != 2 or node.kwargs:
            return None
        a = {"input": node.args[0], "target": node.args[1], "reduction": module.reduction,
             "log_target": module.log_target}
    else:
        a = bind("kl_div", node.args, node.kwargs)
        if a is None or a["size_average"] is not None or a["reduce"] is not None:
            return None  # the deprecated arguments: left as is
    x, target, reduction, log_target = a["input"], a["target"], a["reduction"], a["log_target"]
    if (not isinstance(x, Node) or not isinstance(target, Node) or _holds_node((reduction, log_target))
            or reduction not in ("none", "sum", "mean", "batchmean")):
        return None

    def emit(graph, env, specs, runs, pack=None):
        p = graph.call_function(kl_div.target_probabilities, (env[x], env[target], bool(log_target)))
        spec, run = pack(p, node)
        return graph.call_function(kl_div.kl_div, (spec, reduction, bool(log_target), env[x], env[target], *run)), {}

    return Site(node, "kl_div", path, [], emit)


def scatter_reduce_site(node):
    """``scatter_reduce(x, dim, index, src, "amax" | "amin")``: 1-bit masks of the extrema in place
    of the messages and the result (``variants/scatter_extremum.py``)."""
    a = bind("scatter_reduce", node.args, {"input" if k == "self" else k: v for k, v in node.kwargs.items()})
    if (a is None or a["reduce"] not in scatter_extremum.EXTREMA or not isinstance(a["dim"], int)
            or not isinstance(a["include_self"], bool) or not isinstance(a["src"], Node)):
        return None
    inplace = SCATTER_REDUCES[node.target]

    def emit(graph, env, specs, runs, pack=None):
        return graph.call_function(scatter_extremum.scatter_extremum, (
            _env(env, a["input"]), a["dim"], _env(env, a["index"]), env[a["src"]], a["reduce"]),
            {"include_self": a["include_self"], "inplace": inplace}), {}

    return Site(node, "scatter_reduce", None, [], emit)


def loss_site(node, fn, path=None, elementwise=True):
    """A loss (``loss_gradient.LOSSES``, or a loss module at ``path``): its input gradients,
    computed in forward, kept packed instead of its inputs (``variants/loss_gradient.py``)."""
    args_t, kwargs_t, nodes = _template(node.args, node.kwargs)
    if not nodes:
        return None
    static = (args_t, kwargs_t, elementwise)

    def emit(graph, env, specs, runs, pack=None):
        f = _get(graph, path) if path is not None else fn.__name__  # a name: fx prints no function arguments
        inputs = [env[n] for n in nodes]
        grads = graph.call_function(loss_gradient.input_gradients, (f, static, *inputs))
        packed = [pack(graph.call_function(operator.getitem, (grads, i)), node) for i in range(len(nodes))]
        return graph.call_function(loss_gradient.loss, (f, static, tuple(spec for spec, _ in packed), len(nodes),
                                                         *inputs, *[t for _, run in packed for t in run])), {}

    return Site(node, "loss", path, [], emit)


# Row distances: one number per row of two tensors. fx target -> (kind, parameter names after x1, x2, defaults)
ROW_DISTANCES = {
    **dict.fromkeys((torch.nn.functional.cosine_similarity, torch.cosine_similarity, aten.cosine_similarity.default),
                    ("cosine_similarity", ("dim", "eps"), (1, 1e-8))),
    **dict.fromkeys((torch.nn.functional.pairwise_distance, torch.pairwise_distance, aten.pairwise_distance.default),
                    ("pairwise_distance", ("p", "eps", "keepdim"), (2.0, 1e-6, False))),
}


def row_distance_site(node):
    """``cosine_similarity(x1, x2, dim)`` / ``pairwise_distance(x1, x2, p, eps, keepdim)``: keeps
    each input's packed row Jacobian (``variants/pointwise_several.py``) instead of both inputs,
    which backward reads nonlinearly."""
    kind, names, defaults = ROW_DISTANCES[node.target]
    if len(node.args) < 2 or len(node.args) > 2 + len(names) or set(node.kwargs) - set(names):
        return None
    options = dict(zip(names, defaults)) | dict(zip(names, node.args[2:])) | dict(node.kwargs)
    return _row_distance(node, None, kind, node.target, node.args[0], node.args[1], options)


def row_distance_module_site(node, path, m):
    """nn.CosineSimilarity / nn.PairwiseDistance: as their functions."""
    if len(node.args) != 2 or node.kwargs:
        return None
    if isinstance(m, torch.nn.CosineSimilarity):
        options = {"dim": m.dim, "eps": m.eps}
        return _row_distance(node, path, "cosine_similarity", torch.nn.functional.cosine_similarity, *node.args, options)
    options = {"p": m.norm, "eps": m.eps, "keepdim": m.keepdim}
    return _row_distance(node, path, "pairwise_distance", torch.nn.functional.pairwise_distance, *node.args, options)


CDISTS = (torch.cdist, aten.cdist.default)


def cdist_site(node):
    """``torch.cdist(x1, x2)`` with p = 2: both inputs packed, the distances exact
    (``variants/cdist.py``); other p stay as they are."""
    a = {**dict(zip(("x1", "x2", "p", "compute_mode"), node.args)), **node.kwargs}
    x1, x2, p = a.get("x1"), a.get("x2"), a.get("p", 2.0)
    fn = "torch.cdist" if node.target is torch.cdist else "aten.cdist"
    mode = a.get("compute_mode", "use_mm_for_euclid_dist_if_necessary" if fn == "torch.cdist" else None)
    if (not (isinstance(x1, Node) and isinstance(x2, Node)) or p not in (2, 2.0) or isinstance(mode, Node)
            or set(a) - {"x1", "x2", "p", "compute_mode"}):
        return None

    def emit(graph, env, specs, runs, pack=None):
        return graph.call_function(cdist.cdist, (tuple(specs), fn, mode, *runs[0], *runs[1])), {}

    # each input's gradient reads that input (x1_i - x2_j): its own rounding, never a producer's
    return Site(node, "cdist", None, [x1, x2], emit, reads_own=(0, 1))


def _row_distance(node, path, kind, fn, x1, x2, options):
    if not (isinstance(x1, Node) and isinstance(x2, Node)) or _holds_node(tuple(options.values())):
        return None
    values = tuple(options.values())  # in the function's own order after x1, x2

    def call(a, b):
        return fn(a, b, *values)

    dim, keepdim = (options["dim"], False) if kind == "cosine_similarity" else (-1, options["keepdim"])
    calls = several_callables(Several(call, node.name, 2, kind=kind, dim=dim, keepdim=keepdim))
    return several_pointwise_site(node, calls, (x1, x2), kind=kind, path=path)


# Ops selecting along a dim, returning (values, indices): fx target -> (op, position of dim among
# the arguments after the input, its default (None: required), position of keepdim or None)
_SELECTING = {
    "sort": ((torch.sort, "sort", aten.sort.default, aten.sort.stable), 0, -1, None),
    "topk": ((torch.topk, "topk", aten.topk.default), 1, -1, None),
    "cummax": ((torch.cummax, "cummax", aten.cummax.default), 0, None, None),
    "cummin": ((torch.cummin, "cummin", aten.cummin.default), 0, None, None),
    "kthvalue": ((torch.kthvalue, "kthvalue", aten.kthvalue.default), 1, -1, 2),
    "median": ((torch.median, "median", aten.median.dim), 0, None, 1),
    "nanmedian": ((torch.nanmedian, "nanmedian", aten.nanmedian.dim), 0, None, 1),
    "mode": ((torch.mode, "mode", aten.mode.default), 0, -1, 1),
    # torch.max / min and their methods also take two tensors: sites.py picks the dim forms
    "max": ((aten.max.dim,), 0, None, 1),
    "min": ((aten.min.dim,), 0, None, 1),
}
SELECTIONS = {target: (op, *where) for op, (targets, *where) in _SELECTING.items() for target in targets}


# ``torch.max(x, dim)`` / ``x.min(dim, keepdim)``: the two-tensor forms are element-wise (extremum_site)
EXTREMA_OVER_A_DIM = {"maximum": ("max", *_SELECTING["max"][1:]), "minimum": ("min", *_SELECTING["min"][1:])}


def selection_site(node, entry: tuple | None = None):
    """``sort``, ``topk``, ``cummax``, ``median(x, dim)`` and kin: compact indices instead of
    int64 ones (and the input, for ``cummax``), ``variants/selection.py``. ``entry``: (op, dim
    position, its default, keepdim position) where the target alone does not say (max over a dim)."""
    split = _split_input(node)
    if split is None:
        return None
    x, rest, kwargs = split
    kwargs = dict(kwargs)
    op, dim_at, dim_default, keep_at = entry or SELECTIONS[node.target]
    dim = kwargs.get("dim", rest[dim_at] if len(rest) > dim_at else dim_default)
    keepdim = kwargs.get("keepdim", rest[keep_at] if keep_at is not None and len(rest) > keep_at else False)
    if not isinstance(dim, int) or not isinstance(keepdim, bool):
        return None  # median(x) over everything returns one value, not (values, indices)
    target = node.target

    def call(value):
        return target(value, *rest, **kwargs) if callable(target) else getattr(value, target)(*rest, **kwargs)

    select = selection.selecting(op, call, dim, keep_at is not None and not keepdim, node.name)

    def emit(graph, env, specs, runs, pack=None):
        return graph.call_function(select, (env[x],)), {}

    return Site(node, op, None, [], emit)
