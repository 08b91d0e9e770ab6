"""Under actfx.compile, a saved product of an activation and a fixed factor is saved as the
activation and rebuilt in backward (``rematerialize.fixed_factors``)."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import actfx
from checks import assert_mean_converges, weighted_grads


class _Retention(nn.Module):
    """RetNet's retention: ``(q k^T) * D`` with a decay mask ``D = gamma ** (i - j)`` built from
    ``arange`` and a buffer (0.5 ** 31 to 1 along a row), then a per-head GroupNorm, which scales
    each row back to unit spread."""

    def __init__(self):
        super().__init__()
        self.qkv, self.gn, self.o = nn.Linear(16, 48), nn.GroupNorm(4, 16), nn.Linear(16, 8)
        self.register_buffer("gammas", torch.tensor([0.5, 0.7, 0.9, 0.97]))

    def forward(self, x):
        b, n, _ = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, 4, 4).permute(2, 0, 3, 1, 4)
        i = torch.arange(n, device=x.device)
        gap = i[:, None] - i[None, :]
        decay = torch.exp(gap.float() * torch.log(self.gammas)[:, None, None]).masked_fill(gap < 0, 0.0)
        y = ((q @ k.transpose(-1, -2)) * decay) @ v
        return self.o(self.gn(y.transpose(1, 2).reshape(b * n, 16)).view(b, n, 16))


def _samples():
    torch.manual_seed(0)
    model, x = _Retention(), torch.randn(8, 32, 16)
    w = torch.randn(8, 32, 8, generator=torch.Generator().manual_seed(1))
    exact = weighted_grads(model, torch.compile(model), x, w)
    compiled = actfx.compile(model, bits=2)
    samples = [weighted_grads(model, compiled, x, w) for _ in range(8)]
    return samples, exact


@pytest.mark.slow
def test_a_decay_masked_product_is_stored_as_its_activation():
    """Packed as the product, each row's small entries took the largest one's step: one step's
    2-bit gradient was 4.2x the gradient's norm off on average (with ``fixed_factors`` off; 1e5x
    before GroupNorm read its normalised input); stored as ``q k^T`` and multiplied by the
    recomputed mask, 2.8x, still unbiased."""
    samples, exact = _samples()
    one_step = sum(float((g - exact).norm() / exact.norm()) for g in samples) / len(samples)
    assert one_step < 3.5, one_step
    assert_mean_converges(samples, exact)
