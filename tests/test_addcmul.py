"""addcmul keeps its factors as a product does (packed where the other factor's gradient needs them)."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from checks import assert_converted, assert_unbiased


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


@pytest.mark.parametrize("exported", [False, True])
def test_addcmul_is_converted(exported):
    torch.manual_seed(0)
    assert_converted(_Affine(), torch.randn(32, 16, 64), {"addcmul": 2}, exported=exported, factor=6)


def test_addcmul_gradients_are_unbiased_at_2_bits():
    torch.manual_seed(0)
    assert_unbiased(_Affine(), torch.randn(8, 16, 64))
