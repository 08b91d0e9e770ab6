"""The forward of a converted module's rewritten graph, which a measurement can run node by node.

A model whose root neither fx nor torch.export captured runs its own forward, and the converted
blocks inside it run their generated code: which graph a block runs (with or without its optional
inputs, the captured call or its own forward) is decided there. ``measure`` sets ``RUNNER`` for its
run so the graph chosen is interpreted instead, and what it saves is charged op by op (the packs a
plan chooses widths for). Outside a measurement the generated code runs as it is.
"""

from __future__ import annotations

import contextvars

import torch
from torch.fx import Graph

# (module, graph, generated forward, args, kwargs) -> output, while a measurement runs
RUNNER: contextvars.ContextVar = contextvars.ContextVar("actfx_graph_runner", default=None)


def runnable(graph: Graph, generated):
    """``generated`` (the forward fx wrote for ``graph``), run by ``RUNNER`` where one is set."""
    def forward(self, *args, **kwargs):
        if not torch.compiler.is_compiling():  # dynamo cannot read a ContextVar; a measurement never compiles
            runner = RUNNER.get()
            if runner is not None:
                return runner(self, graph, generated, args, kwargs)
        return generated(self, *args, **kwargs)

    forward.generated = generated
    forward.__actfx_source__ = getattr(generated, "__actfx_source__", None)
    return forward
