"""Saved indices in the narrowest integer type their producer bounds them to (index_range)."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.fx.experimental.proxy_tensor import make_fx

import actfx
from actfx.passes.index_range import compact_dtype


def _last_index(fn, *inputs):
    """compact_dtype of the integer value ``fn`` returns, traced as Inductor sees it."""
    gm = make_fx(fn, tracing_mode="fake")(*inputs)
    return compact_dtype(gm.graph.output_node().args[0][0])


@pytest.mark.parametrize("fn, size, expected", [
    (lambda x: [x.topk(3, dim=-1).indices], 300, torch.int16),
    (lambda x: [x.sort(dim=1).indices], 128, torch.int8),  # 0..127
    (lambda x: [x.sort(dim=1).indices], 129, torch.int16),  # 128 does not fit int8
    (lambda x: [x.max(dim=1).indices.unsqueeze(1)], 50, torch.int8),  # through a view
    (lambda x: [x.argmax()], 9000, torch.int32),  # no dim: 4 x 9000 positions of the whole tensor
    (lambda x: [x.cummax(dim=1).indices], 40000, torch.int32),
    (lambda x: [x.long() * 3], 10, None),  # arithmetic: no bound known
])
def test_an_index_is_bounded_by_the_dimension_its_op_indexes(fn, size, expected):
    assert _last_index(fn, torch.randn(4, size)) == expected


def test_an_index_an_embedding_looks_up_is_bounded_by_its_rows():
    """T5's relative-position buckets: arithmetic, then an embedding lookup (which refuses an
    index outside the table) bounds them."""
    def buckets(table, positions):
        bucket = (positions[:, None] - positions[None, :]).abs().clamp(max=31)
        return [bucket, F.embedding(bucket, table)]

    positions = torch.arange(64)
    assert _last_index(buckets, torch.randn(32, 4), positions) == torch.int8
    assert _last_index(buckets, torch.randn(300, 4), positions) == torch.int16


def test_pool_indices_are_bounded_by_the_pooled_plane():
    x = torch.randn(2, 3, 30, 30)
    assert _last_index(lambda t: [F.max_pool2d(t, 2, return_indices=True)[1]], x) == torch.int16  # 900 positions
    assert _last_index(lambda t: [F.adaptive_max_pool2d(t, 5, return_indices=True)[1]], x) == torch.int16
    assert _last_index(lambda t: [F.max_pool2d(t[..., :10, :10], 2, return_indices=True)[1]], x) == torch.int8


class _IndexedBackward(nn.Module):
    """Backward reads only indices here (the weights' gradients are exact), as an MoE router's
    gather and a max-unpool do."""

    def __init__(self):
        super().__init__()
        self.table = nn.Parameter(torch.randn(300))
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, scores, image):
        chosen = scores.topk(4, dim=-1).indices
        picked, where = F.max_pool2d(self.conv(image), 2, return_indices=True)
        return (self.table[chosen] ** 1).sum() + F.max_unpool2d(picked, where, 2).sum()


@pytest.mark.slow
def test_compiled_saved_indices_are_stored_narrow_and_read_back_exactly():
    torch.manual_seed(0)
    model = _IndexedBackward()
    scores, image = torch.randn(64, 300), torch.randn(2, 3, 20, 20)
    compiled = actfx.compile(model, bits=2)
    reference = torch.compile(model)
    out = compiled(scores, image)
    out.backward()
    got = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    expected_out = reference(scores, image)
    expected_out.backward()
    torch.testing.assert_close(out, expected_out, rtol=1e-6, atol=0)
    for g, e in zip(got, (p.grad for p in model.parameters())):
        torch.testing.assert_close(g, e, rtol=1e-6, atol=1e-6)
    saved = {v.name: v for p in compiled._actfx_compiled.plans for v in p.saved if not v.dtype.startswith("float")}
    narrowed = {v.reason for v in saved.values() if "stored as" in v.reason}
    assert narrowed == {"integer, stored as int16"}, saved  # topk over 300, unpool over 18 x 18
    assert all(v.bytes_after * 4 == v.bytes_before for v in saved.values() if "stored as int16" in v.reason)
