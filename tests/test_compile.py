"""Converted models compose with torch.compile: no graph breaks, same forward, working backward."""

from __future__ import annotations

import pytest
import torch

import actfx
from model_families import FAMILIES


@pytest.mark.slow
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


class _TinyLM(torch.nn.Module):
    """Embedding -> GELU MLP -> logits -> cross-entropy inside the module (as HF models do)."""

    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(64, 32)
        self.mlp = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.GELU(), torch.nn.Linear(64, 32))
        self.head = torch.nn.Linear(32, 64)

    def forward(self, tokens, target):
        h = self.emb(tokens)
        logits = self.head(h + self.mlp(h))
        return torch.nn.functional.cross_entropy(logits.flatten(0, 1), target.flatten())


def test_loss_inside_the_model_compiles_without_graph_breaks():
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = _TinyLM()
    tokens, target = torch.randint(0, 64, (4, 32)), torch.randint(0, 64, (4, 32))
    converted = actfx.convert(model, bits=8)
    assert "cross_entropy" in {d.kind for d in converted._actfx_record.decisions}
    explanation = torch._dynamo.explain(converted)(tokens, target)
    assert explanation.graph_break_count == 0, [str(b.reason)[:200] for b in explanation.break_reasons]
    got = torch.compile(converted, backend="aot_eager")(tokens, target)
    torch.testing.assert_close(got, model(tokens, target), rtol=1e-5, atol=1e-5)
    got.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.slow
def test_inductor_compiled_model_runs_the_cpu_kernels_inside():
    # The user's torch.compile (Inductor) around a converted model: the actfx custom ops stay
    # opaque in its graph and, at run time, call actfx's own compiled CPU kernels.
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.BatchNorm2d(16),
                                torch.nn.ReLU(), torch.nn.Conv2d(16, 8, 3, padding=1))
    x = torch.randn(4, 3, 32, 32)
    converted = actfx.convert(model, bits=8)
    compiled = torch.compile(converted)
    got = compiled(x)
    torch.testing.assert_close(got, model(x), rtol=1e-4, atol=1e-4)
    got.square().sum().backward()
    approx = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
    model.zero_grad(set_to_none=True)
    model(x).square().sum().backward()
    exact = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
    # All parameters together: the first conv's bias has an exact gradient of ~0 (BatchNorm
    # follows), so per-parameter relative errors would divide by nothing.
    assert ((approx - exact).norm() / exact.norm()).item() < 0.01
