"""GLU keeps its two half-size factors packed (unbiased) instead of its input."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from checks import assert_converted, assert_unbiased


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


@pytest.mark.parametrize("exported", [False, True])
def test_glu_is_converted_and_holds_less(exported):
    torch.manual_seed(0)
    assert_converted(_ConformerConv(), torch.randn(4, 64, 32), {"glu": 2}, exported=exported, factor=6)


def test_glu_gradients_are_unbiased_at_2_bits():
    torch.manual_seed(0)
    assert_unbiased(_ConformerConv(), torch.randn(4, 64, 32))
