"""A small U-Net (Ronneberger et al. 2015) for dense prediction: a model whose skip connections
keep encoder activations alive until the decoder, the pattern that makes saved activations large.

Convolutions are padded (the output matches the input size), and each upsampled map is resized
to its skip with `F.interpolate`, so image sizes need not be multiples of 8.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .resnet import init_conv_bn

__all__ = ["DoubleConv", "Up", "UNet", "unet_small"]


class DoubleConv(nn.Sequential):
    """(3x3 conv, BN, ReLU) twice: the unit of every U-Net level."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__(
            nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
        )


class Up(nn.Module):
    """Transposed-conv upsample, resize to the skip, concatenate, DoubleConv."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.up = nn.ConvTranspose2d(in_channels, in_channels // 2, kernel_size=2, stride=2)
        self.conv = DoubleConv(in_channels // 2 + out_channels, out_channels)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(self.up(x), size=skip.shape[-2:], mode="nearest")
        return self.conv(torch.cat([skip, x], dim=1))


class UNet(nn.Module):
    """Images [b, in_channels, h, w] to per-pixel logits [b, num_classes, h, w]."""

    def __init__(self, in_channels: int = 3, num_classes: int = 2, base: int = 32, depth: int = 3):
        super().__init__()
        widths = [base * 2**i for i in range(depth + 1)]
        self.inc = DoubleConv(in_channels, widths[0])
        self.pool = nn.MaxPool2d(kernel_size=2, stride=2)
        self.down = nn.ModuleList(DoubleConv(widths[i], widths[i + 1]) for i in range(depth))
        self.up = nn.ModuleList(Up(widths[i + 1], widths[i]) for i in reversed(range(depth)))
        self.outc = nn.Conv2d(widths[0], num_classes, kernel_size=1)
        init_conv_bn(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.inc(x)
        skips = []
        for down in self.down:
            skips.append(x)
            x = down(self.pool(x))
        for up, skip in zip(self.up, reversed(skips)):
            x = up(x, skip)
        return self.outc(x)


def unet_small(in_channels: int = 3, num_classes: int = 2) -> UNet:
    """Three pooling levels, 32 to 256 channels."""
    return UNet(in_channels, num_classes, base=32, depth=3)
