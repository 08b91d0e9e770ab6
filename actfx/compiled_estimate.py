"""What ``actfx.compile`` would save for backward, estimated without generating code.

Why: ``actfx report SPEC --compile`` must answer on a CPU for shapes that only fit a GPU, as the
eager report does. The same partition runs as in ``actfx.compile`` (AOTAutograd with Inductor's
decompositions, the min-cut partitioner under the memory budget, then actfx's pack pass), on a
model and inputs on the meta device; the partitioned graphs are recorded, never compiled, and
backward never runs.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn as nn

from actfx.compiled import CompiledRecord, _Partitioner, joint_graph_patches, own_cache_entry
from actfx.config import Config
from actfx.kernels.seed_stream import calls_with


def as_fx_code(model: nn.Module, config: Config, memory_budget: float | None = None, *, dynamic: bool = False):
    """``model`` captured, partitioned and packed as ``actfx.compile`` does it, with the graphs
    run as fx code instead of generated kernels (the same ATen pack math; for estimates,
    calibration and tests), and the CompiledRecord its partitions fill."""
    import torch._inductor.lowering  # noqa: F401 - Inductor's decomposition table reads it
    from torch._dynamo.backends.common import aot_autograd
    from torch._functorch.aot_autograd import make_boxed_func
    from torch._guards import detect_fake_mode
    from torch._inductor import config as inductor_config
    from torch._inductor.compile_fx import partition_fn
    from torch._inductor.virtualized import V

    from actfx.passes.norm_decompositions import CompiledDecompositions

    record = CompiledRecord(config, memory_budget)

    def keep(gm, example_inputs):
        return make_boxed_func(gm.forward)  # the graph as it is: no code generation

    def keep_forward(gm, example_inputs):
        return calls_with(keep(gm, example_inputs), record.seeds)  # its packs draw the record's seeds

    partition = _Partitioner(record)
    patches: dict = {}  # actfx.compile's settings for the graph being compiled (``joint_graph_patches``)

    def joint_passes_then_partition(gm, joint_inputs, **kwargs):
        # Inductor's own joint-graph passes first, as compile_fx runs them (no-op removal, pattern
        # rewrites) and with its fake mode installed (its random-seed pass reads it): without them
        # the partition differed from actfx.compile's (a Hugging Face Granite's plan held 8.7% more
        # under actfx.compile than it estimated: its embedding was saved by another module and
        # copied 8 times instead of twice)
        with V.set_fake_mode(detect_fake_mode(joint_inputs)), inductor_config.patch(patches):
            return partition_fn(gm, joint_inputs, partitioner_fn_override=partition, **kwargs)

    traced = aot_autograd(fw_compiler=keep_forward, bw_compiler=keep, partition_fn=joint_passes_then_partition,
                          decompositions=CompiledDecompositions(config.group_size))

    def backend(gm, example_inputs):
        patches.clear()
        patches.update(joint_graph_patches(gm, config))
        return traced(gm, example_inputs)

    # Static by default: plans estimate one batch, calibrate on another and estimate again; with
    # automatic dynamic shapes the third compile would see a symbolic batch and keep every value exact.
    return torch.compile(own_cache_entry(model), backend=backend, dynamic=dynamic), record


def estimate_compiled(model: nn.Module, inputs: tuple, config: Config, memory_budget: float | None = None
                      ) -> CompiledRecord:
    """The CompiledRecord (plans) of one training forward of ``model`` on ``inputs`` (meta or
    real tensors; meta costs nothing); ``model`` is left as it was."""
    try:
        return _estimate(model, inputs, config, memory_budget, contextlib.nullcontext())
    except Exception:
        if not any(isinstance(x, torch.Tensor) and x.is_meta for x in inputs):
            raise
        # a tensor the forward builds without a device (RoPE's torch.arange(T)) was made on the
        # CPU and met the meta activations ("Tensor device mismatch"): again, making it on meta.
        # Only then: under the default-device mode dynamo splits other graphs where it need not.
        with contextlib.suppress(Exception):  # if this fails too, the first failure says more
            return _estimate(model, inputs, config, memory_budget, torch.device("meta"))
        raise


def _estimate(model: nn.Module, inputs: tuple, config: Config, memory_budget, device) -> CompiledRecord:
    compiled, record = as_fx_code(model, config, memory_budget)
    was_training = model.training
    model.train()
    try:
        with torch.enable_grad(), device:
            compiled(*inputs)
    finally:
        model.train(was_training)
    return record
