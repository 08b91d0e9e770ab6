"""An element-wise function of a row sum of an element-wise function, ``f(sum(g(x), dim))``, is one
op keeping its row Jacobian (passes/row_regions.py): a hand-written pairwise distance
``sqrt(((a - b) ** 2).sum(-1) + 1e-12)`` kept sqrt's derivative, 5e5 on the zero diagonal, and its
rounding was biased (the mean of steps as far off as one step)."""

from __future__ import annotations

import torch
import torch.nn as nn

import actfx
from actfx.accounting import count_saved
from checks import assert_mean_converges


class PairwiseDistances(nn.Module):
    """Metric learning / SchNet-style radial distances, written by hand."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 32))

    def forward(self, x):
        e = self.embed(x)
        return torch.sqrt((e[:, None, :] - e[None, :, :]).pow(2).sum(-1) + 1e-12)


class HandWrittenLogSumExp(nn.Module):
    def __init__(self):
        super().__init__()
        self.head = nn.Linear(32, 256)

    def forward(self, x):
        return torch.log(torch.exp(self.head(x) * 8).sum(-1, keepdim=True))


def _grads(model, call, x, w):
    model.zero_grad(set_to_none=True)
    (call(x) * w).sum().backward()
    return torch.cat([p.grad.flatten() for p in model.parameters()])


def test_pairwise_distances_and_logsumexp_keep_one_bounded_jacobian():
    for model_class in (PairwiseDistances, HandWrittenLogSumExp):
        torch.manual_seed(0)
        model, x = model_class(), torch.randn(64, 32)
        converted = actfx.convert(model, bits=8)
        kinds = [d.kind for d in converted._actfx_record.decisions]
        assert "pow" not in kinds and "exp" not in kinds and "log" not in kinds, kinds  # one op, not three
        out = model(x)
        assert torch.equal(converted(x), out)
        w = torch.randn_like(out)
        exact = _grads(model, model, x, w)
        samples = [_grads(model, converted, x, w) for _ in range(16)]
        assert max((g - exact).norm() / exact.norm() for g in samples) < 0.03, model_class.__name__
        assert_mean_converges(samples, exact, least_noise=1e-4)


def test_pairwise_distances_hold_less_than_the_ops_apart():
    torch.manual_seed(0)
    model, x = PairwiseDistances(), torch.randn(64, 32)
    with count_saved(model) as plain:
        kept = model(x)  # noqa: F841 - a live output's graph holds what counts
    converted = actfx.convert(model, bits=2)
    with count_saved(converted) as packed:
        kept = converted(x)  # noqa: F841
    assert packed.activation_bytes < plain.activation_bytes / 14, (plain.activation_bytes, packed.activation_bytes)
