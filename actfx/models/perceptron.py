"""A plain multilayer perceptron: the simplest model whose saved activations are all Linear inputs
and ReLU masks, useful as a baseline next to the convolutional and attention models."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

__all__ = ["MLP", "mlp"]


class MLP(nn.Module):
    """Flatten, then (Linear, ReLU, Dropout) per hidden width, then a Linear classifier."""

    def __init__(
        self, in_features: int = 784, hidden: Sequence[int] = (1024, 1024), num_classes: int = 10, dropout: float = 0.1
    ):
        super().__init__()
        layers: list[nn.Module] = []
        for width in hidden:
            layers += [nn.Linear(in_features, width), nn.ReLU(inplace=True), nn.Dropout(dropout)]
            in_features = width
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(in_features, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.layers(torch.flatten(x, 1)))


def mlp(num_classes: int = 10) -> MLP:
    """784 -> 1024 -> 1024 -> 10, for 1x28x28 inputs."""
    return MLP(784, (1024, 1024), num_classes)
