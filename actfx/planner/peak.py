"""Peak training memory as a function of the bytes held for backward: the objective of a plan.

    peak = fixed + fragmentation * (held activations + 2 x model output + k x largest op output)
    fixed = parameters + gradients + optimizer state + buffers (+ 1 GiB CUDA context on a GPU)

the model of ``actfx.report`` (k = 3 for a converted model: backward's incoming and outgoing
gradient of its largest op, and the unpacked copy of its input). On a GPU the report's margin and
1.10 fragmentation apply; on the CPU neither (no CUDA context, and glibc with
``MALLOC_MMAP_THRESHOLD_`` returns freed blocks at once). Everything batch-sized scales with the
batch; the plan's held activations are exact (summed from the packs it chose).
"""

from __future__ import annotations

import dataclasses
import math

import torch.nn as nn

from actfx.passes.analyze import Measurement
from actfx.report import FRAGMENTATION, MARGIN_BYTES, WORKING_SET, static_costs


@dataclasses.dataclass(frozen=True)
class PeakModel:
    fixed_bytes: int
    other_bytes: int  # output and working set at the planned batch
    fragmentation: float

    def peak(self, activation_bytes: int) -> int:
        return self.fixed_bytes + math.ceil(self.fragmentation * (activation_bytes + self.other_bytes))

    def activation_room(self, budget: int) -> int:
        """The most held-activation bytes under a peak of ``budget`` (negative: none fits)."""
        return math.floor((budget - self.fixed_bytes) / self.fragmentation) - self.other_bytes


def peak_model(model: nn.Module, measured: Measurement, *, optimizer: str, gpu: bool, dtype=None) -> PeakModel:
    costs = static_costs(model, optimizer, dtype)
    fixed = costs.param_bytes + costs.grad_bytes + costs.optimizer_bytes + costs.buffer_bytes
    other = 2 * measured.output_bytes + WORKING_SET["actfx"] * measured.largest_output_bytes
    if gpu:
        return PeakModel(fixed + MARGIN_BYTES, other, FRAGMENTATION)
    return PeakModel(fixed, other, 1.0)
