"""Insert traced PyTorch code into an fx graph, with fake values on every new node.

The compiled-path passes write what they insert (packs, unpacks, masks) as ordinary PyTorch
functions; ``emit`` traces each once per input shape (with Inductor's decompositions, the ops
Inductor lowers) and copies the ops into the partitioned graph, so the graphs stay ATen that
Inductor can fuse.
"""

from __future__ import annotations

import operator

import torch
from torch import fx
from torch._guards import detect_fake_mode
from torch.fx.experimental.proxy_tensor import make_fx


def relu_select(y: torch.Tensor) -> torch.Tensor:
    return torch.where(y <= 0, torch.zeros((), dtype=y.dtype, device=y.device), y)


def ones(like: torch.Tensor) -> torch.Tensor:
    return torch.ones(like.shape, dtype=like.dtype, device=like.device)


def broadcast_zero(like: torch.Tensor) -> torch.Tensor:
    return torch.zeros((), dtype=like.dtype, device=like.device).expand(like.shape)


EMITTED = "actfx_emitted"  # meta key on every node emit inserts (graph_memory counts them as fused)
_TEMPLATES: dict = {}  # traced op sequences by (function, input shapes and dtypes): code, not settings


def _template(fn, key, vals) -> fx.Graph:
    """fn traced once per key (make_fx with Inductor's decompositions: Inductor lowers only
    those), reused for every value of the same shape and strides; ~70 ms a trace otherwise."""
    from torch._inductor.decomposition import select_decomp_table

    if not all(isinstance(s, int) for v in vals for s in v.shape):
        raise ValueError("graph_emit traces for static sizes; check static_shape() before emitting ops for a "
                         "value with a symbolic size")
    # strides too: a reshape traced as a view of a contiguous value cannot replay on a transposed one
    full_key = (key, tuple((tuple(v.shape), tuple(v.stride()), v.dtype, str(v.device)) for v in vals))
    graph = _TEMPLATES.get(full_key)
    if graph is None:
        with detect_fake_mode(vals):
            graph = make_fx(fn, tracing_mode="real", decomposition_table=select_decomp_table())(*vals).graph
        for node in graph.nodes:
            node.meta = {}  # keep no fake tensors (nor their mode) alive in the cache
        if key is not None:
            _TEMPLATES[full_key] = graph
    return graph


def emit(graph: fx.Graph, fn, inputs: list[fx.Node], *, before: fx.Node, key=None):
    """Insert the ops of ``fn`` (traced on the inputs' fake values) before ``before``.

    ``key`` names fn for the template cache (None: trace afresh). Returns the nodes of fn's
    outputs (a node or a tuple); each new node gets ``meta["val"]`` from the graph's fake mode.
    """
    vals = [n.meta["val"] for n in inputs]
    template = _template(fn, key, vals)
    mode = detect_fake_mode(vals)
    env: dict[fx.Node, fx.Node] = {}
    placeholders = iter(inputs)
    result = None
    with graph.inserting_before(before), mode:
        for node in template.nodes:
            if node.op == "placeholder":
                env[node] = next(placeholders)
            elif node.op == "output":
                result = fx.map_arg(node.args[0], lambda a: env[a])
            else:
                new = graph.node_copy(node, lambda a: env[a])
                args, kwargs = fx.map_arg((new.args, new.kwargs), lambda a: a.meta["val"])
                new.meta = {"val": new.target(*args, **kwargs), EMITTED: True}
                env[node] = new
    return result


def fuse_seeds(graph: fx.Graph) -> None:
    """One ``actfx::pack_seeds`` call for all the packs' seeds, in place of Inductor's seed
    buffer (which draws from torch's default generator: see ``actfx/kernels/seed_stream.py``)."""
    from torch._inductor import inductor_prims

    from actfx.kernels import seed_stream

    seeds = [n for n in graph.nodes if n.op == "call_function" and n.target is inductor_prims.seed]
    by_device: dict = {}
    for node in seeds:
        by_device.setdefault(node.args[0], []).append(node)
    first = next(n for n in graph.nodes if n.op != "placeholder")
    for device, nodes in by_device.items():
        with graph.inserting_before(first):
            combined = graph.call_function(torch.ops.actfx.pack_seeds.default, (len(nodes), device))
        with detect_fake_mode([nodes[0].meta["val"]]):
            combined.meta["val"] = seed_stream.pack_seeds(len(nodes), device)
        for index, node in enumerate(nodes):
            with graph.inserting_after(combined):
                lookup = graph.call_function(operator.getitem, (combined, index))
            lookup.meta.update(node.meta)
            lookup.meta["val"] = combined.meta["val"][index]
            node.replace_all_uses_with(lookup)
            graph.erase_node(node)
