"""actfx/report.py and actfx/units.py: the stated memory model and the byte quantities it reads."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn

from actfx.passes.analyze import Measurement, NodeSaved, SavedTensor
from actfx.report import FRAGMENTATION, GPUS, MARGIN_BYTES, StaticCosts, estimate, gpu_capacity, static_costs
from actfx.units import format_bytes, parse_bytes

MiB, GiB = 2**20, 2**30


def measurement(activation: int, output: int, largest: int) -> Measurement:
    node = NodeSaved("op", "", "call_function", "op", None, [SavedTensor((1,), None, activation, False)],
                     output_bytes=largest)
    return Measurement([node], output)


def test_peak_is_fixed_costs_plus_batch_sized_memory():
    costs = StaticCosts(param_bytes=100 * MiB, grad_bytes=100 * MiB, optimizer_bytes=200 * MiB, buffer_bytes=0)
    got = estimate(measurement(800 * MiB, 1 * MiB, 50 * MiB), costs, batch=8, capacity=None, which="baseline")
    per_batch = 800 * MiB + 2 * 1 * MiB + 2 * 50 * MiB
    assert got.peak_bytes == 400 * MiB + MARGIN_BYTES + math.ceil(FRAGMENTATION * per_batch)
    assert got.max_batch is None
    ours = estimate(measurement(800 * MiB, 1 * MiB, 50 * MiB), costs, batch=8, capacity=None, which="actfx")
    assert ours.workspace_bytes == 3 * 50 * MiB  # backward also unpacks the op's input


@pytest.mark.parametrize("capacity", [4 * GiB, 15 * GiB, 80 * GiB])
def test_the_largest_batch_is_the_last_one_that_fits(capacity):
    costs = StaticCosts(param_bytes=300 * MiB, grad_bytes=300 * MiB, optimizer_bytes=600 * MiB, buffer_bytes=MiB)
    batch = 16
    measured = measurement(1200 * MiB, 2 * MiB, 90 * MiB)
    best = estimate(measured, costs, batch, capacity, "baseline").max_batch
    per_sample = FRAGMENTATION * (1200 * MiB + 4 * MiB + 180 * MiB) / batch
    assert costs.total + best * per_sample <= capacity < costs.total + (best + 1) * per_sample


def test_nothing_fits_when_the_fixed_costs_do_not():
    costs = StaticCosts(param_bytes=10 * GiB, grad_bytes=10 * GiB, optimizer_bytes=20 * GiB, buffer_bytes=0)
    assert estimate(measurement(MiB, 0, MiB), costs, 1, 16 * GiB, "actfx").max_batch == 0


def test_static_costs_follow_the_optimizer_and_dtype():
    model = nn.Sequential(nn.Linear(10, 10), nn.BatchNorm1d(10))
    model[0].bias.requires_grad_(False)
    params, trainable = 130 * 4, 120 * 4
    sgd = static_costs(model, "sgd")
    assert (sgd.param_bytes, sgd.grad_bytes, sgd.optimizer_bytes) == (params, trainable, trainable)
    assert sgd.buffer_bytes == 20 * 4 + 8  # running mean and var, num_batches_tracked (int64)
    adam = static_costs(model, "adamw", dtype=torch.bfloat16)
    assert (adam.param_bytes, adam.optimizer_bytes) == (params // 2, 2 * trainable // 2)
    assert adam.buffer_bytes == 20 * 2 + 8
    with pytest.raises(ValueError, match="sgd, adam, adamw"):
        static_costs(model, "lion")


def test_gpu_capacities():
    assert gpu_capacity("T4") == GPUS["t4"] == 15 * GiB
    assert gpu_capacity(memory="24GiB") == 24 * GiB
    assert gpu_capacity() is None
    with pytest.raises(ValueError, match="t4, v100-16, a100-40, a100-80, h100, h200"):
        gpu_capacity("k80")
    with pytest.raises(ValueError, match="not both"):
        gpu_capacity("t4", "16GB")


@pytest.mark.parametrize("text, value", [
    ("16GiB", 16 * GiB), ("16 gib", 16 * GiB), ("40GB", 40 * 10**9), ("15360MiB", 15 * GiB), ("80G", 80 * GiB),
    ("1.5KiB", 1536), ("1e9", 10**9), ("512", 512),
])
def test_parse_bytes(text, value):
    assert parse_bytes(text) == value


@pytest.mark.parametrize("text", ["", "lots", "16 gigs", "GiB", "-1GB"])
def test_parse_bytes_refuses_what_it_cannot_read(text):
    with pytest.raises(ValueError, match="write it like 16GiB"):
        parse_bytes(text)


def test_format_bytes():
    assert [format_bytes(n) for n in (0, 1023, 1536, 196 * MiB, int(42.3 * GiB), None)] == [
        "0 B", "1023 B", "1.50 KiB", "196 MiB", "42.3 GiB", "?"]
    assert format_bytes(1048000) == "1.00 MiB"  # was "1.02e+03 KiB"
