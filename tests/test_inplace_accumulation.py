"""In-place ``index_add_`` accumulations into a fresh buffer run out of place, so each keeps only
its index (``actfx/passes/inplace_accumulation.py``)."""

from __future__ import annotations

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

import actfx
from actfx.passes.inplace_accumulation import write_accumulations_out_of_place
from checks import assert_converted, assert_same_forward_and_fewer_bytes, assert_unbiased


class _TopTwoExperts(nn.Module):
    """A mixture of experts as hand-written code routes tokens: each expert's tokens are added
    into one buffer with ``index_add_``, which is read after the loop."""

    def __init__(self, experts: int = 3):
        super().__init__()
        self.router = nn.Linear(32, experts)
        self.experts = nn.ModuleList(nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 32))
                                     for _ in range(experts))
        self.head = nn.Linear(32, 8)

    def forward(self, x):
        gates, chosen = F.softmax(self.router(x), dim=-1).topk(2, dim=-1)
        out = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            token, slot = torch.where(chosen == e)
            out.index_add_(0, token, expert(x[token]) * gates[token, slot, None])
        return self.head(torch.tanh(out + x))


def test_an_experts_loop_keeps_only_each_call_s_index():
    """PyTorch keeps each expert's whole output for ``index_add_``'s gradient, which reads its
    shape only; in place on a buffer read after the loop, no variant took the calls (a
    hand-written two-layer MoE: 5.2x at 2 bits, 12.7x with this)."""
    torch.manual_seed(0)
    model, x = _TopTwoExperts(), torch.randn(256, 32)
    assert_converted(model, x, {"index_add": 3}, exported=False, factor=8)
    assert_unbiased(model, x)


def test_a_buffer_read_between_accumulations_stays_in_place():
    """A reader between two calls sees the half-filled buffer, and an earlier call's result is the
    buffer itself: rewritten, the first would read the sum and the second a partial one."""
    class Midway(nn.Module):
        def forward(self, h, index, y):
            out = torch.zeros_like(h)
            out.index_add_(0, index, y)
            half = out.sum()
            out.index_add_(0, index, 2 * y)
            return out * half

    class EarlyAlias(nn.Module):
        def forward(self, h, index, y):
            out = torch.zeros_like(h)
            first = out.index_add_(0, index, y)  # aliases out: after the next call it holds both sums
            out.index_add_(0, index, 2 * y)
            return first

    for module in (Midway(), EarlyAlias()):
        gm = fx.symbolic_trace(module)
        assert write_accumulations_out_of_place(gm) == 0
        assert sum(n.target == "index_add_" for n in gm.graph.nodes) == 2


def test_a_caller_s_tensor_is_still_written_in_place():
    """Only buffers the graph makes are rewritten: the caller's tensor must hold the sum after."""
    class IntoInput(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(16, 16)

        def forward(self, out, index, x):
            out.index_add_(0, index, torch.tanh(self.lin(x)))
            return out.sum(-1)

    torch.manual_seed(0)
    model, index, x = IntoInput(), torch.randint(0, 8, (64,)), torch.randn(64, 16)
    converted = actfx.convert(model, bits=8)
    mine, theirs = torch.zeros(8, 16), torch.zeros(8, 16)
    assert torch.equal(converted(mine, index, x), model(theirs, index, x))
    assert torch.equal(mine, theirs) and mine.abs().sum() > 0


def test_chained_calls_give_the_same_values_and_names():
    """Each call becomes ``torch.index_add`` of the previous sum under its own name (reports name
    ops as traced), and readers after the loop read the last sum."""
    class Chain(nn.Module):
        def forward(self, h, index, y):
            out = h.new_zeros(h.shape)
            out.index_add_(0, index, y)
            last = out.index_add_(0, index, y * 2)
            return out + 1, last

    gm = fx.symbolic_trace(Chain())
    names = [n.name for n in gm.graph.nodes if n.target == "index_add_"]
    assert write_accumulations_out_of_place(gm) == 2
    assert [n.name for n in gm.graph.nodes if n.target is torch.index_add] == names
    h, index, y = torch.randn(5, 3), torch.tensor([0, 2, 2, 4]), torch.randn(4, 3)
    for got, expected in zip(gm(h, index, y), Chain()(h, index, y)):
        assert torch.equal(got, expected)
    model = _TopTwoExperts()
    assert_same_forward_and_fewer_bytes(model, actfx.convert(model, bits=2), torch.randn(128, 32), 8)
