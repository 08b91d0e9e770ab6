"""Element-wise functions of several activations keep one packed partial per input
(actfx/variants/pointwise_several.py)."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import actfx
from actfx.variants.pointwise_several import Several
from checks import assert_same_forward_and_fewer_bytes, assert_unbiased, parameter_grads


class TwoBranches(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn, self.a, self.b, self.out = fn, nn.Linear(16, 32), nn.Linear(16, 32), nn.Linear(32, 8)

    def forward(self, x):
        return self.out(self.fn(self.a(x), self.b(x)))


FUNCTIONS = {
    "atan2": lambda a, b: torch.atan2(a, b),
    "lerp_by_a_gate": lambda a, b: torch.lerp(a, b, torch.sigmoid(b)),
    "swiglu": lambda a, b: F.silu(a) * b,
    "tensor_exponent": lambda a, b: (a.abs() + 1).pow(torch.sigmoid(b)),
}


@pytest.mark.parametrize("exported", [False, True])
@pytest.mark.parametrize("name", FUNCTIONS)
def test_a_function_of_two_activations_is_one_site_with_its_partials_packed(name, exported):
    torch.manual_seed(0)
    model, x = TwoBranches(FUNCTIONS[name]), torch.randn(64, 16)
    example = (x,) if exported else None
    converted = actfx.convert(model, bits=8, example_inputs=example)
    decisions = [d for d in converted._actfx_record.decisions if d.kind not in ("linear",)]
    assert len(decisions) == 1 and len(decisions[0].saved) == 2, decisions  # one site, two packed partials
    _assert_same_forward_close_and_unbiased(model, converted, x, exported, factor=10)


def _assert_same_forward_close_and_unbiased(model, converted, x, exported: bool, factor: int):
    """The 8-bit ``converted``: same output, gradient within 3%; under fx, at 2 bits ``factor``
    times fewer bytes and the mean of 16 gradients converging (both paths share the variants)."""
    assert torch.equal(converted(x), model(x))
    exact = parameter_grads(model, x)
    assert (parameter_grads(converted, x) - exact).norm() / exact.norm() < 0.03
    if not exported:
        assert_same_forward_and_fewer_bytes(model, actfx.convert(model, bits=2), x, factor)
        assert_unbiased(model, x, k=16)


def test_a_partial_constant_along_a_broadcast_dim_is_kept_at_the_small_shape():
    """``x * sigmoid(s)`` with a per-channel ``s`` (squeeze-excitation): d/dx is sigmoid(s),
    kept per channel; d/ds varies with x and stays full size."""
    region = Several(lambda x, s: x * torch.sigmoid(s), "gate", 2)
    x, s = torch.randn(2, 3, 5, 5, requires_grad=True), torch.randn(2, 3, 1, 1, requires_grad=True)
    dx, ds = region.partials(x, s)
    assert dx.shape == (2, 3, 1, 1) and ds.shape == (2, 3, 5, 5)
    assert torch.equal(dx, torch.sigmoid(s.detach()))
    near = Several(lambda x, s: x * torch.sigmoid(s), "gate", 2).partials(x, s.expand(2, 3, 5, 5).clone())
    assert near[0].shape == (2, 3, 5, 5)  # no broadcast: nothing to narrow


def test_an_input_without_gradient_gets_no_partial_and_the_gradient_matches():
    region = Several(lambda a, m: torch.where(m, F.silu(a), a * 0.5), "masked", 2)
    a, m = torch.randn(4, 8, requires_grad=True), torch.rand(4, 8) > 0.5
    da, dm = region.partials(a, m)
    assert dm is None and da.shape == a.shape
    expected, = torch.autograd.grad(region.fn(a, m).sum(), a)
    torch.testing.assert_close(da, expected)


class RowDistances(nn.Module):
    """Contrastive-style head: cosine similarity and distance of two projections, as functions
    and as modules."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(16, 32), nn.Linear(16, 32)
        self.cos, self.dist = nn.CosineSimilarity(dim=1), nn.PairwiseDistance(p=3.0, keepdim=True)

    def forward(self, x):
        a, b = self.a(x), self.b(x)
        return (F.cosine_similarity(a, b, dim=-1)[:, None] + F.pairwise_distance(a, b)[:, None]
                + self.cos(a, b)[:, None] * self.dist(a, b))


@pytest.mark.parametrize("exported", [False, True])
def test_row_distances_keep_their_packed_row_jacobians(exported):
    torch.manual_seed(0)
    model, x = RowDistances(), torch.randn(64, 16)
    converted = actfx.convert(model, bits=8, example_inputs=(x,) if exported else None)
    kinds = [d.kind for d in converted._actfx_record.decisions]
    assert kinds.count("cosine_similarity") == 2 and kinds.count("pairwise_distance") == 2, kinds
    _assert_same_forward_close_and_unbiased(model, converted, x, exported, factor=8)


class PNorms(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(16, 32)

    def forward(self, x):
        h = self.a(x)
        return (h * torch.linalg.vector_norm(h, 3, dim=-1, keepdim=True) + h.norm(p=1, dim=1, keepdim=True)
                + torch.norm(h, float("inf"), -1)[:, None])


def test_p_norms_over_one_dim_keep_their_packed_row_jacobians():
    torch.manual_seed(0)
    model, x = PNorms(), torch.randn(64, 16)
    converted = actfx.convert(model, bits=8)
    assert [d.kind for d in converted._actfx_record.decisions].count("vector_norm") == 3
    assert torch.equal(converted(x), model(x))
    exact = parameter_grads(model, x)
    assert (parameter_grads(converted, x) - exact).norm() / exact.norm() < 0.03
    assert_unbiased(model, x, k=16)
