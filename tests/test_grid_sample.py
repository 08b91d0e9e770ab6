"""grid_sample keeps its input packed and its grid exact (both gradients unbiased)."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import actfx
from checks import assert_converted, assert_same_forward_and_fewer_bytes, assert_unbiased


class _Deformable(nn.Module):
    """Sampling offsets predicted from the features, as Deformable DETR's attention and spatial
    transformers do: the grid and the sampled values both depend on parameters."""

    def __init__(self, mode="bilinear", padding="zeros"):
        super().__init__()
        self.value, self.offsets = nn.Conv2d(3, 16, 3, padding=1), nn.Conv2d(3, 2, 3, padding=1)
        self.head = nn.Linear(16, 4)
        self.mode, self.padding = mode, padding

    def forward(self, x):
        b, _, h, w = x.shape
        ys, xs = torch.meshgrid(torch.linspace(-1, 1, h), torch.linspace(-1, 1, w), indexing="ij")
        base = torch.stack([xs, ys], -1).expand(b, h, w, 2)
        grid = base + 0.1 * torch.tanh(self.offsets(x)).permute(0, 2, 3, 1)
        sampled = F.grid_sample(self.value(x), grid, mode=self.mode, padding_mode=self.padding, align_corners=False)
        return self.head(sampled.mean((2, 3)) + sampled.amax((2, 3)))


@pytest.mark.parametrize("mode, padding", [("bilinear", "zeros"), ("bicubic", "border"), ("nearest", "reflection")])
@pytest.mark.parametrize("exported", [False, True])
def test_grid_sample_is_converted(mode, padding, exported):
    torch.manual_seed(0)
    assert_converted(_Deformable(mode, padding), torch.randn(2, 3, 32, 32), {"grid_sample": 1}, exported=exported)


def test_grid_sample_holds_less_and_is_unbiased_at_2_bits():
    torch.manual_seed(0)
    model, x = _Deformable(), torch.randn(2, 3, 32, 32)
    assert_same_forward_and_fewer_bytes(model, actfx.convert(model, bits=2), x, 4)
    assert_unbiased(model, x)
