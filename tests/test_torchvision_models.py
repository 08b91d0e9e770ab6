"""torchvision models convert with identical forward (skipped when torchvision is not installed)."""

from __future__ import annotations

import pytest
import torch

import actfx
from actfx.accounting import count_saved

torchvision = pytest.importorskip("torchvision")


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2", "densenet121", "vgg11_bn", "efficientnet_b0"])
def test_torchvision_model(name):
    torch.manual_seed(0)
    model = getattr(torchvision.models, name)(weights=None)
    x = torch.randn(2, 3, 64, 64)
    converted = actfx.convert(model, bits=2)
    torch.manual_seed(1)
    expected = model(x)
    torch.manual_seed(1)
    with count_saved(converted) as packed:
        got = converted(x)
    assert torch.equal(got, expected)
    with count_saved(model) as baseline:
        kept = model(x)  # noqa: F841
    assert packed.activation_bytes < baseline.activation_bytes / 4
    got.sum().backward()
