"""actfx/rules.py and actfx/passes/noise_degree.py: which saved values may carry rounding noise.

Each rule's claim is checked both ways: the analysis flags exactly the sources a backward is
nonlinear in, and numerically, the mean of K noisy evaluations approaches the exact value as
1/sqrt(K) where the analysis says "linear" and does not where it says "biased".
"""

import math

import pytest
import torch
from torch.fx.experimental.proxy_tensor import make_fx

from actfx.passes import noise_degree
from actfx.rules import RULES, Kind, rule_for

aten = torch.ops.aten


def backward_like(fn, *shapes):
    """fn(tangents_1, saved...) traced to ATen, placeholders named as a partitioned backward's."""
    args = [torch.randn(s) for s in shapes]
    gm = make_fx(fn)(*args)
    placeholders = list(gm.graph.find_nodes(op="placeholder"))
    placeholders[0]._rename("tangents_1")
    for i, node in enumerate(placeholders[1:]):
        node._rename(f"saved_{i}")
    return gm, placeholders[1:], args


CASES = {
    # name: (backward as a function of (g, x), sources expected biased)
    "linear: g * x": (lambda g, x: g * x, False),
    "matmul: g @ x": (lambda g, x: g @ x, False),
    "square: g * x * x": (lambda g, x: g * x * x, True),
    "pow 2: g * x**2": (lambda g, x: g * x.pow(2), True),
    "nonlinear: g * exp(x)": (lambda g, x: g * torch.exp(x), True),
    "divisor: g / x": (lambda g, x: g / x, True),
    "mask: where(x > 0, g, 0)": (lambda g, x: torch.where(x > 0, g, torch.zeros_like(g)), True),
    "normalisation: x * sum(g * x) over 256": (lambda g, x: x * (g * x).sum(-1, keepdim=True), False),
    "small sum: x * sum(g * x) over 8": (lambda g, x: x[..., :8] * (g[..., :8] * x[..., :8]).sum(-1, keepdim=True), True),
}


@pytest.mark.parametrize("name", list(CASES))
def test_analysis_flags_exactly_the_nonlinear_uses(name):
    fn, biased = CASES[name]
    shape = (256, 256) if "matmul" in name else (4, 256)
    gm, saved, _ = backward_like(fn, shape, shape)
    flagged = noise_degree.biased_sources(gm.graph, saved)
    assert (saved[0] in flagged) is biased


@pytest.mark.parametrize("name", ["linear: g * x", "normalisation: x * sum(g * x) over 256", "square: g * x * x"])
def test_the_flag_matches_the_measured_bias(name):
    """Unbiased noise on x: the mean of K backward values approaches the exact one as 1/sqrt(K)
    exactly where the analysis says linear."""
    fn, biased = CASES[name]
    torch.manual_seed(0)
    g, x = torch.randn(4, 256), torch.randn(4, 256)
    exact = fn(g, x)
    step = 1.0

    def noisy():
        t = x / step
        return torch.floor(t + torch.rand_like(t)) * step  # stochastic rounding: E = x

    def error(k):
        return ((sum(fn(g, noisy()) for _ in range(k)) / k - exact).norm() / exact.norm()).item()

    k = 256
    e1, ek = error(1), error(k)
    if biased:
        assert ek > 2.0 * e1 / math.sqrt(k)  # the mean stops converging: the bias dominates
    else:
        assert ek < 1.5 * e1 / math.sqrt(k)


def test_gradient_dependent_arguments_pass_through_unknown_ops():
    """An op without a rule (here erf) is nonlinear in saved values but, in a backward graph,
    linear in the gradient: noise that reaches it through the gradient is not flagged."""
    gm, saved, _ = backward_like(lambda g, x, y: torch.special.erf(y) * (g * x), (4, 256), (4, 256), (4, 256))
    flagged = noise_degree.biased_sources(gm.graph, saved)
    assert saved[1] in flagged and saved[0] not in flagged


def test_convolution_backward_results_read_only_their_own_arguments():
    gm, saved, _ = backward_like(
        lambda g, x: torch.ops.aten.convolution_backward(g, x, torch.ones(4, 3, 3, 3), [0], [1, 1], [1, 1], [1, 1],
                                                         False, [0, 0], 1, [True, True, False])[1] * x.sum(),
        (2, 4, 8, 8), (2, 3, 8, 8))
    # grad_weight is linear in x, x.sum() is dilute (a sum of 384): still linear overall
    assert not noise_degree.biased_sources(gm.graph, saved)


def test_grid_sample_backward_is_linear_in_the_input_and_needs_the_grid_exact():
    grid = (2, 4, 4, 2)
    gm, saved, _ = backward_like(
        lambda g, x, p: torch.ops.aten.grid_sampler_2d_backward(g, x, p, 0, 0, False, [True, True])[1],
        (2, 3, 4, 4), (2, 3, 8, 8), grid)
    assert noise_degree.biased_sources(gm.graph, saved).keys() == {saved[1]}


def test_grouped_mm_backward_is_linear_in_the_tokens_and_needs_the_group_ends_exact():
    """A mixture-of-experts layer's expert gradient: each expert's tokens times their gradients."""
    args = [torch.randn(12, 4), torch.randn(12, 8), torch.tensor([4, 4, 12], dtype=torch.int32)]
    gm = make_fx(lambda g, x, offs: torch._grouped_mm(x.t(), g, offs))(*args)
    placeholders = list(gm.graph.find_nodes(op="placeholder"))
    placeholders[0]._rename("tangents_1")
    saved = placeholders[1:]
    assert noise_degree.biased_sources(gm.graph, saved).keys() == {saved[1]}


def test_other_libraries_ops_are_keyed_by_name():
    pytest.importorskip("transformers.integrations.moe")  # registers transformers' MoE ops
    rule = rule_for(torch.ops.transformers.grouped_mm_fallback_backward.default)
    assert rule.kind is Kind.PRODUCT and rule.exact == (2,) and rule.outputs == ((1, 3), (0, 3))


def test_registry_is_keyed_by_aten_ops_and_defaults_to_nonlinear():
    assert rule_for(aten.mm.default).kind is Kind.PRODUCT
    assert rule_for(aten.view.default).kind is Kind.LINEAR
    assert rule_for(aten.exp.default).kind is Kind.NONLINEAR
    for key in RULES:
        assert isinstance(key, (torch._ops.OpOverloadPacket, torch._ops.OpOverload)) or callable(key)


def _cpu_attention():
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, 16, 8) for _ in range(3))
    mask = torch.randn(16, 16)
    out, lse = aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, False, attn_mask=mask)
    return q, k, v, out, lse, mask


def _attention_backward(g, q, k, v, out, lse, mask):
    return aten._scaled_dot_product_flash_attention_for_cpu_backward(g, q, k, v, out, lse, 0.0, False, attn_mask=mask)


def test_fused_attention_backward_is_linear_in_value_and_output_and_needs_q_k_and_the_mask_exact():
    """The fused kernels recompute the probabilities from q, k, the mask and the logsumexp
    (nonlinear) and read v and the output linearly; the mask is a keyword argument."""
    q, k, v, out, lse, mask = _cpu_attention()
    gm = make_fx(_attention_backward)(torch.randn_like(out), q, k, v, out, lse, mask)
    placeholders = list(gm.graph.find_nodes(op="placeholder"))
    placeholders[0]._rename("tangents_1")
    saved = placeholders[1:]
    flagged = noise_degree.biased_sources(gm.graph, saved)
    assert set(flagged) == {saved[0], saved[1], saved[4], saved[5]}  # q, k, logsumexp, mask


@pytest.mark.parametrize("noisy, biased", [("v and out", False), ("q", True)])
def test_fused_attention_gradients_are_unbiased_in_noisy_value_and_output(noisy, biased):
    q, k, v, out, lse, mask = _cpu_attention()
    g = torch.randn_like(out)
    exact = torch.cat([t.flatten() for t in _attention_backward(g, q, k, v, out, lse, mask)])

    def rounded(x, step=0.5):
        return torch.floor(x / step + torch.rand_like(x)) * step  # stochastic rounding: E = x

    def one():
        args = (rounded(q), k, v, out) if noisy == "q" else (q, k, rounded(v), rounded(out))
        return torch.cat([t.flatten() for t in _attention_backward(g, *args, lse, mask)])

    def error(n):
        return ((sum(one() for _ in range(n)) / n - exact).norm() / exact.norm()).item()

    n = 256
    e1, en = error(1), error(n)
    if biased:
        assert en > 2.0 * e1 / math.sqrt(n)
    else:
        assert en < 1.5 * e1 / math.sqrt(n)
