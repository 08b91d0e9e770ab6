"""A forward with its own ``torch.autocast`` block (fp32 attention inside a bf16 model, as
EfficientViT and RoPE code write it).

Two faults, both fixed: fx traced ``autocast(enabled=False)`` as if it were not there when
autocast was off at trace time (it changed no setting), so under the caller's bf16 autocast the
converted model ran the block in bf16 (0.004 off the original); and torch.export's capture
(``wrap_with_autocast``, one call around a subgraph) was never looked into, so the block's ops
kept their inputs exact next to packs of them. Now the block makes fx refuse, the export
capture's block is inlined between autocast enter and exit calls, and its ops are packed.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn as nn

import actfx
from checks import assert_mean_converges, assert_same_forward_and_fewer_bytes, parameter_grads


class _Fp32Attention(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(64, 64), nn.Linear(64, 64)

    def forward(self, x):
        h = torch.relu(self.a(x))
        with torch.autocast("cpu", enabled=False):
            h = h.float()
            scores = (h @ h.transpose(-1, -2)).softmax(-1)
            h = scores @ h
        return self.b(h)


def test_an_autocast_block_is_kept_and_its_ops_are_packed():
    torch.manual_seed(0)
    model, x = _Fp32Attention(), torch.randn(4, 32, 64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # fx refuses the block: captured by torch.export at the first call
        converted = actfx.convert(model, bits=2)
        assert torch.equal(converted(x), model(x))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected, got = model(x), converted(x)
    assert got.dtype == torch.bfloat16 and torch.equal(got, expected)
    kinds = [d.kind for d in converted._actfx_record.decisions]
    assert "softmax" in kinds and kinds.count("matmul") == 2, kinds
    assert_same_forward_and_fewer_bytes(model, converted, x, factor=4)
    exact = parameter_grads(model, x)
    assert_mean_converges([parameter_grads(converted, x) for _ in range(32)], exact, least_noise=1e-3)
