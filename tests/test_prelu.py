"""PReLU keeps a 1-bit sign mask and its input packed (for the slope's gradient) instead of the input."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from checks import assert_converted, assert_unbiased


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


@pytest.mark.parametrize("exported", [False, True])
def test_prelu_is_converted_and_exact_at_the_mask(exported):
    torch.manual_seed(0)
    assert_converted(_Net(), torch.randn(4, 3, 16, 16), {"prelu": 3}, exported=exported, factor=6)


def test_prelu_gradients_are_unbiased_at_2_bits():
    torch.manual_seed(0)
    assert_unbiased(_Net(), torch.randn(4, 3, 16, 16))
