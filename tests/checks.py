"""Assertions several test files share."""

from __future__ import annotations

import math

import torch

import actfx
from actfx.accounting import count_saved


def assert_same_forward_and_fewer_bytes(model, converted, x, factor):
    """Same output (same dropout draws) and at least ``factor`` times fewer bytes kept for
    backward; then the converted model's backward runs. ``x``: the input, or a tuple of them."""
    inputs = x if isinstance(x, tuple) else (x,)
    torch.manual_seed(1)
    expected = model(*inputs)
    torch.manual_seed(1)
    with count_saved(converted) as packed:
        got = converted(*inputs)
    assert torch.equal(got, expected)
    with count_saved(model) as baseline:
        kept = model(*inputs)  # noqa: F841 - what a live output's graph holds is what counts
    assert packed.activation_bytes < baseline.activation_bytes / factor, (
        baseline.activation_bytes, packed.activation_bytes)
    got.sum().backward()


def parameter_grads(model, x):
    """The gradient of ``model(x).square().sum()`` over every parameter, as one vector."""
    return torch.cat([g.flatten() for g in torch.autograd.grad(model(x).square().sum(), list(model.parameters()))])


def assert_converted(model, x, kinds: dict, *, exported: bool, factor: float | None = None):
    """At 8 bits: the same output, each op kind in ``kinds`` converted that many times, and a
    gradient within 3% of the exact one; with ``factor``, at 2 bits that many times fewer bytes
    kept for backward (``assert_same_forward_and_fewer_bytes``)."""
    example = (x,) if exported else None
    converted = actfx.convert(model, bits=8, example_inputs=example)
    assert torch.equal(converted(x), model(x))
    converted_kinds = [d.kind for d in converted._actfx_record.decisions]
    for kind, count in kinds.items():
        assert converted_kinds.count(kind) == count, (kind, converted_kinds)
    exact = parameter_grads(model, x)
    assert (parameter_grads(converted, x) - exact).norm() / exact.norm() < 0.03
    if factor is not None:
        assert_same_forward_and_fewer_bytes(model, actfx.convert(model, bits=2, example_inputs=example), x, factor)


def weighted_grads(model, call, x, w) -> torch.Tensor:
    """The gradient of ``(call(x) * w).sum()`` over ``model``'s parameters, as one vector
    (``call``: the model itself or a converted or compiled form of it)."""
    model.zero_grad(set_to_none=True)
    (call(x) * w).sum().backward()
    return torch.cat([p.grad.flatten() for p in model.parameters()])


def assert_mean_converges(samples: list, exact: torch.Tensor, *, least_noise: float = 0.0) -> None:
    """The mean of the ``samples`` (noisy gradients) approaches ``exact`` as 1/sqrt(k), within
    1.5x: unbiased noise averages out; ``least_noise``: one sample's error must exceed that share
    of ``exact``'s norm (there is noise to average)."""
    k = len(samples)
    one = sum((g - exact).norm() for g in samples) / k
    mean = (sum(samples) / k - exact).norm()
    assert one > least_noise * exact.norm(), (float(one), float(exact.norm()))
    assert mean < 1.5 * one / math.sqrt(k), (float(mean), float(one))


def assert_unbiased(model, x, k: int = 32):
    """At 2 bits one step's gradient is noisy, and the mean of ``k`` steps approaches the exact
    one as 1/sqrt(k) (within 1.5x): the rounding noise averages out."""
    exact = parameter_grads(model, x)
    converted = actfx.convert(model, bits=2)
    assert_mean_converges([parameter_grads(converted, x) for _ in range(k)], exact, least_noise=1e-3)


def input_grad_mean_errors(model, converted, x, r, ks: tuple) -> dict:
    """For each k in ``ks``: the error of the mean of the first k input gradients of
    ``(converted(x) * r).sum()`` against ``model``'s, relative to its norm (falls as 1/sqrt(k)
    when unbiased)."""
    def grad_x(m):
        xi = x.clone().requires_grad_(True)
        return torch.autograd.grad((m(xi) * r).sum(), xi)[0]

    exact, total, errors = grad_x(model), torch.zeros_like(x), {}
    for k in range(1, max(ks) + 1):
        total += grad_x(converted)
        if k in ks:
            errors[k] = float((total / k - exact).norm() / exact.norm())
    return errors


class Doubled(torch.autograd.Function):
    """A custom autograd.Function: torch.export refuses to capture a forward that calls one."""

    @staticmethod
    def forward(ctx, x):
        return x * 2

    @staticmethod
    def backward(ctx, g):
        return g * 2
