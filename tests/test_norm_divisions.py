"""A value divided by its own row norm, written out, runs as one normalize (passes/norm_divisions.py)."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import actfx
from checks import assert_mean_converges, assert_same_forward_and_fewer_bytes, parameter_grads

SPELLINGS = {
    "x.norm": lambda h: h / h.norm(dim=-1, keepdim=True),
    "torch.norm": lambda h: h / torch.norm(h, dim=-1, keepdim=True),
    "linalg.norm": lambda h: h / torch.linalg.norm(h, dim=-1, keepdim=True),
    "linalg.vector_norm": lambda h: torch.div(h, torch.linalg.vector_norm(h, 2, -1, True)),
    "plus eps": lambda h: h.div(h.norm(p=2, dim=-1, keepdim=True) + 1e-6),
    "clamp": lambda h: h / h.norm(dim=-1, keepdim=True).clamp(min=1e-6),
    "clamp_min": lambda h: h / h.norm(dim=-1, keepdim=True).clamp_min(1e-8),
}


class _CosineAttention(nn.Module):
    """CLIP / Swin-V2-style cosine attention with the norms written out."""

    def __init__(self, unit, d=32, heads=2):
        super().__init__()
        self.unit, self.heads = unit, heads
        self.q, self.k, self.v, self.o = nn.Linear(d, d), nn.Linear(d, d, bias=False), nn.Linear(d, d), nn.Linear(d, d)

    def forward(self, x):
        b, n, c = x.shape
        q, k, v = (t.view(b, n, self.heads, c // self.heads).transpose(1, 2) for t in (self.q(x), self.k(x), self.v(x)))
        att = (self.unit(q) @ self.unit(k).transpose(-2, -1) * 10.0).softmax(-1)
        return self.o((att @ v).transpose(1, 2).reshape(b, n, c))


@pytest.mark.parametrize("spelling", SPELLINGS)
@pytest.mark.parametrize("exported", [False, True])
def test_each_spelling_is_one_normalize_with_the_same_forward(spelling, exported):
    torch.manual_seed(0)
    model, x = _CosineAttention(SPELLINGS[spelling]), torch.randn(2, 64, 32)
    converted = actfx.convert(model, bits=8, example_inputs=(x,) if exported else None)
    assert torch.equal(converted(x), model(x))
    assert [d.kind for d in converted._actfx_record.decisions].count("normalize") == 2
    exact, got = parameter_grads(model, x), parameter_grads(converted, x)
    assert (got - exact).norm() < 0.03 * exact.norm()
    assert_same_forward_and_fewer_bytes(model, actfx.convert(model, bits=2, example_inputs=(x,) if exported else None),
                                        x, 3)


@pytest.mark.parametrize("spelling", ["x.norm", "plus eps"])
def test_the_query_gradient_is_unbiased(spelling):
    """The packed quotient and the exact 1/norm give back PyTorch's gradient on average. (Op by
    op, the norm and the division kept the same pack of the input, and the norm's backward
    multiplied the division's gradient, which reads it, by it again: on a Linear -> ``h /
    h.norm()`` -> Linear the mean of 1024 gradients was 1.42x the unbiased error and growing,
    1.01x as one normalize; ``/work/s46/divnorm_bias.py``.)"""
    torch.manual_seed(0)
    model, x, r = _CosineAttention(SPELLINGS[spelling]), torch.randn(2, 64, 32), torch.randn(2, 64, 32)
    converted = actfx.convert(model, bits=2)

    def q_grad(m):
        return torch.autograd.grad((m(x) * r).sum(), model.q.weight)[0]

    exact = q_grad(model)
    assert_mean_converges([q_grad(converted) for _ in range(256)], exact, least_noise=1e-3)


def test_a_zero_row_keeps_pytorchs_nan_and_zero_gradient_through_the_norm():
    """``x / (||x|| + eps)`` of a zero row is 0 with gradient g / eps, as in PyTorch."""
    lin = nn.Linear(8, 8)
    with torch.no_grad():
        lin.weight.zero_()
        lin.bias.zero_()
    model = nn.Sequential(lin, _Unit())
    x = torch.randn(4, 8)
    converted = actfx.convert(model, bits=8)
    assert torch.equal(converted(x), model(x))
    (e,), (g,) = (torch.autograd.grad(m(x).sum(), [lin.bias]) for m in (model, converted))
    assert torch.allclose(g, e, rtol=0.02)


class _Unit(nn.Module):
    def forward(self, h):
        return h / (h.norm(dim=-1, keepdim=True) + 1e-3)


class _DividedByAClampedValue(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(8, 8)

    def forward(self, x):
        h = self.a(x)
        return h / h.abs().clamp(0.1, 10)


def test_a_divisor_clamped_from_above_is_left_as_it_is():
    """A clamp with a maximum read as a denominator returned nothing to unpack: conversion raised
    TypeError on ``h / h.abs().clamp(0.1, 10)``."""
    model, x = _DividedByAClampedValue(), torch.randn(4, 8)
    converted = actfx.convert(model, bits=2)
    assert torch.equal(converted(x), model(x))
    assert "normalize" not in [d.kind for d in converted._actfx_record.decisions]
