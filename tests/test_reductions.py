"""std / var (input packed, std exact) and logsumexp (probabilities packed): converted in every
spelling, the same forward, unbiased gradients, and PyTorch's own values at the edges."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import actfx
from actfx.accounting import count_saved
from checks import assert_mean_converges, weighted_grads
from test_variants import Wrap, check_variant


class HandWrittenLayerNorm(nn.Module):
    """The Annotated Transformer's LayerNorm: divides by ``x.std(-1)``."""

    def __init__(self, features, eps=1e-6):
        super().__init__()
        self.lin = nn.Linear(features, features)
        self.a_2, self.b_2, self.eps = nn.Parameter(torch.ones(features)), nn.Parameter(torch.zeros(features)), eps

    def forward(self, x):
        x = self.lin(x)
        mean, std = x.mean(-1, keepdim=True), x.std(-1, keepdim=True)
        return self.a_2 * (x - mean) / (std + self.eps) + self.b_2


@pytest.mark.parametrize("kind, fn", [
    ("std", lambda s, x: s.lin(x).std(-1, keepdim=True)),
    ("std", lambda s, x: torch.std(s.lin(x), dim=(1, 2), correction=0)),
    ("std", lambda s, x: s.lin(x).std()),
    ("var", lambda s, x: torch.var(s.lin(x), -1, unbiased=False)),
    ("var", lambda s, x: s.lin(x).var(1, keepdim=True) * 3),
    # both outputs read: var_mean / std_mean were not covered (held 1.36x less than PyTorch, not 14x)
    ("var", lambda s, x: (lambda r: r[0] * 3 + r[1] * 2)(torch.var_mean(s.lin(x), -1, keepdim=True))),
    ("std", lambda s, x: (lambda h, r: (h - r[1]) / (r[0] + 1))(s.lin(x), torch.std_mean(s.lin(x), (0, 1)))),
])
def test_std_and_var_pack_their_input(kind, fn):
    converted = check_variant(Wrap(fn, lin=nn.Linear(32, 32)), torch.randn(4, 16, 32), tol=0.03,
                              kinds=["linear", kind])
    assert [d.saved for d in converted._actfx_record.decisions if d.kind == kind] == [["packed 8-bit"]]


@pytest.mark.parametrize("kind, fn", [
    ("logsumexp", lambda s, x: torch.logsumexp(s.lin(x), -1)),
    ("logsumexp", lambda s, x: s.lin(x).logsumexp((0, 2), keepdim=True)),
])
def test_logsumexp_packs_its_probabilities(kind, fn):
    converted = check_variant(Wrap(fn, lin=nn.Linear(32, 32)), torch.randn(4, 16, 32), tol=0.03,
                              kinds=["linear", kind])
    assert [d.saved for d in converted._actfx_record.decisions if d.kind == kind] == [["packed 8-bit"]]


def _assert_converted_and_unbiased(model, x, kind):
    converted = actfx.convert(model, bits=2)
    assert kind in {d.kind for d in converted._actfx_record.decisions}
    assert torch.equal(converted(x), model(x))
    w = torch.randn(model(x).shape, generator=torch.Generator().manual_seed(3))
    exact = weighted_grads(model, model, x, w)
    assert_mean_converges([weighted_grads(model, converted, x, w) for _ in range(64)], exact, least_noise=1e-3)


def test_a_hand_written_layer_norm_dividing_by_std_is_unbiased():
    """Recomputing std from its packed input would be biased (E sqrt(var(x + noise)) > std(x));
    with the exact std kept, the mean of 64 two-bit gradients approaches the exact one."""
    torch.manual_seed(0)
    _assert_converted_and_unbiased(HandWrittenLayerNorm(16), torch.randn(8, 12, 16), "std")


def test_a_z_loss_over_masked_router_logits_is_unbiased():
    """MoE routers' z-loss: logsumexp of logits with masked (-inf) entries; the probabilities are
    packed, not the -inf logits."""
    torch.manual_seed(0)
    mask = torch.rand(8, 12, 16) < 0.3

    def z_loss(s, x):
        logits = s.lin(x).masked_fill(mask, float("-inf"))
        return torch.logsumexp(logits, dim=-1) ** 2

    _assert_converted_and_unbiased(Wrap(z_loss, lin=nn.Linear(16, 16)), torch.randn(8, 12, 16), "logsumexp")


def test_std_of_a_constant_row_has_pytorchs_zero_gradient():
    """std is 0 on a constant row: PyTorch's backward gives 0 there, not NaN; so does actfx's."""
    model = Wrap(lambda s, x: (s.lin(x) * s.mask).std(-1), lin=nn.Linear(8, 8))
    model.register_buffer("mask", torch.tensor([[1.0], [0.0], [1.0], [0.0]]))
    x = torch.randn(4, 8)
    converted = actfx.convert(model, bits=8)
    exact = torch.autograd.grad(model(x).sum(), model.lin.weight)[0]
    got = torch.autograd.grad(converted(x).sum(), model.lin.weight)[0]
    assert torch.isfinite(got).all()
    assert ((got - exact).norm() / exact.norm()) < 0.03


def test_exported_std_var_and_logsumexp_are_converted():
    """The ATen spellings torch.export records (aten.std.correction, aten.var.correction,
    aten.logsumexp.default) reach the same variants."""
    def fn(s, x):
        h = s.lin(x)
        return h.std(-1) + h.var(-1, unbiased=False) + h.logsumexp(-1)

    model, x = Wrap(fn, lin=nn.Linear(16, 16)), torch.randn(4, 16)
    converted = actfx.convert(model, bits=8, example_inputs=(x,))
    kinds = [d.kind for d in converted._actfx_record.decisions]
    assert {"std", "var", "logsumexp"} <= set(kinds), kinds
    assert torch.equal(converted(x), model(x))
    w = torch.randn(4)
    exact, got = weighted_grads(model, model, x, w), weighted_grads(model, converted, x, w)
    assert (got - exact).norm() / exact.norm() < 0.03


class _Distilled(nn.Module):
    """Knowledge distillation: a student's log-probabilities against a frozen teacher's."""

    def __init__(self, reduction="batchmean", log_target=False, module=False):
        super().__init__()
        self.student, self.teacher = nn.Linear(32, 500), nn.Linear(32, 500).requires_grad_(False)
        self.reduction, self.log_target = reduction, log_target
        self.loss = nn.KLDivLoss(reduction=reduction, log_target=log_target) if module else None

    def forward(self, x):
        log_p = F.log_softmax(self.student(x) / 2.0, -1)
        teacher = self.teacher(x) / 2.0
        target = F.log_softmax(teacher, -1) if self.log_target else F.softmax(teacher, -1)
        if self.loss is not None:
            return self.loss(log_p, target)
        return F.kl_div(log_p, target, reduction=self.reduction, log_target=self.log_target)


@pytest.mark.filterwarnings("ignore:reduction")
@pytest.mark.parametrize("options", [{}, {"reduction": "sum", "log_target": True},
                                     {"reduction": "mean", "module": True}, {"reduction": "none"}])
def test_a_distillation_loss_packs_the_teachers_probabilities_unbiased(options):
    """PyTorch's kl_div keeps the student's log-probabilities and the teacher's probabilities,
    both vocabulary-wide; the input's gradient is ``-p * g``, linear in the teacher's ``p``, which
    is packed instead."""
    torch.manual_seed(0)
    model, x = _Distilled(**options), torch.randn(64, 32)
    converted = actfx.convert(model, bits=2)
    assert [d.saved for d in converted._actfx_record.decisions if d.kind == "kl_div"] == [["packed 2-bit"]]
    assert torch.equal(converted(x), model(x))
    w = torch.randn(model(x).shape)
    exact = weighted_grads(model.student, model, x, w)
    assert_mean_converges([weighted_grads(model.student, converted, x, w) for _ in range(64)], exact,
                          least_noise=1e-3)


class _SoftTargets(nn.Module):
    """Mixup / distillation: cross-entropy against class probabilities, per pixel when 4-D."""

    def __init__(self, weight=None, reduction="mean", per_pixel=False):
        super().__init__()
        self.head, self.weight, self.reduction, self.per_pixel = nn.Linear(32, 100), weight, reduction, per_pixel

    def forward(self, x, probabilities):
        logits = self.head(x)
        if self.per_pixel:
            logits = logits.permute(0, 3, 1, 2)
        return F.cross_entropy(logits, probabilities, self.weight, reduction=self.reduction)


@pytest.mark.parametrize("weight, reduction, shape", [
    (None, "mean", (64,)), (torch.rand(100), "sum", (64,)), (None, "none", (4, 6, 6))])
def test_cross_entropy_against_class_probabilities_packs_the_softmax_unbiased(weight, reduction, shape):
    """With class-probability targets F.cross_entropy ran as PyTorch runs it (log-probabilities
    kept exact, full size); its gradient is linear in the log-probabilities there too, so the
    packed softmax serves it as it does class indices."""
    torch.manual_seed(0)
    model = _SoftTargets(weight, reduction, per_pixel=len(shape) == 3)
    x = torch.randn(*shape, 32)
    target = torch.softmax(torch.randn(*shape, 100) * 3, -1)
    target = target.permute(0, 3, 1, 2) if target.dim() == 4 else target
    converted = actfx.convert(model, bits=2)
    assert torch.equal(converted(x, target), model(x, target))
    w = torch.randn(model(x, target).shape)
    call = lambda m: (lambda inp: m(inp, target))  # noqa: E731
    exact = weighted_grads(model, call(model), x, w)
    with count_saved(model) as plain:
        kept = model(x, target)  # noqa: F841
    with count_saved(converted) as packed:
        kept = converted(x, target)  # noqa: F841
    # the target is kept as PyTorch keeps it (the caller's tensor); the log-probabilities are not
    assert plain.activation_bytes - packed.activation_bytes > 0.7 * target.numel() * 4
    assert_mean_converges([weighted_grads(model, call(converted), x, w) for _ in range(64)], exact,
                          least_noise=1e-3)


class _Smoothed(nn.Module):
    """Cross-entropy with label smoothing over class indices (the usual vision / LM recipe)."""

    def __init__(self, weight=None, reduction="mean", ignore_index=-100, smoothing=0.1, per_pixel=False):
        super().__init__()
        self.head, self.weight, self.per_pixel = nn.Linear(32, 100), weight, per_pixel
        self.options = dict(reduction=reduction, ignore_index=ignore_index, label_smoothing=smoothing)

    def forward(self, x, target):
        logits = self.head(x)
        if self.per_pixel:
            logits = logits.permute(0, 3, 1, 2)
        return F.cross_entropy(logits, target, self.weight, **self.options)


_SMOOTHED_CASES = [
    dict(), dict(reduction="sum", ignore_index=3), dict(weight=torch.rand(100) + 0.5, ignore_index=3),
    dict(weight=torch.rand(100) + 0.5, reduction="none"), dict(per_pixel=True, ignore_index=3), dict(smoothing=1.0),
]


@pytest.mark.parametrize("options", _SMOOTHED_CASES, ids=lambda o: "-".join(sorted(o)) or "plain")
def test_label_smoothing_is_linear_in_the_log_probabilities(options):
    """The backward's loss, written as a function of the log-probabilities, has the gradient of
    F.cross_entropy itself (ATen's smoothing term and its "mean" normaliser included)."""
    from actfx.variants.softmax import _index_nll

    torch.manual_seed(0)
    per_pixel = options.get("per_pixel", False)
    x = torch.randn(4, 100, 3, 3) if per_pixel else torch.randn(64, 100)
    target = torch.randint(0, 100, (4, 3, 3) if per_pixel else (64,))
    target[0] = 3  # one ignored position where ignore_index=3
    smoothing, weight = options.get("smoothing", 0.1), options.get("weight")
    reduction, ignore = options.get("reduction", "mean"), options.get("ignore_index", -100)
    x.requires_grad_(True)
    out = F.cross_entropy(x, target, weight, reduction=reduction, ignore_index=ignore, label_smoothing=smoothing)
    mine = _index_nll(torch.log_softmax(x, 1), target, weight, ignore, reduction, smoothing)
    torch.testing.assert_close(mine, out)
    g = torch.randn(out.shape)
    torch.testing.assert_close(torch.autograd.grad(mine, x, g)[0], torch.autograd.grad(out, x, g)[0])


@pytest.mark.parametrize("options", _SMOOTHED_CASES[:5], ids=lambda o: "-".join(sorted(o)) or "plain")
def test_label_smoothing_packs_the_softmax_unbiased(options):
    """With label smoothing F.cross_entropy ran as PyTorch runs it (log-probabilities kept exact,
    full size); it now keeps the packed softmax, and the mean of K gradients converges."""
    torch.manual_seed(0)
    options = dict(options)
    per_pixel = options.get("per_pixel", False)
    model = _Smoothed(**options)
    x = torch.randn(4, 3, 3, 32) if per_pixel else torch.randn(64, 32)
    target = torch.randint(0, 100, (4, 3, 3) if per_pixel else (64,))
    target[0] = 3
    converted = actfx.convert(model, bits=2)
    assert torch.equal(converted(x, target), model(x, target))
    call = lambda m: (lambda inp: m(inp, target))  # noqa: E731
    w = torch.randn(model(x, target).shape)
    exact = weighted_grads(model, call(model), x, w)
    with count_saved(model) as plain:
        kept = model(x, target)  # noqa: F841
    with count_saved(converted) as packed:
        kept = converted(x, target)  # noqa: F841
    assert plain.activation_bytes - packed.activation_bytes > 0.7 * target.numel() * 100 * 4
    assert_mean_converges([weighted_grads(model, call(converted), x, w) for _ in range(64)], exact,
                          least_noise=1e-3)



class _LogSoftmaxNll(nn.Module):
    """The classic spelling of cross-entropy: log_softmax, then F.nll_loss or nn.NLLLoss."""

    def __init__(self, module=False, **options):
        super().__init__()
        self.head, self.options = nn.Linear(32, 100), options
        self.loss = nn.NLLLoss(**options) if module else None

    def forward(self, x, target):
        log_p = F.log_softmax(self.head(x), dim=-1)
        return self.loss(log_p, target) if self.loss is not None else F.nll_loss(log_p, target, **self.options)


@pytest.mark.parametrize("options", [
    dict(), dict(reduction="sum", ignore_index=3), dict(weight=torch.rand(100) + 0.5, reduction="none"),
    dict(module=True), dict(module=True, ignore_index=3, reduction="sum"),
], ids=["plain", "sum-ignore", "weight-none", "module", "module-sum-ignore"])
def test_nll_loss_keeps_only_the_shape_of_the_log_probabilities(options):
    """nll_loss's gradient is -weight at the targets: PyTorch keeps the full log-probabilities for
    their shape alone, so after log_softmax (probabilities packed) the converted model held more
    than the original (1.09 -> 1.29 MB on a 256 x 1000 head). Only the shape is kept now."""
    torch.manual_seed(0)
    model = _LogSoftmaxNll(**options)
    x, target = torch.randn(64, 32), torch.randint(0, 100, (64,))
    target[0] = 3
    converted = actfx.convert(model, config=actfx.Config(bits=2, op_bits={}))
    assert [d.saved for d in converted._actfx_record.decisions if d.kind == "nll_loss"] == [
        ["shape only"] + ["kept exact"] * (1 + ("weight" in options))]
    assert torch.equal(converted(x, target), model(x, target))
    with count_saved(model) as plain:
        kept = model(x, target)  # noqa: F841
    with count_saved(converted) as packed:
        kept = converted(x, target)  # noqa: F841
    assert packed.activation_bytes < plain.activation_bytes / 4
    call = lambda m: (lambda inp: m(inp, target))  # noqa: E731
    w = torch.randn(model(x, target).shape)
    exact = weighted_grads(model, call(model), x, w)
    assert_mean_converges([weighted_grads(model, call(converted), x, w) for _ in range(64)], exact,
                          least_noise=1e-3)



class _NarrowEncoder(nn.Module):
    """A BERT-like stack of width 128: summed embeddings, then LayerNorm between MLP blocks."""

    def __init__(self, width=128, depth=4):
        super().__init__()
        self.words, self.positions = nn.Embedding(100, width), nn.Embedding(32, width)
        self.norms = nn.ModuleList([nn.LayerNorm(width) for _ in range(depth)])
        self.blocks = nn.ModuleList([nn.Sequential(nn.Linear(width, 2 * width), nn.GELU(), nn.Linear(2 * width, width))
                                     for _ in range(depth)])
        self.head = nn.Linear(width, 8)

    def forward(self, ids):
        h = self.words(ids) + self.positions(torch.arange(ids.shape[1]))
        for norm, block in zip(self.norms, self.blocks):
            h = norm(h)
            h = h + block(h)
        return self.head(h)


@pytest.mark.slow
def test_norms_over_512_values_or_fewer_stay_unbiased():
    """LayerNorm's backward reads x̂ in ``x̂_i mean_j(g_j x̂_j)``; from one pack the product keeps
    an O(1/M) bias, M the values per row. At M = 128 it added up to 1.7% of a 2-layer BERT's
    gradient norm, in the embeddings (mean of 128 two-bit gradients: 0.16 of one step's error for
    0.088); rows of fewer than 512 values now get the independent second pack."""
    torch.manual_seed(0)
    model, ids = _NarrowEncoder(), torch.randint(0, 100, (8, 32))
    converted = actfx.convert(model, bits=2)
    w = torch.randn(8, 32, 8)

    def embedding_grad(m):
        return torch.autograd.grad((m(ids) * w).sum(), model.words.weight)[0].flatten()

    assert_mean_converges([embedding_grad(converted) for _ in range(512)], embedding_grad(model), least_noise=1e-3)
