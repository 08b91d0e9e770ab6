"""Config(attention_math=True): SDPA's backward reads two packs of its probabilities, so q and k
are packed at the configured width (the fused variant keeps them at 8 bits or more)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import actfx
from actfx.accounting import count_saved
from actfx.config import Config


class Attention(nn.Module):
    def __init__(self, d=64, heads=4, gqa=False, mask=None, causal=False, learned_bias=False):
        super().__init__()
        self.heads, self.gqa, self.mask, self.causal = heads, gqa, mask, causal
        self.norm = nn.LayerNorm(d)
        self.q = nn.Linear(d, d)
        self.kv = nn.Linear(d, d if gqa else 2 * d)
        self.out = nn.Linear(d, d)
        self.bias = nn.Parameter(torch.randn(heads, 16, 16) * 0.5) if learned_bias else None

    def forward(self, x):
        b, t, d = x.shape
        x = self.norm(x)
        q = self.q(x).view(b, t, self.heads, -1).transpose(1, 2)
        kv_heads = self.heads // 2 if self.gqa else self.heads
        k, v = self.kv(x).view(b, t, 2 * kv_heads, -1).transpose(1, 2).chunk(2, 1)
        mask = self.bias if self.bias is not None else self.mask
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=self.causal, enable_gqa=self.gqa)
        return self.out(y.transpose(1, 2).reshape(b, t, d))


CASES = {
    "plain": dict(),
    "gqa_causal": dict(gqa=True, causal=True),
    "bool_mask": dict(mask=torch.rand(16, 16, generator=torch.Generator().manual_seed(1)) > 0.3),
    "learned_bias": dict(learned_bias=True),
}


def _gradient(model, x, r):
    for p in model.parameters():
        p.grad = None
    x = x.clone().requires_grad_(True)
    (model(x) * r).sum().backward()
    return torch.cat([p.grad.reshape(-1) for p in model.parameters()] + [x.grad.reshape(-1)])


@pytest.mark.parametrize("case", sorted(CASES))
def test_math_attention_is_identical_forward_and_unbiased_with_q_and_k_at_two_bits(case):
    torch.manual_seed(0)
    model, x = Attention(**CASES[case]), torch.randn(4, 16, 64)
    converted = actfx.convert(model, config=Config(bits=2, op_bits={}, attention_math=True))
    fused = actfx.convert(model, config=Config(bits=2, op_bits={}))
    assert torch.equal(converted(x), model(x))
    (decision,) = [d for d in converted._actfx_record.decisions if d.kind == "sdpa"]
    assert decision.saved[:3] == ["packed 2-bit"] * 3  # q, k, v; the fused variant keeps q and k at 8
    assert decision.saved[-2:] == ["packed 2-bit"] * 2  # the probabilities, twice
    with count_saved(converted) as math_saved:
        out = converted(x)
    with count_saved(fused) as fused_saved:
        out = fused(x)
    del out
    assert math_saved.activation_bytes < fused_saved.activation_bytes
    r = torch.randn(4, 16, 64)
    exact = _gradient(model, x, r)
    draws = [_gradient(converted, x, r) for _ in range(32)]
    one_step = sum(float((g - exact).norm()) for g in draws) / len(draws)
    mean = float((torch.stack(draws).mean(0) - exact).norm())
    assert one_step > 0.05 * float(exact.norm())  # noisy, so the mean below means something
    assert mean / one_step < 1.5 / math.sqrt(len(draws))  # 0.17-0.18 over the four cases


def test_math_attention_at_eight_bits_is_close_to_the_exact_gradient():
    torch.manual_seed(0)
    model, x = Attention(gqa=True, learned_bias=True), torch.randn(4, 16, 64)
    converted = actfx.convert(model, config=Config(bits=8, attention_math=True))
    r = torch.randn(4, 16, 64)
    exact = _gradient(model, x, r)
    assert float((_gradient(converted, x, r) - exact).norm()) < 0.03 * float(exact.norm())


def test_a_fully_masked_row_gives_the_gradient_pytorch_gives():
    """PyTorch's SDPA outputs zeros for a query that sees no key; its gradient is zero there."""
    torch.manual_seed(0)
    mask = torch.ones(16, 16, dtype=torch.bool)
    mask[3] = False
    model, x = Attention(mask=mask), torch.randn(2, 16, 64)
    converted = actfx.convert(model, config=Config(bits=8, attention_math=True, stochastic=False))
    r = torch.randn(2, 16, 64)
    exact, got = _gradient(model, x, r), _gradient(converted, x, r)
    assert torch.isfinite(exact).all() == torch.isfinite(got).all()
    assert float((got - exact).norm()) < 0.03 * float(exact.norm())


def test_dropout_keeps_the_fused_variant():
    """Dropout inside the call: backward replays it through the recomputed kernel, so the call
    keeps the fused variant (q and k at 8 bits) even where attention_math is set."""

    class Dropped(Attention):
        def forward(self, x):
            b, t, d = x.shape
            q = self.q(x).view(b, t, self.heads, -1).transpose(1, 2)
            k, v = self.kv(x).view(b, t, 2 * self.heads, -1).transpose(1, 2).chunk(2, 1)
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=0.1)
            return self.out(y.transpose(1, 2).reshape(b, t, d))

    converted = actfx.convert(Dropped(), config=Config(bits=2, op_bits={}, attention_math=True))
    converted(torch.randn(2, 16, 64))
    (decision,) = [d for d in converted._actfx_record.decisions if d.kind == "sdpa"]
    assert decision.saved[:2] == ["packed 8-bit"] * 2
