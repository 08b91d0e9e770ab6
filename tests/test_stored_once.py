"""Values backward can rebuild from something already stored are not stored again: a key/value
repeated for grouped-query attention, an operand whose partner needs no gradient, LayerNorm's
output read by the next linear. Each case: the decision that says so, fewer bytes held, forward
identical, gradients close at 8 bits and unbiased at 2."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

import actfx
from actfx.accounting import count_saved
from checks import assert_same_forward_and_fewer_bytes


def _held(model, x):
    """Bytes autograd keeps after a forward whose input requires grad."""
    torch.manual_seed(0)
    with count_saved(model) as saved:
        out = model(x.clone().requires_grad_(True))  # noqa: F841  (the live output keeps the graph)
    return saved.activation_bytes


def _gradient(model, x, seed):
    torch.manual_seed(seed)
    model.zero_grad(set_to_none=True)
    xi = x.clone().requires_grad_(True)
    out = model(xi)
    (out * torch.linspace(-1, 1, out.numel()).reshape(out.shape)).sum().backward()
    return torch.cat([xi.grad.reshape(-1)] + [p.grad.reshape(-1) for p in model.parameters() if p.grad is not None])


def _check(model, x, bits=8, tol=0.03):
    converted = actfx.convert(model, bits=bits)
    torch.manual_seed(0)
    expected = model(x)
    torch.manual_seed(0)
    assert torch.equal(converted(x), expected)
    exact = _gradient(model, x, 0)
    got = _gradient(converted, x, 0)
    assert ((got - exact).norm() / exact.norm()).item() < tol
    return converted


def _unbiased(model, x, k=16):
    converted = actfx.convert(model, bits=2)
    exact = _gradient(model, x, 0)
    samples = torch.stack([_gradient(converted, x, seed) for seed in range(k)])
    one = (samples[0] - exact).norm() / exact.norm()
    mean = (samples.mean(0) - exact).norm() / exact.norm()
    assert mean / one < 1.5 / k ** 0.5, (mean / one).item()


class GroupedQueryAttention(nn.Module):
    """Two key/value heads for four query heads, repeated as Hugging Face's ``repeat_kv`` does."""

    def __init__(self, dim=32, heads=4, kv_heads=2):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, dim // heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * kv_heads * self.head_dim)
        self.out = nn.Linear(dim, dim)

    def forward(self, x):
        b, s, _ = x.shape
        q = self.q(x).view(b, s, self.heads, self.head_dim).transpose(1, 2)
        k, v = self.kv(x).view(b, s, 2 * self.kv_heads, self.head_dim).transpose(1, 2).chunk(2, dim=1)
        n = self.heads // self.kv_heads
        k = k[:, :, None, :, :].expand(b, self.kv_heads, n, s, self.head_dim).reshape(b, self.heads, s, self.head_dim)
        v = v[:, :, None, :, :].expand(b, self.kv_heads, n, s, self.head_dim).reshape(b, self.heads, s, self.head_dim)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out(y.transpose(1, 2).reshape(b, s, -1))


def test_grouped_query_attention_keeps_the_key_and_value_heads_once():
    torch.manual_seed(0)
    model, x = GroupedQueryAttention().train(), torch.randn(2, 64, 32)
    converted = _check(model, x)
    (sdpa,) = [d for d in converted._actfx_record.decisions if d.kind == "sdpa"]
    assert [name.split("_")[0] for name in sdpa.values[:3]] == ["transpose", "getitem", "getitem"], sdpa.values
    # the same attention with four key/value heads hands SDPA tensors of the same shapes
    torch.manual_seed(0)
    four = GroupedQueryAttention(kv_heads=4).train()
    saved = 2 * (2 * 4 * 64 * 8 - 2 * 2 * 64 * 8)  # two of four heads of k and v, one byte each
    assert _held(converted, x) <= _held(actfx.convert(four, bits=8), x) - saved * 0.95
    _unbiased(model, x)


class Gated(nn.Module):
    """``h * noise`` with a constant noise (stochastic depth, a fixed mask): h is not needed."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(64, 64)

    def forward(self, x):
        h = self.fc(x).tanh()
        noise = torch.ones_like(x[:, :1]).bernoulli_(0.8) / 0.8
        return h * noise


def test_a_product_with_a_constant_keeps_only_the_constant():
    torch.manual_seed(0)
    model, x = Gated().train(), torch.randn(8, 64)
    converted = _check(model, x)
    # the product is covered: as a site of its own, or with tanh and the noise's scaling as one
    # element-wise region that keeps one partial (the noise needs no gradient)
    assert any(d.node == "mul" for d in converted._actfx_record.decisions)
    # tanh's packed derivative (8 bits) plus the linear's input and the noise; not h again
    without_product = _held(actfx.convert(nn.Sequential(model.fc, nn.Tanh()), bits=8), x)
    assert _held(converted, x) <= without_product + 8 * 4


class PreNorm(nn.Module):
    def __init__(self, dim=64):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fc = nn.Linear(dim, 4 * dim)
        self.proj = nn.Linear(4 * dim, dim)

    def forward(self, x):
        return x + self.proj(F.gelu(self.fc(self.norm(x))))


def test_the_linear_after_layer_norm_rebuilds_its_input_from_the_normalised_pack():
    torch.manual_seed(0)
    model, x = PreNorm().train(), torch.randn(4, 32, 64) * 3 + 1
    converted = _check(model, x)
    (fc,) = [d for d in converted._actfx_record.decisions if d.module_path == "fc"]
    assert fc.saved == ["affine of packed 8-bit"], fc.saved
    # without a bias LayerNorm's output is not offered: the linear packs it again
    unbiased_norm = PreNorm().train()
    unbiased_norm.load_state_dict(model.state_dict(), strict=False)
    unbiased_norm.norm = nn.LayerNorm(64, bias=False)
    again = actfx.convert(unbiased_norm, bits=8)
    assert _held(converted, x) <= _held(again, x) - 4 * 32 * 64 * 0.95
    _unbiased(model, x)


class BiasedAttention(nn.Module):
    """T5-style: a learned position bias and a padding mask, broadcast into SDPA's float mask."""

    def __init__(self, dim=32, heads=4, seq=16):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.bias = nn.Parameter(torch.randn(heads, seq, seq) * 0.1)
        self.out = nn.Linear(dim, dim)

    def forward(self, x, keep):
        if x.dim() != 3:  # fx cannot trace this: export captures it, with every value's shape
            raise ValueError("x must be (batch, tokens, features)")
        b, s, d = x.shape
        q, k, v = self.qkv(x).view(b, s, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        mask = torch.where(keep[:, None, None, :], self.bias[None], torch.finfo(x.dtype).min)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.out(y.transpose(1, 2).reshape(b, s, d))


def test_a_broadcast_float_mask_is_kept_as_its_small_inputs():
    torch.manual_seed(0)
    model = BiasedAttention().train()
    x, keep = torch.randn(8, 16, 32), torch.rand(8, 16) > 0.2
    converted = actfx.convert(model, bits=8, example_inputs=(x, keep))
    (sdpa,) = [d for d in converted._actfx_record.decisions if d.kind == "sdpa"]
    assert "where" not in " ".join(n for n in sdpa.values if n), sdpa.values  # its inputs, not the mask
    assert torch.equal(converted(x, keep), model(x, keep))
    with count_saved(converted) as saved:
        out = converted(x, keep)
    mask_bytes = 8 * 4 * 16 * 16 * 4
    assert saved.activation_bytes < mask_bytes  # the whole model holds less than the mask alone would
    grads = []
    for m in (model, converted):
        m.zero_grad(set_to_none=True)
        (m(x, keep) * torch.linspace(-1, 1, out.numel()).reshape(out.shape)).sum().backward()
        grads.append(m.bias.grad.clone())
    assert ((grads[1] - grads[0]).norm() / grads[0].norm()).item() < 0.03


class HandWrittenRMSNorm(nn.Module):
    """Llama's RMSNorm as Hugging Face writes it, then a linear."""

    def __init__(self, dim=64, square=lambda h: h.pow(2)):
        super().__init__()
        self.weight = nn.Parameter(1 + 0.1 * torch.randn(dim))
        self.fc = nn.Linear(dim, dim)
        self.square = square

    def forward(self, x):
        h = x.to(torch.float32)
        variance = self.square(h).mean(-1, keepdim=True)
        h = h * torch.rsqrt(variance + 1e-6)
        return self.fc(self.weight * h.to(x.dtype))


def test_hand_written_rms_norm_keeps_its_normalised_value_packed_once_and_a_copy():
    torch.manual_seed(0)
    x = torch.randn(4, 32, 64) * torch.rand(4, 32, 1) * 4  # rows of very different spread
    for square in (lambda h: h.pow(2), lambda h: h * h, torch.square):
        model = HandWrittenRMSNorm(square=square).train()
        converted = _check(model, x)
        kinds = [d.kind for d in converted._actfx_record.decisions]
        assert "rms_norm" in kinds and "pow" not in kinds and "pointwise" not in kinds, kinds
    # held: the normalised value at 8 bits once (the weight's product shares it) and its second
    # pack over 64 features (``second_pack``: unbiased backward), 1/rms per row, the linear's input
    values = 4 * 32 * 64
    assert _held(converted, x) < 3.2 * values
    _unbiased(model, x)


class RelativeBias(nn.Module):
    """T5 / MPNet style: a bias looked up per query-key pair from computed position buckets."""

    def __init__(self, buckets=32, heads=4):
        super().__init__()
        self.buckets = buckets
        self.table = nn.Embedding(buckets, heads)  # 32 rows: uint8 indices
        self.wide = nn.Parameter(torch.randn(40000, 2))  # 40000 rows: int32 (int16 holds 32768)
        self.register_buffer("weights", torch.randn(2, 64, 64))

    def forward(self, x):
        s = x.shape[1]
        pos = torch.arange(s)
        rel = (pos[None, :] - pos[:, None]).clamp(-(self.buckets // 2), self.buckets // 2 - 1) + self.buckets // 2
        bias = self.table(rel).sum(-1)  # (s, s)
        wide = F.embedding(rel * 1000, self.wide).sum(-1)
        return (self.weights[0] * bias).sum() + (self.weights[1] * wide).sum() + x.sum()


def test_embedding_keeps_its_indices_in_the_narrowest_integer_type():
    torch.manual_seed(0)
    model, x = RelativeBias().train(), torch.randn(2, 64, 64)
    converted = actfx.convert(model, bits=8)
    assert [d.kind for d in converted._actfx_record.decisions].count("embedding") == 2
    assert torch.equal(converted(x), model(x))
    grads = []
    for m in (model, converted):
        m.zero_grad(set_to_none=True)
        m(x).backward()
        grads.append(torch.cat([p.grad.reshape(-1) for p in m.parameters()]))
    assert torch.equal(grads[0], grads[1])  # exact: the indices are exact
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.dtype) or t, lambda t: t):
        converted(x)
    assert torch.uint8 in saved and torch.int32 in saved and torch.int64 not in saved, saved


class _ExpandedGate(nn.Module):
    """A per-sample gate from the first token, broadcast over the sequence by ``expand_as`` (or by
    plain broadcasting): the gate is 8 x 1 x 64, read through a slice of the input too small to pack."""

    def __init__(self, expand):
        super().__init__()
        self.lin, self.gate, self.expand = nn.Linear(16, 64), nn.Linear(16, 64), expand

    def forward(self, x):
        h, g = self.lin(x), self.gate(x[:, :1])
        return h * (g.expand_as(h) if self.expand else g)


def test_an_expanded_operand_and_a_small_slice_hold_only_their_own_values():
    """An expanded value was packed at its full size (the 8 x 1 x 64 gate as 8 x 256 x 64), and a
    slice kept exact held the whole input it was cut from after the input's own reader had packed
    it: the converted model kept 204 KiB where 45 would do (PyTorch: 642)."""
    torch.manual_seed(0)
    x = torch.randn(8, 256, 16)
    for expand in (True, False):
        model = _ExpandedGate(expand)
        converted = actfx.convert(model, bits=2)
        plain, packed = _held(model, x), _held(converted, x)
        assert packed * 10 < plain, (plain, packed)
        _check(model, x)


class ExpertWithWeightArguments(nn.Module):
    """Hugging Face DBRX's expert: its weights are slices of the parent's, handed in as arguments."""

    def forward(self, x, w1, w2):
        return F.silu(x.matmul(w1.T)).matmul(w2)


class Experts(nn.Module):
    def __init__(self, experts=4, d=32, hidden=256):
        super().__init__()
        self.mlp = ExpertWithWeightArguments()
        self.w1 = nn.Parameter(torch.randn(experts * hidden, d) * 0.1)
        self.w2 = nn.Parameter(torch.randn(experts * hidden, d) * 0.1)
        self.experts, self.hidden = experts, hidden

    def forward(self, h, top):
        out = torch.zeros_like(h)
        for e in top.unique():  # data-dependent: fx converts only the expert
            rows = (top == e).nonzero()[:, 0]
            w1 = self.w1.view(self.experts, self.hidden, -1)[e]
            w2 = self.w2.view(self.experts, self.hidden, -1)[e]
            out = out.index_add(0, rows, self.mlp(h[rows], w1, w2))
        return out


def test_a_weight_handed_in_as_an_argument_is_kept_by_reference():
    """A view of a parameter is held by the model anyway: packing it held a copy on top (DBRX's
    experts held more converted than plain)."""
    torch.manual_seed(0)
    model = Experts()
    h, top = torch.randn(64, 32), torch.randint(0, 4, (64,))
    assert_same_forward_and_fewer_bytes(model, actfx.convert(model, bits=2), (h, top), 3)


class _FlatAndConv(nn.Module):
    """A linear head on ``x.flatten(1)`` beside a conv on ``x`` (and, ``inner``, the same on an
    intermediate activation): each read one pack of ``x`` for itself, two packs of one value."""

    def __init__(self, inner: bool):
        super().__init__()
        self.pre = nn.Conv2d(3, 3, 1) if inner else nn.Identity()
        self.fc = nn.Linear(3 * 16 * 16, 10)
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x):
        x = self.pre(x)
        return self.fc(x.flatten(1)).sum(1, keepdim=True) + self.conv(x).mean((2, 3))


def test_a_value_read_as_itself_and_as_a_reshape_is_packed_once():
    x = torch.randn(8, 3, 16, 16)
    for inner in (False, True):
        torch.manual_seed(0)
        model = _FlatAndConv(inner)
        converted = _check(model, x)
        sources = {d.node: (d.saved, d.sources) for d in converted._actfx_record.decisions}
        assert sources["fc"][0] == ["reshape of packed 8-bit"]
        assert sources["fc"][1] == [("reshape", sources["conv"][1][0])]  # the conv's pack, reshaped
        packs = 2 if inner else 1  # pre's input and the shared one
        one_pack = 3 * 16 * 16 * 8 // 256 * (256 + 4)  # 8-bit codes + min and step per group
        assert _held(converted, x) == packs * one_pack
        _unbiased(model, x)


class _CastThenEdited(nn.Module):
    """``b = a.half()`` is a copy: ``a.mul_(2)`` after it leaves b as it was. Packing ``a`` once
    for both readers would hand fc2's backward the edited values."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc3 = nn.Linear(64, 64), nn.Linear(64, 8)
        self.fc2 = nn.Linear(64, 8).half()

    def forward(self, x):
        a = self.fc1(x)
        b = a.half()
        a.mul_(2)
        return self.fc2(b).float() + self.fc3(a)


def test_a_cast_copy_is_not_packed_as_its_source():
    torch.manual_seed(0)
    converted = _check(_CastThenEdited(), torch.randn(64, 64), tol=0.03)  # 8-bit gradient within 3%
    sources = {d.node: d.sources for d in converted._actfx_record.decisions}
    assert sources["fc2"] == [("pack", "half")]  # its own pack of the copy, not a reshape of fc1's
