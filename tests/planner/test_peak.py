"""actfx/planner/peak.py: the largest batch that fits a GPU, from fake-tensor steps."""

from __future__ import annotations

import math

import pytest
import torch

from actfx.planner import peak

MiB = 1 << 20


def _fit(monkeypatch, step_of_batch, capacity):
    """largest_batch with the fake step replaced by ``step_of_batch(b)``; the batches it measured."""
    model = torch.nn.Linear(64, 64)
    measured = []

    def fake_step(converted, inputs, dtype=None):
        measured.append(inputs[0].shape[0])
        return step_of_batch(inputs[0].shape[0])

    monkeypatch.setattr(peak, "step_bytes", fake_step)
    batch, step = peak.largest_batch(model, model, (torch.zeros(8, 64),), capacity, optimizer="sgd")
    fixed = peak.peak_model(model, 0, 0, optimizer="sgd", gpu=True).fixed_bytes
    return batch, step, measured, lambda b: fixed + math.ceil(peak.FRAGMENTATION * step_of_batch(b))


def test_a_step_proportional_to_the_batch_takes_two_fake_steps(monkeypatch):
    capacity = 4 << 30
    batch, step, measured, needed = _fit(monkeypatch, lambda b: b * 10 * MiB, capacity)
    assert measured == [8, batch]  # the base batch, then the answer: no shrinking
    assert needed(batch) <= capacity < needed(batch + 1)
    assert step == batch * 10 * MiB


def test_a_constant_part_is_found_by_the_line_through_two_steps(monkeypatch):
    # 2 GiB that do not grow with the batch (gradients alive at the worst moment): the
    # proportional bound is far too low; the line through the two measured steps is exact
    capacity = 6 << 30
    batch, _, measured, needed = _fit(monkeypatch, lambda b: (2 << 30) + b * 10 * MiB, capacity)
    assert len(measured) == 3 and measured[1] < batch == measured[2]
    assert needed(batch) <= capacity < needed(batch + 1)


def test_a_step_that_grows_faster_than_the_batch_is_shrunk_to_fit(monkeypatch):
    capacity = 4 << 30
    batch, step, measured, needed = _fit(monkeypatch, lambda b: b * 10 * MiB + b * b * 64 * 1024, capacity)
    assert needed(batch) <= capacity
    assert needed(math.ceil(batch * 1.02)) > capacity  # within 2% of the largest that fits
    assert step is not None


def test_no_room_for_a_batch_of_one_says_so(monkeypatch):
    from actfx.planner.choose import BudgetError

    with pytest.raises(BudgetError, match="not even a batch of 1 fits"):
        _fit(monkeypatch, lambda b: b * 10 * MiB, 1 << 30)  # the 1 GiB margin alone fills it
