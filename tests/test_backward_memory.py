"""actfx's backward keeps its transient memory near PyTorch's: a convolution reads its packed input
one slice of the batch at a time (never unpacked whole), and the rebuilt shortcut chain of a
residual stage is not held unpacked for later readers."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import actfx
import actfx.variants.conv_backward as conv_backward
import actfx.variants.saved as saved


class Stage(nn.Module):
    """A stem and ``blocks`` residual blocks (conv -> BN, + shortcut, ReLU), ResNet style: each
    block's input is rebuilt from the previous block's packed BN input, mask and shortcut."""

    def __init__(self, blocks=3, width=8):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU())
        self.convs = nn.ModuleList(nn.Conv2d(width, width, 3, padding=1, bias=False) for _ in range(blocks))
        self.norms = nn.ModuleList(nn.BatchNorm2d(width) for _ in range(blocks))
        self.head = nn.Conv2d(width, 4, 1)

    def forward(self, x):
        x = self.stem(x)
        for conv, norm in zip(self.convs, self.norms):
            x = F.relu(norm(conv(x)) + x)
        return self.head(x).mean((2, 3))


def _gradients(model, x, seed=0):
    torch.manual_seed(seed)
    model.zero_grad(set_to_none=True)
    xi = x.clone().requires_grad_(True)
    out = model(xi)
    (out * torch.linspace(-1, 1, out.numel()).reshape(out.shape)).sum().backward()
    return torch.cat([xi.grad.reshape(-1)] + [p.grad.reshape(-1) for p in model.parameters()])


def _record_unpacks(monkeypatch) -> list:
    """The shapes of the packed values backward unpacks, in order."""
    unpacked = []
    real_unpack = saved.unpack_groups
    monkeypatch.setattr(saved, "unpack_groups", lambda codes, meta, shape, *a: unpacked.append(tuple(shape))
                        or real_unpack(codes, meta, shape, *a))
    return unpacked


@pytest.mark.slow
def test_convolution_backward_unpacks_its_input_one_slice_at_a_time(monkeypatch):
    torch.manual_seed(0)
    model = Stage()
    converted = actfx.convert(model, config=actfx.Config(bits=2, stochastic=False))  # same packs every step
    x = torch.randn(8, 3, 16, 16)
    whole = _gradients(converted, x)  # 8 samples of 8 x 16 x 16 fp32: under one slice, run whole

    sample_bytes = 8 * 16 * 16 * 4
    monkeypatch.setattr(conv_backward, "SLICE_BYTES", 2 * sample_bytes)
    unpacked = _record_unpacks(monkeypatch)
    sliced = _gradients(converted, x)

    conv_inputs = [s for s in unpacked if s[1:] == (8, 16, 16)]
    assert conv_inputs, "no packed conv input was unpacked"
    # BatchNorm's backward needs its whole input; every convolution read rows of two samples.
    slices = [s for s in conv_inputs if s[0] == 2]
    assert len(slices) >= 4 * len(model.convs), unpacked
    assert all(s[0] in (2, 8) for s in conv_inputs), unpacked
    assert sliced.isfinite().all()
    torch.testing.assert_close(sliced, whole, rtol=1e-4, atol=1e-4)


def _unpacked_codes(loss) -> list:
    """The packed codes of every custom Function in the graph that hold an unpacked copy."""
    held, seen, stack = [], set(), [loss.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        try:
            tensors = node.saved_tensors
        except (AttributeError, RuntimeError):
            tensors = ()
        held += [t for t in tensors if isinstance(t, torch.Tensor) and saved._UNPACKED in t.__dict__]
        stack.extend(f for f, _ in node.next_functions)
    return held


def test_the_residual_chain_is_not_held_unpacked_for_later_readers():
    torch.manual_seed(0)
    model = Stage(blocks=4)
    converted = actfx.convert(model, bits=2)
    out = converted(torch.randn(2, 3, 16, 16))
    loss = out.square().sum()
    most, nodes = [0], []

    def count(*_):
        most[0] = max(most[0], len({id(t) for t in _unpacked_codes(loss)}))

    seen, stack = set(), [loss.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        nodes.append(node)
        node.register_prehook(count)
        stack.extend(f for f, _ in node.next_functions)
    loss.backward()
    # Rebuilding block k's input unpacks the BN inputs of blocks k, k-1, ..., 0 through the
    # shortcuts; only block k's own is kept, for its BatchNorm's backward, which comes next.
    assert most[0] <= 1, most[0]
    assert all(p.grad is not None and p.grad.isfinite().all() for p in model.parameters())


def test_the_fake_step_runs_one_slice_per_convolution(monkeypatch):
    # The planner's step on fake tensors runs at batches of hundreds: one slice shows the memory
    # (every slice allocates the same and frees it), all of them only cost time (`actfx plan
    # resnet50 --gpu t4` took 296 s instead of 24).
    from actfx.planner.step_memory import step_bytes

    torch.manual_seed(0)
    model = Stage()
    converted = actfx.convert(model, bits=2)
    monkeypatch.setattr(conv_backward, "SLICE_BYTES", 8 * 16 * 16 * 4)  # one sample per slice
    unpacked = _record_unpacks(monkeypatch)
    assert step_bytes(converted, (torch.empty(64, 3, 16, 16, device="meta"),)) > 0
    slices = [s for s in unpacked if s == (1, 8, 16, 16)]
    # Each convolution rebuilds its input from a few packed pieces, once, not once per sample.
    assert 0 < len(slices) <= 2 * (len(model.convs) + 1), len(slices)
