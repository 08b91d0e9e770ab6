"""gather keeps its index in the narrowest integer type (its gradient stays exact)."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import actfx
from actfx.accounting import count_saved
from actfx.variants.gather import gather
from checks import assert_converted


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
