"""CIFAR ResNets (He et al. 2015, section 4.2): 6n+2 layers, three stages of 16/32/64 channels.

Shortcuts use option A, as in the paper's CIFAR experiments: when a stage halves the resolution
and doubles the channels, the identity is subsampled and zero-padded, so shortcuts add no
parameters (resnet20: 0.27M, resnet56: 0.85M, the counts the paper reports).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .resnet import BasicBlock, conv3x3, init_conv_bn

__all__ = ["ZeroPadShortcut", "CifarResNet", "resnet20", "resnet56"]


class ZeroPadShortcut(nn.Module):
    """Option-A shortcut: take every other pixel, append zero channels up to `out_channels`."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.extra_channels = out_channels - in_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, 0, self.extra_channels))


class CifarResNet(nn.Module):
    """3x3 stem, three stages of `n` basic blocks, global average pool, linear classifier."""

    def __init__(self, depth: int, num_classes: int = 10):
        super().__init__()
        if (depth - 2) % 6 != 0:
            raise ValueError(f"depth must be 6n+2 (20, 32, 44, 56, 110, ...), got {depth}")
        n = (depth - 2) // 6
        self.inplanes = 16
        self.conv1 = conv3x3(3, 16)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = self._make_layer(16, n, stride=1)
        self.layer2 = self._make_layer(32, n, stride=2)
        self.layer3 = self._make_layer(64, n, stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(64, num_classes)
        init_conv_bn(self)

    def _make_layer(self, planes: int, blocks: int, stride: int) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes:
            downsample = ZeroPadShortcut(self.inplanes, planes)
        layers = [BasicBlock(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes
        layers += [BasicBlock(planes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        x = torch.flatten(self.avgpool(x), 1)
        return self.fc(x)


def resnet20(num_classes: int = 10) -> CifarResNet:
    return CifarResNet(20, num_classes)


def resnet56(num_classes: int = 10) -> CifarResNet:
    return CifarResNet(56, num_classes)
