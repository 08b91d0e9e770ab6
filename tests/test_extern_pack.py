"""extern_pack: the compiled path's precompiled CPU pack kernel (``actfx::pack_table``).

With ``Config(pack_kernel=True)``, values an extern kernel writes (convolution and matmul
outputs) and the 1-bit masks are packed by one C++ kernel instead of ATen math Inductor
generates code for, value by value. Its bytes must be graph_pack's bit for bit, so backward's
fused unpack reads them unchanged.
"""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import actfx
from actfx import Config
from actfx.kernels import extern_pack, graph_pack
from actfx.kernels.graph_pack import Rows
from actfx.passes.saved_plan import Storage

pytestmark = pytest.mark.skipif(not extern_pack.kernel_available(), reason="no C++ compiler to build the pack kernel")

_SEED = torch.tensor(0x1234_5678_9ABC, dtype=torch.int64)

# flat (with and without padding), blocks of rows inside a plane, whole planes, columns of rows
_LAYOUTS = [((7, 333), None), ((4096,), None), ((3, 8, 20, 56), Rows(3, 20)), ((3, 50, 7, 7), Rows(3, 7)),
            ((513, 129), Rows(1)), ((2, 300, 64), Rows(2))]


def _reference(x, bits, stochastic, rows, monkeypatch):
    """graph_pack's ATen pack with the kernel's seed."""
    monkeypatch.setattr(graph_pack, "_pack_seed", lambda device: _SEED)
    return graph_pack.pack_values(x, bits, 256, stochastic, rows)


def _kernel_pack(x, bits, stochastic, rows):
    inner, plane = (-1, 0) if rows is None else (rows.inner, rows.plane or 0)
    return torch.ops.actfx.pack_table(x, _SEED, bits, 256, stochastic, inner, plane)


@pytest.mark.parametrize("shape,rows", _LAYOUTS)
@pytest.mark.parametrize("bits", [1, 2, 4, 8])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_bytes_are_graph_packs_bit_for_bit(shape, rows, bits, dtype, monkeypatch):
    torch.manual_seed(0)
    x = (torch.randn(shape) * torch.rand(shape[-1]) * 5).to(dtype)
    x.reshape(-1)[:300] = 2.5  # a constant group
    for stochastic in (True, False):
        expected = _reference(x, bits, stochastic, rows, monkeypatch)
        got = _kernel_pack(x, bits, stochastic, rows)
        for name, e, g in zip(("packed", "lo", "hi"), expected, got):
            assert g.shape == e.shape and g.dtype == e.dtype, name
            assert torch.equal(g, e), (name, int((g != e).sum()))


@pytest.mark.parametrize("shape,rows", [((7, 333), None), ((13,), None), ((3, 8, 20, 56), Rows(3)), ((513, 129), Rows(1))])
def test_mask_bytes_are_graph_packs(shape, rows):
    mask = torch.rand(shape) > 0.5
    expected, got = graph_pack.pack_mask(mask, rows), extern_pack.pack_mask_extern(mask, rows)
    assert got.shape == expected.shape and torch.equal(got, expected)
    assert torch.equal(graph_pack.unpack_mask(got, mask, rows), mask)


def test_non_finite_groups_unpack_to_nan_and_others_stay_finite():
    torch.manual_seed(0)
    rows = Rows(3, 16)
    x = torch.randn(2, 4, 16, 16)
    x[0, 1, 3, 5], x[1, 2, 0, 0] = float("nan"), float("inf")
    packed, lo, hi = _kernel_pack(x, 2, True, rows)
    step = graph_pack.group_step(lo, hi, 2)
    y = graph_pack.unpack_values(packed, lo, hi, x, 2, rows)
    bad = ~torch.isfinite(y)
    # a group is a block of whole rows inside one channel plane: each non-finite value spoils its own
    assert bad[0, 1].any() and bad[1, 2].any() and bad.sum() == 2 * 256
    assert torch.isnan(y[bad]).all()
    assert (y[~bad] - x[~bad]).abs().max() <= step[torch.isfinite(step)].max()


def test_stochastic_rounding_is_unbiased_and_seeded():
    torch.manual_seed(0)
    x, rows = torch.randn(4, 8, 64), Rows(2)
    seeds = [torch.tensor(s) for s in range(64)]
    samples = [graph_pack.unpack_values(*torch.ops.actfx.pack_table(x, s, 2, 256, True, 2, 0), x, 2, rows)
               for s in seeds]
    one = (samples[0] - x).norm()
    assert (sum(samples) / len(samples) - x).norm() < 1.5 * one / len(samples) ** 0.5
    again = torch.ops.actfx.pack_table(x, seeds[3], 2, 256, True, 2, 0)[0]
    assert torch.equal(again, torch.ops.actfx.pack_table(x, seeds[3], 2, 256, True, 2, 0)[0])
    assert not torch.equal(again, torch.ops.actfx.pack_table(x, seeds[4], 2, 256, True, 2, 0)[0])


class ConvMlp(nn.Module):
    """A convolution (extern output, packed by the kernel) and a GELU (its derivative is a
    pointwise value: packed in Inductor's generated code, fused with the GELU)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3, padding=1)
        self.fc1, self.fc2 = nn.Linear(16 * 16, 256), nn.Linear(256, 10)

    def forward(self, x):
        h = self.conv(x).flatten(2)  # [B, 16, 256]
        return self.fc2(F.gelu(self.fc1(h))).mean(1)


def _grads(model, fn, x):
    model.zero_grad(set_to_none=True)
    fn(x).square().mean().backward()
    return torch.cat([p.grad.flatten() for p in model.parameters()])


def test_extern_outputs_are_packed_by_the_kernel_and_pointwise_values_in_generated_code():
    from torch._inductor.utils import run_and_get_code

    torch.manual_seed(0)
    model, x = ConvMlp(), torch.randn(4, 3, 16, 16)
    compiled = actfx.compile(model, config=Config(bits=2, pack_kernel=True))
    _, codes = run_and_get_code(lambda: _grads(model, compiled, x))
    packed = [v for v in compiled._actfx_compiled.plans[-1].saved if v.storage is Storage.PACKED]
    # the convolution's output (as the Linear's flattened input) by the kernel, the GELU's in Inductor's code
    assert [(v.op, v.shape) for v in packed if v.apart] == [("aten.view.default", (64, 256))], packed
    assert sum(not v.apart and v.shape == (4, 16, 256) for v in packed) == 2, packed
    forward = codes[0]
    assert forward.count("= torch.ops.actfx.pack_table.default(") == sum(v.apart for v in packed)
    assert "by the CPU pack kernel" in next(v for v in packed if v.apart).saved_as
    torch.manual_seed(1)
    out = compiled(x)
    torch.testing.assert_close(out, torch.compile(model)(x), rtol=1e-6, atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("config", [Config(bits=2), Config(bits=2, pack_kernel=True)], ids=["default", "no_compiler"])
def test_without_the_kernel_every_pack_is_generated_and_gradients_match(config, monkeypatch):
    """By default, and where the kernel cannot be built, the same values are packed as ATen
    math: same bytes, so one seed gives the same gradients as with the kernel."""
    torch.manual_seed(0)
    model, x = ConvMlp(), torch.randn(4, 3, 16, 16)
    torch.manual_seed(5)
    with_kernel = _grads(model, actfx.compile(model, config=Config(bits=2, pack_kernel=True)), x)
    if config.pack_kernel:
        monkeypatch.setattr(extern_pack, "kernel_available", lambda: False)
    compiled = actfx.compile(model, config=config)
    torch.manual_seed(5)
    without = _grads(model, compiled, x)
    saved = compiled._actfx_compiled.plans[-1].saved
    assert any(v.storage is Storage.PACKED for v in saved) and not any(v.apart for v in saved)
    torch.testing.assert_close(without, with_kernel, rtol=1e-5, atol=1e-6)


def test_a_graph_packed_by_the_kernel_says_what_to_do_where_it_cannot_be_built(monkeypatch):
    monkeypatch.setattr(extern_pack, "_kernel", lambda: None)
    with pytest.raises(RuntimeError, match="install g\\+\\+, or compile with Config\\(pack_kernel=False\\)"):
        torch.ops.actfx.pack_table(torch.randn(4, 300), _SEED, 2, 256, True, -1, 0)


@pytest.mark.slow
def test_masks_are_packed_by_the_kernel_and_marked_so():
    from torch._inductor.utils import run_and_get_code

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 3, padding=1))
    x = torch.randn(2, 3, 16, 16)
    compiled = actfx.compile(model, config=Config(bits=2, pack_kernel=True))
    _, codes = run_and_get_code(lambda: _grads(model, compiled, x))
    masks = [v for v in compiled._actfx_compiled.plans[-1].saved if v.storage is Storage.MASK]
    assert masks and all(v.apart and v.saved_as == "1-bit mask, by the CPU pack kernel" for v in masks), masks
    assert codes[0].count("= torch.ops.actfx.pack_mask_table.default(") == len(masks)
