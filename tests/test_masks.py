"""Tests for `actfx/kernels/masks.py` through `pack_bits` / `unpack_bits`: layout, round trip,
size, validation and the custom ops on fake / meta tensors."""

import pytest
import torch

from actfx.kernels import mask_nbytes, pack_bits, unpack_bits


def test_literal_bytes():
    # bit i -> byte i // 8, bit i % 8, LSB first; the last byte is zero-padded
    mask = torch.tensor([1, 0, 0, 0, 0, 0, 0, 1, 0, 1, 1], dtype=torch.bool)
    assert pack_bits(mask).tolist() == [0b1000_0001, 0b0000_0110]


@pytest.mark.parametrize("shape", [(1,), (7,), (8,), (9,), (3, 5, 7), (2, 64), (0,), (4, 0)])
def test_round_trip_and_size(shape):
    mask = torch.rand(shape, generator=torch.Generator().manual_seed(0)) > 0.5
    codes = pack_bits(mask)
    n = mask.numel()
    assert codes.dtype == torch.uint8 and codes.shape == ((n + 7) // 8,)
    assert codes.nbytes == mask_nbytes(n) == -(-n // 8)
    back = unpack_bits(codes, shape)
    assert back.dtype == torch.bool and back.shape == shape
    assert torch.equal(back, mask)


def test_non_contiguous_mask():
    x = torch.randn(30, 20)
    mask = (x > 0).t()
    assert torch.equal(unpack_bits(pack_bits(mask), mask.shape), mask)


def test_caller_mask_untouched():
    mask = torch.rand(100) > 0.3
    before = mask.clone()
    pack_bits(mask)
    assert torch.equal(mask, before)


def test_validation():
    with pytest.raises(TypeError, match="bool mask, got dtype torch.float32"):
        pack_bits(torch.randn(8))
    with pytest.raises(ValueError, match="1-D uint8 tensor of 2 bytes"):
        unpack_bits(torch.zeros(3, dtype=torch.uint8), (9,))


def test_meta_and_fake():
    from torch._subclasses.fake_tensor import FakeTensorMode

    codes = pack_bits(torch.empty(5, 13, dtype=torch.bool, device="meta"))
    assert codes.device.type == "meta" and codes.shape == (9,)
    assert unpack_bits(codes, (5, 13)).shape == (5, 13)
    with FakeTensorMode():
        codes = pack_bits(torch.empty(3, 3, dtype=torch.bool))
        assert codes.shape == (2,) and unpack_bits(codes, (3, 3)).dtype == torch.bool


def test_compiles_without_graph_breaks():
    def f(x):
        return x * unpack_bits(pack_bits(x > 0), x.shape)

    x = torch.randn(6, 11)
    torch._dynamo.reset()
    y = torch.compile(f, backend="aot_eager", fullgraph=True)(x)
    torch.testing.assert_close(y, torch.relu(x), rtol=0, atol=0)
