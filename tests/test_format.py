"""Tests for `actfx/format.py` and the PyTorch reference path of `actfx/kernels`: layout, error
bound, randomness, special groups, validation, and the custom ops on fake / meta tensors."""

import math

import pytest
import torch

from actfx.format import PackedTensor, pack
from actfx.kernels import (
    TERNARY,
    check_bits,
    code_bytes,
    levels,
    check_float_dtype,
    check_group_size,
    pack_groups,
    packed_nbytes,
    unpack_groups,
)

ZERO_SEED = torch.zeros(1, dtype=torch.int64)


def seed_of(s: int) -> torch.Tensor:
    return torch.tensor([s], dtype=torch.int64)


def det_pack(x, bits, group_size=32):
    return pack_groups(x, ZERO_SEED, 0, bits, group_size, False)


def meta_bits(meta):
    return [v & 0xFFFF for v in meta.view(torch.int16).reshape(-1).tolist()]


# ------------------------------------------------------------------------------- literal layout
# Hand-computed, deterministic mode, one group of 32.
#  1 bit : x = 1 where i % 3 == 0 else 0 -> lo 0, step = 1 * fp32(1/1) = 1; byte 0 has codes 1 at
#          i = 0, 3, 6 -> 1 + 8 + 64 = 73; byte 1: i = 9, 12, 15 -> bits 1, 4, 7 = 146; byte 2:
#          i = 18, 21 -> bits 2, 5 = 36; byte 3 like byte 0.
#  2 bits: x = i % 4 - 1.5 -> lo -1.5 (0xBFC0), step = fp32(3 * fp32(1/3)) = 1.0 (0x3F80); codes
#          0, 1, 2, 3 -> 0b11_10_01_00 = 228 in every byte.
#  4 bits: x = 0.1 i -> lo 0, step = bf16_up(3.1 / 15 = 0.20667) = 212 / 1024 = 0.20703125 (0x3E54);
#          code = round(0.48302 i): pairs (0,0) (1,1) ... (14,14) then (14,15) -> 17 k, last 254.
#  1.6 (three levels): x = i % 3 - 1 -> lo -1 (0xBF80), step = fp32(2 * fp32(1/2)) = 1.0; codes
#          i % 3, five per byte in base 3, value 5j + k as digit k: byte 0 holds 0, 1, 2, 0, 1 ->
#          0 + 3 + 18 + 0 + 81 = 102, byte 1 holds 2, 0, 1, 2, 0 -> 65, byte 2 holds 1, 2, 0, 1, 2 ->
#          196, repeating; byte 6 holds i = 30, 31 (0, 1) and three padding zeros -> 3.
#  8 bits: x = i - 8 -> lo -8 (0xC100), step = bf16_up(31 / 255 = 0.121569) = 249 / 2048 (0x3DF9);
#          code = round(8.2249 i) = 0, 8, 16, 25, ... (i = 20 gives 164.498 -> 164), 255.
LITERAL = {
    1: ((torch.arange(32) % 3 == 0).float(), [73, 146, 36, 73], [0x0000, 0x3F80]),
    2: (torch.arange(32) % 4 - 1.5, [228] * 8, [0xBFC0, 0x3F80]),
    TERNARY: (torch.arange(32) % 3 - 1.0, [102, 65, 196, 102, 65, 196, 3], [0xBF80, 0x3F80]),
    4: (
        torch.arange(32) * 0.1,
        [0, 17, 34, 51, 68, 85, 102, 119, 136, 153, 170, 187, 204, 221, 238, 254],
        [0x0000, 0x3E54],
    ),
    8: (
        torch.arange(32.0) - 8,
        [0, 8, 16, 25, 33, 41, 49, 58, 66, 74, 82, 90, 99, 107, 115, 123,
         132, 140, 148, 156, 164, 173, 181, 189, 197, 206, 214, 222, 230, 239, 247, 255],
        [0xC100, 0x3DF9],
    ),
}


@pytest.mark.parametrize("bits", [1, TERNARY, 2, 4, 8])
def test_literal_bytes(bits):
    x, want_codes, want_meta = LITERAL[bits]
    codes, meta = det_pack(x, bits)
    assert codes.dtype == torch.uint8 and codes.shape == (1, code_bytes(bits, 32))
    assert meta.dtype == torch.bfloat16 and meta.shape == (1, 2)
    assert codes.reshape(-1).tolist() == want_codes
    assert meta_bits(meta) == want_meta


def test_literal_partial_group_pads_with_zero_codes():
    # 34 values at 2 bits: the second group has 2 real values (codes 0 and 3) and 30 padding slots.
    x = torch.cat([torch.arange(32) % 4 - 1.5, torch.tensor([10.0, 13.0])])
    codes, meta = det_pack(x, 2)
    assert codes.shape == (2, 8)
    assert codes[1].tolist() == [0b1100, 0, 0, 0, 0, 0, 0, 0]
    # lo = 10 (0x4120), step = bf16_up(fp32(3 * fp32(1/3))) = 1.0: the padding took no part in min/max
    assert meta_bits(meta)[2:] == [0x4120, 0x3F80]


# --------------------------------------------------------------------------------- error bound


def ulp_bf16(v: torch.Tensor) -> torch.Tensor:
    """Spacing of bf16 numbers at |v| (8 significant bits), in float64."""
    _, exp = torch.frexp(v.double().abs())
    return torch.ldexp(torch.ones_like(v, dtype=torch.float64), exp - 8)


def check_bound(x: torch.Tensor, bits: int, group_size: int, stochastic: bool) -> None:
    """The documented statements, with fp32 rounding allowed for as the docstring says."""
    codes, meta = pack_groups(x, seed_of(1), 0, bits, group_size, stochastic)
    x_hat = unpack_groups(codes, meta, x.shape, x.dtype, bits, group_size)
    top = levels(bits)
    g = x.double().reshape(-1, group_size)
    mn, mx = g.amin(1), g.amax(1)
    lo, step = meta.double().unbind(1)
    assert torch.all(torch.isfinite(step)) and torch.all(step > 0)
    assert torch.all(lo <= mn)
    assert torch.all(lo >= mn - ulp_bf16(mn))
    # (1 + 2**-7): bf16 rounding up; (1 + 2**-21): fp32 rounding of max - lo, of 1/L and of the product
    assert torch.all(step <= (mx - lo) / top * (1 + 2**-7) * (1 + 2**-21))
    err = (x_hat.double() - x.double()).reshape(-1, group_size)
    # float rounding: t = (x - lo) * r is off by ~3 fp32 ulps of t <= L (in steps), x_hat by half an ulp
    slack = step[:, None] * top * 2**-22 + g.abs() * 2**-24
    if stochastic:
        assert torch.all(err.abs() < step[:, None] + slack)
    else:
        assert torch.all(err.abs() <= step[:, None] / 2 + slack)


@pytest.mark.parametrize("bits", [1, TERNARY, 2, 4, 8])
@pytest.mark.parametrize("stochastic", [False, True])
@pytest.mark.parametrize("group_size", [32, 256])
def test_error_bound(bits, stochastic, group_size):
    gen = torch.Generator().manual_seed(int(bits * 10) + group_size)
    x = torch.randn(64, group_size, generator=gen) * torch.logspace(-3, 3, 64)[:, None]
    x = x + torch.randn(64, 1, generator=gen) * 5  # offsets, so lo is rarely 0 or exact
    check_bound(x.reshape(-1), bits, group_size, stochastic)


@pytest.mark.parametrize("scale", [1e-30, 1e-10, 1e10, 1e30])
@pytest.mark.parametrize("bits", [2, 8])
def test_scale_range(scale, bits):
    # bf16 meta keeps fp32's exponent range: no inf / 0 step at either end
    x = torch.randn(8 * 64, generator=torch.Generator().manual_seed(0)) * scale
    for stochastic in (False, True):
        check_bound(x, bits, 64, stochastic)


# ---------------------------------------------------------------------------- randomness


@pytest.mark.slow
def test_stochastic_rounding_is_unbiased_where_nearest_is_not():
    # Groups [0, 3, 1/3 x 30] at 2 bits: lo = 0, step = 1, so 1/3 sits a third of a step above
    # code 0. Nearest rounding always returns 0 (off by 1/3); stochastic rounding returns 1 with
    # probability 1/3 (std of one sample sqrt(2)/3), so the mean converges to 1/3.
    groups = 4000
    x = torch.full((groups, 32), 1 / 3)
    x[:, 0], x[:, 1] = 0.0, 3.0
    x = x.reshape(-1)
    third = torch.zeros(groups, 32, dtype=torch.bool)
    third[:, 2:] = True
    third = third.reshape(-1)
    samples = third.sum().item()
    se = math.sqrt(2) / 3 / math.sqrt(samples)

    stochastic = pack(x, 2, group_size=32, seed=123).unpack()
    nearest = pack(x, 2, group_size=32, stochastic=False).unpack()
    assert abs(stochastic[third].double().mean().item() - 1 / 3) < 5 * se
    assert abs(nearest[third].double().mean().item() - 1 / 3) == pytest.approx(1 / 3, rel=1e-6)
    # the endpoints are exact in both modes
    for y in (stochastic, nearest):
        torch.testing.assert_close(y[~third], x[~third], rtol=0, atol=0)


@pytest.mark.slow
def test_three_levels_round_stochastically_without_bias():
    # Groups [0, 2, 1/3 x 30] at three levels: lo = 0, step = 1, so 1/3 rounds to level 1 with
    # probability 1/3 and the mean converges to 1/3 (nearest rounding gives 0: off by 1/3).
    groups = 4000
    x = torch.full((groups, 32), 1 / 3)
    x[:, 0], x[:, 1] = 0.0, 2.0
    third = torch.zeros(groups, 32, dtype=torch.bool)
    third[:, 2:] = True
    x, third = x.reshape(-1), third.reshape(-1)
    se = math.sqrt(2) / 3 / math.sqrt(third.sum().item())
    stochastic = pack(x, TERNARY, group_size=32, seed=5).unpack()
    nearest = pack(x, TERNARY, group_size=32, stochastic=False).unpack()
    assert abs(stochastic[third].double().mean().item() - 1 / 3) < 5 * se
    assert nearest[third].double().mean().item() == 0.0
    assert set(stochastic[third].unique().tolist()) == {0.0, 1.0}
    torch.testing.assert_close(stochastic[~third], x[~third], rtol=0, atol=0)


def test_three_levels_hold_five_values_per_byte():
    x = torch.randn(1 << 20)
    p = pack(x, TERNARY)
    assert p.codes.shape == (4096, 52)  # ceil(256 / 5) bytes per group of 256
    assert p.nbytes == packed_nbytes(x.numel(), TERNARY, 256) == 4096 * 56
    assert "ratio=18.29x" in repr(p)


def test_same_seed_same_bytes_other_seed_or_stream_differs():
    x = torch.randn(4096, generator=torch.Generator().manual_seed(0))
    a = pack_groups(x, seed_of(7), 3, 2, 64, True)
    b = pack_groups(x, seed_of(7), 3, 2, 64, True)
    other_seed = pack_groups(x, seed_of(8), 3, 2, 64, True)
    other_stream = pack_groups(x, seed_of(7), 4, 2, 64, True)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], other_seed[0])
    assert not torch.equal(a[0], other_stream[0])
    # only the codes carry noise; meta is a function of x alone
    assert torch.equal(a[1], other_seed[1])


def test_streams_are_independent():
    # Rounding decisions of two streams on a value half a step up should agree ~50% of the time.
    x = torch.full((64, 32), 0.5)
    x[:, 0], x[:, 1] = 0.0, 1.0
    x = x.reshape(-1)
    up = [pack_groups(x, seed_of(5), s, 1, 32, True)[0].reshape(64, 4)[:, 1:] for s in (0, 1)]
    agree = (~(up[0] ^ up[1])).view(-1)
    agree_bits = sum(((agree >> k) & 1).sum().item() for k in range(8))
    n = 64 * 3 * 8
    assert abs(agree_bits / n - 0.5) < 5 * 0.5 / math.sqrt(n)


def test_pack_with_seed_none_is_fresh_each_time():
    x = torch.randn(4096, generator=torch.Generator().manual_seed(0))
    a, b = pack(x, 2), pack(x, 2)
    assert not torch.equal(a.codes, b.codes)


def test_pack_groups_leaves_global_rng_alone():
    x = torch.randn(4096)
    torch.manual_seed(0)
    want = torch.rand(8)
    torch.manual_seed(0)
    pack_groups(x, seed_of(3), 0, 2, 64, True)
    unpack_groups(*pack_groups(x, seed_of(3), 0, 2, 64, True), x.shape, x.dtype, 2, 64)
    torch.testing.assert_close(torch.rand(8), want, rtol=0, atol=0)


def test_pack_with_int_seed_is_reproducible_and_leaves_global_rng_alone():
    x = torch.randn(1000)
    torch.manual_seed(0)
    want = torch.rand(8)
    torch.manual_seed(0)
    a, b = pack(x, 4, seed=11), pack(x, 4, seed=11)
    torch.testing.assert_close(torch.rand(8), want, rtol=0, atol=0)
    assert torch.equal(a.codes, b.codes)


# --------------------------------------------------------------------------- PackedTensor


def test_ratio_at_2_bits_is_at_least_15x():
    x = torch.randn(1 << 20)
    p = pack(x, 2)
    assert p.nbytes == p.codes.nbytes + p.meta.nbytes == packed_nbytes(x.numel(), 2, 256)
    assert x.nbytes / p.nbytes >= 15.0
    assert "ratio=15.06x" in repr(p)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(3, 5, 7), (1000,), (2, 1, 300)])
def test_unpack_restores_shape_dtype_device(dtype, shape):
    x = torch.randn(shape).to(dtype)
    p = pack(x, 4, group_size=64)
    assert isinstance(p, PackedTensor)
    y = p.unpack()
    assert y.shape == x.shape and y.dtype == dtype and y.device == x.device and y.is_contiguous()
    assert p.shape == x.shape and p.dtype == dtype and p.bits == 4 and p.group_size == 64


def test_non_contiguous_input_packs_like_its_contiguous_copy():
    x = torch.randn(40, 70)
    for view in (x.t(), x[:, ::3], x.unsqueeze(0).expand(2, 40, 70)):
        a = det_pack(view, 2)
        b = det_pack(view.contiguous(), 2)
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("make", ["contiguous", "transposed", "padded"])
def test_caller_tensor_is_never_modified(dtype, make):
    x = torch.randn(64, 96).to(dtype)
    x = {"contiguous": x, "transposed": x.t(), "padded": x.reshape(-1)[:1000]}[make]
    before = x.clone()
    for stochastic in (False, True):
        pack(x, 2, group_size=32, stochastic=stochastic).unpack()
    assert torch.equal(x, before)


@pytest.mark.parametrize("shape", [(0,), (3, 0, 5)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_empty_tensor(shape, dtype):
    x = torch.empty(shape, dtype=dtype)
    p = pack(x, 2)
    assert p.codes.shape == (0, 64) and p.meta.shape == (0, 2) and p.nbytes == 0
    y = p.unpack()
    assert y.shape == shape and y.dtype == dtype
    repr(p)


@pytest.mark.parametrize("value", [0.0, -0.0, 1.0, 0.1, -3.3e-39, 1e30, -7.5])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("bits", [1, TERNARY, 8])
def test_constant_groups_round_trip_exactly(value, dtype, bits):
    # 0.1 and -3.3e-39 (fp32 subnormal) are not bf16 values: the code bytes carry the fp32 bits.
    c = torch.tensor(value, dtype=dtype)
    if not torch.isfinite(c):
        pytest.skip("value out of range for this dtype")
    x = torch.randn(3, 32).to(dtype)
    x[1] = c
    codes, meta = pack_groups(x, seed_of(0), 0, bits, 32, True)
    assert meta[1, 1].item() == 0.0
    assert codes[1, :4].tolist() == list(c.float().view(1).view(torch.uint8).tolist())
    assert codes[1, 4:].sum().item() == 0
    y = unpack_groups(codes, meta, x.shape, dtype, bits, 32)
    same_bits = y[1].view(torch.int16 if dtype != torch.float32 else torch.int32) == x[1].view(
        torch.int16 if dtype != torch.float32 else torch.int32
    )
    assert same_bits.all(), (y[1], x[1])


def test_all_zero_groups_are_exact_at_every_bit_width():
    x = torch.relu(torch.randn(8, 64))
    x[2:5] = 0.0
    for bits in (1, TERNARY, 2, 4, 8):
        y = pack(x, bits, group_size=64).unpack()
        assert torch.equal(y[2:5], x[2:5])


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_non_finite_groups_unpack_to_nan(bad, dtype):
    x = torch.randn(4, 32).to(dtype)
    x[2, 5] = bad
    codes, meta = pack_groups(x.reshape(-1)[:120], seed_of(0), 0, 2, 32, True)
    assert torch.isnan(meta[2]).all()
    assert codes[2].sum().item() == 0
    y = unpack_groups(codes, meta, (120,), dtype, 2, 32).reshape(-1)
    assert torch.isnan(y[64:96]).all()
    assert torch.isfinite(y[:64]).all() and torch.isfinite(y[96:]).all()


def test_a_nan_whose_bits_round_to_a_number_still_marks_its_group():
    """CUDA's NaN (0x7FFFFFFF) as a group's min and max: its step, rounded up to bf16, is -0.0, a
    number; the group must still be stored as NaN (on an H200 the reference pack stored it as
    finite and its meta differed from the Triton kernel's)."""
    from actfx.kernels.reference import non_finite_groups, round_bf16_down, round_bf16_up

    nan = torch.tensor([0x7FFFFFFF], dtype=torch.int32).view(torch.float32)  # CUDA arithmetic's NaN
    mn, mx = torch.cat([nan, torch.tensor([1.0])]), torch.cat([nan, torch.tensor([2.0])])
    step = round_bf16_up(torch.cat([nan, (mx[1:] - round_bf16_down(mn[1:])) / 3]))  # (mx - lo) / 3 on CUDA
    assert torch.isfinite(step[0])  # the rounding alone hides the NaN
    assert non_finite_groups(mn, mx, step).tolist() == [True, False]


def test_nan_in_partial_last_group():
    x = torch.randn(40)
    x[35] = float("nan")
    y = pack(x, 4, group_size=32).unpack()
    assert torch.isfinite(y[:32]).all() and torch.isnan(y[32:]).all()


def test_values_beyond_bf16_range_make_the_group_non_finite():
    # -3.4e38 rounds down to bf16 -inf, and 3e38 - (-3e38) overflows fp32: documented as NaN groups
    x = torch.randn(3, 32)
    x[0, 0] = -3.4e38
    x[1, 0], x[1, 1] = -3e38, 3e38
    y = pack(x, 2, group_size=32).unpack()
    assert torch.isnan(y[:2]).all() and torch.isfinite(y[2]).all()


# ---------------------------------------------------------------------------- validation


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64, torch.uint8, torch.bool, torch.float64])
def test_non_float_dtype_is_a_type_error_naming_it(dtype):
    with pytest.raises(TypeError, match=str(dtype).replace(".", r"\.")):
        pack(torch.zeros(64, dtype=dtype), 2)
    with pytest.raises(TypeError, match=str(dtype).replace(".", r"\.")):
        pack_groups(torch.zeros(64, dtype=dtype), ZERO_SEED, 0, 2, 32, False)


@pytest.mark.parametrize("bits", [0, 3, 5, 16, -1])
def test_bad_bits_value(bits):
    with pytest.raises(ValueError, match=r"\{1, 1.6, 2, 4, 8\}.*got " + str(bits)):
        pack(torch.randn(64), bits)


@pytest.mark.parametrize("bits", ["2", 2.0, True, None])
def test_bad_bits_type(bits):
    with pytest.raises(TypeError, match="bits must be an int"):
        check_bits(bits)


@pytest.mark.parametrize("group_size", [100, 16, 8192, 0, -32, 48])
def test_bad_group_size_value(group_size):
    with pytest.raises(ValueError, match="power of two from 32 to 4096 inclusive, got " + str(group_size)):
        pack(torch.randn(64), 2, group_size=group_size)


@pytest.mark.parametrize("group_size", ["a", 256.0, None, True])
def test_bad_group_size_type(group_size):
    with pytest.raises(TypeError, match="group_size must be an int"):
        check_group_size(group_size)


def test_good_values_pass_validation():
    assert [check_bits(b) for b in (1, 1.6, 2, 4, 8)] == [1, TERNARY, 2, 4, 8]
    assert check_group_size(32) == 32 and check_group_size(4096) == 4096
    assert check_float_dtype(torch.bfloat16) is torch.bfloat16


def test_bad_seed_and_backend():
    x = torch.randn(64)
    with pytest.raises(TypeError, match="one-element int64"):
        pack_groups(x, torch.zeros(1, dtype=torch.int32), 0, 2, 32, True)
    with pytest.raises(TypeError, match="one-element int64"):
        pack_groups(x, torch.zeros(2, dtype=torch.int64), 0, 2, 32, True)
    with pytest.raises(ValueError, match="backend must be one of"):
        pack_groups(x, ZERO_SEED, 0, 2, 32, True, backend="cuda")
    with pytest.raises(TypeError, match="seed must be an int or None"):
        pack(x, 2, seed=1.5)
    with pytest.raises(TypeError, match="pack takes a torch.Tensor"):
        pack([1.0, 2.0], 2)


def test_unpack_checks_codes_and_meta_against_shape():
    codes, meta = det_pack(torch.randn(100), 2)
    with pytest.raises(ValueError, match="codes must be uint8 of shape"):
        unpack_groups(codes, meta, (200,), torch.float32, 2, 32)
    with pytest.raises(ValueError, match="codes must be uint8 of shape"):
        unpack_groups(codes, meta, (100,), torch.float32, 4, 32)
    with pytest.raises(ValueError, match="meta must be bfloat16"):
        unpack_groups(codes, meta.float(), (100,), torch.float32, 2, 32)
    with pytest.raises(TypeError, match="shape must be a sequence of ints"):
        unpack_groups(codes, meta, (100.0,), torch.float32, 2, 32)


def test_packed_nbytes():
    assert packed_nbytes(0, 2, 256) == 0
    assert packed_nbytes(1, 2, 256) == 64 + 4
    assert packed_nbytes(1 << 20, 2, 256) == (1 << 18) + 4096 * 4
    assert packed_nbytes(300, 8, 32) == 10 * 36


# ---------------------------------------------------------------- custom ops, fake and meta


def test_ops_on_meta_device():
    x = torch.empty(7, 33, device="meta", dtype=torch.float16)
    p = pack(x, 4, group_size=64)
    assert p.codes.device.type == "meta" and p.codes.shape == (4, 32) and p.meta.shape == (4, 2)
    y = p.unpack()
    assert y.device.type == "meta" and y.shape == (7, 33) and y.dtype == torch.float16


def test_ops_under_fake_tensor_mode():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        x = torch.empty(5, 77)
        codes, meta = pack_groups(x, torch.zeros(1, dtype=torch.int64), 1, 2, 32, True)
        assert codes.shape == (13, 8) and codes.dtype == torch.uint8
        assert meta.shape == (13, 2) and meta.dtype == torch.bfloat16
        y = unpack_groups(codes, meta, x.shape, torch.bfloat16, 2, 32)
        assert y.shape == (5, 77) and y.dtype == torch.bfloat16


def _round_trip(x, seed):
    codes, meta = pack_groups(x, seed, 3, 2, 64, True)
    return unpack_groups(codes, meta, x.shape, x.dtype, 2, 64) * 2


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_pack_unpack_compiles_without_graph_breaks(backend):
    torch._dynamo.reset()
    x, seed = torch.randn(10, 50), seed_of(4)
    compiled = torch.compile(_round_trip, backend=backend, fullgraph=True)
    torch.testing.assert_close(compiled(x, seed), _round_trip(x, seed), rtol=0, atol=0)
    assert torch._dynamo.explain(_round_trip)(x, seed).graph_break_count == 0


def test_custom_op_schemas():
    assert str(torch.ops.actfx.pack_groups.default._schema) == (
        "actfx::pack_groups(Tensor x, Tensor seed, int stream, float bits, int group_size, "
        "bool stochastic) -> (Tensor, Tensor)"
    )
    assert str(torch.ops.actfx.unpack_groups.default._schema) == (
        "actfx::unpack_groups(Tensor codes, Tensor meta, SymInt[] shape, ScalarType dtype, "
        "float bits, int group_size) -> Tensor"
    )
    torch.library.opcheck(
        torch.ops.actfx.pack_groups.default, (torch.randn(100), seed_of(1), 0, 2, 32, False)
    )
    codes, meta = det_pack(torch.randn(100), 2)
    torch.library.opcheck(
        torch.ops.actfx.unpack_groups.default, (codes, meta, [100], torch.float16, 2, 32)
    )
    # bits is a float in the schema so that three levels (1.6) pass through it
    torch.library.opcheck(
        torch.ops.actfx.pack_groups.default, (torch.randn(100), seed_of(1), 0, TERNARY, 32, True)
    )
    codes, meta = det_pack(torch.randn(100), TERNARY)
    torch.library.opcheck(
        torch.ops.actfx.unpack_groups.default, (codes, meta, [100], torch.float32, TERNARY, 32)
    )


def test_packs_of_tensors_that_require_grad_carry_no_gradient():
    x = torch.randn(100, requires_grad=True) * 2
    p = pack(x, 2, group_size=32)
    assert not p.meta.requires_grad and not p.codes.requires_grad
    assert not p.unpack().requires_grad
