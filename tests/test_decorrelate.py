"""actfx/passes/decorrelate.py: softmax's backward reads its probabilities through two
independent packs, so short attention rows are packed (unbiased) instead of kept exact."""

from __future__ import annotations

import torch

import actfx
from actfx.compiled_estimate import as_fx_code
from actfx.passes.saved_plan import Storage
from checks import assert_mean_converges
from test_compiled import Block


def _grads(model, fn, x):
    model.zero_grad(set_to_none=True)
    fn(x).square().mean().backward()
    return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])


def test_short_attention_rows_are_packed_twice_and_unbiased():
    torch.manual_seed(0)
    model, x = Block(d=64, heads=4), torch.randn(4, 16, 64)  # rows of 16 probabilities: too short to dilute
    config = actfx.Config(bits=2, op_bits={})  # probabilities at 2 bits too: a biased product would show
    compiled, record = as_fx_code(model, config)
    exact = _grads(model, model, x)
    torch.manual_seed(1)
    k = 32
    grads = [_grads(model, compiled, x) for _ in range(k)]
    probabilities = [v for plan in record.plans for v in plan.saved if v.shape == (4, 4, 16, 16)]
    assert len(probabilities) == 2 and all(v.storage is Storage.PACKED for v in probabilities), \
        [(v.op, v.storage, v.reason) for v in probabilities]
    assert sum("alias" in v.op for v in probabilities) == 1  # the second, independent copy
    assert_mean_converges(grads, exact)


def test_batch_norm_over_few_values_is_packed_twice_and_unbiased():
    """32 values per channel (batch 8, 2x2): BatchNorm's backward x_hat * sum(g * x_hat) kept
    its input exact; two packs make it unbiased."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(8, 16, 3, padding=1), torch.nn.BatchNorm2d(16), torch.nn.ReLU(),
                                torch.nn.Conv2d(16, 8, 3, padding=1), torch.nn.BatchNorm2d(8))
    x = torch.randn(8, 8, 2, 2)
    compiled, record = as_fx_code(model, actfx.Config(bits=2, min_numel=16))
    exact = _grads(model, model, x)
    torch.manual_seed(1)
    k = 32
    grads = [_grads(model, compiled, x) for _ in range(k)]
    inputs = [v for plan in record.plans for v in plan.saved if v.shape in ((8, 16, 2, 2), (8, 8, 2, 2))
              and v.storage is not Storage.MASK and v.reason != "graph input"]
    assert inputs and all(v.storage is Storage.PACKED for v in inputs), [(v.op, v.storage, v.reason) for v in inputs]
    assert sum("alias" in v.op for v in inputs) == 2  # each BatchNorm input read through a second pack
    assert_mean_converges(grads, exact)


class _ChannelNormBlock(torch.nn.Module):
    """ConvNeXt's pattern: a LayerNorm over the 16 channels of each pixel, then 1x1 convolutions."""

    def __init__(self, c=16):
        super().__init__()
        self.dw = torch.nn.Conv2d(c, c, 3, padding=1, groups=c)
        self.norm = torch.nn.LayerNorm(c)
        self.fc1, self.fc2 = torch.nn.Conv2d(c, 4 * c, 1), torch.nn.Conv2d(4 * c, c, 1)

    def forward(self, x):
        h = self.norm(self.dw(x).permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        return x + self.fc2(torch.nn.functional.gelu(self.fc1(h)))


def test_layer_norm_over_short_rows_reads_its_normalised_value_twice_and_stays_unbiased():
    """Backward's x_hat * sum(g * x_hat) over 16 channels, x_hat saved as it is: the product's
    second factor is the saved value itself, with no chain of ops to copy; it stayed exact."""
    torch.manual_seed(0)
    model, x = _ChannelNormBlock(), torch.randn(4, 16, 8, 8)
    compiled, record = as_fx_code(model, actfx.Config(bits=2))
    exact = _grads(model, model, x)
    torch.manual_seed(1)
    k = 32
    grads = [_grads(model, compiled, x) for _ in range(k)]
    normed = [v for plan in record.plans for v in plan.saved if v.site.startswith("norm:") and v.shape == (4, 8, 8, 16)]
    assert all(v.storage is Storage.PACKED for v in normed), [(v.op, v.storage, v.reason) for v in normed]
    assert sum("alias" in v.op for v in normed) == 1  # x_hat's second, independent copy
    assert_mean_converges(grads, exact)
