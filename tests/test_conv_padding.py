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
