"""GroupNorm's and BatchNorm's backwards through the normalised input
(``actfx/passes/norm_decompositions.py``): PyTorch's gradients, and under actfx.compile a norm no
longer multiplies a raw pack's rounding by its groups' or channels' 1/std."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import actfx
from actfx.compiled import compiled_record
from actfx.passes.norm_decompositions import batch_norm_backward, group_norm_backward
from checks import weighted_grads

aten = torch.ops.aten


@pytest.mark.parametrize("shape, groups, affine", [((4, 32, 5, 3), 4, True), ((6, 12), 3, True),
                                                   ((2, 8, 7), 8, False), ((3, 6, 2, 2, 2), 2, True)])
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.float64, 1e-12), (torch.bfloat16, 2e-2)])
def test_the_gradients_are_pytorch_s(shape, groups, affine, dtype, tol):
    """The same three gradients as ATen's kernel (fp32 to rounding; bf16 computed in fp32 as
    ATen's CPU kernel does, so within bf16's step)."""
    torch.manual_seed(0)
    x = torch.randn(shape, dtype=dtype) * torch.rand(shape[0], 1).reshape(-1, *[1] * (len(shape) - 1)).to(dtype) * 5
    weight = torch.randn(shape[1], dtype=dtype) if affine else None
    bias = torch.randn(shape[1], dtype=dtype) if affine else None
    n, c, hxw = shape[0], shape[1], x[0, 0].numel()
    _, mean, rstd = aten.native_group_norm(x, weight, bias, n, c, hxw, groups, 1e-5)
    dy = torch.randn(shape, dtype=dtype)
    mask = [True, affine, affine]
    expected = aten.native_group_norm_backward(dy, x, mean, rstd, weight, n, c, hxw, groups, mask)
    got = group_norm_backward(dy, x, mean, rstd, weight, n, c, hxw, groups, mask)
    for g, e in zip(got, expected):
        assert (g is None) == (e is None)
        if e is not None:
            assert g.dtype == e.dtype and g.shape == e.shape
            torch.testing.assert_close(g.float(), e.float(), atol=tol * e.float().abs().max().item(), rtol=tol)


class _GroupNormAfterMatmul(nn.Module):
    """A per-head GroupNorm on a matmul's output whose rows differ in scale by 10^4 (retention,
    attention outputs): each GroupNorm group of 8 values has its own small spread."""

    def __init__(self):
        super().__init__()
        self.p, self.v = nn.Linear(16, 16), nn.Linear(16, 32)
        self.gn, self.o = nn.GroupNorm(4, 32), nn.Linear(32, 8)
        self.register_buffer("scale", 10 ** (-4 * torch.rand(4, 16, 1, generator=torch.Generator().manual_seed(0))))

    def forward(self, x):
        y = torch.bmm(self.p(x) * self.scale, self.v(x))
        return self.o(self.gn(y.reshape(-1, 32)).view(y.shape))


@pytest.mark.slow
def test_a_groupnorm_after_a_matmul_is_not_amplified_under_compile():
    """Inductor's decomposition read the raw input (``c2 * x + c3``), packed with neighbours 10^4
    wider, and the partitioner also saved it whole to recompute the norm's output: one step's
    2-bit gradient was 1.2e6 times the gradient's norm off (actfx.convert: 1.4). Now backward
    reads the packed normalised value for both."""
    torch.manual_seed(0)
    model, x = _GroupNormAfterMatmul(), torch.randn(4, 16, 16)
    w = torch.randn(4, 16, 8, generator=torch.Generator().manual_seed(1))
    exact = weighted_grads(model, torch.compile(model), x, w)
    compiled = actfx.compile(model, bits=2)
    errors = [float((weighted_grads(model, compiled, x, w) - exact).norm() / exact.norm()) for _ in range(4)]
    assert max(errors) < 1000, errors  # 1.16e6 before; what is left is the matmul's own packs
    saved = {v.name for plan in compiled_record(compiled).plans for v in plan.saved}
    assert "bmm" not in saved  # the raw copy is rebuilt from the normalised one


@pytest.mark.parametrize("shape, affine", [((4, 8, 5, 5), True), ((6, 16), True), ((2, 4, 3, 3, 3), False),
                                           ((8, 6, 2, 2), True)])
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.float64, 1e-12)])
def test_batch_norm_gradients_are_pytorch_s(shape, affine, dtype, tol):
    """Training mode: the same three gradients as ATen's kernel; channels of very different
    spread and mean."""
    torch.manual_seed(0)
    spread = (10 ** (3 * torch.rand(shape[1]))).reshape(1, -1, *[1] * (len(shape) - 2)).to(dtype)
    x = torch.randn(shape, dtype=dtype) * spread + 3 * spread
    weight = torch.randn(shape[1], dtype=dtype) if affine else None
    running_mean, running_var = torch.zeros(shape[1], dtype=dtype), torch.ones(shape[1], dtype=dtype)
    _, mean, invstd = aten.native_batch_norm(x, weight, None, running_mean, running_var, True, 0.1, 1e-5)
    dy = torch.randn(shape, dtype=dtype)
    mask = [True, affine, True]
    args = (dy, x, weight, running_mean, running_var, mean, invstd, True, 1e-5, mask)
    for g, e in zip(batch_norm_backward(*args, group_size=1 << 30), aten.native_batch_norm_backward(*args)):
        assert (g is None) == (e is None)
        if e is not None:
            assert g.dtype == e.dtype and g.shape == e.shape
            torch.testing.assert_close(g, e, atol=tol * e.abs().max().item(), rtol=tol)


class _BatchNormOnSmallMaps(nn.Module):
    """MobileNetV3's last stages at 64 px: BatchNorm over 2x2 maps, batch 2 (8 values a channel),
    after a convolution whose channels differ in spread by 10^3 (a pack group: 64 channels)."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(16, 128, 1), nn.BatchNorm2d(128)
        self.head = nn.Linear(128 * 4, 8)
        with torch.no_grad():
            self.conv.weight.mul_(10 ** (3 * torch.rand(128, 1, 1, 1, generator=torch.Generator().manual_seed(0))))

    def forward(self, x):
        return self.head(torch.nn.functional.hardswish(self.bn(self.conv(x))).flatten(1))


@pytest.mark.slow
def test_a_batchnorm_over_small_maps_is_not_amplified_under_compile():
    """A 256-value pack group of the raw input spanned 64 channels of 2x2 maps; each channel's
    share of the step was multiplied by its invstd (timm MobileNetV3-small at 64 px, 2 bits: one
    step's gradient 344x its norm off, convert 7.4x; now 6.7x). Now backward reads x̂."""
    torch.manual_seed(0)
    model, x = _BatchNormOnSmallMaps(), torch.randn(8, 16, 2, 2)
    w = torch.randn(8, 8, generator=torch.Generator().manual_seed(1))
    exact = weighted_grads(model, torch.compile(model), x, w)
    compiled = actfx.compile(model, bits=2)
    errors = [float((weighted_grads(model, compiled, x, w) - exact).norm() / exact.norm()) for _ in range(4)]
    assert max(errors) < 5, errors  # 7.5e5 before


class _TwoBatchNormsOnSmallMaps(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(16, 64, 1), nn.BatchNorm2d(64)
        self.c2, self.b2 = nn.Conv2d(64, 64, 1), nn.BatchNorm2d(64)

    def forward(self, x):
        return self.b2(self.c2(torch.relu(self.b1(self.c1(x))))).relu().mean((2, 3))


def test_a_batchnorm_over_small_maps_stores_its_normalised_input_once():
    """The decomposition reads the [1, C, 1, 1] mean as ``view(squeeze(mean))``: hoisted, its x̂
    differed from the forward's x̂ by that chain alone, and both were packed (each BatchNorm's
    x̂ twice, one copy without a module path)."""
    from actfx.compiled_estimate import estimate_compiled
    from actfx.config import Config
    from actfx.passes.saved_plan import Storage

    torch.manual_seed(0)
    record = estimate_compiled(_TwoBatchNormsOnSmallMaps(), (torch.randn(8, 16, 4, 4),), Config(bits=2))
    full = [v for plan in record.plans for v in plan.saved if v.storage is Storage.PACKED and v.shape == (8, 64, 4, 4)]
    normalised = [v for v in full if v.op == "aten.mul.Tensor"]
    assert sorted(v.module_path for v in normalised) == ["b1", "b2"]
