"""Training memory, baseline vs actfx, and the largest batch that fits a GPU: a stated, simple model.

Everything batch-sized is measured (a fake forward at the requested batch, see
``actfx.passes.analyze``); the rest is counted from the parameters. The model:

    peak(B)  = fixed + 1.10 * per_batch(B)
    fixed    = parameters + gradients + optimizer state + buffers + 1 GiB margin
    per_batch(B) = activations kept for backward (measured at B)
                 + 2 * model output (the output and what a loss such as cross-entropy keeps of it)
                 + k * largest tensor any op produced (backward's working set: the incoming and
                   outgoing gradient of that op, k = 2; actfx also unpacks its input, k = 3)

- gradients: one per trainable parameter, in its dtype;
- optimizer state, as PyTorch's optimizers allocate it, in the parameters' dtype: sgd (with
  momentum) 1x the trainable parameters, adam / adamw 2x;
- the 1 GiB margin stands for the CUDA context and cuBLAS/cuDNN workspaces (outside
  ``torch.cuda.memory_allocated`` but on the card); 1.10 for allocator rounding and fragmentation.

Per-batch memory is taken as proportional to the batch (what is not, such as BatchNorm's
per-channel statistics, is a few KiB), so the largest batch that fits ``capacity`` is
``floor((capacity - fixed) / (1.10 * per_batch(B) / B))``. The estimate errs high: it counts
every gradient as allocated while every activation is still held.
"""

from __future__ import annotations

import dataclasses
import math

import torch.nn as nn

from actfx.passes.analyze import Measurement
from actfx.units import parse_bytes

MiB, GiB = 2**20, 2**30

# Total memory as nvidia-smi reports it for each card (MiB); a "16 GB" T4 shows 15360 MiB.
GPUS = {
    "t4": 15360 * MiB,
    "v100-16": 16160 * MiB,
    "a100-40": 40960 * MiB,
    "a100-80": 81920 * MiB,
    "h100": 81559 * MiB,
    "h200": 143771 * MiB,
}
OPTIMIZER_STATES = {"sgd": 1, "adam": 2, "adamw": 2}  # tensors of parameter size per parameter
MARGIN_BYTES = 1 * GiB
FRAGMENTATION = 1.10
WORKING_SET = {"baseline": 2, "actfx": 3}  # largest tensors alive at once in backward


def gpu_capacity(gpu: str | None = None, memory: str | None = None) -> int | None:
    """Bytes of GPU memory from ``--gpu NAME`` or ``--gpu-memory 16GiB`` (not both); None if neither."""
    if gpu is not None and memory is not None:
        raise ValueError("give --gpu or --gpu-memory, not both")
    if memory is not None:
        capacity = parse_bytes(memory)
        if capacity <= 0:
            raise ValueError(f"--gpu-memory must be positive, got {memory!r}")
        return capacity
    if gpu is None:
        return None
    key = gpu.lower()
    if key not in GPUS:
        raise ValueError(f"unknown GPU {gpu!r}; use one of {', '.join(GPUS)}, or give --gpu-memory 24GiB")
    return GPUS[key]


@dataclasses.dataclass(frozen=True)
class StaticCosts:
    """What does not grow with the batch, in bytes."""

    param_bytes: int
    grad_bytes: int
    optimizer_bytes: int
    buffer_bytes: int
    margin_bytes: int = MARGIN_BYTES

    @property
    def total(self) -> int:
        return self.param_bytes + self.grad_bytes + self.optimizer_bytes + self.buffer_bytes + self.margin_bytes


def static_costs(model: nn.Module, optimizer: str, dtype=None) -> StaticCosts:
    """Parameters (tied ones once), their gradients and optimizer state, and buffers, as held in
    ``dtype`` when one is given (floating tensors only, as ``model.to(dtype)`` would)."""
    if optimizer not in OPTIMIZER_STATES:
        raise ValueError(f"unknown optimizer {optimizer!r}; use one of {', '.join(OPTIMIZER_STATES)}")

    def nbytes(t):
        size = dtype.itemsize if dtype is not None and t.is_floating_point() else t.element_size()
        return t.numel() * size

    params = list(model.parameters())
    trainable = sum(nbytes(p) for p in params if p.requires_grad)
    return StaticCosts(
        param_bytes=sum(nbytes(p) for p in params),
        grad_bytes=trainable,
        optimizer_bytes=OPTIMIZER_STATES[optimizer] * trainable,
        buffer_bytes=sum(nbytes(b) for b in model.buffers()),
    )


@dataclasses.dataclass(frozen=True)
class Estimate:
    activation_bytes: int
    output_bytes: int
    workspace_bytes: int
    peak_bytes: int
    max_batch: int | None  # None without a GPU capacity; 0 when not even one sample fits


def estimate(measured: Measurement, costs: StaticCosts, batch: int, capacity: int | None,
             which: str) -> Estimate:
    """Peak training memory at ``batch`` and the largest batch under ``capacity`` (see module doc)."""
    if batch < 1:
        raise ValueError(f"batch must be at least 1, got {batch}")
    workspace = WORKING_SET[which] * measured.largest_output_bytes
    per_batch = measured.activation_bytes + 2 * measured.output_bytes + workspace
    peak = costs.total + math.ceil(FRAGMENTATION * per_batch)
    max_batch = None
    if capacity is not None:
        per_sample = FRAGMENTATION * per_batch / batch
        room = capacity - costs.total
        max_batch = max(0, math.floor(room / per_sample)) if per_sample > 0 else None
    return Estimate(measured.activation_bytes, measured.output_bytes, workspace, peak, max_batch)
