"""torchvision models convert with identical forward (skipped when torchvision is not installed)."""

from __future__ import annotations

import pytest
import torch

import actfx
from checks import assert_same_forward_and_fewer_bytes

torchvision = pytest.importorskip("torchvision")


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2", "densenet121", "vgg11_bn", "efficientnet_b0"])
def test_torchvision_model(name):
    torch.manual_seed(0)
    model = getattr(torchvision.models, name)(weights=None)
    x = torch.randn(2, 3, 64, 64)
    converted = actfx.convert(model, bits=2)
    assert_same_forward_and_fewer_bytes(model, converted, x, factor=4)
