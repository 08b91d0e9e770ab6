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
    step's bytes as measured there).

    A step's bytes are gradients-so-far plus activations at its worst moment, and only the
    activations grow with the batch, so above the measured batch b0 they are at most
    ``(b / b0) step0``: that batch is measured first. Each next batch is where the line through
    the last two measured steps meets the capacity, until a step would gain less than 1% of the
    batch. ResNet-50 (near proportional) takes two fake steps; the older guess, which took the
    gradients as a constant part, overshot by 9% and took three."""
    from actfx.planner.choose import BudgetError
    base_batch = batch_of(inputs)
    peak = peak_model(model, step_bytes(converted, inputs, dtype=dtype), 0, optimizer=optimizer, gpu=True,
                      dtype=dtype)
    target = (capacity - peak.fixed_bytes) / peak.fragmentation  # the most step bytes that fit

    def fits(step: int) -> bool:
        return peak.peak(0, step) <= capacity

    measured = [(base_batch, peak.step_bytes)]
    best = measured[0] if fits(peak.step_bytes) else None
    batch = math.floor(target / peak.step_bytes * base_batch) if peak.step_bytes > 0 and target > 0 else 0
    for _ in range(6):
        if batch < 1 or any(batch == b for b, _ in measured):
            break
        step = step_bytes(converted, with_batch(inputs, batch), dtype=dtype)
        measured.append((batch, step))
        if fits(step) and (best is None or batch > best[0]):
            best = (batch, step)
        (b1, s1), (b2, s2) = measured[-2], measured[-1]
        slope = (s2 - s1) / (b2 - b1)
        guess = math.floor(b2 + (target - s2) / slope) if slope > 0 else b2 // 2
        if not fits(step):
            guess = min(guess, batch - 1)
        if best is not None and guess < best[0] * 1.01:
            break  # a fake step is not worth less than 1% more batch
        batch = guess
    if best is None:
        smallest = min(measured)
        if smallest[0] > 1 and target > 0:
            raise BudgetError(f"no batch found to fit {format_bytes(capacity)}: a batch of {smallest[0]} needs "
                              f"{format_bytes(peak.peak(0, smallest[1]))}; plan with batch= set", peak.peak(0, smallest[1]))
        raise BudgetError(f"not even a batch of 1 fits {format_bytes(capacity)}: parameters, optimizer state "
                          f"and the 1 GiB margin alone take {format_bytes(peak.fixed_bytes)}", peak.fixed_bytes)
    return best
