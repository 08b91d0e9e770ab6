"""Assertions several test files share."""

from __future__ import annotations

import torch

from actfx.accounting import count_saved


def assert_same_forward_and_fewer_bytes(model, converted, x, factor):
    """Same output (same dropout draws) and at least ``factor`` times fewer bytes kept for
    backward; then the converted model's backward runs."""
    torch.manual_seed(1)
    expected = model(x)
    torch.manual_seed(1)
    with count_saved(converted) as packed:
        got = converted(x)
    assert torch.equal(got, expected)
    with count_saved(model) as baseline:
        kept = model(x)  # noqa: F841 - what a live output's graph holds is what counts
    assert packed.activation_bytes < baseline.activation_bytes / factor, (
        baseline.activation_bytes, packed.activation_bytes)
    got.sum().backward()
