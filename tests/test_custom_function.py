"""A custom autograd.Function of one tensor whose backward proves element-wise keeps its packed
derivative instead of its input (BLOOM's GeLUFunction, timm's and EfficientNet-PyTorch's
memory-efficient Swish); one that mixes values runs as written."""

from __future__ import annotations

import io

import pytest
import torch
import torch.nn as nn
from rich.console import Console

import actfx
from actfx.accounting import count_saved
from actfx.config import KEEP_EXACT, Config
from checks import assert_mean_converges, weighted_grads


class GeLUFunction(torch.autograd.Function):
    """As transformers' BLOOM: forward saves the input, backward evaluates GELU's derivative."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x * 0.5 * (1.0 + torch.tanh(0.79788456 * x * (1 + 0.044715 * x * x)))

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        t = torch.tanh(0.79788456 * x * (1 + 0.044715 * x * x))
        return g * (0.5 * x * ((1 - t * t) * (0.79788456 + 0.1070322243 * x * x)) + 0.5 * (1 + t))


class DropFunction(torch.autograd.Function):
    """A dropout written by hand: random in forward, element-wise in backward."""

    @staticmethod
    def forward(ctx, x, p):
        mask = (torch.rand_like(x) > p).to(x.dtype) / (1 - p)
        ctx.save_for_backward(mask)
        return x * mask

    @staticmethod
    def backward(ctx, g):
        (mask,) = ctx.saved_tensors
        return g * mask, None


class CumsumFunction(torch.autograd.Function):
    """Same shape in and out, but it mixes values: its backward is no ``g * f'(x)``."""

    @staticmethod
    def forward(ctx, x):
        return x.cumsum(-1)

    @staticmethod
    def backward(ctx, g):
        return g.flip(-1).cumsum(-1).flip(-1)


class InPlace(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        ctx.mark_dirty(x)
        return x.mul_(2)

    @staticmethod
    def backward(ctx, g):
        return g * 2


class TwoOutputs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x.sin(), x.cos()

    @staticmethod
    def backward(ctx, g1, g2):
        (x,) = ctx.saved_tensors
        return g1 * x.cos() - g2 * x.sin()


class SetupContext(torch.autograd.Function):
    @staticmethod
    def forward(x):
        return x.tanh()

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(output)

    @staticmethod
    def backward(ctx, g):
        (y,) = ctx.saved_tensors
        return g * (1 - y * y)


class AView(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return g


def _sum_of(pair):
    return pair[0] + pair[1]  # indexed: fx cannot iterate a traced tuple


CALLS = {"gelu": lambda h: GeLUFunction.apply(h), "dropout": lambda h: DropFunction.apply(h, 0.25),
         "cumsum": lambda h: CumsumFunction.apply(h),
         # other forms: in place (``mark_dirty``), two outputs, ``setup_context``, a view
         "in_place": lambda h: InPlace.apply(h.clone()), "two_outputs": lambda h: _sum_of(TwoOutputs.apply(h)),
         "setup_context": lambda h: SetupContext.apply(h), "a_view": lambda h: AView.apply(h)}
FORMS = ("a_view", "in_place", "setup_context", "two_outputs")


class Mlp(nn.Module):
    """up, the Function ``kind`` names (applied when called, as models do), down."""

    def __init__(self, kind):
        super().__init__()
        self.up, self.down = nn.Linear(64, 256), nn.Linear(256, 64)
        self.kind = kind

    def forward(self, x):
        return self.down(CALLS[self.kind](self.up(x)))


LINEARS_EXACT = Config(bits=2, site_bits={"0.up:linear": KEEP_EXACT, "0.down:linear": KEEP_EXACT,
                                          "1.up:linear": KEEP_EXACT, "1.down:linear": KEEP_EXACT})


def _model(name):
    torch.manual_seed(0)
    return nn.Sequential(Mlp(name), Mlp(name)).train()


def _held(model, x) -> int:
    with count_saved(model) as held:
        out = model(x)  # noqa: F841 - what a live output's graph holds is what counts
    return held.activation_bytes


def _seeded(call):
    def run(x):
        torch.manual_seed(7)
        return call(x)
    return run


@pytest.mark.parametrize("name", ["gelu", "dropout"])
def test_an_element_wise_function_keeps_its_packed_derivative(name):
    model = _model(name)
    x, r = torch.randn(32, 64), torch.randn(32, 64)
    converted = actfx.convert(model, bits=2)
    assert torch.equal(_seeded(converted)(x), _seeded(model)(x))  # the same random draws too
    assert [d.kind for d in converted._actfx_record.decisions].count("custom_function") == 2
    torch.manual_seed(7)
    assert _held(converted, x) < _held(model, x) / 8
    # the linears' inputs exact: what is left of the noise is the derivative's, unbiased
    exact = weighted_grads(model, _seeded(model), x, r)
    partly = actfx.convert(model, config=LINEARS_EXACT)
    assert_mean_converges([weighted_grads(model, _seeded(partly), x, r) for _ in range(16)], exact,
                          least_noise=1e-3)


def test_a_function_that_mixes_values_runs_as_written():
    model = _model("cumsum")
    x, r = torch.randn(32, 64), torch.randn(32, 64)
    converted = actfx.convert(model, config=LINEARS_EXACT)
    assert torch.equal(converted(x), model(x))
    # taken for element-wise, its gradient would be ``g`` times the column counts: far off
    expected = weighted_grads(model, model, x, r)
    got = weighted_grads(model, converted, x, r)
    assert (got - expected).norm() <= 1e-6 * expected.norm()


def test_show_measures_the_function_s_packed_derivative_on_fake_tensors():
    """show's measurement runs on fake tensors: no data pointers (both read 0, so the output
    looked written in place and was left with its input kept) and no values to check with."""
    model = _model("gelu")
    rows = actfx.show(actfx.convert(model, bits=2), torch.randn(32, 64), console=Console(file=io.StringIO()))
    applied = [r for r in rows if r["node"].startswith("apply_")]
    assert len(applied) == 2 and all(r["kind"] == "packed 2-bit" and r["after_bytes"] < r["before_bytes"] / 8
                                     for r in applied), applied


@pytest.mark.parametrize("form", FORMS)
def test_other_forms_of_functions_run_with_their_gradient(form):
    """In place (``mark_dirty``), several outputs, ``setup_context``, a view: the same output,
    and at 8 bits the gradient within 3% (the linears' packs)."""
    torch.manual_seed(0)
    model = Mlp(form)
    x, r = torch.randn(16, 64), torch.randn(16, 64)
    converted = actfx.convert(model, bits=8)
    assert torch.equal(converted(x), model(x))
    assert [d.kind for d in converted._actfx_record.decisions].count("custom_function") == 1  # captured by fx
    expected = weighted_grads(model, model, x, r)
    assert (weighted_grads(model, converted, x, r) - expected).norm() < 0.03 * expected.norm()
