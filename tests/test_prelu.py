"""PReLU keeps a 1-bit sign mask and its input packed (for the slope's gradient) instead of the input."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import actfx
from actfx.accounting import count_saved


class _Net(nn.Module):
    """PReLU as face-recognition ResNets and Conv-TasNet use it: per channel, single, functional."""

    def __init__(self):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(3, 16, 3, padding=1), nn.Conv2d(16, 16, 3, padding=1)
        self.per_channel, self.single = nn.PReLU(16), nn.PReLU()
        self.slope = nn.Parameter(torch.full((16,), 0.1))
        self.head = nn.Linear(16, 4)

    def forward(self, x):
        h = self.single(self.conv2(self.per_channel(self.conv1(x))))
        return self.head(F.prelu(h, self.slope).mean((2, 3)))


def _grads(model, x):
    return torch.cat([g.flatten() for g in torch.autograd.grad(model(x).square().sum(), list(model.parameters()))])


@pytest.mark.parametrize("exported", [False, True])
def test_prelu_is_converted_and_exact_at_the_mask(exported):
    torch.manual_seed(0)
    model, x = _Net(), torch.randn(4, 3, 16, 16)
    converted = actfx.convert(model, bits=8, example_inputs=(x,) if exported else None)
    assert torch.equal(converted(x), model(x))
    assert [d.kind for d in converted._actfx_record.decisions].count("prelu") == 3
    exact = _grads(model, x)
    assert (_grads(converted, x) - exact).norm() / exact.norm() < 0.03
    with count_saved(model) as before:
        kept = model(x)  # noqa: F841
    narrow = actfx.convert(model, bits=2, example_inputs=(x,) if exported else None)
    with count_saved(narrow) as after:
        kept = narrow(x)  # noqa: F841
    assert after.activation_bytes < before.activation_bytes / 6


def test_prelu_gradients_are_unbiased_at_2_bits():
    torch.manual_seed(0)
    model, x = _Net(), torch.randn(4, 3, 16, 16)
    exact = _grads(model, x)
    converted = actfx.convert(model, bits=2)
    k = 32
    grads = [_grads(converted, x) for _ in range(k)]
    one = sum((g - exact).norm() for g in grads) / k
    mean = (sum(grads) / k - exact).norm()
    assert one > 1e-3 * exact.norm()  # the packs are noisy ...
    assert mean < 1.5 * one / math.sqrt(k)  # ... and the noise averages out
