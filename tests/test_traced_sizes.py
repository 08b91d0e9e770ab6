"""A forward that sizes a fresh tensor from its input (``torch.zeros(x.shape[0], 16)``, a recurrent
or spiking net's initial state) is traced whole by fx (passes/traced_sizes.py)."""

from __future__ import annotations

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
