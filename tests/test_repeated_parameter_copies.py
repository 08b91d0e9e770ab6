"""Under actfx.compile, a value computed from parameters alone and repeated over the batch is
held as its source and laid out again in backward (``rematerialize.repeated_parameter_copies``)."""

from __future__ import annotations

import io

import pytest
import torch
import torch.nn as nn
from rich.console import Console

import actfx
from checks import weighted_grads


class _RelativeKeys(nn.Module):
    """DeBERTa's disentangled attention: relative-position keys from a LayerNorm and a Linear of
    an embedding table, ``repeat``ed over batch x heads, scored against the queries."""

    def __init__(self, d=64, heads=4, span=32):
        super().__init__()
        self.heads, self.rel = heads, nn.Parameter(torch.randn(span, d))
        self.norm, self.pos_key, self.query, self.out = nn.LayerNorm(d), nn.Linear(d, d), nn.Linear(d, d), nn.Linear(span, 8)

    def forward(self, x):
        b, n, d = x.shape
        h = self.heads
        keys = self.pos_key(self.norm(self.rel)).view(1, -1, h, d // h).permute(0, 2, 1, 3).reshape(h, -1, d // h)
        keys = keys.repeat(b, 1, 1)  # [b * h, span, d / h]
        q = self.query(x).view(b, n, h, d // h).permute(0, 2, 1, 3).reshape(b * h, n, d // h)
        scores = torch.bmm(q, keys.transpose(1, 2))  # [b * h, n, span]
        return self.out(scores.view(b, h, n, -1).sum(1))


@pytest.mark.slow
def test_a_parameter_copy_repeated_over_the_batch_is_held_once():
    """The repeated keys stayed exact as a "parameter copy", batch x heads of them (DeBERTa-v2,
    tiny: 56% of what it held); now the projection is held once and repeated in backward: the
    same values, so the gradients are those of the same widths."""
    torch.manual_seed(0)
    model, x = _RelativeKeys(), torch.randn(8, 24, 64)
    w = torch.randn(8, 24, 8, generator=torch.Generator().manual_seed(1))
    exact = weighted_grads(model, torch.compile(model), x, w)
    compiled = actfx.compile(model, bits=8)
    got = weighted_grads(model, compiled, x, w)
    assert (got - exact).norm() / exact.norm() < 0.03
    rows = actfx.show(compiled, console=Console(file=io.StringIO()))
    copies = [r for r in rows if "parameter copy" in r["saved_as"]]
    assert copies and max(r["after_bytes"] for r in copies) <= 32 * 64 * 4, [(r["shape"], r["after_bytes"]) for r in copies]
