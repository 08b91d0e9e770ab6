"""Each compressed-save variant in module, functional and method form: same forward, right gradient."""

from __future__ import annotations

import itertools
import operator

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import actfx
from actfx.accounting import count_saved
from checks import assert_mean_converges, assert_unbiased, input_grad_mean_errors, weighted_grads


class Wrap(nn.Module):
    """A one-op model: ``fn(self, x)`` with optional parameters."""

    def __init__(self, fn, **modules):
        super().__init__()
        self.fn = fn
        for name, m in modules.items():
            setattr(self, name, m)

    def forward(self, x):
        return self.fn(self, x)


def check_variant(model, x, *, kinds, bits=8, tol=0.02, exact_grad=False):
    """The ops of ``kinds`` were converted; forward identical; input and parameter gradients
    close (or equal for exact variants). ``kinds`` is required: a variant test that passes when
    its op silently stops being converted tests nothing."""
    converted = actfx.convert(model, bits=bits)
    seen = {d.kind for d in converted._actfx_record.decisions}
    assert kinds and set(kinds) <= seen, f"expected {kinds} among converted kinds, got {seen}"
    results = []
    for m in (model, converted):
        xi = x.clone().requires_grad_(True)
        torch.manual_seed(0)
        out = m(xi)
        weight = torch.linspace(-1, 1, out.numel()).reshape(out.shape)
        grads = torch.autograd.grad((out * weight).sum(), [xi, *m.parameters()], allow_unused=True)
        results.append((out, torch.cat([g.reshape(-1) for g in grads if g is not None])))
    (out0, g0), (out1, g1) = results
    assert torch.equal(out0, out1)
    if exact_grad:
        assert torch.equal(g0, g1)
    else:
        assert ((g1 - g0).norm() / g0.norm()).item() < tol
    return converted


@pytest.mark.parametrize("fn", [
    lambda s, x: s.conv(x),
    lambda s, x: F.conv2d(x, s.conv.weight, s.conv.bias, stride=2, padding=1, dilation=1, groups=1),
])
def test_conv2d_forms(fn):
    check_variant(Wrap(fn, conv=nn.Conv2d(4, 8, 3, padding=1)), torch.randn(2, 4, 12, 12), kinds=["conv"])


@pytest.mark.parametrize("conv,shape", [
    (nn.Conv1d(4, 6, 3, stride=2, padding=2, dilation=2), (2, 4, 40)),
    (nn.Conv3d(2, 4, 3, padding=1, groups=2), (2, 2, 6, 6, 6)),
    (nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect"), (2, 4, 10, 10)),
    (nn.Conv2d(4, 4, 3, padding=1, padding_mode="circular", groups=4), (2, 4, 10, 10)),
    (nn.Conv2d(4, 4, 3, padding="same", bias=False), (2, 4, 10, 10)),
    (nn.ConvTranspose2d(4, 3, 3, stride=2, padding=1, output_padding=1), (2, 4, 8, 8)),
    (nn.ConvTranspose1d(4, 3, 4, stride=2), (2, 4, 16)),
    (nn.ConvTranspose3d(2, 2, 2, stride=2), (1, 2, 4, 4, 4)),
])
def test_conv_variants(conv, shape):
    kind = "conv_transpose" if "Transpose" in type(conv).__name__ else "conv"
    check_variant(Wrap(lambda s, x: s.conv(x), conv=conv), torch.randn(*shape), kinds=[kind])


@pytest.mark.parametrize("fn, kind", [
    (lambda s, x: s.lin(x), "linear"),
    (lambda s, x: F.linear(x, s.lin.weight, s.lin.bias), "linear"),
    (lambda s, x: x @ s.lin.weight.t(), "linear"),  # an activation times a weight is a linear layer (bits)
])
def test_linear_forms_any_leading_dims(fn, kind):
    check_variant(Wrap(fn, lin=nn.Linear(32, 16)), torch.randn(3, 5, 7, 32), kinds=[kind])


def test_baddbmm_packs_both_batches_and_reads_its_input_for_its_shape():
    """Bloom's attention scores: baddbmm(alibi, q, k^T); the bias needs no storage."""
    bias = torch.randn(6, 1, 16)
    converted = check_variant(
        Wrap(lambda s, x: torch.baddbmm(bias, s.q(x), s.k(x).transpose(1, 2), beta=1.0, alpha=0.25),
             q=nn.Linear(8, 8), k=nn.Linear(8, 8)), torch.randn(6, 16, 8), kinds=["matmul"])
    (site,) = [d for d in converted._actfx_record.decisions if d.kind == "matmul"]
    assert site.saved == ["shape only", "packed 8-bit", "packed 8-bit"], site.saved


@pytest.mark.parametrize("bn", [
    nn.BatchNorm1d(8), nn.BatchNorm2d(8, momentum=None), nn.BatchNorm3d(8, track_running_stats=False),
    nn.BatchNorm2d(8, affine=False),
])
def test_batch_norm_train_and_eval_updates_running_stats_identically(bn):
    import copy

    shape = {nn.BatchNorm1d: (16, 8), nn.BatchNorm2d: (4, 8, 6, 6), nn.BatchNorm3d: (2, 8, 3, 4, 4)}[type(bn)]
    reference = copy.deepcopy(bn)
    model = Wrap(lambda s, x: s.bn(x), bn=bn)
    converted = actfx.convert(model, bits=8)
    for _ in range(3):
        x = torch.randn(*shape) * 3 + 1
        expected = reference(x.clone().requires_grad_(True))
        got = converted(x.clone().requires_grad_(True))
        assert torch.equal(got, expected)
    assert all(torch.equal(a, b) for a, b in zip(reference.buffers(), bn.buffers()))
    converted.eval()
    reference.eval()
    x = torch.randn(*shape)
    assert torch.equal(converted(x), reference(x))
    check_variant(model, x, kinds=["batch_norm"])


@pytest.mark.parametrize("form", ["module", "functional", "eval"])
def test_batch_norm_packs_its_normalised_input_so_small_maps_of_mixed_scales_stay_accurate(form):
    """64 channels of 2x2 maps: one group of 256 packed values spans 64 channels. Channels spread
    1e-2 .. 1e2 apart: with the raw input packed, the small ones round to a step set by the wide
    ones and backward multiplies that by their 1/std (the input's gradient was 6.6e6x its norm off
    at 2 bits). The normalised input has unit spread per channel: errors of order one, unbiased
    (the mean of 16 steps about 1/4 of one step's error)."""
    torch.manual_seed(0)
    scales = (10.0 ** torch.arange(-2, 3).float()).repeat(13)[:64].reshape(1, 64, 1, 1)
    x = torch.randn(8, 64, 2, 2) * scales + scales
    bn = nn.BatchNorm2d(64)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.normal_()
    if form == "functional":
        model = Wrap(lambda s, x: F.batch_norm(x, None, None, s.bn.weight, s.bn.bias, True), bn=bn)
    else:
        model = Wrap(lambda s, x: s.bn(x), bn=bn)
    if form == "eval":
        bn.running_mean.copy_(scales.reshape(-1))
        bn.running_var.copy_(scales.reshape(-1) ** 2)
        model.eval()
    converted = actfx.convert(model, bits=2)
    assert [d.kind for d in converted._actfx_record.decisions] == ["batch_norm"]
    r = torch.randn(8, 64, 2, 2)

    def grads(m):
        xi = x.clone().requires_grad_(True)
        return [g.reshape(-1) for g in torch.autograd.grad((m(xi) * r).sum(), [xi, bn.weight])]

    exact, draws = grads(model), [grads(converted) for _ in range(16)]
    for i, limit in ((0, 0.5), (1, 2.0)):  # x, then the weight (32 values per channel)
        one = sum(float((g[i] - exact[i]).norm()) for g in draws) / len(draws) / float(exact[i].norm())
        mean = float((sum(g[i] for g in draws) / len(draws) - exact[i]).norm() / exact[i].norm())
        if form == "eval" and i == 0:  # eval's input gradient is weight / std times the output's
            assert one < 1e-6
            continue
        assert one < limit and one / mean > 2.5, (i, one, mean)


def mixed_scale_input_error(model, x, kind):
    """The op of ``kind`` was the one converted (2 bits), forward identical; (one step's input
    gradient error, the error of the mean of 16), each relative to the exact gradient's norm."""
    converted = actfx.convert(model, bits=2)
    assert [d.kind for d in converted._actfx_record.decisions] == [kind]
    assert torch.equal(converted(x), model(x))
    r = torch.randn(x.shape, generator=torch.Generator().manual_seed(1))

    def grad_x(m):
        xi = x.clone().requires_grad_(True)
        return torch.autograd.grad((m(xi) * r).sum(), xi)[0]

    exact, draws = grad_x(model), [grad_x(converted) for _ in range(16)]
    one = sum(float((g - exact).norm()) for g in draws) / len(draws) / float(exact.norm())
    return one, float((sum(draws) / len(draws) - exact).norm() / exact.norm())


@pytest.mark.parametrize("kind, norm", [
    ("group_norm", lambda s, x: s.n(x)), ("group_norm", lambda s, x: F.group_norm(x, 32, s.n.weight, s.n.bias)),
    ("instance_norm", lambda s, x: s.i(x)), ("instance_norm", lambda s, x: F.instance_norm(x, weight=s.i.weight)),
])
def test_group_and_instance_norm_pack_their_normalised_input(kind, norm):
    """BatchNorm's small-map case for GroupNorm and InstanceNorm: with the raw input packed, the
    input's gradient was 7e5x (GroupNorm) and 1.3e8x (InstanceNorm) its norm off at 2 bits."""
    torch.manual_seed(0)
    scales = (10.0 ** torch.arange(-2, 3).float()).repeat(13)[:64].reshape(1, 64, 1, 1)
    model = Wrap(norm, n=nn.GroupNorm(32, 64), i=nn.InstanceNorm2d(64, affine=True))
    one, mean = mixed_scale_input_error(model, torch.randn(8, 64, 2, 2) * scales + scales, kind)
    assert one < 1.0 and one / mean > 2.5, (one, mean)


def test_rms_norm_packs_its_normalised_input():
    """Per-head RMSNorm over 64 features: a group of 256 packed values spans 4 rows. Rows 1e-2 ..
    1e2 apart: with x packed the input's gradient was 6.9e6x its norm off at 2 bits."""
    torch.manual_seed(0)
    scales = (10.0 ** torch.arange(-2, 3).float()).repeat(13)[:64].reshape(64, 1)
    model = Wrap(lambda s, x: s.n(x), n=nn.RMSNorm(64))
    one, mean = mixed_scale_input_error(model, torch.randn(64, 64) * scales, "rms_norm")
    assert one < 0.5 and one / mean > 2.5, (one, mean)


class HandWrittenRMSNorm(nn.Module):
    """RMS normalisation as Hugging Face's Llama writes it (``passes/rms_regions.py`` collapses it)."""

    def forward(self, x):
        h = x.to(torch.float32)
        return h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)


@pytest.mark.parametrize("norm, shape", [
    (nn.BatchNorm2d(64), (4, 64, 2, 2)), (nn.InstanceNorm2d(64, affine=True), (4, 64, 2, 2)),
    (nn.GroupNorm(32, 64), (4, 64, 2, 2)), (nn.LayerNorm(16), (64, 16)), (nn.RMSNorm(16), (64, 16)),
    (HandWrittenRMSNorm(), (64, 16)),
])
def test_normalisation_over_few_values_per_row_stays_unbiased(norm, shape):
    """M values per normalised row (16 per BatchNorm channel, 4 per InstanceNorm plane, 8 per
    GroupNorm group, 16 LayerNorm features): backward's ``x̂_i mean_j(g_j x̂_j)`` read from one
    pack meets element i's rounding twice; the mean of 1024 input gradients kept a floor of 3.6%
    / 8.6% / 6.3% / 4.9% (16 -> 256 steps: 7.5% -> 3.9% for BatchNorm). Corrected with a second
    pack (``second_pack``), the error of the mean of K falls as 1/sqrt(K): 16 -> 256 divides it
    by about 4. The hand-written RMS normalisation had no second pack: a peft LoRA Llama's
    embedding gradient, averaged over 256 steps, stayed 1.4x the 1/sqrt(K) error."""
    torch.manual_seed(0)
    x, r = torch.randn(*shape) * torch.linspace(0.5, 2, shape[-1]), torch.randn(*shape)
    model = Wrap(lambda s, x: s.n(x), n=norm)
    converted = actfx.convert(model, bits=2)
    (decision,) = converted._actfx_record.decisions
    assert decision.saved == ["packed 2-bit", "packed 2-bit"]  # x̂ and its copy
    errors = input_grad_mean_errors(model, converted, x, r, (16, 256))
    assert errors[16] / errors[256] > 2.8, errors


def _cosine_similarity(s, x):
    h = F.normalize(x * 1.0, dim=-1)
    return h @ h.transpose(-1, -2)


def test_normalize_packs_its_output_and_stays_unbiased():
    """F.normalize was an element-wise recompute from its packed input: ``x / ||x||`` of a rounded
    x is biased (cosine similarity of 16-feature rows at 2 bits: the mean of 256 input gradients
    stayed near the mean of 16's error). Packed output, exact 1/norm and a second pack: 1/sqrt(K)."""
    torch.manual_seed(0)
    x, r = torch.randn(8, 16, 16) * torch.linspace(0.5, 2, 16), torch.randn(8, 16, 16)
    model = Wrap(_cosine_similarity)
    converted = actfx.convert(model, bits=2)
    assert [d.saved for d in converted._actfx_record.decisions if d.kind == "normalize"] == [
        ["packed 2-bit", "packed 2-bit"]]  # the output and its copy
    assert torch.equal(converted(x), model(x))

    def grad_x(m):
        xi = x.clone().requires_grad_(True)
        return torch.autograd.grad((m(xi) * r).sum(), xi)[0]

    exact, total, errors = grad_x(model), torch.zeros_like(x), {}
    for k in range(1, 257):
        total += grad_x(converted)
        if k in (16, 256):
            errors[k] = float((total / k - exact).norm() / exact.norm())
    assert errors[16] / errors[256] > 2.8, errors


@pytest.mark.parametrize("name, fn", [
    ("module", lambda s, x: s.act(x)),
    ("F.relu", lambda s, x: F.relu(x)),
    ("torch.relu", lambda s, x: torch.relu(x)),
    ("method", lambda s, x: x.relu()),
    ("in place method", lambda s, x: (x * 1.0).relu_()),
    ("F.relu inplace", lambda s, x: F.relu(x * 1.0, inplace=True)),
    ("relu6", lambda s, x: F.relu6(x)),
    ("hardtanh", lambda s, x: F.hardtanh(x, -0.5, 0.5)),
    ("leaky", lambda s, x: F.leaky_relu(x, 0.2)),
])
def test_relu_family_gradients_are_exact(name, fn):
    """1-bit masks are exact: the gradient equals PyTorch's bit for bit."""
    model = Wrap(lambda s, x: fn(s, x * 1.0), act=nn.ReLU(inplace=True))
    kind = "hardtanh" if "hardtanh" in name or "relu6" in name else "leaky_relu" if "leaky" in name else "relu"
    check_variant(model, torch.randn(16, 300), exact_grad=True, kinds=[kind])


@pytest.mark.parametrize("act", [nn.ReLU6(inplace=True), nn.LeakyReLU(0.1, inplace=True), nn.Hardtanh(-2, 2)])
def test_relu_family_modules_exact(act):
    kind = "leaky_relu" if isinstance(act, nn.LeakyReLU) else "hardtanh"  # ReLU6 is a Hardtanh
    check_variant(Wrap(lambda s, x: s.act(x * 1.0), act=act), torch.randn(16, 300) * 3, exact_grad=True,
                  kinds=[kind])


def test_dropout_mask_exact_and_rng_stream_unchanged():
    model = Wrap(lambda s, x: s.drop(x) + F.dropout(x, 0.3, s.training), drop=nn.Dropout(0.5))
    check_variant(model, torch.randn(16, 300), exact_grad=True, kinds=["dropout"])


@pytest.mark.parametrize("fn", [
    lambda s, x: s.pool(x),
    lambda s, x: F.max_pool2d(x, 3, 2, 1),
    lambda s, x: F.max_pool2d(x, 2, ceil_mode=True),
    lambda s, x: F.max_pool1d(x.flatten(2), 4, 3, 1, 2),
    lambda s, x: F.adaptive_max_pool2d(x, 3),
])
def test_max_pool_compact_indices_exact(fn):
    model = Wrap(fn, pool=nn.MaxPool2d(3, 2, 1, dilation=2, ceil_mode=True))
    converted = check_variant(model, torch.randn(2, 3, 13, 11), exact_grad=True, kinds=["max_pool"])
    from actfx.accounting import count_saved

    x = torch.randn(2, 3, 13, 11, requires_grad=True)
    with count_saved(converted) as saved:
        out = converted(x)
    assert saved.activation_bytes <= out.numel() * 2  # <= 2 bytes per output instead of 8


class _SegNetBlock(nn.Module):
    """SegNet / a convolutional autoencoder: max pooling returns its indices for MaxUnpool."""

    def __init__(self, functional):
        super().__init__()
        self.enc, self.dec, self.functional = nn.Conv2d(3, 16, 3, padding=1), nn.Conv2d(16, 3, 3, padding=1), functional
        self.pool, self.unpool = nn.MaxPool2d(2, return_indices=True), nn.MaxUnpool2d(2)

    def forward(self, x):
        h = torch.relu(self.enc(x))
        h, where = F.max_pool2d(h, 2, return_indices=True) if self.functional else self.pool(h)
        return self.dec(self.unpool(torch.tanh(h), where))


@pytest.mark.parametrize("functional", [False, True])
@pytest.mark.parametrize("exported", [False, True])
def test_max_pool_returning_its_indices_keeps_only_them(functional, exported):
    """With ``return_indices=True`` the pooling was left as is and kept its input, which the ReLU
    before it no longer kept once converted: the converted model held 1.7x less than PyTorch,
    the pooling 3x more; now it keeps the indices its caller holds anyway."""
    torch.manual_seed(0)
    model, x = _SegNetBlock(functional), torch.randn(2, 3, 16, 16)
    converted = actfx.convert(model, bits=8, example_inputs=(x,) if exported else None)
    assert torch.equal(converted(x), model(x))
    assert "max_pool" in [d.kind for d in converted._actfx_record.decisions]
    exact = torch.autograd.grad(model(x).sum(), list(model.parameters()))
    got = torch.autograd.grad(converted(x).sum(), list(converted.parameters()))
    assert max(((g - e).norm() / e.norm()).item() for g, e in zip(got, exact)) < 0.03
    narrow = actfx.convert(model, bits=2, example_inputs=(x,) if exported else None)
    with count_saved(model) as plain:
        kept = model(x)  # noqa: F841
    with count_saved(narrow) as packed:
        kept = narrow(x)  # noqa: F841
    assert packed.activation_bytes * 4 < plain.activation_bytes, (plain.activation_bytes, packed.activation_bytes)


@pytest.mark.parametrize("fn,kind", [
    (lambda s, x: s.pool(x), "avg_pool"),
    (lambda s, x: F.adaptive_avg_pool2d(x, 2), "adaptive_avg_pool"),
])
def test_average_pools_save_only_the_shape(fn, kind):
    converted = check_variant(Wrap(fn, pool=nn.AvgPool2d(2)), torch.randn(2, 3, 8, 8), exact_grad=True, kinds=[kind])
    from actfx.accounting import count_saved

    with count_saved(converted) as saved:
        out = converted(torch.randn(2, 3, 8, 8, requires_grad=True))  # noqa: F841
    assert saved.activation_bytes == 0


@pytest.mark.parametrize("act", [nn.SiLU(), nn.GELU(), nn.GELU("tanh"), nn.Sigmoid(), nn.Tanh(), nn.Hardswish(),
                                 nn.Hardsigmoid(), nn.Mish(), nn.Softmax(-1), nn.LogSoftmax(-1), nn.ELU(),
                                 # module forms of functions that had variants (the modules ran as is)
                                 nn.CELU(0.7), nn.LogSigmoid(), nn.Softsign(), nn.Tanhshrink(), nn.Softshrink(0.3),
                                 nn.Hardshrink(0.3)])
def test_elementwise_activations(act):
    kind = {nn.LogSoftmax: "log_softmax"}.get(type(act), type(act).__name__.lower())
    check_variant(Wrap(lambda s, x: s.act(s.lin(x)), act=act, lin=nn.Linear(64, 64)), torch.randn(16, 64), tol=0.03,
                  kinds=["linear", kind])


@pytest.mark.parametrize("fn, kind", [
    (lambda s, x: F.silu(x), "silu"), (lambda s, x: F.gelu(x, approximate="tanh"), "gelu"),
    (lambda s, x: torch.sigmoid(x), "sigmoid"), (lambda s, x: x.sigmoid(), "sigmoid"), (lambda s, x: x.tanh(), "tanh"),
    (lambda s, x: torch.softmax(x, -1), "softmax"), (lambda s, x: x.softmax(1), "softmax"),
    (lambda s, x: F.log_softmax(x, dim=-1), "log_softmax"), (lambda s, x: F.hardswish(x), "hardswish"),
    (lambda s, x: F.mish(x), "mish"),
])
def test_elementwise_functional_forms(fn, kind):
    check_variant(Wrap(lambda s, x: fn(s, s.lin(x)), lin=nn.Linear(64, 64)), torch.randn(16, 64), tol=0.03,
                  kinds=["linear", kind])


@pytest.mark.parametrize("fn", [
    lambda z: F.log_softmax(z, dim=-1), lambda z: z.log_softmax(-1), lambda z: torch.log_softmax(z, 1),
    lambda z: F.log_softmax(z, -1, dtype=torch.float64).float(),
])
def test_log_softmax_with_masked_logits_keeps_probabilities(fn):
    # -inf logits (masked vocabulary / attention): packing the input would turn whole groups into
    # NaN; the packed probabilities are finite and backward (g - p * sum g) is linear in them.
    masked = torch.arange(64) > 40

    def forward(s, x):
        out = fn(s.lin(x).masked_fill(masked, float("-inf")))
        return out.masked_fill(masked, 0.0)

    converted = check_variant(Wrap(forward, lin=nn.Linear(64, 64)), torch.randn(32, 64), tol=0.03,
                              kinds=["log_softmax"])
    assert "recompute" not in {d.kind for d in converted._actfx_record.decisions}


class _WithLoss(nn.Module):
    def __init__(self, loss=None, functional=None):
        super().__init__()
        self.head = nn.Linear(16, 40)
        self.loss, self.functional = loss, functional

    def forward(self, x, target):
        logits = self.head(x)
        if self.loss is not None:
            return self.loss(logits.transpose(1, 2), target)  # [N, C, T]: class dim 1
        return self.functional(logits.flatten(0, 1), target.flatten())


@pytest.mark.parametrize("make", [
    lambda: _WithLoss(functional=lambda z, t: F.cross_entropy(z, t)),
    lambda: _WithLoss(functional=lambda z, t: F.cross_entropy(z, t, ignore_index=3, reduction="sum")),
    lambda: _WithLoss(nn.CrossEntropyLoss()),
    lambda: _WithLoss(nn.CrossEntropyLoss(weight=torch.rand(40), reduction="none")),
], ids=["functional", "ignore_index-sum", "module", "module-weight-none"])
def test_cross_entropy_keeps_packed_probabilities(make):
    # The loss's log-probabilities are a language model's largest saved tensor; packed
    # probabilities replace them (and nll_loss's copy of them) entirely.
    torch.manual_seed(0)
    model = make()
    x, target = torch.randn(8, 64, 16), torch.randint(0, 40, (8, 64))
    converted = actfx.convert(model, bits=8)
    assert "cross_entropy" in {d.kind for d in converted._actfx_record.decisions}
    outs, grads = [], []
    for m in (model, converted):
        out = m(x, target)
        outs.append(out)
        grads.append(torch.autograd.grad(out.sum(), m.head.weight)[0])
    assert torch.equal(outs[0], outs[1])
    assert ((grads[1] - grads[0]).norm() / grads[0].norm()).item() < 0.03
    with count_saved(converted) as saved:
        kept = converted(x, target)  # noqa: F841
    assert saved.by_dtype.get(torch.float32, 0) < 40 * 64 * 8 * 4 / 3  # < a third of fp32 logits


@pytest.mark.parametrize("kwargs,target", [
    ({"label_smoothing": 0.1}, lambda: torch.randint(0, 40, (512,))),
    ({}, lambda: torch.softmax(torch.randn(512, 40), dim=1)),  # probability targets
])
def test_cross_entropy_smoothed_and_soft_targets_match_pytorch(kwargs, target):
    torch.manual_seed(0)
    model = _WithLoss(functional=lambda z, t: F.cross_entropy(z, t.reshape(z.shape[0], -1).squeeze(1), **kwargs))
    x, t = torch.randn(8, 64, 16), target()
    converted = actfx.convert(model, bits=8)
    ga = torch.autograd.grad(model(x, t), model.head.weight)[0]
    out = converted(x, t)
    assert torch.equal(out, model(x, t))
    gb = torch.autograd.grad(out, converted.head.weight)[0]
    assert ((gb - ga).norm() / ga.norm()).item() < 0.03  # the head's input is packed at 8 bits


@pytest.mark.parametrize("norm,shape", [
    (nn.LayerNorm(64), (8, 10, 64)), (nn.GroupNorm(4, 16), (4, 16, 6, 6)),
    (nn.InstanceNorm2d(16, affine=True), (4, 16, 6, 6)), (nn.RMSNorm(64), (8, 10, 64)),
])
def test_norms(norm, shape):
    kind = {nn.LayerNorm: "layer_norm", nn.GroupNorm: "group_norm", nn.InstanceNorm2d: "instance_norm",
            nn.RMSNorm: "rms_norm"}[type(norm)]
    check_variant(Wrap(lambda s, x: s.norm(x * 2.0 + 1.0), norm=norm), torch.randn(*shape), kinds=[kind])


@pytest.mark.parametrize("op", [operator.mul, torch.mul, operator.truediv, operator.matmul, torch.matmul, "bmm"])
def test_products_of_two_activations(op):
    if op == "bmm":
        fn = lambda s, x: torch.bmm(s.a(x), s.b(x).transpose(1, 2))  # noqa: E731
    elif op in (operator.matmul, torch.matmul):
        fn = lambda s, x: op(s.a(x), s.b(x).transpose(-1, -2))  # noqa: E731
    elif op is operator.truediv:
        fn = lambda s, x: op(s.a(x), s.b(x).abs() + 1.0)  # noqa: E731
    else:
        fn = lambda s, x: op(s.a(x), s.b(x)[:, :1])  # broadcasting  # noqa: E731
    kind = "div" if op is operator.truediv else "mul" if op in (operator.mul, torch.mul) else "matmul"
    check_variant(Wrap(fn, a=nn.Linear(32, 32), b=nn.Linear(32, 32)), torch.randn(4, 16, 32), kinds=["linear", kind])


def test_scaled_dot_product_attention_with_mask_and_dropout():
    def fn(s, x):
        q, k, v = s.qkv(x).view(2, 16, 3, 4, 8).permute(2, 0, 3, 1, 4)
        mask = torch.ones(16, 16, dtype=torch.bool).tril()
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=0.2)

    check_variant(Wrap(fn, qkv=nn.Linear(32, 96)), torch.randn(2, 16, 32), kinds=["sdpa"])


class _NormalisedAttention(nn.Module):
    """Attention over unit q and k with a sharp scale (QK-norm): its recompute is very nonlinear."""

    def __init__(self, d=32, heads=2):
        super().__init__()
        self.qkv, self.out, self.heads = nn.Linear(d, 3 * d), nn.Linear(d, d), heads

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        o = F.scaled_dot_product_attention(F.normalize(q, dim=-1), F.normalize(k, dim=-1), v, scale=8.0)
        return self.out(o.transpose(1, 2).reshape(b, t, d))


def test_attention_keeps_q_and_k_at_eight_bits_and_stays_unbiased():
    """Backward recomputes softmax(q k^T) from the stored q and k: rounded at 2 bits, the mean of
    1024 gradients stayed 39% of the norm off (4 bits: 3.0%). q and k now keep at least 8 bits
    (v, which enters linearly, takes the configured width); the mean converges as 1/sqrt(K)."""
    torch.manual_seed(0)
    model, x = _NormalisedAttention(), torch.randn(4, 16, 32)
    converted = actfx.convert(model, config=actfx.Config(bits=2, op_bits={}))
    assert [d.saved for d in converted._actfx_record.decisions if d.kind == "sdpa"] == [
        ["packed 8-bit", "packed 8-bit", "packed 2-bit"]]
    w = torch.randn(4, 16, 32)
    exact = weighted_grads(model, model, x, w)
    assert_mean_converges([weighted_grads(model, converted, x, w) for _ in range(64)], exact, least_noise=0.1)


@pytest.mark.parametrize("fn", [
    lambda s, x: torch.cdist(s.a(x).sigmoid() + 0.5, s.b(x), p=3),  # a 3-norm distance of two activations
    lambda s, x: F.normalize(s.a(x), p=1, dim=-1),
])
def test_nonlinear_ops_without_a_variant_are_not_recomputed_from_rounded_inputs(fn):
    """Such ops were rerun in backward from their packed inputs: a nonlinear function of rounded
    values, so a biased gradient (``pow`` of two activations was one; it keeps its packed
    partials now: tests/test_pointwise_several.py). They run as they are and are reported."""
    model = Wrap(fn, a=nn.Linear(16, 16), b=nn.Linear(16, 16))
    converted = actfx.convert(model, bits=2)
    assert [u.what for u in converted._actfx_record.uncovered] in (["cdist"], ["normalize"])


def test_uncovered_ops_run_as_they_are_and_are_reported():
    model = Wrap(lambda s, x: torch.cumprod(s.lin(x), dim=-1), lin=nn.Linear(8, 8))
    converted = check_variant(model, torch.randn(4, 8) * 0.1 + 1.0, kinds=["linear"])
    assert [u.what for u in converted._actfx_record.uncovered] == ["cumprod"]


def test_addmm_with_a_weight_is_a_linear():
    """GPT-2's Conv1D: torch.addmm(bias, x, weight)."""
    model = Wrap(lambda s, x: torch.addmm(s.lin.bias, x.view(-1, 32), s.lin.weight.t()).view(4, 16, 16),
                 lin=nn.Linear(32, 16))
    check_variant(model, torch.randn(4, 16, 32), kinds=["linear"])


class _ModulatedConv(nn.Module):
    """StyleGAN2's modulated convolution: one group per sample, ``groups`` read from the input."""

    def __init__(self, c=8):
        super().__init__()
        self.weight, self.affine = nn.Parameter(torch.randn(1, c, c, 3, 3) * 0.1), nn.Linear(c, c)

    def forward(self, x):
        b, c, h, w = x.shape
        wt = self.weight * self.affine(x.mean((2, 3))).view(b, 1, c, 1, 1)
        wt = wt * torch.rsqrt(wt.pow(2).sum([2, 3, 4], keepdim=True) + 1e-8)
        return F.conv2d(x.reshape(1, b * c, h, w), wt.view(b * c, c, 3, 3), padding=1, groups=b).view(b, c, h, w)


def test_a_convolution_whose_groups_come_from_the_input_shape_is_converted():
    """The conv site put the traced graph's node for ``groups`` into its static geometry: the
    rewrite crashed ("does not belong to this Graph"). It is read at run time now."""
    torch.manual_seed(0)
    converted = check_variant(_ModulatedConv(), torch.randn(4, 8, 12, 12), tol=0.03, kinds=["conv"])
    # the input and the computed weight (tests/test_modulated_conv.py)
    assert [d.saved for d in converted._actfx_record.decisions if d.kind == "conv"] == [["packed 8-bit"] * 2]


@pytest.mark.parametrize("fn", [
    lambda s, x: s.conv(s.pad(F.relu(s.c0(x)))),  # CycleGAN's ResNet generator
    lambda s, x: s.conv(F.pad(F.relu(s.c0(x)), (1, 1, 1, 1), mode="reflect")),
    lambda s, x: s.conv(F.pad(F.relu(s.c0(x)), (1, 2, 0, 1), "replicate")),
])
def test_reflection_and_replication_padding_keep_only_their_input_shape(fn):
    """PyTorch keeps a reflection / replication pad's whole input for a backward that reads only
    its shape: after the ReLU became a 1-bit mask, that input was held exact (a style-transfer
    network held 290 of its 505 KiB there)."""
    model = Wrap(fn, c0=nn.Conv2d(3, 8, 3, padding=1), conv=nn.Conv2d(8, 8, 3), pad=nn.ReflectionPad2d(1))
    converted = check_variant(model, torch.randn(2, 3, 16, 16), kinds=["pad", "conv"])
    assert [d.saved for d in converted._actfx_record.decisions if d.kind == "pad"] == [["shape only"]]
    assert not converted._actfx_record.uncovered


@pytest.mark.parametrize("fn", [
    lambda s, x: s.conv(F.interpolate(torch.tanh(s.c0(x)), size=(5, 5), mode="area")),
    lambda s, x: s.conv(s.up(torch.tanh(s.c0(x)))),
])
def test_area_interpolation_keeps_only_its_input_shape(fn):
    """``F.interpolate(mode="area")`` is adaptive average pooling: PyTorch keeps its whole input
    for a backward that reads only the shape (it was held exact, "not covered")."""
    model = Wrap(fn, c0=nn.Conv2d(3, 8, 3, padding=1), conv=nn.Conv2d(8, 8, 3), up=nn.Upsample((5, 5), mode="area"))
    converted = check_variant(model, torch.randn(2, 3, 16, 16), kinds=["interpolate", "conv"])
    assert [d.saved for d in converted._actfx_record.decisions if d.kind == "interpolate"] == [["shape only"]]
    assert not converted._actfx_record.uncovered


@pytest.mark.parametrize("fn", [
    lambda s, x: torch.fft.rfft(s.lin(x), dim=-1).abs(),
    lambda s, x: torch.view_as_real(torch.fft.rfft2(s.lin(x), norm="ortho")),  # a Fourier neural operator
    lambda s, x: torch.fft.fft(s.lin(x)).real,
])
def test_fourier_transforms_keep_only_their_input_shape(fn):
    """An FFT is linear: PyTorch keeps its whole input for a backward that reads the shape alone."""
    converted = check_variant(Wrap(fn, lin=nn.Linear(64, 64)), torch.randn(4, 8, 64), tol=0.03, kinds=["fft"])
    assert [d.saved for d in converted._actfx_record.decisions if d.kind == "fft"] == [["shape only"]]


def test_addmm_with_alpha_and_beta_packs_its_factors():
    model = Wrap(lambda s, x: torch.addmm(s.lin(x), x, s.lin.weight.t(), beta=0.5, alpha=2.0),
                 lin=nn.Linear(32, 32))
    converted = check_variant(model, torch.randn(64, 32), kinds=["linear"])
    # an activation times a weight counts as a linear layer: x packed, the weight as it is
    assert [d.saved for d in converted._actfx_record.decisions] == [
        ["packed 8-bit"], ["shape only", "packed 8-bit", "kept exact"]]


def test_channel_dropout_is_not_reported_as_uncovered():
    """F.dropout2d keeps one mask value per channel: nothing worth compressing or listing."""
    model = Wrap(lambda s, x: F.dropout2d(s.conv(x), 0.2), conv=nn.Conv2d(4, 4, 3))
    converted = actfx.convert(model)
    assert not converted._actfx_record.uncovered


def _pool_geometries():
    for nd in (1, 2, 3):
        for k, stride, pad, dil in itertools.product((1, 2, 3, 4), (1, 2, 3), (0, 1, 2), (1, 2)):
            if pad > k // 2:
                continue
            for size in ([(9,) * nd, (3,) * nd, (2,) * nd] if nd < 3 else [(6,) * nd, (2,) * nd]):
                yield nd, k, stride, pad, dil, size


def test_window_indices_round_trip_for_every_geometry():
    # uint8 in-window positions via an offset table (no integer division), checked against the
    # division formula and back to PyTorch's plane indices, tiny inputs with padding included.
    from actfx.variants.pool import _to_window_index_by_division, from_window_index, to_window_index

    pools = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}
    checked = 0
    for nd, k, stride, pad, dil, size in _pool_geometries():
        x = torch.randn((2, 3) + size, generator=torch.Generator().manual_seed(checked))
        try:
            _, idx = pools[nd](x, k, stride, pad, dil, return_indices=True)
        except RuntimeError:  # output would be empty
            continue
        geometry = ((k,) * nd, (stride,) * nd, (pad,) * nd, (dil,) * nd)
        rel = to_window_index(idx, size, geometry)
        assert torch.equal(rel, _to_window_index_by_division(idx, size, geometry)), (nd, k, stride, pad, dil, size)
        assert torch.equal(from_window_index(rel, size, geometry), idx)
        checked += 1
    assert checked > 200


@pytest.mark.parametrize("fn", [
    lambda s, x: torch.einsum("bij,bkj->bik", s.q(x), s.k(x)),
    lambda s, x: torch.einsum("bij,bjk->bik", [s.q(x).softmax(-1), s.k(x)]),
])
def test_einsum_of_two_activations_packs_both(fn):
    model = Wrap(fn, q=nn.Linear(64, 64), k=nn.Linear(64, 64))
    converted = check_variant(model, torch.randn(4, 64, 64), tol=0.03, kinds=["linear", "matmul"])
    einsums = [d for d in converted._actfx_record.decisions if d.kind == "matmul"]
    assert einsums and all(d.saved == ["packed 8-bit", "packed 8-bit"] for d in einsums), einsums


@pytest.mark.parametrize("fn", [
    lambda s, x: x / torch.linalg.vector_norm(s.lin(x), dim=-1, keepdim=True),  # cosine attention's norm
    lambda s, x: torch.linalg.vector_norm(s.lin(x), 2, (1, 2)),
    lambda s, x: s.lin(x) * torch.norm(s.lin(x), p=2, dim=(1, 2), keepdim=True),  # ConvNeXt-V2's GRN
    lambda s, x: s.lin(x).norm(dim=-1),
    lambda s, x: x / torch.linalg.norm(s.lin(x), dim=-1, keepdim=True),  # was not covered: 1.36x, not 14x
    lambda s, x: torch.linalg.norm(s.lin(x), dim=(1, 2)),  # Frobenius
])
def test_vector_norm_packs_its_input_and_keeps_the_norm_exact(fn):
    converted = check_variant(Wrap(fn, lin=nn.Linear(64, 64)), torch.randn(4, 32, 64), tol=0.03,
                              kinds=["linear", "vector_norm"])
    norms = [d for d in converted._actfx_record.decisions if d.kind == "vector_norm"]
    assert norms and all(d.saved == ["packed 8-bit"] for d in norms), norms


class _GumbelHead(nn.Module):
    """A discrete latent (VQ / RL policy style): F.gumbel_softmax between two layers."""

    def __init__(self, hard):
        super().__init__()
        self.a, self.b, self.hard = nn.Linear(32, 64), nn.Linear(64, 32), hard

    def forward(self, x):
        return self.b(F.gumbel_softmax(self.a(x), tau=0.5, hard=self.hard))


@pytest.mark.parametrize("hard", [False, True])
def test_gumbel_softmax_is_traced_through_and_packs_its_softmax(hard):
    """fx recorded F.gumbel_softmax as one opaque call (its __torch_function__ check), which kept
    the full soft sample; traced through, its softmax is packed. Same noise, same forward; with
    the noise fixed, the mean of K two-bit gradients converges to the exact one."""
    torch.manual_seed(0)
    model, x = _GumbelHead(hard), torch.randn(64, 32)
    converted = actfx.convert(model, config=actfx.Config(bits=2, op_bits={}))
    assert "softmax" in {d.kind for d in converted._actfx_record.decisions}
    check_variant(model, x, kinds=["softmax"])

    def grads(m):
        torch.manual_seed(1)  # the same Gumbel noise in every sample
        return weighted_grads(model, m, x, w)

    w = torch.randn(64, 32)
    with count_saved(model) as plain:
        kept = model(x)  # noqa: F841
    with count_saved(converted) as packed:
        kept = converted(x)  # noqa: F841
    assert packed.activation_bytes < plain.activation_bytes / 4
    assert_mean_converges([grads(converted) for _ in range(64)], grads(model), least_noise=1e-3)


@pytest.mark.parametrize("norm", [nn.LayerNorm(128), nn.GroupNorm(8, 128)], ids=["layer_norm", "group_norm"])
def test_norms_under_cpu_autocast_compute_as_autocast_does(norm):
    """CPU autocast runs the norms in the input's bf16 (CUDA's runs them in fp32); the variants
    cast to fp32 whenever autocast was on, and a Linear -> LayerNorm came out fp32, 0.008 off."""
    torch.manual_seed(0)
    last = (lambda s, x: s.norm(s.fc(x))) if isinstance(norm, nn.LayerNorm) else (
        lambda s, x: s.norm(s.fc(x).transpose(1, 2)))
    model = Wrap(last, fc=nn.Linear(32, 128), norm=norm)
    x = torch.randn(4, 16, 32)
    converted = actfx.convert(model, bits=8)
    kind = "layer_norm" if isinstance(norm, nn.LayerNorm) else "group_norm"
    assert {"linear", kind} <= {d.kind for d in converted._actfx_record.decisions}
    outs, grads = [], []
    for m in (model, converted):
        m.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = m(x)
        outs.append(out)
        out.float().square().mean().backward()
        grads.append(torch.cat([p.grad.reshape(-1) for p in m.parameters()]))
    assert outs[0].dtype == outs[1].dtype == torch.bfloat16
    assert torch.equal(outs[0], outs[1])
    assert ((grads[1] - grads[0]).norm() / grads[0].norm()).item() < 0.05


class _ComputedArguments(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.lin, self.fn = nn.Linear(16, 32), fn

    def forward(self, x):
        return self.fn(self.lin(x)).square().sum()


@pytest.mark.parametrize("fn", [
    lambda h: F.softmax(h, dim=-1, dtype=h.dtype),  # Hugging Face's GPT-OSS attention sinks
    lambda h: F.leaky_relu(h, 0.01 * h.dim()),
    lambda h: F.hardtanh(h, -h.dim(), h.dim()),
], ids=["softmax dtype", "leaky_relu slope", "hardtanh bounds"])
def test_an_argument_computed_in_the_graph_is_taken_from_the_new_graph(fn):
    """fx records ``h.dtype`` or ``0.01 * h.dim()`` as nodes: the softmax site passed the old
    graph's node on ("does not belong to this Graph": GPT-OSS failed to convert), the ReLU-like
    sites called float() on it (TypeError)."""
    torch.manual_seed(0)
    model, x = _ComputedArguments(fn), torch.randn(8, 16)
    converted = actfx.convert(model, bits=8)
    assert torch.equal(converted(x), model(x))
    converted(x).backward()


@pytest.mark.parametrize("act", [
    lambda s, x: F.threshold(x * 1.0, 0.1, 0.0),
    lambda s, x: F.threshold(x * 1.0, -0.2, -0.5, inplace=True),
    lambda s, x: s.act(x * 1.0),
], ids=["functional", "in place", "module"])
def test_threshold_keeps_a_mask(act):
    """F.threshold / nn.Threshold with the value at or below the threshold: a ReLU at another level."""
    check_variant(Wrap(act, act=nn.Threshold(0.3, 0.3)), torch.randn(16, 300), exact_grad=True, kinds=["threshold"])


def test_a_threshold_replacing_with_a_larger_value_is_left_as_it_is():
    """x <= 0.1 becomes 20: no mask of the output tells the two apart."""
    model, x = Wrap(lambda s, x: s.act(x * 1.0), act=nn.Threshold(0.1, 20.0)), torch.randn(16, 300, requires_grad=True)
    converted = actfx.convert(model, bits=8)
    assert "threshold" not in {d.kind for d in converted._actfx_record.decisions}
    assert torch.equal(converted(x), model(x))
    assert torch.equal(torch.autograd.grad(converted(x).sum(), x)[0], torch.autograd.grad(model(x).sum(), x)[0])


@pytest.mark.parametrize("fn, module", [
    (lambda s, x: F.softmin(x * 1.0, dim=-1), None),
    (lambda s, x: s.act(x * 1.0), nn.Softmin(dim=1)),
    (lambda s, x: s.act(x.view(4, 4, 10, 30) * 1.0), nn.Softmax2d()),
], ids=["F.softmin", "nn.Softmin", "nn.Softmax2d"])
def test_softmin_and_softmax2d_pack_their_probabilities(fn, module):
    """softmin is the softmax of -x, Softmax2d a softmax over channels: they kept input and output."""
    # scores of a moderate spread: 8-bit probabilities near 0 dominate a sharp softmax's small gradient
    check_variant(Wrap(fn, act=module or nn.Identity()), torch.randn(16, 300) * 0.5, kinds=["softmax"])


def test_alpha_dropout_is_reported_as_not_covered():
    """nn.AlphaDropout keeps a mask at its input's full size; it was listed with the ops that
    save nothing worth packing (channel dropouts keep one value per channel), so show hid it."""
    model = nn.Sequential(nn.Linear(16, 64), nn.AlphaDropout(0.2), nn.Linear(64, 4))
    converted = actfx.convert(model, bits=2)
    assert "AlphaDropout" in [u.what for u in converted._actfx_record.uncovered]


class _TimesVector(nn.Module):
    """``tanh(h) @ v`` (or ``v @ tanh(h)``) with a parameter vector: GAT's attention logits, a scalar head."""

    def __init__(self, hidden: tuple, vector_first: bool):
        super().__init__()
        self.lin, self.vector_first = nn.Linear(16, 16), vector_first
        self.v = nn.Parameter(torch.randn(16) / 4)
        self.hidden = hidden

    def forward(self, x):
        h = torch.tanh(self.lin(x)).reshape(self.hidden)
        return (self.v @ h if self.vector_first else h @ self.v) * 1.0


@pytest.mark.parametrize("hidden, vector_first", [((64, 16), False), ((4, 16, 16), False), ((4, 16, 16), True),
                                                  ((16, 64), True)], ids=["mv", "batched-mv", "vm-batched", "vm"])
def test_a_product_with_a_vector_packs_the_activation(hidden, vector_first):
    """torch.matmul with a 1-D operand was left to autograd, which kept the activation exact."""
    torch.manual_seed(0)
    model, x = _TimesVector(hidden, vector_first), torch.randn(64, 16)
    converted = actfx.convert(model, bits=2)
    with count_saved(model) as before:
        expected = model(x)
    with count_saved(converted) as after:
        out = converted(x)
    assert torch.equal(out, expected)
    (product,) = [d for d in converted._actfx_record.decisions if d.node == "matmul"]
    assert sorted(product.saved) == ["kept exact", "packed 2-bit"]  # the parameter vector, the activation
    assert after.activation_bytes < before.activation_bytes / 4, (after.activation_bytes, before.activation_bytes)
    check_variant(model, x, kinds=[product.kind])
    assert_unbiased(model, x)


def _gated_scores(s, x):
    q, k = torch.tanh(s.lin(x)).chunk(2, -1)
    return torch.einsum("bid,bjd,bj->bij", q, k, torch.sigmoid(s.gate(x)).squeeze(-1))


def _through_two_weights(s, x):
    return torch.einsum("bid,de,ef->bif", torch.tanh(s.lin(x)), s.w1, s.w2)


@pytest.mark.parametrize("fn", [_gated_scores, _through_two_weights], ids=["three-activations", "two-weights"])
def test_an_einsum_of_three_operands_packs_them(fn):
    """Only two-operand einsums were converted; three kept every operand exact."""
    torch.manual_seed(0)
    model = Wrap(fn, lin=nn.Linear(16, 32))
    if fn is _gated_scores:
        model.gate = nn.Linear(16, 1)
    else:
        model.w1, model.w2 = nn.Parameter(torch.randn(32, 8) / 4), nn.Parameter(torch.randn(8, 8) / 4)
    x = torch.randn(4, 24, 16)
    converted = actfx.convert(model, bits=2)
    (einsum,) = [d for d in converted._actfx_record.decisions if d.node == "einsum"]
    assert "packed" in einsum.saved[0] and all(s.startswith("packed") or s == "kept exact" for s in einsum.saved)
    check_variant(model, x, kinds=[einsum.kind])
    assert_unbiased(model, x)


def _knn_distances(s, x):
    h = torch.tanh(s.lin(x))
    return torch.cdist(h, h).sin()


def _to_prototypes(s, x):
    return torch.cdist(torch.tanh(s.lin(x)), torch.tanh(s.lin(x[:, :5]) * 2), compute_mode="donot_use_mm_for_euclid_dist")


@pytest.mark.parametrize("fn", [_knn_distances, _to_prototypes], ids=["one-input", "two-inputs"])
def test_cdist_packs_its_inputs_and_keeps_the_distances(fn):
    """torch.cdist kept both inputs exact (a kNN block held 1.8x less than the original); with the
    distances exact its gradient is linear in the inputs, which are packed."""
    torch.manual_seed(0)
    model, x = Wrap(fn, lin=nn.Linear(8, 16)), torch.randn(4, 24, 8)
    converted = actfx.convert(model, bits=2)
    (decision,) = [d for d in converted._actfx_record.decisions if d.kind == "cdist"]
    assert decision.saved == ["packed 2-bit", "packed 2-bit"]
    check_variant(model, x, kinds=["cdist"])
    assert_unbiased(model, x)


def test_an_exported_cdist_is_packed_too():
    """torch.export records ``aten.cdist`` (compute_mode an int or None there)."""
    torch.manual_seed(0)
    model, x = Wrap(_knn_distances, lin=nn.Linear(8, 16)), torch.randn(4, 24, 8)
    converted = actfx.convert(model, bits=8, example_inputs=(x,))
    assert torch.equal(converted(x), model(x))
    assert [d.saved for d in converted._actfx_record.decisions if d.kind == "cdist"] == [["packed 8-bit"] * 2]


class _SmallHead(nn.Module):
    """DETR's box head on six queries: every value under ``Config.min_numel``."""

    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList([nn.Linear(32, 32), nn.Linear(32, 32), nn.Linear(32, 4)])

    def forward(self, x):
        for i, layer in enumerate(self.layers):
            x = F.relu(layer(x)) if i < len(self.layers) - 1 else layer(x)
        return x


def test_a_relu_too_small_to_pack_keeps_no_mask_beside_its_output():
    """The next layer keeps the output exact (too small to pack); a mask beside it held more than
    the original (4704 against 4608 B). The mask is read off the exact output instead."""
    torch.manual_seed(0)
    model, x = _SmallHead(), torch.randn(2, 6, 32, requires_grad=True)
    converted = actfx.convert(model, bits=2)
    with count_saved(model) as plain:
        expected = model(x)
    with count_saved(converted) as held:
        got = converted(x)
    assert torch.equal(got, expected)
    assert held.activation_bytes <= plain.activation_bytes, (held.activation_bytes, plain.activation_bytes)
    exact = torch.autograd.grad(expected.square().sum(), [x, *model.parameters()])
    grads = torch.autograd.grad(got.square().sum(), [x, *model.parameters()])
    for a, b in zip(grads, exact):
        torch.testing.assert_close(a, b)
