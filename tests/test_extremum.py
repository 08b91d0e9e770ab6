"""torch.maximum / minimum of two activations: three exact 1-bit masks instead of both inputs."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import actfx
from checks import assert_same_forward_and_fewer_bytes
from actfx.accounting import count_saved
from actfx.variants.masks import extremum


@pytest.mark.parametrize("op", ["maximum", "minimum"])
def test_gradients_equal_atens_with_ties_nan_and_broadcasting(op):
    fn = getattr(torch, op)
    a = torch.tensor([1.0, 2.0, 3.0, float("nan"), 5.0, 1.0], requires_grad=True)
    b = torch.tensor([[0.0, 2.0, 4.0, 1.0, float("nan"), 1.0]] * 2, requires_grad=True)
    g = torch.arange(12.0).view(2, 6)
    out = extremum(op, f"torch:{op}", a, b)
    assert torch.equal(out.isnan(), fn(a, b).isnan())
    for got, expected in zip(torch.autograd.grad(out, (a, b), g), torch.autograd.grad(fn(a, b), (a, b), g)):
        assert torch.equal(got, expected)


class _Gate(nn.Module):
    """RWKV-style: the larger of two computed values (as its WKV recurrence keeps a running max)."""

    def __init__(self, spelling):
        super().__init__()
        self.a, self.b, self.out = nn.Linear(32, 256), nn.Linear(32, 256), nn.Linear(256, 8)
        self.spelling = spelling

    def forward(self, x):
        a, b = self.a(x), self.b(x)
        if self.spelling == "maximum":
            h = torch.maximum(a, b)
        elif self.spelling == "min":
            h = torch.min(a, b.round())  # ties
        elif self.spelling == "method":
            h = a.max(b[:1])  # broadcast
        else:  # torch.max over a computed dim: not a binary max
            h = a * torch.max(b, a.dim() - 1)[0][..., None]
        return self.out(torch.tanh(h))


@pytest.mark.parametrize("spelling", ["maximum", "min", "method", "dim"])
@pytest.mark.parametrize("exported", [False, True])
def test_converted_and_keeps_masks(spelling, exported):
    torch.manual_seed(0)
    model, x = _Gate(spelling), torch.randn(64, 32)
    exact = torch.autograd.grad(model(x).sum(), list(model.parameters()))
    converted = actfx.convert(model, bits=8, example_inputs=(x,) if exported else None)
    assert torch.equal(converted(x), model(x))
    got = torch.autograd.grad(converted(x).sum(), list(model.parameters()))
    assert max(((g - e).norm() / e.norm()).item() for g, e in zip(got, exact)) < 0.03
    kinds = [d.kind for d in converted._actfx_record.decisions]
    if spelling == "dim":
        assert not {"maximum", "minimum"} & set(kinds)
        return
    assert ("minimum" if spelling == "min" else "maximum") in kinds
    # both 64x256 inputs (128 KiB in all) became 3 bits per output element (6 KiB)
    narrow = actfx.convert(model, bits=2, example_inputs=(x,) if exported else None)
    assert_same_forward_and_fewer_bytes(model, narrow, x, 6)


@pytest.mark.parametrize("op", ["amax", "amin"])
@pytest.mark.parametrize("dim, keepdim", [(-1, False), ((0, 2), True), ((), False), (1, True)])
def test_reduced_extremum_gradients_equal_atens(op, dim, keepdim):
    from actfx.variants.masks import reduced_extremum

    torch.manual_seed(0)
    x = torch.randint(0, 3, (3, 4, 5)).float()  # many ties
    x[0, 1, 2] = float("nan")
    x.requires_grad_()
    fn = getattr(torch, op)
    expected_out = fn(x, dim, keepdim)
    out = reduced_extremum(op, x, dim, keepdim)
    assert torch.equal(out.isnan(), expected_out.isnan())
    g = torch.randn(expected_out.shape)
    (got,), (expected,) = torch.autograd.grad(out, x, g), torch.autograd.grad(expected_out, x, g)
    assert torch.equal(got.isnan(), expected.isnan())
    assert torch.equal(got.nan_to_num(), expected.nan_to_num())


class _WindowMax(nn.Module):
    """Hiera's mask-unit pooling: a max over a window dimension written as ``amax``."""

    def __init__(self, method):
        super().__init__()
        self.a, self.out = nn.Linear(32, 64), nn.Linear(64, 8)
        self.method = method

    def forward(self, x):
        h = self.a(x).view(x.shape[0], 4, -1, 64)
        h = h.amax(dim=1) if self.method else torch.amin(h, 1, keepdim=True).squeeze(1)
        return self.out(torch.tanh(h))


@pytest.mark.parametrize("method", [True, False])
@pytest.mark.parametrize("exported", [False, True])
def test_amax_keeps_a_mask(method, exported):
    torch.manual_seed(0)
    model, x = _WindowMax(method), torch.randn(8, 64, 32)
    exact = torch.autograd.grad(model(x).sum(), list(model.parameters()))
    converted = actfx.convert(model, bits=2, example_inputs=(x,) if exported else None)
    assert torch.equal(converted(x), model(x))
    assert ("amax" if method else "amin") in [d.kind for d in converted._actfx_record.decisions]
    converted8 = actfx.convert(model, bits=8, example_inputs=(x,) if exported else None)
    got = torch.autograd.grad(converted8(x).sum(), list(model.parameters()))
    assert max(((g - e).norm() / e.norm()).item() for g, e in zip(got, exact)) < 0.03
    assert_same_forward_and_fewer_bytes(model, converted, x, 6)


@pytest.mark.parametrize("op", ["amax", "amin"])
@pytest.mark.parametrize("include_self", [True, False])
@pytest.mark.parametrize("inplace", [False, True])
@pytest.mark.parametrize("dim", [0, 1])
def test_scatter_extremum_gradients_equal_atens(op, include_self, inplace, dim):
    """Ties, NaN, destinations no message reaches, and ATen's count of the destination's own value
    among the ties even where ``include_self=False`` left it out."""
    from actfx.variants.scatter_extremum import scatter_extremum

    torch.manual_seed(0)
    x0, src0 = torch.randint(-2, 3, (5, 6)).float(), torch.randint(-2, 3, (8, 6) if dim == 0 else (5, 9)).float()
    src0[1, 2] = x0[3, 4] = float("nan")
    index = torch.randint(0, 5 if dim == 0 else 6, src0.shape)
    g = torch.randn(5, 6)
    results = []
    for ours in (False, True):
        x, src = x0.clone().requires_grad_(), src0.clone().requires_grad_()
        dest = x * 1.0
        if ours:
            out = scatter_extremum(dest, dim, index, src, op, include_self=include_self, inplace=inplace)
        else:
            reduce = dest.scatter_reduce_ if inplace else dest.scatter_reduce
            out = reduce(dim, index, src, op, include_self=include_self)
        results.append((out, *torch.autograd.grad(out, (x, src), g)))
    for got, expected in zip(results[1], results[0]):
        assert torch.equal(got.isnan(), expected.isnan())
        assert torch.equal(got.nan_to_num(), expected.nan_to_num())


class _MaxAggregation(nn.Module):
    """torch_geometric's MaxAggregation (EdgeCNN, PointNet++): the largest message per node."""

    def __init__(self, method):
        super().__init__()
        self.lin, self.out, self.method = nn.Linear(16, 64), nn.Linear(64, 4), method

    def forward(self, x, src_index, dst_index):
        messages = torch.tanh(self.lin(x.index_select(0, src_index)))
        index = dst_index.view(-1, 1).expand_as(messages)
        if self.method:
            pooled = x.new_zeros(x.shape[0], 64).scatter_reduce_(0, index, messages, reduce="amax", include_self=False)
        else:
            pooled = torch.scatter_reduce(x.new_zeros(x.shape[0], 64), 0, index, messages, "amax", include_self=False)
        return self.out(pooled)


@pytest.mark.parametrize("method", [True, False])
@pytest.mark.parametrize("exported", [False, True])
def test_max_aggregation_keeps_masks_of_the_largest_messages(method, exported):
    """autograd kept the messages, the result and the index at full size (85% of what EdgeCNN held
    after conversion); now one bit a message and two an output value."""
    torch.manual_seed(0)
    model = _MaxAggregation(method)
    x, edges = torch.randn(50, 16), torch.randint(0, 50, (2, 800))
    inputs = (x, edges[0], edges[1])
    exact = torch.autograd.grad(model(*inputs).sum(), list(model.parameters()))
    converted = actfx.convert(model, bits=2, example_inputs=inputs if exported else None)
    assert torch.equal(converted(*inputs), model(*inputs))
    assert "scatter_reduce" in [d.kind for d in converted._actfx_record.decisions]
    with count_saved(model) as plain:
        kept = model(*inputs)  # noqa: F841
    with count_saved(converted) as packed:
        kept = converted(*inputs)  # noqa: F841
    assert packed.activation_bytes < plain.activation_bytes / 6, (plain.activation_bytes, packed.activation_bytes)
    converted8 = actfx.convert(model, bits=8, example_inputs=inputs if exported else None)
    got = torch.autograd.grad(converted8(*inputs).sum(), list(model.parameters()))
    assert max(((g - e).norm() / e.norm()).item() for g, e in zip(got, exact)) < 0.03


@pytest.mark.parametrize("dim, keepdim", [(-1, False), (1, True), (None, False), (None, True)])
def test_aminmax_gradients_equal_atens(dim, keepdim):
    from actfx.variants.masks import aminmax

    torch.manual_seed(0)
    x = torch.randint(0, 3, (3, 4, 5)).float()  # many ties
    x[0, 1, 2] = float("nan")
    x.requires_grad_()
    expected, got = torch.aminmax(x, dim=dim, keepdim=keepdim), aminmax(x, dim, keepdim)
    assert type(got) is type(expected)
    for a, b in zip(got, expected):
        assert torch.equal(a.nan_to_num(), b.nan_to_num()) and torch.equal(a.isnan(), b.isnan())
    g_min, g_max = torch.randn(expected.min.shape), torch.randn(expected.max.shape)
    (mine,), (theirs,) = (torch.autograd.grad([out.min, out.max], x, [g_min, g_max]) for out in (got, expected))
    assert torch.equal(mine.isnan(), theirs.isnan()) and torch.equal(mine.nan_to_num(), theirs.nan_to_num())


class _RangeNormalized(nn.Module):
    """Min-max scaling of features (quantization-aware and contrastive code): ``torch.aminmax``."""

    def __init__(self, method):
        super().__init__()
        self.a, self.out = nn.Linear(32, 64), nn.Linear(64, 8)
        self.method = method

    def forward(self, x):
        h = self.a(x)
        lo, hi = h.aminmax(dim=-1, keepdim=True) if self.method else torch.aminmax(h, dim=-1, keepdim=True)
        return self.out((h - lo) / (hi - lo + 1e-3))


@pytest.mark.parametrize("method", [True, False])
@pytest.mark.parametrize("exported", [False, True])
def test_aminmax_keeps_two_masks(method, exported):
    torch.manual_seed(0)
    model, x = _RangeNormalized(method), torch.randn(8, 64, 32)
    converted = actfx.convert(model, bits=2, example_inputs=(x,) if exported else None)
    assert torch.equal(converted(x), model(x))
    assert "aminmax" in [d.kind for d in converted._actfx_record.decisions]
    assert_same_forward_and_fewer_bytes(model, converted, x, 6)
