"""Ops that select along a dim keep compact indices for backward (actfx/variants/selection.py)."""

import pytest
import torch
import torch.nn as nn

import actfx
from actfx.accounting import count_saved

SELECTIONS = {
    "sort": lambda h: h.sort(-1).values,
    "sort_descending_unpacked": lambda h: torch.sort(h, dim=1, descending=True)[0],
    "topk": lambda h: torch.topk(h, 5, dim=-1).values,
    "cummax": lambda h: torch.cummax(h, 1).values,
    "cummin": lambda h: h.cummin(dim=1)[0],
    "kthvalue": lambda h: torch.kthvalue(h, 3, -1, keepdim=True).values.expand_as(h),
    "median": lambda h: h.median(dim=1).values[:, None].expand_as(h),
    "mode": lambda h: torch.mode(h.round(), 1)[0][:, None] * h,
    "max": lambda h: torch.max(h, dim=1, keepdim=True).values.expand_as(h),
    "min_method": lambda h: h.min(1)[0][:, None] * h,
}


class Select(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn, self.a, self.b = fn, nn.Linear(8, 200), nn.Linear(200, 4)

    def forward(self, x):
        y = self.fn(self.a(x))
        return self.b(nn.functional.pad(y, (0, 200 - y.shape[-1])))


@pytest.mark.parametrize("exported", [False, True])
@pytest.mark.parametrize("name", SELECTIONS)
def test_selections_keep_compact_indices_and_the_same_gradients(name, exported):
    torch.manual_seed(0)
    model, x = Select(SELECTIONS[name]), torch.randn(16, 8)
    op = name.split("_")[0]
    # nothing is packed (min_numel): the selection alone decides the gradients
    config = actfx.Config(min_numel=10**9)
    converted = actfx.convert(model, config=config, example_inputs=(x,) if exported else None)
    assert op in [d.kind for d in converted._actfx_record.decisions]
    assert torch.equal(converted(x), model(x))
    grads = [torch.autograd.grad(m(x).square().sum(), list(model.parameters())) for m in (model, converted)]
    assert all(torch.equal(a, b) for a, b in zip(*grads))
    with count_saved(model) as before:
        kept = model(x)  # noqa: F841
    with count_saved(converted) as after:
        kept = converted(x)  # noqa: F841
    # int64 indices (and cummax's input) -> uint8 indices; the rest as it was
    assert "torch.int64" not in after.by_dtype, after
    assert after.by_dtype["torch.uint8"] * 8 == before.by_dtype["torch.int64"], (before, after)
    assert after.by_dtype["torch.float32"] <= before.by_dtype["torch.float32"], (before, after)
