"""Tests for `actfx/kernels/cpu_compiled.py`: the torch.compile'd CPU path against the reference.

Deterministic mode must give the reference's bytes exactly (same fp32 operations in the same
order); stochastic mode uses its own hashed noise, so it is checked for what matters: unbiased
rounding, reproducibility per (seed, stream), and different noise for different keys.
"""

import pytest
import torch

import actfx
from actfx.kernels import (
    TERNARY,
    cpu_compiled,
    pack_bits,
    pack_bits_between,
    pack_groups,
    scale_by_mask,
    unpack_bits,
    unpack_groups,
)
from actfx.kernels.masks import pack_bits_impl
from actfx.kernels.reference import pack_groups_reference, unpack_groups_reference

pytestmark = pytest.mark.skipif(not cpu_compiled.compiled_cpu_works(), reason="Inductor cannot compile here")


def seed_of(s: int) -> torch.Tensor:
    return torch.tensor([s], dtype=torch.int64)


def awkward(shape, dtype, generator_seed=0) -> torch.Tensor:
    """Random values with the groups the format treats specially: constant, NaN, inf, -0.0, subnormal."""
    g = torch.Generator().manual_seed(generator_seed)
    x = torch.randn(shape, generator=g) * 3 + 1
    flat = x.view(-1)
    flat[:512] = 2.5  # two constant groups of 256
    flat[700] = float("nan")
    flat[1300] = float("inf")
    flat[2000:2300] = -0.0
    flat[3000:3100] = 1e-40  # fp32 subnormals
    return x.to(dtype)


# Odd sizes: a partial last group, a row count that is not a multiple of the vector width.
SHAPES = [(3, 100_003), (65_536 + 37,), (8, 64, 33, 31)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("bits", [1, TERNARY, 2, 4, 8])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_deterministic_bytes_equal_the_reference(shape, bits, dtype):
    x = awkward(shape, dtype)
    codes, meta = pack_groups(x, seed_of(5), 3, bits, 256, False, backend="compiled")
    want_codes, want_meta = pack_groups_reference(x, seed_of(5), 3, bits, 256, False)
    assert torch.equal(codes, want_codes)
    assert torch.equal(meta.view(torch.int16), want_meta.view(torch.int16))
    back = unpack_groups(codes, meta, shape, dtype, bits, 256, backend="compiled")
    want = unpack_groups_reference(want_codes, want_meta, shape, dtype, bits, 256)
    assert back.dtype == dtype and back.shape == x.shape
    int_view = torch.int32 if dtype == torch.float32 else torch.int16
    assert torch.equal(back.view(int_view), want.view(int_view))  # NaN groups included, bit for bit


@pytest.mark.parametrize("group_size", [32, 1024])
@pytest.mark.parametrize("bits", [2, TERNARY])
def test_other_group_sizes_match_the_reference(group_size, bits):
    x = awkward((70_000,), torch.float32, generator_seed=1)
    got = pack_groups(x, seed_of(0), 0, bits, group_size, False, backend="compiled")
    want = pack_groups_reference(x, seed_of(0), 0, bits, group_size, False)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1].view(torch.int16), want[1].view(torch.int16))


@pytest.mark.parametrize("bits", [1, TERNARY, 2, 4])
def test_stochastic_rounding_is_unbiased(bits):
    # The mean of K independent roundings converges to x as 1/sqrt(K); a biased rounding (e.g.
    # round-to-nearest, or noise that is not uniform) stalls at its bias instead.
    x = torch.randn(64, 4096, generator=torch.Generator().manual_seed(0))
    K = 64
    total = torch.zeros_like(x)
    for s in range(K):
        codes, meta = pack_groups(x, seed_of(s), 0, bits, 256, True, backend="compiled")
        one = unpack_groups(codes, meta, x.shape, torch.float32, bits, 256, backend="compiled")
        total += one
    single = (one - x).abs().mean()
    averaged = (total / K - x).abs().mean()
    assert averaged < 1.5 * single / K**0.5, (single.item(), averaged.item())
    nearest = pack_groups(x, seed_of(0), 0, bits, 256, False, backend="compiled")
    assert not torch.equal(codes, nearest[0])


def test_noise_is_reproducible_and_differs_per_seed_and_stream():
    x = torch.randn(50_000, generator=torch.Generator().manual_seed(2))
    a = pack_groups(x, seed_of(1), 0, 2, 256, True, backend="compiled")[0]
    assert torch.equal(a, pack_groups(x, seed_of(1), 0, 2, 256, True, backend="compiled")[0])
    for other in (pack_groups(x, seed_of(2), 0, 2, 256, True, backend="compiled")[0],
                  pack_groups(x, seed_of(1), 1, 2, 256, True, backend="compiled")[0]):
        assert (a != other).float().mean() > 0.3


def test_noise_keys_are_int32_tensors_and_odd_multipliers():
    for seed, stream in [(0, 0), (1, 0), (0, 1), (2**62, 17)]:
        mult, add = cpu_compiled.noise_keys(seed, stream)
        assert mult.dtype == add.dtype == torch.int32 and mult.dim() == 0
        assert int(mult) % 2 != 0


def test_masks_match_the_eager_layout():
    mask = torch.rand(8 * 5000, generator=torch.Generator().manual_seed(3)) > 0.5
    codes = pack_bits(mask)
    assert torch.equal(codes, pack_bits_impl(mask))
    assert torch.equal(unpack_bits(codes, mask.shape), mask)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("inside,outside", [(1.0, 0.0), (1.0, 0.01), (1.25, 0.0)])
def test_scale_by_mask_matches_the_eager_product(dtype, inside, outside):
    g = torch.Generator().manual_seed(4)
    mask = torch.rand(4, 8, 64, 64, generator=g) > 0.3
    values = torch.randn(mask.shape, generator=g).to(dtype)
    values.view(-1)[7] = float("inf")  # inf * 0 is NaN in plain autograd too: nothing hidden
    got = scale_by_mask(values, pack_bits(mask), inside, outside)
    want = values * torch.where(mask, inside, outside).to(dtype)
    torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True)


def test_env_var_selects_the_reference_and_rejects_typos(monkeypatch):
    x = torch.randn(40_000, generator=torch.Generator().manual_seed(5))
    monkeypatch.setenv("ACTFX_CPU_KERNELS", "reference")
    via_auto = pack_groups(x, seed_of(3), 2, 2, 256, True)
    assert torch.equal(via_auto[0], pack_groups_reference(x, seed_of(3), 2, 2, 256, True)[0])
    monkeypatch.setenv("ACTFX_CPU_KERNELS", "fast")
    with pytest.raises(ValueError, match="ACTFX_CPU_KERNELS must be one of"):
        pack_groups(x, seed_of(3), 2, 2, 256, True)


def test_auto_uses_the_compiled_path_for_large_cpu_tensors(monkeypatch):
    monkeypatch.delenv("ACTFX_CPU_KERNELS", raising=False)
    x = torch.randn(40_000, generator=torch.Generator().manual_seed(6))
    got = pack_groups(x, seed_of(3), 2, 2, 256, True)
    assert torch.equal(got[0], pack_groups(x, seed_of(3), 2, 2, 256, True, backend="compiled")[0])


def test_compiled_backend_refuses_non_cpu_tensors():
    x = torch.randn(4096, device="meta")
    with pytest.raises(ValueError, match="CPU path"):
        pack_groups(x, torch.zeros(1, dtype=torch.int64, device="meta"), 0, 2, 256, True, backend="compiled")


def _conv_bn_relu():
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.BatchNorm2d(16), torch.nn.ReLU(),
        torch.nn.Conv2d(16, 16, 3, padding=1), torch.nn.Flatten(), torch.nn.Linear(16 * 32 * 32, 10),
    ), torch.randn(8, 3, 32, 32)


def _residual():
    from actfx.models import resnet18

    return resnet18(num_classes=10), torch.randn(2, 3, 64, 64)  # blocks rebuilt as relu(bn(x) + shortcut)


@pytest.mark.parametrize("make", [_conv_bn_relu, _residual], ids=["conv-bn-relu", "resnet18"])
def test_converted_model_trains_the_same_with_either_cpu_path(make, monkeypatch):
    # Deterministic rounding: the compiled and reference paths give identical bytes, and the fused
    # rebuilds compute what the eager ones do, so the whole training step (forward, every packed
    # save, backward) must give identical gradients.
    torch.manual_seed(0)
    model, x = make()
    grads = {}
    for choice in ("compiled", "reference"):
        monkeypatch.setenv("ACTFX_CPU_KERNELS", choice)
        converted = actfx.convert(model, config=actfx.Config(bits=2, stochastic=False))
        converted(x).square().sum().backward()
        grads[choice] = [p.grad.clone() for p in converted.parameters()]
        model.zero_grad(set_to_none=True)
    for a, b in zip(grads["compiled"], grads["reference"]):
        assert torch.equal(a, b)


@pytest.mark.parametrize("lo,hi", [(0.0, None), (0.0, 6.0), (-1.0, 1.0)])
def test_threshold_masks_match_the_eager_comparison(lo, hi):
    values = torch.randn(4, 8, 64, 64, generator=torch.Generator().manual_seed(7)) * 4
    values.view(-1)[:3] = torch.tensor([float("nan"), float("inf"), 6.0])
    want = values > lo
    if hi is not None:
        want &= values < hi
    assert torch.equal(pack_bits_between(values, lo, hi), pack_bits_impl(want))


@pytest.mark.parametrize("shape", [(4, 16, 32, 32), (2, 8, 10, 12)])
def test_batchnorm_relu_rebuild_matches_the_eager_formula(shape, monkeypatch):
    from actfx.kernels import affine_scale_by_mask

    g = torch.Generator().manual_seed(8)
    x = torch.randn(shape, generator=g)
    a, b = torch.randn(shape[1], generator=g), torch.randn(shape[1], generator=g)
    codes = pack_bits(torch.rand(shape, generator=g) > 0.4)
    fused = affine_scale_by_mask(x, a, b, 1, codes, 1.0, 0.0, torch.float32)
    monkeypatch.setenv("ACTFX_CPU_KERNELS", "reference")
    eager = affine_scale_by_mask(x, a, b, 1, codes, 1.0, 0.0, torch.float32)
    # multiply then add on both paths: bit-identical
    assert torch.equal(fused, eager)
    y = x * a.view(1, -1, 1, 1) + b.view(1, -1, 1, 1)
    assert torch.equal(eager, y * unpack_bits(codes, shape))


def test_residual_rebuild_matches_the_eager_formula(monkeypatch):
    from actfx.kernels import affine_scale_by_mask

    shape = (4, 16, 16, 16)
    g = torch.Generator().manual_seed(9)
    x, shortcut = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
    a, b = torch.randn(shape[1], generator=g), torch.randn(shape[1], generator=g)
    codes = pack_bits(torch.rand(shape, generator=g) > 0.4)
    fused = affine_scale_by_mask(x, a, b, 1, codes, 1.0, 0.0, torch.float32, addend=shortcut)
    monkeypatch.setenv("ACTFX_CPU_KERNELS", "reference")
    eager = affine_scale_by_mask(x, a, b, 1, codes, 1.0, 0.0, torch.float32, addend=shortcut)
    assert torch.equal(fused, eager)
    y = (x * a.view(1, -1, 1, 1) + b.view(1, -1, 1, 1)) + shortcut
    assert torch.equal(eager, y * unpack_bits(codes, shape))


def test_reference_kernels_runs_the_reference_with_the_same_bytes(monkeypatch):
    """A plan's one-off check of its widths runs packs eagerly rather than compiling new kernels."""
    from actfx.kernels import reference_kernels

    monkeypatch.delenv("ACTFX_CPU_KERNELS", raising=False)
    x = torch.randn(40_000, generator=torch.Generator().manual_seed(7))
    compiled = pack_groups(x, seed_of(3), 2, 1, 256, False)

    def refuse(*args, **kwargs):
        raise AssertionError("the compiled kernel ran")

    monkeypatch.setattr(cpu_compiled, "pack_groups_compiled", refuse)
    with reference_kernels():
        eager = pack_groups(x, seed_of(3), 2, 1, 256, False)
        pack_groups(x, seed_of(3), 2, 1, 256, True)  # stochastic: the reference's own noise
    assert torch.equal(eager[0], compiled[0]) and torch.equal(eager[1], compiled[1])
    with pytest.raises(AssertionError, match="compiled kernel ran"):
        pack_groups(x, seed_of(3), 2, 1, 256, True)


@pytest.mark.slow
def test_the_kernels_build_under_warnings_as_errors():
    """A test suite run with ``-W error``: PyTorch's own DeprecationWarning inside Inductor's
    compile (``torch.jit.script_method``) was raised, the first kernel failed and the process
    fell back to the slow reference packs for good. Checked in a fresh process (the check is
    cached per process)."""
    import subprocess
    import sys

    code = ("import warnings; warnings.simplefilter('error'); "
            "from actfx.kernels.cpu_compiled import compiled_cpu_works; assert compiled_cpu_works()")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
