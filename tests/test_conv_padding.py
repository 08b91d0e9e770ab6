"""Convolutions with string paddings keep their input packed where the padding is a number."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from checks import assert_converted


class _StringPadded(nn.Module):
    """Convolutions with string paddings: SigLIP's patch embedding uses ``"valid"``."""

    def __init__(self, padding, kernel):
        super().__init__()
        self.patch = nn.Conv2d(3, 16, 4, stride=4, padding="valid")
        self.mix = nn.Conv2d(16, 16, kernel, padding=padding)

    def forward(self, x):
        return self.mix(F.gelu(self.patch(x)))


@pytest.mark.parametrize("padding, kernel, converted", [("same", 3, 2), ("same", 2, 1), ("valid", 3, 2)])
@pytest.mark.parametrize("exported", [False, True])
def test_string_paddings_are_converted_where_they_are_numbers(padding, kernel, converted, exported):
    """``"same"`` with an even kernel pads one side more: that call stays as it is. Without
    torch.export the kernel size of ``"same"`` is not in the graph (the module form is)."""
    torch.manual_seed(0)
    assert_converted(_StringPadded(padding, kernel), torch.randn(2, 3, 32, 32), {"conv": converted}, exported=exported)


class _SamePaddedConv(nn.Conv2d):
    """A Conv2d subclass fx traces into (Hugging Face EfficientNet's depthwise conv): F.conv2d with
    padding="same" on the module's own weight."""

    def forward(self, x):
        return F.conv2d(x, self.weight, self.bias, self.stride, "same", self.dilation, self.groups)


def test_same_padding_on_a_traced_weight_is_converted():
    """Without torch.export an fx graph records no sizes; the kernel's comes from the weight the
    get_attr node reads (the call stayed as it was, its input exact)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3), nn.GELU(), _SamePaddedConv(16, 16, 3, groups=16))
    assert_converted(model, torch.randn(2, 3, 32, 32), {"conv": 2}, exported=False)
