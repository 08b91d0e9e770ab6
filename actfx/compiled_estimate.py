"""What ``actfx.compile`` would save for backward, estimated without generating code.

Why: ``actfx report SPEC --compile`` must answer on a CPU for shapes that only fit a GPU, as the
eager report does. The same partition runs as in ``actfx.compile`` (AOTAutograd with Inductor's
decompositions, the min-cut partitioner under the memory budget, then actfx's pack pass), on a
model and inputs on the meta device; the partitioned graphs are recorded, never compiled, and
backward never runs.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from actfx.compiled import CompiledRecord, _Partitioner, own_cache_entry
from actfx.config import Config
from actfx.kernels.seed_stream import calls_with


def as_fx_code(model: nn.Module, config: Config, memory_budget: float | None = None, *, dynamic: bool = False):
    """``model`` captured, partitioned and packed as ``actfx.compile`` does it, with the graphs
    run as fx code instead of generated kernels (the same ATen pack math; for estimates,
    calibration and tests), and the CompiledRecord its partitions fill."""
    import torch._inductor.lowering  # noqa: F401 - Inductor's decomposition table reads it
    from torch._dynamo.backends.common import aot_autograd
    from torch._functorch.aot_autograd import make_boxed_func
    from torch._inductor.decomposition import select_decomp_table

    record = CompiledRecord(config, memory_budget)

    def keep(gm, example_inputs):
        return make_boxed_func(gm.forward)  # the graph as it is: no code generation

    def keep_forward(gm, example_inputs):
        return calls_with(keep(gm, example_inputs), record.seeds)  # its packs draw the record's seeds

    backend = aot_autograd(fw_compiler=keep_forward, bw_compiler=keep, partition_fn=_Partitioner(record),
                           decompositions=select_decomp_table())
    # Static by default: plans estimate one batch, calibrate on another and estimate again; with
    # automatic dynamic shapes the third compile would see a symbolic batch and keep every value exact.
    return torch.compile(own_cache_entry(model), backend=backend, dynamic=dynamic), record


def estimate_compiled(model: nn.Module, inputs: tuple, config: Config, memory_budget: float | None = None
                      ) -> CompiledRecord:
    """The CompiledRecord (plans) of one training forward of ``model`` on ``inputs`` (meta or
    real tensors; meta costs nothing); ``model`` is left as it was."""
    compiled, record = as_fx_code(model, config, memory_budget)
    was_training = model.training
    model.train()
    try:
        with torch.enable_grad():
            compiled(*inputs)
    finally:
        model.train(was_training)
    return record
