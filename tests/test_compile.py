"""Converted models compose with torch.compile: no graph breaks, same forward, working backward."""

from __future__ import annotations

import pytest
import torch

import actfx
from model_families import FAMILIES


@pytest.mark.parametrize("name", ["resnet_basic", "mlp", "functional"])
def test_compiles_without_graph_breaks(name):
    torch._dynamo.reset()
    torch.manual_seed(0)
    model, x = FAMILIES[name]()
    converted = actfx.convert(model, bits=8)
    explanation = torch._dynamo.explain(converted)(x)
    assert explanation.graph_break_count == 0, [str(b.reason)[:200] for b in explanation.break_reasons]
    compiled = torch.compile(converted, backend="aot_eager")
    torch.manual_seed(1)
    expected = model(x)
    torch.manual_seed(1)
    got = compiled(x)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    got.square().sum().backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
