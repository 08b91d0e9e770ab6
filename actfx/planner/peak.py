"""Peak training memory as a function of the bytes held for backward: the objective of a plan.

    peak = fixed + fragmentation * step
    fixed = parameters + optimizer state + buffers (+ 1 GiB CUDA context and workspaces on a GPU)
    step  = gradients + held activations + backward's transient tensors, at the step's worst point

``step`` is measured on fake tensors (``step_memory``) for the model converted at the default
width; a plan that holds ``h`` bytes instead of ``h0`` is charged ``step + (h - h0)`` while widths
are chosen (every held byte counted as alive at the peak: an upper bound), then measured again for
the widths chosen. On a GPU the report's 1 GiB margin and 1.10 fragmentation apply; on the CPU
neither (no CUDA context; glibc started with ``MALLOC_MMAP_THRESHOLD_`` returns freed blocks).
"""

from __future__ import annotations

import dataclasses
import math

import torch.nn as nn

from actfx.planner.batch import batch_of, with_batch
from actfx.planner.step_memory import step_bytes
from actfx.report import FRAGMENTATION, MARGIN_BYTES, static_costs
from actfx.units import format_bytes


@dataclasses.dataclass(frozen=True)
class PeakModel:
    fixed_bytes: int
    step_bytes: int  # measured, for the default widths
    held_bytes: int  # what the default widths hold
    fragmentation: float

    def peak(self, activation_bytes: int, step_bytes: int | None = None) -> int:
        """The peak for a plan holding ``activation_bytes`` (or whose step was measured)."""
        step = step_bytes if step_bytes is not None else self.step_bytes + activation_bytes - self.held_bytes
        return self.fixed_bytes + math.ceil(self.fragmentation * step)

    def activation_room(self, budget: int) -> int:
        """The most held-activation bytes under a peak of ``budget`` (negative: none fits)."""
        return math.floor((budget - self.fixed_bytes) / self.fragmentation) - self.step_bytes + self.held_bytes


def peak_model(model: nn.Module, step_bytes: int, held_bytes: int, *, optimizer: str, gpu: bool,
               dtype=None) -> PeakModel:
    costs = static_costs(model, optimizer, dtype)
    fixed = costs.param_bytes + costs.optimizer_bytes + costs.buffer_bytes
    if gpu:
        return PeakModel(fixed + MARGIN_BYTES, step_bytes, held_bytes, FRAGMENTATION)
    return PeakModel(fixed, step_bytes, held_bytes, 1.0)


def largest_batch(model: nn.Module, converted: nn.Module, inputs: tuple, capacity: int, *, optimizer: str,
                  dtype=None) -> tuple:
    """(the largest batch whose step with ``converted`` fits ``capacity`` bytes of GPU, that
    step's bytes as measured there): the step's memory less the gradients taken as proportional
    to the batch, then checked at that batch (the caller reuses the measured step)."""
    from actfx.planner.choose import BudgetError
    base_batch = batch_of(inputs)
    grads = static_costs(model, optimizer, dtype).grad_bytes
    peak = peak_model(model, step_bytes(converted, inputs, dtype=dtype), 0, optimizer=optimizer, gpu=True,
                      dtype=dtype)
    per_sample = peak.fragmentation * max(peak.step_bytes - grads, 0) / base_batch
    room = capacity - peak.fixed_bytes - peak.fragmentation * grads
    batch = math.floor(room / per_sample) if per_sample > 0 else 0
    step = None
    for _ in range(4):  # the step is not exactly proportional to the batch: check, and shrink to fit
        if batch < 1:
            break
        step = step_bytes(converted, with_batch(inputs, batch), dtype=dtype)
        needed = peak.peak(0, step)
        if needed <= capacity:
            break
        batch = math.floor(batch * (capacity - peak.fixed_bytes) / (needed - peak.fixed_bytes) * 0.99)
        step = None
    if batch < 1:
        raise BudgetError(f"not even a batch of 1 fits {format_bytes(capacity)}: parameters, optimizer state "
                          f"and the 1 GiB margin alone take {format_bytes(peak.fixed_bytes)}", peak.fixed_bytes)
    return batch, step
