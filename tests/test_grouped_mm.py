"""Mixture-of-experts grouped matmul keeps its tokens packed (expert gradients unbiased)."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import actfx
from checks import assert_converted, assert_same_forward_and_fewer_bytes, assert_unbiased


class _TopTwoMoE(nn.Module):
    """Top-2 routing written as torchtitan and DeepSeek-style code do: tokens sorted by expert,
    one ``torch._grouped_mm`` per projection; each token's hidden state appears twice in the
    matrix the first matmul saves."""

    def __init__(self, dim=16, hidden=32, experts=4):
        super().__init__()
        self.router = nn.Linear(dim, experts, bias=False)
        self.up = nn.Parameter(torch.randn(experts, dim, hidden) / dim ** 0.5)
        self.down = nn.Parameter(torch.randn(experts, hidden, dim) / hidden ** 0.5)
        self.head = nn.Linear(dim, 4)

    def forward(self, x):
        tokens = x.reshape(-1, x.shape[-1])
        weights, experts = torch.topk(self.router(tokens).softmax(-1), 2, dim=-1)
        order = experts.flatten().argsort()
        offs = torch.bincount(experts.flatten(), minlength=self.up.shape[0]).cumsum(0).to(torch.int32)
        routed = tokens.repeat_interleave(2, dim=0)[order]
        hidden = torch.nn.functional.gelu(torch._grouped_mm(routed, self.up, offs))
        out = torch.empty_like(routed).index_copy(0, order, torch._grouped_mm(hidden, self.down, offs))
        mixed = (out.view(-1, 2, x.shape[-1]) * weights.unsqueeze(-1)).sum(1)
        return self.head(mixed.view_as(x) + x)


@pytest.mark.parametrize("exported, dtype", [(False, torch.float32), (True, torch.bfloat16)])
def test_grouped_mm_is_converted(exported, dtype):
    """(torch.export's shape function for ``_grouped_mm`` takes bfloat16 only.)"""
    torch.manual_seed(0)
    model = _TopTwoMoE().to(dtype)
    assert_converted(model, torch.randn(4, 16, 16, dtype=dtype), {"grouped_mm": 2}, exported=exported)


def test_grouped_mm_holds_less_and_is_unbiased_at_2_bits():
    torch.manual_seed(0)
    model, x = _TopTwoMoE(), torch.randn(4, 16, 16)
    assert_same_forward_and_fewer_bytes(model, actfx.convert(model, bits=2), x, 3)
    assert_unbiased(model, x)


def test_transformers_mixtral_experts_are_packed():
    """transformers' MoE layers call its ``grouped_mm_fallback`` op on CPU and in fp32; before
    it was covered, Mixtral kept 3.7x less at 2 bits, 11x after."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.MixtralConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                        num_attention_heads=4, num_key_value_heads=2, vocab_size=128,
                                        num_local_experts=4, num_experts_per_tok=2, use_cache=False)
    model = transformers.MixtralForCausalLM(config).train()
    ids = {"input_ids": torch.randint(0, 128, (2, 16))}
    converted = actfx.convert(model, bits=2, example_inputs=ids)
    kinds = [d.kind for d in converted._actfx_record.decisions]
    assert kinds.count("grouped_mm") == 2, kinds
    torch.manual_seed(1)
    assert torch.equal(converted(**ids).logits, model(**ids).logits)
    rows = actfx.show(converted, ids)
    grouped = [r for r in rows if r["op"].startswith("grouped_mm")]
    assert grouped and all(r["after_bytes"] * 8 < r["before_bytes"] for r in grouped), grouped
