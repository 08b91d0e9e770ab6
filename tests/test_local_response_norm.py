"""nn.LocalResponseNorm / F.local_response_norm traced through (``passes/traced_through.py``).

fx recorded F.local_response_norm as one opaque call, and nn.LocalResponseNorm was a leaf: it
kept its input and four same-sized intermediates exact (a conv -> ReLU -> LRN -> conv model held
1.3x less than PyTorch in all, the LRN 0.8x: more than before, next to packs of its input).
Written out as PyTorch's own ops, the same values bit for bit at every rank, its square and
power are packed: 4.4x in all.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import actfx
from actfx.passes.traced_through import local_response_norm
from checks import assert_mean_converges, assert_same_forward_and_fewer_bytes, parameter_grads


class _LRN(nn.Module):
    def __init__(self):
        super().__init__()
        self.c, self.n, self.c2 = nn.Conv2d(3, 16, 3), nn.LocalResponseNorm(5, alpha=1e-2, k=1.0), nn.Conv2d(16, 8, 3)

    def forward(self, x):
        return self.c2(self.n(torch.relu(self.c(x))))


@pytest.mark.parametrize("shape", [(2, 7, 9), (2, 16, 5, 6), (3, 5, 4, 3, 2)])
@pytest.mark.parametrize("size", [1, 2, 5])
def test_the_written_out_lrn_is_pytorch_s_bit_for_bit(shape, size):
    x = torch.randn(shape)
    assert torch.equal(local_response_norm(x, size, 1e-3, 0.75, 2.0), F.local_response_norm(x, size, 1e-3, 0.75, 2.0))


def test_local_response_norm_is_packed_and_stays_unbiased():
    torch.manual_seed(0)
    model, x = _LRN(), torch.randn(8, 3, 16, 16)
    converted = actfx.convert(model, bits=2)
    inside = {d.kind for d in converted._actfx_record.decisions if d.module_path == "n"}
    assert {"pointwise", "avg_pool", "div"} <= inside, converted._actfx_record.decisions
    assert_same_forward_and_fewer_bytes(model, converted, x, factor=3)
    exact = parameter_grads(model, x)
    assert_mean_converges([parameter_grads(converted, x) for _ in range(32)], exact, least_noise=1e-3)
