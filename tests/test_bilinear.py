"""nn.Bilinear / F.bilinear: both inputs packed, unbiased.

Before, nn.Bilinear was a leaf module with no variant: it kept its two inputs exact next to the
packs the layers around it made of the same values, and the converted model held 5% more than
PyTorch (10.5 against 10.0 KiB). Traced into, ``torch.bilinear`` is recomputed in backward from
its packed inputs: each gradient is linear in each input (the weight's, ``g x1 x2^T``, in both,
from independent packs), so the mean of K gradients converges to the exact one.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import actfx
from checks import assert_mean_converges, assert_same_forward_and_fewer_bytes, parameter_grads


class _Bilinear(nn.Module):
    def __init__(self, same: bool):
        super().__init__()
        self.a, self.bl, self.same = nn.Linear(64, 64), nn.Bilinear(64, 64, 32), same

    def forward(self, x):
        h = torch.tanh(self.a(x))
        return self.bl(h, h if self.same else x)


@pytest.mark.parametrize("same", [False, True])
def test_bilinear_packs_both_inputs_and_stays_unbiased(same):
    torch.manual_seed(0)
    model, x = _Bilinear(same), torch.randn(256, 64)
    converted = actfx.convert(model, bits=2)
    decisions = [d for d in converted._actfx_record.decisions if d.kind == "bilinear"]
    assert len(decisions) == 1 and decisions[0].module_path == "bl", converted._actfx_record.decisions
    assert_same_forward_and_fewer_bytes(model, converted, x, factor=3)
    exact = parameter_grads(model, x)
    assert_mean_converges([parameter_grads(converted, x) for _ in range(32)], exact, least_noise=1e-3)
