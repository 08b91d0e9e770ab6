"""Tests for `actfx/kernels/triton_pack.py`: byte-identical to the PyTorch reference in
deterministic mode, unbiased and reproducible in stochastic mode.

Without a GPU the kernels run in Triton's interpreter on CPU tensors (tests/conftest.py sets
TRITON_INTERPRET=1); it takes ~10 ms per program, so the tensors here are small. The `cuda` tests
repeat the comparison on a GPU, including a tensor past 2**31 elements.
"""

import math
import warnings

import pytest
import torch

pytest.importorskip("triton")

from actfx.kernels import TERNARY, pack_groups, unpack_groups  # noqa: E402

# numpy, inside the interpreter, warns about the NaN / inf groups that the tests feed on purpose
pytestmark = pytest.mark.filterwarnings(
    "ignore:invalid value encountered:RuntimeWarning", "ignore:All-NaN slice:RuntimeWarning"
)

INTERPRETED = not torch.cuda.is_available()
DEVICE = "cpu" if INTERPRETED else "cuda"


def seed_of(s: int, device=DEVICE) -> torch.Tensor:
    return torch.tensor([s], dtype=torch.int64, device=device)


def same_values(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit-identical, treating every NaN as equal (NaN payloads are not part of the contract)."""
    if a.shape != b.shape or a.dtype != b.dtype or not torch.equal(a.isnan(), b.isnan()):
        return False
    as_int = {4: torch.int32, 2: torch.int16}[a.element_size()]
    return torch.equal(a.masked_fill(a.isnan(), 0).view(as_int), b.masked_fill(b.isnan(), 0).view(as_int))


def make_input(shape, dtype, group_size, device=DEVICE, seed=0):
    """Random values at several scales, plus a constant group, a NaN group and an inf group."""
    gen = torch.Generator().manual_seed(seed)
    n = math.prod(shape)
    x = torch.randn(n, generator=gen) * torch.logspace(-2, 2, n)[torch.randperm(n, generator=gen)]
    if n >= 4 * group_size:
        x[group_size : 2 * group_size] = 0.1  # constant, not a bf16 value
        x[2 * group_size + 3] = float("nan")
        x[3 * group_size + 1] = float("-inf")
    return x.reshape(shape).to(dtype).to(device)


def assert_matches_reference(x, bits, group_size):
    seed = seed_of(9, x.device)
    got = pack_groups(x, seed, 1, bits, group_size, False, backend="triton")
    want = pack_groups(x, seed, 1, bits, group_size, False, backend="reference")
    assert torch.equal(got[0], want[0]), "codes differ"
    assert torch.equal(got[1].view(torch.int16), want[1].view(torch.int16)), "meta differs"
    args = (x.shape, x.dtype, bits, group_size)
    y_triton = unpack_groups(*want, *args, backend="triton")
    y_ref = unpack_groups(*want, *args, backend="reference")
    assert y_triton.is_contiguous() and y_triton.shape == x.shape
    assert same_values(y_triton, y_ref)


@pytest.mark.parametrize("bits", [1, TERNARY, 2, 4, 8])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape,group_size", [((5, 37), 32), ((333,), 64), ((3, 1, 150), 128)])
def test_deterministic_matches_reference(bits, dtype, shape, group_size):
    assert_matches_reference(make_input(shape, dtype, group_size), bits, group_size)


@pytest.mark.parametrize("bits", [2, TERNARY])
@pytest.mark.parametrize("group_size", [32, 4096])
def test_group_size_extremes_match_reference(group_size, bits):
    # 32: many groups per program; 4096: one group per program, and a partial one
    assert_matches_reference(make_input((2 * 4096 + 100,), torch.float32, group_size), bits, group_size)


def test_non_contiguous_input_matches_reference():
    x = make_input((64, 40), torch.float16, 32).t()
    assert_matches_reference(x, 4, 32)


def test_empty_tensor():
    x = torch.empty(0, 3, device=DEVICE)
    codes, meta = pack_groups(x, seed_of(0), 0, 2, 32, True, backend="triton")
    assert codes.shape == (0, 8) and meta.shape == (0, 2)
    assert unpack_groups(codes, meta, (0, 3), torch.float32, 2, 32, backend="triton").shape == (0, 3)


def test_stochastic_is_unbiased_and_reproducible():
    # See tests/test_format.py: 1/3 of a step above code 0; nearest rounding would give mean 0.
    groups = 512
    x = torch.full((groups, 32), 1 / 3)
    x[:, 0], x[:, 1] = 0.0, 3.0
    x = x.reshape(-1).to(DEVICE)
    codes, meta = pack_groups(x, seed_of(21), 5, 2, 32, True, backend="triton")
    again = pack_groups(x, seed_of(21), 5, 2, 32, True, backend="triton")
    other_stream = pack_groups(x, seed_of(21), 6, 2, 32, True, backend="triton")
    other_seed = pack_groups(x, seed_of(22), 5, 2, 32, True, backend="triton")
    assert torch.equal(codes, again[0])
    assert not torch.equal(codes, other_stream[0]) and not torch.equal(codes, other_seed[0])

    y = unpack_groups(codes, meta, x.shape, x.dtype, 2, 32, backend="triton").reshape(groups, 32)
    samples = y[:, 2:].double().cpu()
    se = math.sqrt(2) / 3 / math.sqrt(samples.numel())
    assert abs(samples.mean().item() - 1 / 3) < 5 * se
    assert set(samples.unique().tolist()) <= {0.0, 1.0}


def test_three_levels_round_stochastically_without_bias():
    # [0, 2, 1/3 x 30]: step 1, so 1/3 rounds to level 1 with probability 1/3
    groups = 512
    x = torch.full((groups, 32), 1 / 3)
    x[:, 0], x[:, 1] = 0.0, 2.0
    x = x.reshape(-1).to(DEVICE)
    codes, meta = pack_groups(x, seed_of(21), 5, TERNARY, 32, True, backend="triton")
    assert codes.shape == (groups, 7)
    y = unpack_groups(codes, meta, x.shape, x.dtype, TERNARY, 32, backend="triton").reshape(groups, 32)
    samples = y[:, 2:].double().cpu()
    se = math.sqrt(2) / 3 / math.sqrt(samples.numel())
    assert abs(samples.mean().item() - 1 / 3) < 5 * se
    assert set(samples.unique().tolist()) == {0.0, 1.0}
    assert torch.equal(y[:, :2].cpu(), x.reshape(groups, 32)[:, :2].cpu())


def test_stochastic_error_is_below_one_step():
    x = make_input((20, 64), torch.float32, 64, seed=3)[4:]  # rows 1-3 hold the special groups
    codes, meta = pack_groups(x, seed_of(2), 0, 2, 64, True, backend="triton")
    y = unpack_groups(codes, meta, x.shape, x.dtype, 2, 64, backend="triton")
    step = meta[:, 1].float().repeat_interleave(64).reshape(x.shape)
    assert torch.all((y - x).abs() < step * (1 + 2**-20))


# ------------------------------------------------------------------------------ on a GPU


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("bits", [1, TERNARY, 2, 4, 8])
def test_cuda_matches_reference(dtype, bits):
    for shape, group_size in (((1000, 333), 256), ((77,), 32), ((3, 5000), 4096)):
        assert_matches_reference(make_input(shape, dtype, group_size, "cuda"), bits, group_size)


@pytest.mark.cuda
def test_cuda_auto_dispatch_uses_triton_without_warning(recwarn):
    x = make_input((4096,), torch.float32, 256, "cuda")
    seed = seed_of(1, "cuda")
    auto = pack_groups(x, seed, 0, 2, 256, True)
    triton = pack_groups(x, seed, 0, 2, 256, True, backend="triton")
    assert torch.equal(auto[0], triton[0])
    assert not [w for w in recwarn if "actfx" in str(w.message)]


@pytest.mark.cuda
def test_cuda_tensor_past_2_31_elements():
    n = 2**31 + 4096 + 77  # fp16: 4 GiB in, ~1 GiB of codes at 2 bits
    need = n * 2 + n // 4 + (n // 256) * 4 + n * 2  # input, codes, meta, output
    if torch.cuda.mem_get_info()[0] < need * 1.2:
        pytest.skip(f"needs ~{need * 1.2 / 2**30:.1f} GiB free GPU memory")
    x = torch.empty(n, dtype=torch.float16, device="cuda")
    x.uniform_(-1, 1)
    x[-5:] = 7.0
    seed = seed_of(0, "cuda")
    codes, meta = pack_groups(x, seed, 0, 2, 256, False, backend="triton")
    # the tail (past 2**31) must match the reference applied to the same groups alone
    first = (2**31 // 256) - 1
    tail = x[first * 256 :]
    want = pack_groups(tail, seed, 0, 2, 256, False, backend="reference")
    assert torch.equal(codes[first:], want[0])
    assert torch.equal(meta[first:].view(torch.int16), want[1].view(torch.int16))
    del x
    y = unpack_groups(codes, meta, (n,), torch.float16, 2, 256, backend="triton")
    torch.testing.assert_close(
        y[first * 256 :], unpack_groups(*want, tail.shape, torch.float16, 2, 256, backend="reference"),
        rtol=0, atol=0,
    )


def test_broken_device_falls_back_with_one_warning():
    # "cuda:99" fails to launch anywhere: the probe warns once, then the answer is cached.
    from actfx.kernels import _triton_works

    _triton_works.cache_clear()
    with pytest.warns(RuntimeWarning, match="falls back to the slower PyTorch reference"):
        assert _triton_works("cuda:99") is False
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _triton_works("cuda:99") is False
    _triton_works.cache_clear()
