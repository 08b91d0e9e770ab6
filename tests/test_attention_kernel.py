"""actfx/passes/attention_kernel.py: per SDPA call, math backend or fused kernel, whichever holds less."""

import pytest
import torch
from checks import assert_mean_converges

import actfx
from actfx.compiled_estimate import estimate_compiled
from actfx.passes.attention_kernel import math_holds_less
from actfx.passes.saved_plan import Storage
from test_compiled import Block, _grads


def test_math_where_its_probabilities_hold_less_than_exact_q_and_k():
    def heads(tokens, dtype=torch.float32):
        return torch.empty(1, 12, tokens, 64, dtype=dtype)

    assert math_holds_less(heads(256), heads(256), attention_bits=8)  # GPT-2's heads at 256 tokens
    assert not math_holds_less(heads(480), heads(480), attention_bits=8)
    assert math_holds_less(heads(480), heads(480), attention_bits=2)  # narrower probabilities
    assert not math_holds_less(heads(1024), heads(1024), attention_bits=2)  # the forward row cap, 8 x 64
    assert not math_holds_less(heads(256, torch.bfloat16), heads(256, torch.bfloat16), attention_bits=8)


@pytest.mark.slow
def test_probabilities_too_few_to_pack_count_as_exact_not_as_a_refusal():
    """MobileViT's last stage: 4 tokens, heads of 20, 8 x 4 heads. Its 512 probabilities stay
    exact (under min_numel), but math packs q, k and v where the fused kernel keeps q and k
    exact: math was refused whenever the probabilities were that few (9.8% of what a compiled
    MobileViT-XXS held). Where q and k are too few to pack as well, the fused kernel stays."""
    assert math_holds_less(torch.empty(8, 4, 4, 20), torch.empty(8, 4, 4, 20), attention_bits=8, min_numel=1024)
    assert not math_holds_less(torch.empty(1, 2, 7, 8), torch.empty(1, 2, 7, 8), attention_bits=8, min_numel=1024)
    torch.manual_seed(0)
    model, x = Block(d=80, heads=4), torch.randn(8, 4, 80)
    compiled = _compiled_as_torch_compile_and_unbiased(model, x)
    saved = compiled._actfx_compiled.plans[-1].saved
    assert [v.storage for v in saved if v.shape == (8, 4, 4, 4)] == [Storage.EXACT]  # math's probabilities
    assert not [v.name for v in saved if "attention" in v.reason]  # no exact q and k for a fused kernel


def test_few_queries_over_many_keys_count_the_keys_per_head():
    """A Perceiver's 8 latents over 64 keys, heads of width 8 (cross-attention): the fused kernel
    keeps 64 exact keys a head (2048 B), math 512 probabilities at 8 bits and q, k, v (1600 B in
    all). Counted per query row as if there were as many queries as keys, the fused kernel was
    kept (a Perceiver held 3.8x less than torch.compile instead of 9x)."""
    assert math_holds_less(torch.empty(4, 4, 8, 8), torch.empty(4, 4, 64, 8), attention_bits=8)


def _compiled_as_torch_compile_and_unbiased(model, x):
    """actfx.compile(model, bits=2), its forward checked against torch.compile's and the mean of
    16 of its gradients against torch.compile's gradient."""
    compiled, reference = actfx.compile(model, bits=2), torch.compile(model)
    torch.testing.assert_close(compiled(x), reference(x), rtol=1e-6, atol=1e-6)
    exact = _grads(model, reference, x)
    assert_mean_converges([_grads(model, compiled, x) for _ in range(16)], exact)
    return compiled


@pytest.mark.slow
def test_long_rows_keep_the_fused_kernel_and_pack_v_and_the_output():
    """160 keys against heads of 16: the fused kernel holds less. Its backward recomputes the
    probabilities from q and k (kept exact) and reads v and the output linearly (packed); the
    forward is torch.compile's, the gradients unbiased, and the estimate on meta tensors (the
    memory-efficient kernel) holds what the compiled model holds."""
    torch.manual_seed(0)
    model, x = Block(d=64, heads=4), torch.randn(2, 160, 64)
    compiled = _compiled_as_torch_compile_and_unbiased(model, x)
    plan = compiled._actfx_compiled.plans[-1]
    assert not [v for v in plan.saved if v.shape == (2, 4, 160, 160)]  # no probabilities
    heads = [v for v in plan.saved if v.shape == (2, 4, 160, 16)]  # q, k, v, output
    assert sorted((v.storage.name, v.bits) for v in heads) == [("EXACT", None), ("EXACT", None),
                                                                ("PACKED", 8), ("PACKED", 8)]
    estimate = estimate_compiled(Block(d=64, heads=4).to("meta"), (x.to("meta"),), actfx.Config(bits=2))
    assert abs(estimate.bytes_after - compiled._actfx_compiled.bytes_after) <= 64  # the GPU kernel's RNG state


def test_short_rows_trace_math_and_pack_the_probabilities():
    torch.manual_seed(0)
    model, x = Block(d=64, heads=4), torch.randn(2, 64, 64)  # 64 keys against heads of 16
    record = estimate_compiled(model, (x,), actfx.Config(bits=2))
    probabilities = [v for v in record.plans[-1].saved if v.shape == (2, 4, 64, 64)]
    assert probabilities and all(v.storage is Storage.PACKED and v.bits == 8 for v in probabilities)


class MaskedBlock(Block):
    """Block with the additive mask Hugging Face models build: where(causal, 0, -inf)."""

    def forward(self, x):
        b, t, d = x.shape
        causal = torch.ones(t, t, dtype=torch.bool, device=x.device).tril()
        mask = torch.where(causal, 0.0, float("-inf")).expand(b, 1, t, t)
        q, k, v = self.qkv(self.ln1(x)).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        a = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return x + self.proj(a.transpose(1, 2).reshape(b, t, d))


@pytest.mark.slow
def test_a_fused_kernels_float_mask_is_kept_as_its_boolean():
    """The fused backward reads the mask (exact); built from a boolean and two constants, it is
    rebuilt in backward from a 1-bit mask instead of held in fp32."""
    torch.manual_seed(0)
    model, x = MaskedBlock(d=64, heads=4), torch.randn(2, 160, 64)
    compiled = _compiled_as_torch_compile_and_unbiased(model, x)
    saved = compiled._actfx_compiled.plans[-1].saved
    assert not [v for v in saved if v.dtype == "float32" and v.shape[-2:] == (160, 160)]
    masks = [v for v in saved if v.storage is Storage.MASK and v.shape[-2:] == (160, 160)]
    assert masks and sum(v.bytes_after for v in masks) <= 2 * 160 * 160 // 8 + 64


def test_attention_inside_a_checkpointed_region_is_chosen_too():
    from torch.utils.checkpoint import checkpoint

    from actfx.passes.attention_kernel import attention_as_math, choose_attention_kernels

    class Checkpointed(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.block = Block(d=64, heads=4)

        def forward(self, x):
            return checkpoint(self.block, x, use_reentrant=False)

    targets = []

    def backend(gm, example_inputs):
        choose_attention_kernels(gm, attention_bits=8)
        targets.extend(n.target for m in gm.modules() if isinstance(m, torch.fx.GraphModule) for n in m.graph.nodes)
        return gm

    torch.compile(Checkpointed(), backend=backend)(torch.randn(2, 32, 64, requires_grad=True))
    assert attention_as_math in targets


def test_symbolic_sequence_lengths_keep_pytorchs_choice_and_exact_gradients():
    """With dynamic shapes the sizes are symbolic: reading them would add guards, and the values
    stay exact anyway; the SDPA call is left as it is, and one graph serves every length."""
    from actfx.compiled_estimate import as_fx_code

    torch.manual_seed(0)
    model = Block(d=64, heads=4)
    compiled, record = as_fx_code(model, actfx.Config(bits=2), dynamic=True)
    for length in (24, 40):
        x = torch.randn(2, length, 64)
        torch.testing.assert_close(_grads(model, compiled, x), _grads(model, model, x), rtol=1e-4, atol=1e-5)
    assert len(record.plans) == 1  # one graph for both lengths: no size was specialised


class GroupedQueryAttention(torch.nn.Module):
    """4 query heads sharing 2 key/value heads, a boolean causal mask passed to SDPA."""

    def __init__(self):
        super().__init__()
        self.q, self.kv = torch.nn.Linear(64, 64), torch.nn.Linear(64, 64)

    def forward(self, x):
        b, t, _ = x.shape
        q = self.q(x).view(b, t, 4, 16).transpose(1, 2)
        k, v = self.kv(x).view(b, t, 2, 32).transpose(1, 2).split(16, -1)
        mask = torch.ones(t, t, dtype=torch.bool, device=x.device).tril()
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)


def test_the_estimate_on_meta_traces_the_fused_kernel_as_the_cpu_does():
    """Grouped-query attention with a boolean mask, 160 keys on heads of 16: the estimate on meta
    tensors keeps what the run on real tensors keeps (k and v ungrouped, the mask as bits)."""
    from actfx.compiled_estimate import as_fx_code

    torch.manual_seed(0)
    model, x = GroupedQueryAttention(), torch.randn(2, 160, 64)
    compiled, record = as_fx_code(model, actfx.Config(bits=8))
    compiled(x).sum().backward()
    estimate = estimate_compiled(GroupedQueryAttention().to("meta"), (x.to("meta"),), actfx.Config(bits=8))
    assert abs(estimate.bytes_after - record.bytes_after) <= 64
    assert [v for v in record.plans[-1].saved if v.storage is Storage.MASK and v.shape == (160, 160)]


class CausalBooleanAttention(torch.nn.Module):
    """Attention as Hugging Face's GPT-2 calls SDPA: a boolean causal mask built in the graph and
    the default scale passed explicitly."""

    def __init__(self, d=64, heads=2):
        super().__init__()
        self.heads, self.qkv, self.out = heads, torch.nn.Linear(d, 3 * d), torch.nn.Linear(d, d)

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = (y.view(b, t, self.heads, d // self.heads).transpose(1, 2) for y in self.qkv(x).split(d, dim=2))
        i = torch.arange(t, device=x.device)
        mask = (i[None, None, :, None] >= i[None, None, None, :]).expand(b, 1, t, t)
        y = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=0.0,
                                                             scale=(d // self.heads) ** -0.5, is_causal=False)
        return self.out(y.transpose(1, 2).reshape(b, t, d))


@pytest.mark.slow
def test_inductors_attention_patterns_do_not_turn_the_chosen_math_back_into_the_fused_kernel():
    """Inductor's joint-graph patterns (fuse_attention.py) matched the math backend's traced
    scaling and put the CPU flash kernel back: q and k stayed exact, the probabilities unsaved,
    and a Hugging Face GPT-2 held 25.8 MB instead of 17.1. The query is scaled before the call."""
    torch.manual_seed(0)
    model, x = CausalBooleanAttention(), torch.randn(2, 128, 64)  # 128 keys, heads of 32: math
    compiled = _compiled_as_torch_compile_and_unbiased(model, x)
    saved = compiled._actfx_compiled.plans[-1].saved
    assert not [v for v in saved if "flash" in v.reason], [(v.op, v.reason) for v in saved if "flash" in v.reason]
    probabilities = [v for v in saved if v.shape == (2, 2, 128, 128) and v.storage is Storage.PACKED]
    assert probabilities and all(v.bits == 8 for v in probabilities)


class PrescaledQueryAttention(torch.nn.Module):
    """Attention as Hugging Face's OPT calls SDPA: the query scaled by the model, ``scale=1.0``."""

    def __init__(self, d=64, heads=2):
        super().__init__()
        self.heads = heads
        self.q, self.k, self.v, self.out = (torch.nn.Linear(d, d) for _ in range(4))

    def forward(self, x):
        b, t, d = x.shape
        width = d // self.heads
        q = self.q(x) * width ** -0.5
        q, k, v = (y.view(b, t, self.heads, width).transpose(1, 2) for y in (q, self.k(x), self.v(x)))
        y = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, scale=1.0)
        return self.out(y.transpose(1, 2).reshape(b, t, d))


@pytest.mark.slow
def test_a_query_the_model_scaled_itself_keeps_the_chosen_math():
    """With ``scale=1.0`` the query's factor of 1 was removed as a no-op and Inductor's unscaled
    attention pattern put the CPU flash kernel back (OPT: q and k exact, 3.9x instead of 8.5x).
    Fails without the fix under torch 2.14.1; torch 2.13's patterns did not take that graph."""
    torch.manual_seed(0)
    model, x = PrescaledQueryAttention(), torch.randn(2, 128, 64)
    compiled = _compiled_as_torch_compile_and_unbiased(model, x)
    saved = compiled._actfx_compiled.plans[-1].saved
    assert not [v for v in saved if "flash" in v.reason], [(v.op, v.reason) for v in saved if "flash" in v.reason]
    assert [v for v in saved if v.shape == (2, 2, 128, 128) and v.storage is Storage.PACKED]


class TorchMultiheadAttention(torch.nn.Module):
    """nn.MultiheadAttention as torchvision's ViT calls it (batch first, no weights returned)."""

    def __init__(self, d=64, heads=4):
        super().__init__()
        self.norm, self.attn = torch.nn.LayerNorm(d), torch.nn.MultiheadAttention(d, heads, batch_first=True)

    def forward(self, x):
        h = self.norm(x)
        return x + self.attn(h, h, h, need_weights=False)[0]


@pytest.mark.slow
def test_multihead_attention_modules_get_the_per_call_choice_too():
    """Dynamo keeps ``F.multi_head_attention_forward`` one call, so its SDPA was never pointed at
    math: q and k stayed exact (17 tokens, heads of 16: 44.1 -> 23.4 KB; through SDPA 8.5 KB)."""
    torch.manual_seed(0)
    model, x = TorchMultiheadAttention(), torch.randn(2, 17, 64)
    compiled = _compiled_as_torch_compile_and_unbiased(model, x)
    saved = compiled._actfx_compiled.plans[-1].saved
    assert not [v for v in saved if "flash" in v.reason], [(v.op, v.reason) for v in saved if "flash" in v.reason]
    assert [v for v in saved if v.shape == (2, 4, 17, 17) and v.storage is Storage.PACKED and v.bits == 8]


def test_the_estimate_of_a_long_row_multihead_attention_traces_the_fused_kernel():
    """On meta tensors SDPA traces math; 160 keys against heads of 16 run the fused kernel on the
    CPU, so the estimate must hold no probabilities either (it counted them, 8-bit, instead of
    exact q and k)."""
    model, x = TorchMultiheadAttention().to("meta"), torch.randn(2, 160, 64, device="meta")
    record = estimate_compiled(model, (x,), actfx.Config(bits=2))
    assert not [v for v in record.plans[-1].saved if v.shape == (2, 4, 160, 160)]
    assert [v for v in record.plans[-1].saved if v.storage is Storage.EXACT and "attention" in v.reason]


class HandWrittenAttention(torch.nn.Module):
    """Attention written out (ConvBERT, MobileViT, many repositories): matmul, scale, additive
    mask, softmax, dropout, matmul; Inductor's patterns turn it into the fused CPU kernel."""

    def __init__(self, d=64, heads=2):
        super().__init__()
        self.q, self.k, self.v, self.out = (torch.nn.Linear(d, d) for _ in range(4))
        self.heads, self.drop = heads, torch.nn.Dropout(0.0)

    def forward(self, x, mask):
        b, t, d = x.shape
        q, k, v = (f(x).view(b, t, self.heads, d // self.heads).permute(0, 2, 1, 3) for f in (self.q, self.k, self.v))
        scores = torch.matmul(q, k.transpose(-1, -2)) / (d // self.heads) ** 0.5 + mask
        a = torch.matmul(self.drop(torch.nn.functional.softmax(scores, dim=-1)), v)
        return self.out(a.permute(0, 2, 1, 3).reshape(b, t, d))


@pytest.mark.slow
def test_attention_written_by_hand_keeps_math_where_math_holds_less():
    """The fused kernel Inductor's patterns made kept q and k exact (64 KB of the 82 KB a repro
    held); the softmax now reads max(s, s) of its scores, which no pattern takes, so q and k are
    packed and the probabilities too (47.6 KB there)."""
    torch.manual_seed(0)
    model, x = HandWrittenAttention(), torch.randn(2, 64, 64)
    mask = torch.zeros(2, 1, 1, 64)
    mask[0, ..., -8:] = torch.finfo(torch.float32).min
    compiled, reference = actfx.compile(model, bits=2), torch.compile(model)
    torch.testing.assert_close(compiled(x, mask), reference(x, mask), rtol=1e-6, atol=1e-6)
    plan = compiled._actfx_compiled.plans[-1]
    assert not [v for v in plan.saved if "flash" in v.reason], [(v.name, v.reason) for v in plan.saved]
    probabilities = [v for v in plan.saved if v.shape == (2, 2, 64, 64)]
    assert probabilities and all(v.storage is Storage.PACKED for v in probabilities)
    exact = _grads(model, lambda inp: reference(inp, mask), x)
    assert_mean_converges([_grads(model, lambda inp: compiled(inp, mask), x) for _ in range(16)], exact)


@pytest.mark.slow
def test_attention_written_by_hand_with_symbolic_lengths_trains():
    """Under dynamic shapes the scores' length is symbolic: the fused kernel stays, as for SDPA."""
    torch.manual_seed(0)
    model = HandWrittenAttention()
    compiled = actfx.compile(model, bits=2, dynamic=True)
    for length in (32, 48):
        x, mask = torch.randn(2, length, 64), torch.zeros(2, 1, 1, length)
        out = compiled(x, mask)
        torch.testing.assert_close(out, model(x, mask), rtol=1e-5, atol=1e-6)
        out.sum().backward()
