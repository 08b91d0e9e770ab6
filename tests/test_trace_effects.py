"""What a forward does besides computing its output survives conversion (fx runs Python for real while it traces)."""

from __future__ import annotations

import copy
import random

import pytest
import torch
import torch.nn as nn

import actfx


class LayerDrop(nn.Module):
    """fairseq / Hugging Face style stochastic depth: a fresh draw per layer and call."""

    def __init__(self, draw):
        super().__init__()
        self.layers = nn.ModuleList(nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 64)) for _ in range(4))
        self.draw, self.head = draw, nn.Linear(64, 4)

    def forward(self, x):
        for layer in self.layers:
            if self.training and self.draw() < 0.4:
                continue
            x = x + layer(x)
        return self.head(x)


@pytest.mark.filterwarnings("ignore:actfx")
@pytest.mark.parametrize("draw", [lambda: torch.rand(1).item(), random.random], ids=["torch", "python"])
def test_a_random_branch_is_drawn_at_every_call(draw):
    """fx ran the draw once while tracing and kept that branch for every call: the converted
    model skipped the same layers at every step (outputs 0.2-0.5 off the original's)."""
    torch.manual_seed(0)
    model, x = LayerDrop(draw), torch.randn(8, 64)
    state = torch.random.get_rng_state(), random.getstate()
    converted = actfx.convert(model, bits=8)
    assert torch.equal(torch.random.get_rng_state(), state[0]) and random.getstate() == state[1]
    for seed in range(6):
        torch.manual_seed(seed), random.seed(seed)
        expected = model(x)
        torch.manual_seed(seed), random.seed(seed)
        assert torch.equal(converted(x), expected), seed


class Routed(nn.Module):
    def __init__(self):
        super().__init__()
        self.gate, self.ff = nn.Linear(64, 4), nn.Linear(64, 64)
        self.aux_losses = []  # the training loop adds and clears them

    def forward(self, x):
        p = self.gate(x).softmax(-1)
        self.aux_losses.append((p.mean(0) ** 2).sum() * 4)
        return self.ff(x) * p.max(-1, keepdim=True).values


@pytest.mark.filterwarnings("ignore:actfx")
def test_values_stored_in_a_list_attribute_are_stored_at_every_call():
    """The trace appended fx proxies to the list, and the converted graph appended nothing: the
    auxiliary loss dropped out of training."""
    model = Routed()
    converted = actfx.convert(model, bits=2)
    assert model.aux_losses == []
    out = converted(torch.randn(32, 64))
    assert len(model.aux_losses) == 1 and model.aux_losses[0].requires_grad
    (out.sum() + model.aux_losses[0]).backward()
    assert model.gate.weight.grad is not None


class Momentum(nn.Module):
    """MoCo v1/v2: the key encoder follows the query encoder inside forward (``in_place``: BYOL
    and DINO style, ``k.data.mul_(m).add_(q)``)."""

    def __init__(self, in_place=False):
        super().__init__()
        self.query, self.key = nn.Linear(64, 32), nn.Linear(64, 32)
        self.in_place = in_place

    @torch.no_grad()
    def _follow(self):
        for q, k in zip(self.query.parameters(), self.key.parameters()):
            if self.in_place:
                k.data.mul_(0.9).add_(q.data, alpha=0.1)
            else:
                k.data = k.data * 0.9 + q.data * 0.1

    def forward(self, x):
        self._follow()
        return (self.query(x) * self.key(x).detach()).sum(-1)


@pytest.mark.filterwarnings("ignore:actfx")
@pytest.mark.parametrize("in_place", [False, True], ids=["replaced", "in-place"])
def test_converting_does_not_run_a_momentum_update(in_place):
    """fx ran ``_follow`` for real while tracing: conversion moved the key encoder, once per trace;
    an in-place update was then missing from the graph, so training calls never moved it."""
    torch.manual_seed(0)
    model = Momentum(in_place)
    plain = copy.deepcopy(model)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    converted = actfx.convert(model, bits=2)
    assert all(torch.equal(p, before[name]) for name, p in model.named_parameters())
    x = torch.randn(8, 64)
    for _ in range(3):
        converted(x).sum().backward()
        plain(x).sum().backward()
    assert not torch.equal(model.key.weight, before["key.weight"])  # the training calls do update it
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), plain.parameters()))


class CachedBias(nn.Module):
    """timm LeViT's attention: in eval mode a bias table is computed once and cached in a dict."""

    def __init__(self):
        super().__init__()
        self.fc, self.bias = nn.Linear(64, 64), nn.Parameter(torch.randn(64))
        self.cache = {}

    def biases(self):
        if self.training:
            return self.bias * 2
        if "cpu" not in self.cache:
            self.cache["cpu"] = self.bias * 2
        return self.cache["cpu"]

    def forward(self, x):
        return torch.tanh(self.fc(x)) + self.biases()


def test_a_cache_filled_in_eval_mode_does_not_stop_the_conversion():
    """Only the training capture refuses traced values stored in an attribute: in eval mode they
    are a cache, and refusing it cost LeViT and EfficientFormer their attention's conversion."""
    model, x = CachedBias(), torch.randn(32, 64)
    converted = actfx.convert(model, bits=8)
    assert "" in converted._actfx_record.graphs and model.cache == {}  # traced whole, the cache left empty
    assert torch.equal(converted(x), model(x))
    model.eval(), converted.eval()
    with torch.no_grad():
        assert torch.equal(converted(x), model(x))
