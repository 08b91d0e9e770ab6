"""gather keeps its index in the narrowest integer type (its gradient stays exact)."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import actfx
from actfx.accounting import count_saved
from actfx.variants.gather import gather
from checks import assert_converted, assert_unbiased


class _RandomMasking(nn.Module):
    """ViT-MAE's random masking: a random half of the tokens kept, gathered with an index
    repeated across the width (int64, twice the bytes of the fp32 values it selects)."""

    def __init__(self):
        super().__init__()
        self.embed, self.head = nn.Linear(16, 64), nn.Linear(64, 8)
        self.register_buffer("noise", torch.rand(4, 32))

    def forward(self, x):
        h = self.embed(x)
        keep = self.noise.argsort(dim=1)[:, : x.shape[1] // 2]
        return self.head(torch.tanh(h.gather(1, keep.unsqueeze(-1).repeat(1, 1, h.shape[-1]))))


@pytest.mark.parametrize("exported", [False, True])
def test_gather_is_converted(exported):
    torch.manual_seed(0)
    assert_converted(_RandomMasking(), torch.randn(4, 32, 16), {"gather": 1}, exported=exported)


def test_the_index_is_kept_in_one_byte_and_the_gradient_is_exact():
    """PyTorch keeps the int64 index and the input itself (for its shape)."""
    torch.manual_seed(0)
    x = torch.randn(4, 32, 64, requires_grad=True)
    index = torch.randint(0, 32, (4, 16, 64))
    with count_saved() as plain:
        expected = torch.gather(x, 1, index)
    with count_saved() as compact:
        got = gather(x, 1, index)
    assert torch.equal(got, expected)
    assert plain.activation_bytes == index.numel() * 8 + x.numel() * 4
    assert compact.activation_bytes == index.numel()
    grad = torch.randn_like(got)
    assert torch.equal(torch.autograd.grad(got, x, grad)[0], torch.autograd.grad(expected, x, grad)[0])


def test_the_masked_model_holds_less():
    torch.manual_seed(0)
    model, x = _RandomMasking(), torch.randn(4, 32, 16)
    with count_saved(model) as before:
        kept = model(x)  # noqa: F841
    converted = actfx.convert(model, bits=2)
    with count_saved(converted) as after:
        kept = converted(x)  # noqa: F841
    assert after.activation_bytes * 6 < before.activation_bytes, (before.activation_bytes, after.activation_bytes)


def test_an_expanded_index_is_kept_unexpanded():
    """``idx[:, None].expand(-1, d)`` (a pointer network's or a graph's selection) holds one int64 a
    row; its narrow copy at full size held d bytes a row: 4x what PyTorch keeps at d = 128."""
    torch.manual_seed(0)
    x = torch.randn(300, 128, requires_grad=True)
    index = torch.randint(0, 300, (4000,)).view(-1, 1).expand(-1, 128)
    with count_saved() as plain:
        expected = torch.gather(x, 0, index)
    with count_saved() as compact:
        got = gather(x, 0, index)
    assert torch.equal(got, expected)
    assert compact.activation_bytes == 4000 * 2  # int16 for 300 rows
    assert compact.activation_bytes < plain.activation_bytes
    grad = torch.randn_like(got)
    assert torch.equal(torch.autograd.grad(got, x, grad)[0], torch.autograd.grad(expected, x, grad)[0])


class _SegmentSum(nn.Module):
    """A graph network's readout written by hand: node states summed per graph with index_add."""

    def __init__(self, inplace: bool):
        super().__init__()
        self.lin, self.head, self.inplace = nn.Linear(64, 64), nn.Linear(64, 4), inplace
        self.register_buffer("graph_of", torch.arange(512) // 64)

    def forward(self, h):
        h = torch.tanh(self.lin(h))
        if self.inplace:
            return self.head(torch.zeros(8, 64).index_add_(0, self.graph_of, h))
        return self.head(torch.index_add(torch.zeros(8, 64), 0, self.graph_of, h, alpha=0.5))


@pytest.mark.parametrize("exported", [False, True])
@pytest.mark.parametrize("inplace", [True, False], ids=["method", "function"])
def test_index_add_keeps_only_the_shape_of_its_source(inplace, exported):
    """PyTorch keeps index_add's whole source for a gradient (``g.index_select(dim, index)``) that
    reads its shape only; a hand-written GNN held it exact (66 of 462 KiB at 2 bits). Captured by
    torch.export (``aten.index_add``: Hugging Face JetMoe's expert combine) it was not covered."""
    torch.manual_seed(0)
    model, x = _SegmentSum(inplace), torch.randn(512, 64)
    assert_converted(model, x, {"index_add": 1}, exported=exported)
    converted = actfx.convert(model, bits=2, example_inputs=(x,) if exported else None)
    with count_saved(converted) as saved:
        kept = converted(x)  # noqa: F841 - a live output's graph holds what counts
    assert 0 < saved.activation_bytes < 512 * 64 * 4 / 4  # tanh's output packed once, no exact source
    assert_unbiased(model, x)
