"""Under actfx.compile, an RMS norm's raw saved input is stored scaled by the norm's own rsqrt
(``passes/rms_inputs.py``), so each pack group holds rows of one scale."""

from __future__ import annotations

import io

import pytest
import torch
import torch.nn as nn
from rich.console import Console

import actfx
from checks import assert_mean_converges, weighted_grads


class _RMSNorm(nn.Module):
    """Written as Hugging Face's Llama / Gemma norms are: fp32 statistic, ``rsqrt(mean + eps)``."""

    def __init__(self, d):
        super().__init__()
        self.weight, self.eps = nn.Parameter(torch.zeros(d)), 1e-6

    def forward(self, x):
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return (h * (1.0 + self.weight)).type_as(x)


class _EmbeddedBlock(nn.Module):
    """Gemma's start: a padding embedding (token 0 embeds to a zero row), scaled by sqrt(d), an
    RMS norm and a projection whose weight gradient reads the norm's output."""

    def __init__(self, d=64):
        super().__init__()
        self.embed = nn.Embedding(128, d, padding_idx=0)
        self.norm, self.v, self.out = _RMSNorm(d), nn.Linear(d, d, bias=False), nn.Linear(d, 32, bias=False)
        self.register_buffer("scale", torch.tensor(d ** 0.5))

    def forward(self, ids):
        h = self.embed(ids) * self.scale
        return self.out(torch.tanh(self.v(self.norm(h))) + h)


def _samples():
    torch.manual_seed(0)
    model = _EmbeddedBlock()
    nn.init.normal_(model.embed.weight, std=0.02)
    with torch.no_grad():
        model.embed.weight[0].zero_()
    ids = torch.randint(0, 128, (4, 64), generator=torch.Generator().manual_seed(2))
    ids[:, ::8] = 0  # padding tokens
    w = torch.randn(4, 64, 32, generator=torch.Generator().manual_seed(1))
    exact = weighted_grads(model, torch.compile(model), ids, w)
    compiled = actfx.compile(model, bits=2)
    samples = [weighted_grads(model, compiled, ids, w) for _ in range(8)]
    return compiled, samples, exact


@pytest.mark.slow
def test_an_rms_norms_input_is_packed_at_its_rows_scale():
    """Packed raw, the zero rows of the padding tokens took their groups' step and backward
    multiplied it by 1/sqrt(eps): one step's 2-bit gradient was 14.8x the gradient's norm off
    (Hugging Face Gemma2, tiny: 7.24x, from layer 0's value projection; convert 1.05x); stored
    scaled by the rsqrt, 0.29x here (Gemma2 1.06x), still unbiased, the same bytes."""
    compiled, samples, exact = _samples()
    one_step = sum(float((g - exact).norm() / exact.norm()) for g in samples) / len(samples)
    assert one_step < 1.0, one_step
    assert_mean_converges(samples, exact)
    rows = actfx.show(compiled, console=Console(file=io.StringIO()))
    ops = {r["op"] for r in rows}
    assert "aten.embedding.default" not in ops and "aten.mul.Tensor" in ops  # the raw embedding: as x * rsqrt
