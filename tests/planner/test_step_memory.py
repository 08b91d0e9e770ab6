"""actfx/planner/step_memory.py: a training step's memory above the parameters, on fake tensors."""

from __future__ import annotations

import torch

import actfx
from actfx.accounting import count_saved
from actfx.planner.step_memory import step_bytes
from planner_models import SmallCNN


def test_the_step_holds_gradients_activations_and_grows_with_the_batch():
    torch.manual_seed(0)
    model = SmallCNN()
    converted = actfx.convert(model, bits=2)
    x = torch.randn(8, 3, 32, 32)
    with count_saved(converted) as saved:
        out = converted(x)
    del out
    grads = sum(p.numel() * p.element_size() for p in model.parameters())
    small = step_bytes(converted, (torch.empty(8, 3, 32, 32, device="meta"),))
    large = step_bytes(converted, (torch.empty(32, 3, 32, 32, device="meta"),))
    assert small >= grads + saved.activation_bytes
    # Everything but the gradients scales with the batch (4x here), give or take BN's statistics.
    assert abs((large - grads) / (small - grads) - 4) < 0.2
    assert all(p.grad is None for p in model.parameters())  # nothing written into the model
