"""Small models for the planner tests."""

from __future__ import annotations

import torch
import torch.nn as nn


class TwoBranch(nn.Module):
    """Two linear heads on the same features, one fed them 100x wider: the wide branch's packed
    input rounds with a 100x larger step, so its gradient variance is ~10^4 x the narrow one's."""

    def __init__(self, features: int = 64, out: int = 8):
        super().__init__()
        self.narrow = nn.Linear(features, out)
        self.wide = nn.Linear(features, out)

    def forward(self, x):
        return self.narrow(x * 1.0) + self.wide(x * 100.0)


class FunctionalTwoBranch(nn.Module):
    """TwoBranch as functional code in one forward: both products are ops of kind linear in the
    root module, told apart only by their order (plan keys ``:linear`` and ``:linear#2``)."""

    def __init__(self, features: int = 64, out: int = 8):
        super().__init__()
        self.narrow = nn.Parameter(torch.randn(out, features) / features**0.5)
        self.wide = nn.Parameter(torch.randn(out, features) / features**0.5)

    def forward(self, x):
        return nn.functional.linear(x * 1.0, self.narrow) + nn.functional.linear(x * 100.0, self.wide)


class SmallCNN(nn.Module):
    def __init__(self, classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(16)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(32)
        self.relu = nn.ReLU()
        self.head = nn.Linear(32, classes)

    def forward(self, x):
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.relu(self.bn2(self.conv2(x)))
        return self.head(x.mean((2, 3)))


def projection(seed: int = 0):
    """A loss: the output against a fixed Gaussian, drawn once per output shape."""
    drawn = {}

    def loss(out):
        if out.shape not in drawn:
            drawn[out.shape] = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed))
        return (out * drawn[out.shape]).sum()

    return loss
