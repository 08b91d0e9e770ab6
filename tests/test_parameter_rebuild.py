"""A weight computed from parameters alone (weight standardisation, weight norm, a LoRA's merged
weight) is made again in backward, not kept; spectral norm's, a DropConnect mask's and a weight
read from a buffer the forward updates are kept (remade, they would differ)."""

from __future__ import annotations

import copy
import io
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from rich.console import Console

import actfx
from actfx.accounting import count_saved
from actfx.config import KEEP_EXACT, Config
from checks import assert_mean_converges, weighted_grads


class StdConv(nn.Conv2d):
    """timm's ScaledStdConv2d, reduced: the weight standardised by a batch_norm every step."""

    def forward(self, x):
        w = F.batch_norm(self.weight.reshape(1, self.out_channels, -1), None, None, training=True, momentum=0.0,
                         eps=1e-6).reshape_as(self.weight)
        return F.conv2d(x, w, self.bias, self.stride, self.padding)


class LoRALinear(nn.Linear):
    def __init__(self, i, o, r=4):
        super().__init__(i, o)
        self.A = nn.Parameter(torch.randn(r, i) * 0.1)
        self.B = nn.Parameter(torch.randn(o, r) * 0.1)

    def forward(self, x):
        return F.linear(x, self.weight + self.B @ self.A, self.bias)


class Net(nn.Module):
    def __init__(self, norm=nn.utils.parametrizations.weight_norm):
        super().__init__()
        self.c1 = StdConv(3, 48, 3, padding=1)  # 1296 values: a weight below min_numel is kept
        self.c2 = StdConv(48, 32, 3, padding=1)
        self.c3 = norm(nn.Conv2d(32, 32, 3, padding=1))
        self.fc = LoRALinear(32, 64)
        self.head = nn.Linear(64, 10)

    def forward(self, x):
        h = F.relu(self.c1(x))
        h = F.relu(self.c2(h))
        h = F.gelu(self.c3(h))
        return self.head(F.gelu(self.fc(h.mean((2, 3)))))


def _inputs_exact(*sites: str) -> Config:
    """Every activation of these ``module.path:kind`` sites kept as it is: only the weights change."""
    return Config(bits=2, site_bits=dict.fromkeys(sites, KEEP_EXACT))


EXACT_NET = _inputs_exact("c1:conv", "c2:conv", "c3:conv", "fc:linear", "head:linear", ":gelu", ":gelu#2")


def _relative_error(got, expected) -> float:
    return float((got - expected).norm() / expected.norm())


def _saved_as(converted) -> list:
    return [text for d in converted._actfx_record.decisions for text in d.saved]


def _made_again(converted) -> list:
    """The unit keys of the ops whose weight is made again in backward."""
    return sorted(d.key for d in converted._actfx_record.decisions if "made again from parameters" in d.saved)


def _held(model, x) -> int:
    with count_saved(model) as held:
        out = model(x)  # noqa: F841 - what a live output's graph holds is what counts
    return held.activation_bytes


def _converted(model_class):
    """(model, input, output weights, its 2-bit conversion), the forward checked equal."""
    torch.manual_seed(0)
    model = model_class()
    x, r = torch.randn(2, 3, 8, 8), torch.randn(2, 10)
    converted = actfx.convert(model, bits=2)
    assert torch.equal(converted(x), model(x))
    return model, x, r, converted


def test_weights_computed_from_parameters_are_made_again_not_kept():
    model, x, r, converted = _converted(Net)
    assert _saved_as(converted).count("made again from parameters") == 4  # c1, c2, c3 (weight norm), fc
    # the weights (27 KiB of them) dominated what the converted model held at this size
    assert _held(converted, x) < _held(model, x) / 8
    # the input of every layer exact, the weights made again: PyTorch's gradient up to the
    # variants' own backward formulas' rounding (1.2e-7 relative, the same with the weights kept)
    exact_inputs = actfx.convert(model, config=EXACT_NET)
    assert _saved_as(exact_inputs).count("made again from parameters") == 4
    expected = weighted_grads(model, model, x, r)
    assert _relative_error(weighted_grads(model, exact_inputs, x, r), expected) < 1e-6
    assert_mean_converges([weighted_grads(model, converted, x, r) for _ in range(16)], expected, least_noise=1e-3)


def test_show_lists_a_weight_s_computation_apart_from_ops_not_covered():
    torch.manual_seed(0)
    model = Net()
    converted = actfx.convert(model, bits=2)
    rows = {r["node"]: r for r in actfx.show(converted, torch.randn(2, 3, 8, 8), console=Console(file=io.StringIO()))}
    # the batch_norms standardising c1's and c2's weights, c3's weight norm
    assert [n for n, r in rows.items() if r["kind"] == "parameter computation"] == [
        "batch_norm", "batch_norm_1", "c3_parametrizations_weight"]
    assert not [n for n, r in rows.items() if r["kind"] == "not covered"]
    assert rows["conv2d_1"]["kind"] == "packed 2-bit, made again from parameters"


def test_autocast_weights_are_made_again_in_the_forward_s_precision():
    torch.manual_seed(0)
    model = Net()
    x, r = torch.randn(2, 3, 8, 8), torch.randn(2, 10)
    exact_inputs = actfx.convert(model, config=EXACT_NET)

    def under_autocast(call):
        def run(inputs):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return call(inputs).float()
        return run

    # 1.1e-9 relative; made again in float32 instead of the forward's bfloat16: 2.7e-3
    expected = weighted_grads(model, under_autocast(model), x, r)
    assert _relative_error(weighted_grads(model, under_autocast(exact_inputs), x, r), expected) < 1e-6


class Impure(nn.Module):
    """Weights that differ when computed again: spectral norm's power iteration updates its
    vectors, DropConnect draws a mask, and one weight reads a buffer the forward updates."""

    def __init__(self, writes_buffer: bool):
        super().__init__()
        self.writes_buffer = writes_buffer  # then fx refuses the model and torch.export captures it
        self.sn = nn.utils.parametrizations.spectral_norm(nn.Conv2d(3, 48, 3, padding=1))  # 1296 weights
        self.drop = nn.Linear(48, 64)
        self.scaled = nn.Linear(64, 32)
        self.register_buffer("shift", torch.zeros(32, 64))

    def forward(self, x):
        h = F.relu(self.sn(x)).mean((2, 3))
        h = F.gelu(F.linear(h, F.dropout(self.drop.weight, 0.2, self.training), self.drop.bias))
        out = F.linear(h, self.scaled.weight + self.shift, self.scaled.bias)  # add keeps nothing of shift
        if self.writes_buffer:
            self.shift.add_(0.5)
        return out


@pytest.mark.parametrize("writes_buffer", [False, True])
def test_weights_that_would_differ_when_made_again_are_kept(writes_buffer):
    torch.manual_seed(0)
    model = Impure(writes_buffer)
    x, r = torch.randn(4, 3, 8, 8), torch.randn(4, 32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "does not trace as a whole" where the buffer is written
        converted = actfx.convert(model, config=_inputs_exact("sn:conv", ":linear", ":linear#2", ":gelu"))
        converted(x)
    # kept: spectral norm's and DropConnect's; ``weight + shift`` is made again unless shift is written
    assert _made_again(converted) == ([] if writes_buffer else [":linear#2"])  # functional: the root's second linear
    state = {k: v.clone() for k, v in model.state_dict().items()}
    torch.manual_seed(3)
    expected = weighted_grads(model, model, x, r)
    model.load_state_dict(state)
    torch.manual_seed(3)
    assert _relative_error(weighted_grads(model, converted, x, r), expected) < 1e-6


def test_a_copy_of_the_model_makes_its_weights_again_from_its_own_parameters():
    torch.manual_seed(0)
    model = Net()
    x, r = torch.randn(2, 3, 8, 8), torch.randn(2, 10)
    converted = actfx.convert(model, config=EXACT_NET)
    converted(x)
    copied = copy.deepcopy(converted)
    with torch.no_grad():
        for p in copied.parameters():
            p.mul_(1.5)
    reference = Net()
    reference.load_state_dict(copied.state_dict())
    expected = weighted_grads(reference, reference, x, r)
    # a rebuild holding the original's weight norm module read its parameters: 8.8% off
    assert _relative_error(weighted_grads(copied, copied, x, r), expected) < 1e-6


class HandWrittenStdConv(nn.Conv2d):
    """BiT's original StdConv2d (mmcv's ConvWS2d is alike): its division keeps ``w - m``."""

    def forward(self, x):
        v, m = torch.var_mean(self.weight, dim=[1, 2, 3], keepdim=True, unbiased=False)
        w = (self.weight - m) / torch.sqrt(v + 1e-10)
        return F.conv2d(x, w, self.bias, self.stride, self.padding)


class HandWrittenNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = HandWrittenStdConv(3, 48, 3, padding=1)
        self.c2 = HandWrittenStdConv(48, 64, 3, padding=1)
        self.head = nn.Linear(64, 10)

    def forward(self, x):
        return self.head(F.relu(self.c2(F.relu(self.c1(x)))).mean((2, 3)))


def test_a_standardisation_whose_ops_keep_the_weight_runs_as_a_checkpoint():
    model, x, r, converted = _converted(HandWrittenNet)
    assert _made_again(converted) == ["c1:conv", "c2:conv"]
    # 291 KB -> 5.5 KB (122 KB with the division's ``w - m`` kept: the weights made again alone)
    assert _held(converted, x) < _held(model, x) / 20
    exact_inputs = actfx.convert(model, config=_inputs_exact("c1:conv", "c2:conv", "head:linear"))
    expected = weighted_grads(model, model, x, r)
    assert _relative_error(weighted_grads(model, exact_inputs, x, r), expected) < 1e-6
    assert_mean_converges([weighted_grads(model, converted, x, r) for _ in range(16)], expected, least_noise=1e-3)


@pytest.mark.slow
def test_compiling_the_converted_model_does_not_break_on_its_computed_weights():
    """A computed weight reaches its variant once (its run's slot is None): passed twice, as the
    weight and as its run's head, it broke torch.compile's graph at every such layer."""
    torch.manual_seed(0)
    model = Net()
    x, r = torch.randn(2, 3, 8, 8), torch.randn(2, 10)
    torch._dynamo.utils.counters.clear()
    compiled = torch.compile(actfx.convert(model, bits=8))
    expected = weighted_grads(model, model, x, r)
    assert _relative_error(weighted_grads(model, compiled, x, r), expected) < 0.03
    breaks = [reason for reason in torch._dynamo.utils.counters["graph_break"] if "duplicate tensor input" in reason]
    assert not breaks, breaks
