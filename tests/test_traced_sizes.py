"""A forward that sizes a fresh tensor from its input (``torch.zeros(x.shape[0], 16)``, a recurrent
or spiking net's initial state) is traced whole by fx (passes/traced_sizes.py)."""

from __future__ import annotations

import warnings

import torch
import torch.nn as nn

import actfx


class _Surrogate(torch.autograd.Function):
    """A spike with a surrogate gradient: torch.export refuses the Function, fx calls it."""

    @staticmethod
    def forward(ctx, v):
        ctx.save_for_backward(v)
        return (v > 0).float()

    @staticmethod
    def backward(ctx, grad):
        (v,) = ctx.saved_tensors
        return grad / (1 + v.abs()) ** 2


class Spiking(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(64, 256), nn.Linear(256, 10)

    def forward(self, x):
        membrane = torch.zeros(x.shape[0], 256)
        out = torch.full((x.shape[0], 10), 0.0)
        for step in range(4):
            membrane = 0.9 * membrane + torch.tanh(self.fc1(x[:, step]))
            spikes = _Surrogate.apply(membrane - 1.0)
            membrane = membrane * (1 - spikes)
            out = out + self.fc2(spikes) + torch.ones(x.size(0), 1)
        return out


def test_a_state_sized_from_the_input_traces_whole():
    torch.manual_seed(0)
    model, x = Spiking(), torch.randn(8, 4, 64)
    converted = actfx.convert(model, bits=8)
    assert list(converted._actfx_record.graphs) == [""]  # the root, not its linear layers one by one
    assert torch.equal(converted(x), model(x))
    other = torch.randn(5, 4, 64)  # the traced size is read at each call
    assert torch.equal(converted(other), model(other))
    assert torch.zeros is torch._C._VariableFunctions.zeros  # put back after the trace


def test_its_gradients_are_close_at_8_bits():
    torch.manual_seed(0)
    model, x = Spiking(), torch.randn(8, 4, 64)
    r = torch.randn(8, 10)

    def grads(call):
        model.zero_grad(set_to_none=True)
        (call(x) * r).sum().backward()
        return torch.cat([p.grad.flatten() for p in model.parameters()])

    exact = grads(model)
    assert (grads(actfx.convert(model, bits=8)) - exact).norm() / exact.norm() < 0.03


class NoisyInput(nn.Module):
    """Noise sized from the input, sizes given one by one (``torch.randn(B, 1, H, W)``)."""

    def __init__(self, seeded: bool = False):
        super().__init__()
        self.conv, self.seeded = nn.Conv2d(4, 4, 3, padding=1), seeded

    def forward(self, x):
        b, _, h, w = x.shape
        if self.seeded:  # the same noise at every call, from a generator made in forward
            noise = torch.randn(b, 1, h, w, generator=torch.Generator().manual_seed(3))
        else:
            noise = torch.randn(b, 1, h, w) + torch.rand(b, 1, h, w)
        return self.conv(torch.relu(x + noise))


def test_noise_sized_from_the_input_traces_whole_when_converted():
    model, x = NoisyInput(), torch.randn(2, 4, 8, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback to pieces or to torch.export
        converted = actfx.convert(model, bits=2)
    assert list(converted._actfx_record.graphs) == [""]
    torch.manual_seed(1)
    expected = model(x)
    torch.manual_seed(1)
    assert torch.equal(converted(x), expected)
    assert torch.randn is torch._C._VariableFunctions.randn


def test_a_generator_made_in_forward_is_not_frozen_into_the_trace():
    model, x = NoisyInput(seeded=True), torch.randn(2, 4, 8, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # it is converted in pieces, and says so
        converted = actfx.convert(model, bits=2)
        first, second = converted(x), converted(x)
    assert torch.equal(first, model(x)) and torch.equal(second, model(x))  # a fresh generator each call
