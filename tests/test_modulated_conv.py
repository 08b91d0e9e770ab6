"""A convolution whose weight the graph computes (StyleGAN2's modulated convolution, dynamic and
conditional convolutions) keeps that weight packed: the input's gradient is linear in it. It
was kept exact, most of what such a layer holds at low resolution."""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

import actfx
from checks import assert_mean_converges, assert_same_forward_and_fewer_bytes


class ModulatedConv(nn.Module):
    """StyleGAN2: a per-sample weight from a style vector, run as one grouped convolution."""

    def __init__(self, cin=64, cout=64, k=3, wdim=32):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(1, cout, cin, k, k))
        self.affine = nn.Linear(wdim, cin)
        self.cin, self.cout, self.k = cin, cout, k

    def forward(self, x, w):
        b, c, h, wd = x.shape
        weight = self.weight / math.sqrt(c * self.k * self.k) * self.affine(w).view(b, 1, c, 1, 1)
        weight = weight * torch.rsqrt(weight.pow(2).sum([2, 3, 4]) + 1e-8).view(b, self.cout, 1, 1, 1)
        out = F.conv2d(x.reshape(1, b * c, h, wd), weight.view(b * self.cout, c, self.k, self.k), padding=1,
                       groups=b)
        return F.leaky_relu(out.view(b, self.cout, h, wd), 0.2)


def test_a_computed_convolution_weight_is_packed_and_unbiased():
    torch.manual_seed(0)
    model = ModulatedConv()
    x, w = torch.randn(8, 64, 8, 8), torch.randn(8, 32)
    r = torch.randn(8, 64, 8, 8)

    def grads(call):
        model.zero_grad(set_to_none=True)
        (call(x, w) * r).sum().backward()
        return torch.cat([p.grad.flatten() for p in model.parameters()])

    converted = actfx.convert(model, bits=2)
    assert_same_forward_and_fewer_bytes(model, converted, (x, w), 8)
    exact = grads(model)
    assert (grads(actfx.convert(model, bits=8)) - exact).norm() / exact.norm() < 0.03
    assert_mean_converges([grads(converted) for _ in range(16)], exact, least_noise=1e-3)
