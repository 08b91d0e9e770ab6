"""masked_select keeps only its mask for backward (PyTorch keeps the whole input too)."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import actfx
from actfx.accounting import count_saved
from actfx.variants.masked_select import masked_select
from checks import assert_converted, assert_same_forward_and_fewer_bytes


class _ValidTokenLoss(nn.Module):
    """Per-token scores of which only the valid ones (a mask computed in forward) are kept."""

    def __init__(self):
        super().__init__()
        self.embed, self.score = nn.Linear(16, 64), nn.Linear(64, 64)

    def forward(self, x):
        h = torch.tanh(self.embed(x))
        scores = self.score(h)
        return torch.masked_select(scores, h > 0).square().mean() + scores.masked_select(x[..., :1] > 0).mean()


@pytest.mark.parametrize("exported", [False, True])
def test_masked_select_is_converted(exported):
    torch.manual_seed(0)
    assert_converted(_ValidTokenLoss(), torch.randn(4, 32, 16), {"masked_select": 2}, exported=exported)


@pytest.mark.parametrize("mask_shape", [(4, 32, 64), (4, 32, 1), (64,)])
def test_only_the_mask_is_kept_and_the_gradient_is_pytorchs(mask_shape):
    """A mask of the input's shape, one broadcast over the features and one over the rows."""
    torch.manual_seed(0)
    x = torch.randn(4, 32, 64, requires_grad=True)
    mask = torch.randn(mask_shape) > 0
    with count_saved() as plain:
        expected = torch.masked_select(x, mask)
    with count_saved() as kept:
        got = masked_select(x, mask)
    assert torch.equal(got, expected)
    assert plain.activation_bytes == x.numel() * 4 + mask.numel()
    assert kept.activation_bytes == mask.numel()
    grad = torch.randn_like(got)
    assert torch.equal(torch.autograd.grad(got, x, grad)[0], torch.autograd.grad(expected, x, grad)[0])


def test_a_mask_broadcast_over_the_input_sums_the_gradient_back():
    """An input broadcast against a larger mask: each input value was selected once per copy."""
    x = torch.randn(1, 8, requires_grad=True)
    mask = torch.rand(5, 8) > 0.3
    grad = torch.randn(int(mask.sum()))
    expected = torch.autograd.grad(torch.masked_select(x, mask), x, grad)[0]
    assert torch.allclose(torch.autograd.grad(masked_select(x, mask), x, grad)[0], expected)


def test_the_model_no_longer_holds_the_selected_scores():
    """Both selects kept the fp32 scores (32 KiB, one storage): 98,772 -> 64,228 bytes at 8 bits before, 31,460 now."""
    torch.manual_seed(0)
    model, x = _ValidTokenLoss(), torch.randn(4, 32, 16)
    assert_same_forward_and_fewer_bytes(model, actfx.convert(model, bits=8), x, 3)
