"""Training with compressed activations still learns: 2-bit follows fp32, 1-bit visibly does not.

A 3-layer MLP learns a fixed random teacher (8 classes) by SGD, once as is and once converted at
2 and at 1 bit, with the same initialisation and the same batches, so the runs differ only in
the noise of the gradients. Every Linear saves its input packed, the first one the raw data.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import actfx

DIM, CLASSES, WIDTH = 32, 8, 128
STEPS, WINDOW, BATCH, LR = 300, 50, 64, 0.05
SEEDS = (0, 1)

# Tolerances, from 6 seeds of exactly this setup (window = mean training loss over 50 steps):
# * 2-bit / fp32 per window (after the first): mean 1.049, worst single seed 1.074; averaged over a
#   pair of seeds as below, worst 1.066 (three pairs). 2-bit is consistently a few percent slower
#   to train, the cost of its extra gradient variance at this learning rate; fp32's own final
#   window varies 0.646-0.696 (7%) from seed to seed. 1.12 leaves room for that spread and for
#   float differences between platforms, and is still far below what a broken backward gives.
# * 1-bit / 2-bit on the final window: 1.32-1.46 for single seeds, >= 1.36 for pairs. Requiring
#   1.15 makes a test that fails if the width were ignored or 1-bit were as good as 2-bit.
MAX_2BIT_OVER_FP32 = 1.12
MIN_1BIT_OVER_2BIT = 1.15


def _teacher_data(n: int = 8192) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, DIM, generator=g)
    w1 = torch.randn(DIM, 64, generator=g) * (1.5 / DIM**0.5)
    w2 = torch.randn(64, CLASSES, generator=g) * (1.5 / 8)
    return x, (torch.tanh(x @ w1) @ w2).argmax(1)


def train_curve(seed: int, data, prepare) -> torch.Tensor:
    """Mean training loss per window of WINDOW steps of the MLP made with ``seed``, trained
    through ``prepare(model, x, y)`` (the model itself, or a converted one sharing its weights)."""
    x, y = data
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(DIM, WIDTH), nn.ReLU(), nn.Linear(WIDTH, WIDTH), nn.ReLU(),
                          nn.Linear(WIDTH, CLASSES))
    run = prepare(model, x, y)
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9)
    order = torch.Generator().manual_seed(seed)
    losses = []
    for _ in range(STEPS):
        idx = torch.randint(len(x), (BATCH,), generator=order)
        loss = F.cross_entropy(run(x[idx]), y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.detach())
    return torch.stack(losses).view(-1, WINDOW).mean(1)


def _loss_curve(bits: int | None, seed: int, data) -> torch.Tensor:
    return train_curve(seed, data, lambda model, x, y: model if bits is None else actfx.convert(model, bits=bits))


@pytest.fixture(scope="module")
def curves() -> dict:
    # One thread: these matrices are too small to split, and idle threads spinning on a busy
    # 2-core machine made the file 5x slower.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        data = _teacher_data()
        return {bits: torch.stack([_loss_curve(bits, s, data) for s in SEEDS]).mean(0) for bits in (None, 2, 1)}
    finally:
        torch.set_num_threads(threads)


def test_fp32_learns(curves):
    # Sanity for the setup itself: chance is log(8) = 2.08; fp32 ends near 0.67.
    assert curves[None][-1] < 0.8, curves[None]


def test_2bit_follows_fp32(curves):
    ratio = curves[2][1:] / curves[None][1:]
    assert ratio.max() <= MAX_2BIT_OVER_FP32, f"2-bit/fp32 loss per window: {ratio.tolist()}"


def test_1bit_measurably_worse_than_2bit(curves):
    ratio = float(curves[1][-1] / curves[2][-1])
    assert ratio >= MIN_1BIT_OVER_2BIT, f"final loss 1-bit {curves[1][-1]:.3f} vs 2-bit {curves[2][-1]:.3f}"
