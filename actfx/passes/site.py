"""What the rewrite needs to know about one op it has a variant for: the ``Site``.

Each ``site_*`` module recognises a family of ops (in module, functional and method form) and
returns a Site: the op's kind, the inputs whose values its backward needs (the rewrite decides
how each is stored), and how to emit the variant call into the new graph.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import torch
from torch.fx import Graph, Node


# The fewest bits for a value backward recomputes through a nonlinearity (``Site.nonlinear``):
# attention recomputed from rounded q, k is biased by the rounding variance (a mean of 1024
# gradients stayed 39% off at 2 bits, 3.0% at 4), which shrinks 289x from 4 to 8 bits.
NONLINEAR_BITS = 8


@dataclasses.dataclass
class Site:
    node: Node
    kind: str
    module_path: str | None
    saved: list  # fx args (Nodes or constants) whose values backward needs, in variant order
    emit: Callable  # (graph, env, specs, runs) -> (out node, extras)
    exact: tuple = ()  # positions in `saved` always kept exact (a division's denominator)
    # positions backward recomputes through a nonlinearity (attention's q and k): packed at no
    # fewer than NONLINEAR_BITS, where the bias of that recompute is far below the rounding noise
    nonlinear: tuple = ()
    shape_only: tuple = ()  # positions whose backward needs only the shape
    # positions whose value the gradient with respect to that same input reads (var, a 2-norm):
    # such a value is never rebuilt from a pack its producer's backward also reads (``rewrite``)
    reads_own: tuple = ()
    factors: bool = False  # the saved values are factors of one product (a factor met twice reads itself)
    inplace_on: Node | None = None  # the input this op writes into, if any
    source: Node | None = None  # a ReLU-like op's input (its output is mask * input)
    # the same op as another variant, taken where the config asks for it (math attention)
    alternative: "Site | None" = None


def _get(graph: Graph, path: str, attr: str | None = None) -> Node | None:
    return graph.get_attr(f"{path}.{attr}" if attr else path)


def _bias_node(graph, path, module):
    return _get(graph, path, "bias") if getattr(module, "bias", None) is not None else None


def _env(env, value):
    return torch.fx.node.map_arg(value, lambda n: env[n])
