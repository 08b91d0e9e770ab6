"""Transformer blocks: identical forward, close gradients at 8 bits, nearly all saved bytes packed."""

from __future__ import annotations

import pytest
import torch

import actfx
from actfx.accounting import count_saved
from actfx.models import build_model, get_model_spec
from transformer_blocks import BLOCKS, example

FLOAT = ("torch.float32", "torch.float16")  # test models run in fp32: bf16 here is packing metadata


def grads(model, args, seed):
    model.zero_grad(set_to_none=True)
    torch.set_rng_state(seed)
    out = model(*args)
    weight = torch.linspace(-1, 1, out.numel()).reshape(out.shape)
    (out * weight).sum().backward()
    return torch.cat([p.grad.reshape(-1) for p in model.parameters() if p.grad is not None])


def packed_share(model, converted, args):
    torch.manual_seed(0)
    with count_saved(model) as before:
        kept = model(*args)  # what the graph of a live output holds is what counts
    torch.manual_seed(0)
    with count_saved(converted) as after:
        kept = converted(*args)  # noqa: F841
    baseline = sum(v for k, v in before.by_dtype.items() if k in FLOAT)
    left = sum(v for k, v in after.by_dtype.items() if k in FLOAT)
    return 1.0 - left / baseline, before.activation_bytes / after.activation_bytes


@pytest.mark.parametrize("name", BLOCKS)
def test_block_forward_identical(name):
    model, args = example(name)
    converted = actfx.convert(model, bits=2)
    for training in (True, False):
        model.train(training)
        converted.train(training)
        torch.manual_seed(5)
        expected = model(*args)
        torch.manual_seed(5)
        assert torch.equal(converted(*args), expected), f"{name} training={training}"


@pytest.mark.parametrize("name", BLOCKS)
def test_block_gradients_close_at_8_bits(name):
    model, args = example(name)
    converted = actfx.convert(model, bits=8)
    state = torch.get_rng_state()
    exact, approx = grads(model, args, state), grads(converted, args, state)
    error = ((approx - exact).norm() / exact.norm()).item()
    assert error < 0.05, f"{name}: 8-bit gradient error {error:.4f}"


@pytest.mark.parametrize("name", BLOCKS)
def test_block_saves_at_least_90_percent_of_float_bytes_packed(name):
    model, args = example(name)
    converted = actfx.convert(model, bits=2)
    share, _ = packed_share(model, converted, args)
    assert share >= 0.9, f"{name}: only {share:.1%} of the saved float bytes are packed"
    assert not converted._actfx_record.uncovered, converted._actfx_record.uncovered


@pytest.mark.parametrize("name", ["gpt_tiny", "llama_tiny", "vit_tiny", "swin_tiny"])
def test_reference_transformers(name):
    torch.manual_seed(0)
    model = build_model(name)
    tokens = get_model_spec(name).example_input(4)
    converted = actfx.convert(model, bits=2)
    torch.manual_seed(1)
    expected = model(tokens)
    torch.manual_seed(1)
    assert torch.equal(converted(tokens), expected)
    share, ratio = packed_share(model, converted, (tokens,))
    assert share >= 0.9
    assert ratio >= 6.0, f"{name}: activation memory only {ratio:.1f}x smaller at 2 bits"


def test_swin_shifted_window_attention_gradients_close_at_8_bits():
    # Swin: roll, window partition views, relative-position bias (a parameter gather), the shift
    # mask added to hand-written attention, patch merging's strided slices.
    torch.manual_seed(0)
    model = build_model("swin_tiny")
    x = get_model_spec("swin_tiny").example_input(2)
    converted = actfx.convert(model, bits=8)
    state = torch.get_rng_state()
    exact, approx = grads(model, (x,), state), grads(converted, (x,), state)
    error = ((approx - exact).norm() / exact.norm()).item()
    assert error < 0.05, f"swin_tiny: 8-bit gradient error {error:.4f}"
