"""Training with a plan at 1.5 bits on average learns like fp32 (the setup of tests/test_convergence.py).

The plan gets half-way between what uniform 1-bit and uniform 2-bit hold, and is calibrated once,
on one batch, before training; its widths then stay fixed (no host syncs in training steps).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import actfx
from actfx.accounting import count_saved
from test_convergence import BATCH, MAX_2BIT_OVER_FP32, SEEDS, _teacher_data, train_curve


def _held(model, x) -> int:
    with count_saved(model) as saved:
        out = model(x)
    del out
    return saved.activation_bytes


def _planned(model, x, y) -> nn.Module:
    one, two = (_held(actfx.convert(model, bits=b), x) for b in (1, 2))
    plan = actfx.plan(model, x, activation_budget=(one + two) // 2, loss_fn=lambda out: F.cross_entropy(out, y))
    assert plan.average_bits <= 1.5, plan.average_bits
    return actfx.convert(model, plan=plan)


def _loss_curve(planned: bool, seed: int, data) -> torch.Tensor:
    """Mean training loss per window of WINDOW steps (tests/test_convergence.py's training)."""
    return train_curve(seed, data, lambda model, x, y: _planned(model, x[:BATCH], y[:BATCH]) if planned else model)


@pytest.fixture(scope="module")
def curves() -> dict:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        data = _teacher_data()
        return {p: torch.stack([_loss_curve(p, s, data) for s in SEEDS]).mean(0) for p in (False, True)}
    finally:
        torch.set_num_threads(threads)


def test_a_plan_at_one_and_a_half_bits_follows_fp32(curves):
    ratio = curves[True][1:] / curves[False][1:]
    print("plan / fp32 per window:", [round(float(r), 3) for r in ratio])
    # The bound tests/test_convergence.py holds uniform 2-bit to (its comment gives the spread).
    assert float(ratio.max()) < MAX_2BIT_OVER_FP32, ratio
