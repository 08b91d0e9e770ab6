"""Losses keep the packed gradient of their result, computed in forward, instead of their inputs."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import actfx
from actfx.accounting import count_saved
from actfx.config import Config
from checks import assert_mean_converges

_CASES = {
    "mse": lambda p, q, t: F.mse_loss(p, q),
    "mse-none": lambda p, q, t: F.mse_loss(p, q, reduction="none").mul(t).sum(),
    "l1-sum": lambda p, q, t: F.l1_loss(p, q, reduction="sum"),
    "smooth_l1": lambda p, q, t: F.smooth_l1_loss(p, q, beta=0.5),
    "huber": lambda p, q, t: F.huber_loss(p, q, delta=0.3),
    "bce_logits": lambda p, q, t: F.binary_cross_entropy_with_logits(p, torch.sigmoid(q), pos_weight=t[0].abs()),
    "bce": lambda p, q, t: F.binary_cross_entropy(torch.sigmoid(p), torch.sigmoid(q)),
    "gaussian_nll": lambda p, q, t: F.gaussian_nll_loss(p, t, F.softplus(q) + 0.1),
    "margin_ranking": lambda p, q, t: F.margin_ranking_loss(p, q, t.sign()),
    "triplet": lambda p, q, t: F.triplet_margin_loss(p, q, p.flip(0)),
    "multilabel_soft_margin": lambda p, q, t: F.multilabel_soft_margin_loss(p, (t > 0).float()),
    "module_mse": lambda p, q, t, m=nn.MSELoss(): m(p, q),
    "module_bce_logits": lambda p, q, t, m=nn.BCEWithLogitsLoss(): m(p, (t > 0).float()),
}


class _Head(nn.Module):
    """Two predictions from one input, and a loss of them (as a model computing its own loss does)."""

    def __init__(self, loss):
        super().__init__()
        self.a, self.b, self.loss = nn.Linear(32, 64), nn.Linear(32, 64), loss
        for i, value in enumerate(getattr(loss, "__defaults__", None) or ()):
            if isinstance(value, nn.Module):
                self.add_module(f"criterion{i}", value)  # registered: fx keeps the module a call

    def forward(self, x, t):
        return self.loss(self.a(x), self.b(x), t)


def _grads(model, x, t):
    params = list(model.parameters())
    grads = torch.autograd.grad(model(x, t), params, allow_unused=True)
    return torch.cat([(torch.zeros_like(p) if g is None else g).flatten() for g, p in zip(grads, params)])


# torch.export keeps these as ATen losses (so do l1, smooth L1, Huber, BCE and soft margin; the
# others it writes out as their ops, which have variants)
_ATEN_LOSSES = ("mse-none", "huber", "bce_logits", "module_mse")


@pytest.mark.parametrize("name, exported", [(name, False) for name in _CASES] + [(name, True) for name in _ATEN_LOSSES])
def test_a_loss_keeps_its_packed_input_gradients(name, exported):
    torch.manual_seed(0)
    model, x, t = _Head(_CASES[name]), torch.randn(128, 32), torch.randn(128, 64)
    example = (x, t) if exported else None
    converted = actfx.convert(model, bits=8, example_inputs=example)
    assert torch.equal(converted(x, t), model(x, t))
    assert "loss" in [d.kind for d in converted._actfx_record.decisions]
    exact = _grads(model, x, t)
    assert ((_grads(converted, x, t) - exact).norm() / exact.norm()) < 0.03
    narrow = actfx.convert(model, bits=2, example_inputs=example)
    with count_saved(model) as plain:
        kept = model(x, t)  # noqa: F841
    with count_saved(narrow) as packed:
        kept = narrow(x, t)  # noqa: F841
    assert packed.activation_bytes * 2.5 < plain.activation_bytes, (plain.activation_bytes, packed.activation_bytes)


class _Predictions(nn.Module):
    """The loss's inputs are parameters: its packed gradients are the only rounded values."""

    def __init__(self, loss):
        super().__init__()
        self.p, self.q, self.loss = nn.Parameter(torch.randn(128, 64)), nn.Parameter(torch.randn(128, 64)), loss

    def forward(self, x, t):
        return self.loss(self.p + 0 * t, self.q + 0 * t, t)  # activations, not parameters


@pytest.mark.parametrize("name", ["mse", "mse-none", "bce_logits", "triplet"])
def test_the_gradient_from_a_two_bit_loss_is_unbiased(name):
    torch.manual_seed(0)
    model, x, t = _Predictions(_CASES[name]), torch.randn(128, 32), torch.randn(128, 64)
    converted = actfx.convert(model, config=Config(bits=2, op_bits={"loss": 2}))
    assert "loss" in [d.kind for d in converted._actfx_record.decisions]
    exact = _grads(model, x, t)
    assert_mean_converges([_grads(converted, x, t) for _ in range(32)], exact, least_noise=1e-3)


def test_an_unreduced_loss_that_is_not_element_wise_runs_as_pytorch_runs_it():
    """A triplet loss per sample reads whole rows: no element's derivative stands for it."""
    torch.manual_seed(0)
    model = _Head(lambda p, q, t: F.triplet_margin_loss(p, q, p.flip(0), reduction="none").mul(t[:, 0]).sum())
    x, t = torch.randn(16, 32), torch.randn(16, 64)
    converted = actfx.convert(model, bits=2)
    assert torch.equal(converted(x, t), model(x, t))
    assert torch.allclose(_grads(converted, x, t), _grads(model, x, t), rtol=1e-5, atol=1e-7)
