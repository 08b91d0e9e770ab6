"""Sites for attention and products of activations: SDPA, softmax, nn.MultiheadAttention /
TransformerEncoderLayer (recomputed modules), mul / div / matmul."""

from __future__ import annotations

import operator

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.fx import Node

from actfx.passes.expansion import chain_inputs, replay_chain
from actfx.passes.signatures import bind
from actfx.passes.site import Site, _env, _get
from actfx.passes.site_elementwise import _recompute_site, _template
from actfx.variants import attention_math, module_recompute, products, softmax


# ---------------------------------------------------------------- attention

def _sdpa(node):
    """F.scaled_dot_product_attention: q, k, v packed (Config.op_bits["sdpa"], 8 by default; q
    and k never below ``NONLINEAR_BITS``), backward recomputes attention from them (replaying
    dropout); the mask is kept exact. A key, value or mask repeated from a smaller tensor
    (grouped-query attention's ``repeat_kv``, a broadcast mask) is kept as that tensor and
    repeated again in backward."""
    a = bind("sdpa", node.args, node.kwargs)
    if a is None:
        return None
    dropout = a["dropout_p"]
    replay = isinstance(dropout, Node) or dropout != 0.0
    args = (a["query"], a["key"], a["value"])
    kwargs = {k: a[k] for k in ("attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")}
    mask = a["attn_mask"]
    chains = {n: c for n in (a["key"], a["value"], mask) if isinstance(n, Node)
              for c in [replay_chain(n, pointwise=n is mask)] if c is not None}
    site = _recompute_site(node, None, "sdpa", F.scaled_dot_product_attention, args, kwargs, replay_rng=replay,
                           chains=chains)
    if site is not None and isinstance(mask, Node):
        exact = chain_inputs(*chains[mask]) if mask in chains else {mask}
        site.exact = tuple(i for i, n in enumerate(site.saved) if n in exact)
    if site is not None:
        # softmax(q k^T) is recomputed from q and k: nonlinear in them (v enters linearly)
        scores = chain_inputs(*chains[a["key"]]) if a["key"] in chains else {a["key"]}
        site.nonlinear = tuple(i for i, n in enumerate(site.saved) if n is a["query"] or n in scores)
        if not replay:
            site.alternative = _math_sdpa_site(node, args, kwargs, chains, site.exact)
    return site


def _math_sdpa_site(node, args, kwargs, chains, exact):
    """The same call with backward reading two packs of its probabilities
    (``variants/attention_math``): q and k are read linearly, so no width floor."""
    args_t, kwargs_t, nodes = _template(args, kwargs, chains)

    def emit(graph, env, specs, runs, pack=None):
        flat = [n for run in runs for n in run]
        static = (args_t, kwargs_t, tuple(specs))
        p = graph.call_function(attention_math.probabilities, (static, *flat))
        first, second = pack(p, node), pack(p, node)  # one value to the planner, rounded apart
        out = graph.call_function(attention_math.attention,
                                  ((*static, (first[0], second[0])), *flat, *first[1], *second[1]))
        return out, {}

    return Site(node, "sdpa", None, nodes, emit, exact=exact)


def _softmax_site(node, path, x, dim, dtype, negated=False):
    """``negated``: softmin, the softmax of ``-x`` (as F.softmin computes it)."""
    def emit(graph, env, specs, runs, pack=None):
        dt = _env(env, dtype)  # ``dtype=x.dtype`` is a node of the traced graph
        source = graph.call_function(operator.neg, (env[x],)) if negated else env[x]
        y = graph.call_function(softmax.softmax_forward, (source, dim, dt))
        spec, run = pack(y, node)
        return graph.call_function(softmax.softmax, (spec, dim, dt, source, *run)), {"packed_output": (spec, run)}

    return Site(node, "softmax", path, [], emit)


def _softmax_functional(node, method=False):
    a = bind("softmax", node.args, node.kwargs)
    if a is None or a["dim"] is None or isinstance(a["dim"], Node):
        return None
    return _softmax_site(node, None, a["input"], a["dim"], a["dtype"], negated=node.target is F.softmin)


_RECOMPUTED_MODULES = (nn.MultiheadAttention, nn.TransformerEncoderLayer, nn.TransformerDecoderLayer,
                       # recurrent layers keep gates and states of every step; their input is far less
                       nn.LSTM, nn.GRU, nn.RNN, nn.LSTMCell, nn.GRUCell, nn.RNNCell)


def _module_recompute_site(node, path, m, checkpoint: bool = False, target: str | None = None):
    """PyTorch's attention modules and a ``checkpoint`` (a module ``Config.recompute_modules``
    names; ``target``: the module called, where it is not at ``path``, a block outlined from a graph
    torch.export captured) are rerun in backward from their inputs, kept exact. Why exact: the rerun is nonlinear
    in them (LayerNorm, softmax), so from rounded inputs the gradients were biased (a
    TransformerEncoderLayer's mean of 64 gradients stayed 1.8% of the norm off at 8 bits)."""
    args_t, kwargs_t, nodes = _template(node.args, node.kwargs)
    exact = tuple(range(len(nodes)))

    def emit(graph, env, specs, runs, pack=None):
        flat = [n for run in runs for n in run]
        static = (args_t, kwargs_t, tuple(specs))
        return graph.call_function(module_recompute.recompute_module, (_get(graph, target or path), static, *flat)), {}

    kind = ("checkpoint" if checkpoint else "attention" if isinstance(m, nn.MultiheadAttention) else
            "recurrent" if isinstance(m, (nn.RNNBase, nn.RNNCellBase)) else "transformer_layer")
    return Site(node, kind, path, nodes, emit, exact=exact)


aten = torch.ops.aten
# what torch.export makes of nn.LSTM / GRU / RNN and their cells (fx keeps the modules: above)
RECURRENT_OPS = (aten.lstm.input, aten.gru.input, aten.rnn_tanh.input, aten.rnn_relu.input, aten.lstm_cell.default,
                 aten.gru_cell.default, aten.rnn_tanh_cell.default, aten.rnn_relu_cell.default)


def recurrent_op_site(node):
    """An exported recurrent layer or cell, rerun in backward from its exact inputs as the module
    is under fx: an nn.LSTM captured by torch.export held 1.05x less than PyTorch, 32x under fx."""
    args_t, kwargs_t, nodes = _template(node.args, node.kwargs)
    op = node.target

    def emit(graph, env, specs, runs, pack=None):
        flat = [n for run in runs for n in run]
        return graph.call_function(module_recompute.recompute_op, (op, (args_t, kwargs_t, tuple(specs)), *flat)), {}

    return Site(node, "recurrent", None, nodes, emit, exact=tuple(range(len(nodes))))


# ---------------------------------------------------------------- products

def _product_site(node, op, a, b, inplace=False):
    def emit(graph, env, specs, runs, pack=None):
        return graph.call_function(products.product, (op, tuple(specs), *runs[0], *runs[1]),
                                   {"inplace": True} if inplace else {}), {}

    return Site(node, op, None, [a, b], emit, exact=(1,) if op == "div" else (), inplace_on=a if inplace else None,
                factors=op != "div")


_PRODUCT_FUNCS = {operator.mul: "mul", torch.mul: "mul", torch.multiply: "mul", operator.truediv: "div",
                  torch.div: "div", torch.divide: "div",
                  torch.true_divide: "div", operator.matmul: "matmul", torch.matmul: "matmul",
                  torch.bmm: "matmul"}
_PRODUCT_METHODS = {"mul": "mul", "multiply": "mul", "div": "div", "divide": "div", "true_divide": "div",
                    "matmul": "matmul", "bmm": "matmul",
                    # in place (``attn.div_(attn.sum(-1, keepdim=True))``, ConViT's gated attention)
                    "mul_": "mul", "multiply_": "mul", "div_": "div", "divide_": "div", "true_divide_": "div"}


_ADDCMUL = (torch.addcmul, torch.ops.aten.addcmul.default, "addcmul")


def addcmul_site(node):
    """``addcmul(input, t1, t2, value=v)`` (ResMLP's affine layers): the two factors as a product."""
    a = bind("addcmul", node.args, node.kwargs)
    if a is None:
        return None
    base, t1, t2, value = a["input"], a["tensor1"], a["tensor2"], a["value"]
    if not isinstance(value, (int, float)) or not all(isinstance(v, Node) for v in (base, t1, t2)):
        return None

    def emit(graph, env, specs, runs, pack=None):
        return graph.call_function(products.addcmul, (value, tuple(specs), env[base], *runs[0], *runs[1])), {}

    return Site(node, "addcmul", None, [t1, t2], emit, factors=True)


def _product(node, op):
    a = bind("div" if op == "div" else "binary", node.args, node.kwargs)
    if a is None or a.get("rounding_mode") is not None:
        return None
    inplace = node.op == "call_method" and node.target.endswith("_")
    if inplace and not (isinstance(a["input"], Node) and isinstance(a["other"], Node)):
        return None  # a Python number: written in place by autograd's own op, nothing worth packing
    return _product_site(node, op, a["input"], a["other"], inplace)
