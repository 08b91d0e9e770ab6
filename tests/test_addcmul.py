"""addcmul keeps its factors as a product does (packed where the other factor's gradient needs them)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn

import actfx
from actfx.accounting import count_saved


class _Affine(nn.Module):
    """ResMLP's Affine: ``addcmul(beta, alpha, x)``; then a gated product of two activations."""

    def __init__(self, d=64):
        super().__init__()
        self.alpha, self.beta = nn.Parameter(torch.ones(d) * 1.5), nn.Parameter(torch.zeros(d))
        self.a, self.b, self.out = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, 4)

    def forward(self, x):
        h = torch.addcmul(self.beta, self.alpha, self.a(x))
        h = self.a(x).addcmul(torch.tanh(h), self.b(x), value=0.5)
        return self.out(torch.tanh(h))


def _grads(model, x):
    return torch.cat([g.flatten() for g in torch.autograd.grad(model(x).square().sum(), list(model.parameters()))])


@pytest.mark.parametrize("exported", [False, True])
def test_addcmul_is_converted(exported):
    torch.manual_seed(0)
    model, x = _Affine(), torch.randn(32, 16, 64)
    converted = actfx.convert(model, bits=8, example_inputs=(x,) if exported else None)
    assert torch.equal(converted(x), model(x))
    assert [d.kind for d in converted._actfx_record.decisions].count("addcmul") == 2
    exact = _grads(model, x)
    assert (_grads(converted, x) - exact).norm() / exact.norm() < 0.03
    with count_saved(model) as before:
        kept = model(x)  # noqa: F841
    narrow = actfx.convert(model, bits=2, example_inputs=(x,) if exported else None)
    with count_saved(narrow) as after:
        kept = narrow(x)  # noqa: F841
    assert after.activation_bytes < before.activation_bytes / 6


def test_addcmul_gradients_are_unbiased_at_2_bits():
    torch.manual_seed(0)
    model, x = _Affine(), torch.randn(8, 16, 64)
    exact = _grads(model, x)
    converted = actfx.convert(model, bits=2)
    k = 32
    grads = [_grads(converted, x) for _ in range(k)]
    one = sum((g - exact).norm() for g in grads) / k
    mean = (sum(grads) / k - exact).norm()
    assert one > 1e-3 * exact.norm()
    assert mean < 1.5 * one / math.sqrt(k)
