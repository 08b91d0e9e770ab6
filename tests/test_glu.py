"""GLU keeps its two half-size factors packed (unbiased) instead of its input."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import actfx
from actfx.accounting import count_saved


class _ConformerConv(nn.Module):
    """A Conformer convolution module (torchaudio, Wav2Vec2-Conformer): pointwise conv to twice
    the channels, GLU over channels, depthwise conv; then a gated linear unit over features."""

    def __init__(self, d=32):
        super().__init__()
        self.pointwise, self.glu = nn.Conv1d(d, 2 * d, 1), nn.GLU(dim=1)
        self.depthwise = nn.Conv1d(d, d, 3, padding=1, groups=d)
        self.gate = nn.Linear(d, 2 * d)
        self.out = nn.Linear(d, 8)

    def forward(self, x):  # x: (batch, time, d)
        h = self.depthwise(self.glu(self.pointwise(x.transpose(1, 2)))).transpose(1, 2)
        return self.out(F.glu(self.gate(h), dim=-1))


def _grads(model, x):
    return torch.cat([g.flatten() for g in torch.autograd.grad(model(x).square().sum(), list(model.parameters()))])


@pytest.mark.parametrize("exported", [False, True])
def test_glu_is_converted_and_holds_less(exported):
    torch.manual_seed(0)
    model, x = _ConformerConv(), torch.randn(4, 64, 32)
    converted = actfx.convert(model, bits=8, example_inputs=(x,) if exported else None)
    assert torch.equal(converted(x), model(x))
    assert [d.kind for d in converted._actfx_record.decisions].count("glu") == 2
    exact = _grads(model, x)
    assert (_grads(converted, x) - exact).norm() / exact.norm() < 0.03
    with count_saved(model) as before:
        kept = model(x)  # noqa: F841
    narrow = actfx.convert(model, bits=2, example_inputs=(x,) if exported else None)
    with count_saved(narrow) as after:
        kept = narrow(x)  # noqa: F841
    assert after.activation_bytes < before.activation_bytes / 6


def test_glu_gradients_are_unbiased_at_2_bits():
    torch.manual_seed(0)
    model, x = _ConformerConv(), torch.randn(4, 64, 32)
    exact = _grads(model, x)
    converted = actfx.convert(model, bits=2)
    k = 32
    grads = [_grads(converted, x) for _ in range(k)]
    one = sum((g - exact).norm() for g in grads) / k
    mean = (sum(grads) / k - exact).norm()
    assert one > 1e-3 * exact.norm()
    assert mean < 1.5 * one / math.sqrt(k)
