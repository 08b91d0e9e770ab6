"""DDP and FSDP2 around converted and compiled models (one CPU process, gloo): they train and pack."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn

import actfx
from actfx.compiled import compiled_record


@pytest.fixture
def process_group(tmp_path):
    if not dist.is_available():
        pytest.skip("torch.distributed is not available in this build")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 256), nn.GELU(), nn.LayerNorm(256), nn.Linear(256, 8))


def _step(model, x):
    out = model(x)
    out.square().mean().backward()
    return out


def test_ddp_around_a_converted_model_trains_like_the_original(process_group):
    model, x = _mlp(), torch.randn(32, 64)
    ddp = nn.parallel.DistributedDataParallel(actfx.convert(model, bits=8))
    got = _step(ddp, x)
    approx = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    expected = _step(model, x)
    assert torch.equal(got, expected)
    error = max(((a - p.grad).norm() / p.grad.norm()).item() for a, p in zip(approx, model.parameters()))
    assert error < 0.03


def test_ddp_and_fsdp2_around_a_compiled_model_pack_what_is_saved(process_group):
    from torch.distributed.fsdp import fully_shard

    model, x = _mlp(), torch.randn(32, 64)
    compiled = actfx.compile(model, bits=2)
    _step(nn.parallel.DistributedDataParallel(compiled), x)
    plans = compiled_record(compiled).plans
    assert plans and sum(p.bytes_after for p in plans) * 4 < sum(p.bytes_before for p in plans)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())

    sharded = actfx.compile(_mlp(), bits=2)
    fully_shard(sharded)
    _step(sharded, x)
    plans = compiled_record(sharded).plans
    assert plans and sum(p.bytes_after for p in plans) < sum(p.bytes_before for p in plans)
