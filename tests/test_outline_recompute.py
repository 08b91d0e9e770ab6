"""Config.recompute_modules inside a graph torch.export captured (actfx/passes/outline_recompute.py)."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn as nn

import actfx
from actfx.accounting import count_saved
from actfx.config import Config
from actfx.models import build_model


class Block(nn.Module):
    def __init__(self, d=32):
        super().__init__()
        self.norm, self.up, self.act, self.down = nn.LayerNorm(d), nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d)
        self.drop = nn.Dropout(0.25)

    def forward(self, x):
        return x + self.drop(self.down(self.act(self.up(self.norm(x)))))


class BranchingStack(nn.Module):
    """Branches on its input's length, which fx cannot trace: torch.export captures it flat."""

    def __init__(self, depth=3, d=32, block=Block):
        super().__init__()
        self.blocks = nn.ModuleList(block(d) for _ in range(depth))

    def forward(self, x):
        if x.shape[1] > 1:
            x = x * 2
        for block in self.blocks:
            x = block(x)
        return x


class Untraceable(nn.Module):
    """Any model behind a branch fx cannot trace."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        if x.shape[0] > 1:
            return self.inner(x)
        return self.inner(x).clone()


def _held(model, x) -> int:
    with count_saved(model) as saved:
        out = model(x)
    del out
    return saved.activation_bytes


def _grads(model, x, seed=1):
    torch.manual_seed(seed)
    return torch.autograd.grad(model(x).square().mean(), list(model.parameters()))


def test_blocks_of_a_captured_model_are_recomputed_from_their_exact_inputs():
    """Every block recomputed: nothing inside is packed, so the gradients are the model's own
    (dropout's masks replayed), and each block holds its fp32 input only."""
    torch.manual_seed(0)
    model, x = BranchingStack().train(), torch.randn(4, 8, 32)
    config = Config(bits=2, recompute_modules=("blocks.0", "blocks.1", "blocks.2"))
    converted = actfx.convert(model, config=config, example_inputs=(x,))
    assert "" in converted._actfx_record.captured  # torch.export captured it
    kinds = [(d.module_path, d.kind) for d in converted._actfx_record.decisions if d.module_path]
    assert kinds == [("blocks.0", "checkpoint"), ("blocks.1", "checkpoint"), ("blocks.2", "checkpoint")]
    assert list(converted.state_dict()) == list(model.state_dict())
    assert all(a is b for a, b in zip(converted.parameters(), model.parameters()))
    torch.manual_seed(1)
    want_out = model(x)
    torch.manual_seed(1)
    assert torch.equal(converted(x), want_out)
    for got, want in zip(_grads(converted, x), _grads(model, x)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)  # the rerun's float order: same ops, same order
    assert _held(converted, x) == 3 * x.numel() * 4


def test_a_recomputed_block_of_a_captured_model_holds_less_than_the_same_model_without():
    torch.manual_seed(0)
    model, x = BranchingStack().train(), torch.randn(4, 8, 32)
    plain = actfx.convert(model, config=Config(bits=8), example_inputs=(x,))
    one = actfx.convert(model, config=Config(bits=8, recompute_modules=("blocks.1",)), example_inputs=(x,))
    inside = [d for d in one._actfx_record.decisions if (d.module_path or "").startswith("blocks.1.")]
    assert not inside and [d.kind for d in one._actfx_record.decisions if d.module_path == "blocks.1"] == ["checkpoint"]
    assert _held(one, x) < _held(plain, x)  # at 8 bits a block's packs outweigh its fp32 input
    exact = torch.cat([g.flatten() for g in _grads(model, x)])
    got = torch.cat([g.flatten() for g in _grads(one, x)])
    assert float((got - exact).norm() / exact.norm()) < 0.03  # the other blocks at 8 bits


class NormedBlock(nn.Module):
    def __init__(self, d=32):
        super().__init__()
        self.lin, self.bn = nn.Linear(d, d), nn.BatchNorm1d(d)

    def forward(self, x):
        return x + self.bn(self.lin(x).transpose(1, 2)).transpose(1, 2)


def test_a_captured_block_that_updates_running_statistics_counts_the_batch_once():
    """The rerun writes BatchNorm's running statistics into copies (they were refused before: a
    rerun into the buffers would count the batch twice)."""
    torch.manual_seed(0)
    model, x = BranchingStack(depth=2, block=NormedBlock).train(), torch.randn(4, 8, 32)
    reference = BranchingStack(depth=2, block=NormedBlock).train()
    reference.load_state_dict(model.state_dict())
    converted = actfx.convert(model, config=Config(recompute_modules=("blocks.0", "blocks.1")), example_inputs=(x,))
    assert [d.kind for d in converted._actfx_record.decisions if d.module_path] == ["checkpoint", "checkpoint"]
    for got, want in zip(_grads(converted, x), _grads(reference, x)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    for name, buffer in reference.state_dict().items():
        torch.testing.assert_close(model.state_dict()[name], buffer, rtol=0, atol=0)
    assert int(model.blocks[0].bn.num_batches_tracked) == 1


def test_a_captured_model_converted_at_its_first_call_recomputes_the_blocks_named():
    torch.manual_seed(0)
    model, x = BranchingStack().train(), torch.randn(4, 8, 32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "does not trace as a whole": captured at the first call
        converted = actfx.convert(model, config=Config(bits=2, recompute_modules=("blocks.2",)))
    converted(x).square().mean().backward()
    assert [d.kind for d in converted._actfx_record.decisions if d.module_path == "blocks.2"] == ["checkpoint"]


@pytest.mark.slow
def test_the_plan_recomputes_blocks_of_a_model_torch_export_captured():
    """Models fx cannot trace (Hugging Face v5 transformers) were offered no recompute: a ViT
    behind a branch fx cannot trace gets what the traced one gets (an encoder layer rerun)."""
    torch.manual_seed(0)
    vit = build_model("vit_tiny")
    nn.init.normal_(vit.heads.head.weight, std=0.02)  # torchvision zeroes it: no gradient reaches the packs
    model, x = Untraceable(vit), torch.randn(4, 3, 32, 32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        uniform = actfx.convert(model, bits=2)
        uniform(x)
    planned = actfx.plan(model, x, activation_budget=_held(uniform, x))
    recomputed = [s.module for s in planned.recomputed]
    assert recomputed and all(m.startswith("inner.encoder.layers.") for m in recomputed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        converted = actfx.convert(model, plan=planned)
    converted(x)
    assert "" in converted._actfx_record.captured
    assert _held(converted, x) == planned.activation_bytes <= _held(uniform, x)


class TwoOutputBlock(nn.Module):
    """Hands out two tensors and reads its input's size, as T5's blocks hand on a position bias."""

    def __init__(self, d=32):
        super().__init__()
        self.inner = Block(d)
        self.gate = nn.Linear(d, d)

    def forward(self, x):
        h = self.inner(x)
        return h, torch.sigmoid(self.gate(h)).reshape(x.shape[0], -1)


class PairStack(nn.Module):
    def __init__(self, d=32):
        super().__init__()
        self.blocks = nn.ModuleList(TwoOutputBlock(d) for _ in range(2))

    def forward(self, x):
        if x.shape[1] > 1:
            x = x * 2
        gates = []
        for block in self.blocks:
            x, gate = block(x)
            gates.append(gate)
        return x.sum(-1) + torch.cat(gates, 1).sum(-1, keepdim=True)


def test_a_captured_block_handing_out_two_values_is_recomputed_exactly():
    torch.manual_seed(0)
    model, x = PairStack().train(), torch.randn(4, 8, 32)
    converted = actfx.convert(model, config=Config(recompute_modules=("blocks.0", "blocks.1")), example_inputs=(x,))
    assert [d.kind for d in converted._actfx_record.decisions if d.module_path] == ["checkpoint", "checkpoint"]
    torch.manual_seed(1)
    want_out = model(x)
    torch.manual_seed(1)
    assert torch.equal(converted(x), want_out)
    for got, want in zip(_grads(converted, x), _grads(model, x)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


class _Doubled(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return 2 * x

    @staticmethod
    def backward(ctx, g):
        return 2 * g


class FunctionAtTheRoot(BranchingStack):
    """A custom autograd.Function at the root: export refuses the whole model, so each block
    (which fx cannot trace either) is captured on its own at its first call."""

    def forward(self, x):
        return super().forward(_Doubled.apply(x))


class BranchingBlock(Block):
    def forward(self, x):
        if x.shape[0] > 1:
            return super().forward(x)
        return super().forward(x).clone()


def test_a_block_captured_on_its_own_is_recomputed_whole():
    torch.manual_seed(0)
    model, x = FunctionAtTheRoot(depth=2, block=BranchingBlock).train(), torch.randn(4, 8, 32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the root's export is refused, with a warning
        converted = actfx.convert(model, config=Config(bits=2, recompute_modules=("blocks.1",)))
        converted(x)
    assert "blocks.1" in converted._actfx_record.captured  # the block's own capture
    assert [d.kind for d in converted._actfx_record.decisions if d.module_path == "blocks.1"] == ["checkpoint"]
    assert not [d for d in converted._actfx_record.decisions if (d.module_path or "").startswith("blocks.1.")]
    torch.manual_seed(1)
    want_out = model(x)
    torch.manual_seed(1)
    assert torch.equal(converted(x), want_out)


class FunctionInside(BranchingBlock):
    def forward(self, x):
        return super().forward(_Doubled.apply(x))


def test_a_named_block_nothing_captures_warns_that_it_is_not_recomputed():
    torch.manual_seed(0)
    model, x = BranchingStack(depth=2, block=FunctionInside).train(), torch.randn(4, 8, 32)
    with pytest.warns(UserWarning, match=r"Config\.recompute_modules names blocks\.0, which is therefore not recomputed"):
        converted = actfx.convert(model, config=Config(recompute_modules=("blocks.0",)))
        converted(x)
    assert "checkpoint" not in {d.kind for d in converted._actfx_record.decisions}


def test_show_lists_a_recomputed_captured_block_as_one_row_with_what_its_ops_saved_before():
    """The outlined call stood in for a run of ops show could no longer pair: every row of such a
    model lost its "before" bytes."""
    import io

    from rich.console import Console

    torch.manual_seed(0)
    model, x = BranchingStack().train(), torch.randn(4, 8, 32)
    converted = actfx.convert(model, config=Config(bits=2, recompute_modules=("blocks.1",)), example_inputs=(x,))
    rows = actfx.show(converted, x, console=Console(file=io.StringIO()))
    block = [r for r in rows if r["module_path"] == "blocks.1"]
    assert len(block) == 1 and block[0]["op"] == "checkpoint"
    assert block[0]["after_bytes"] == x.numel() * 4 < block[0]["before_bytes"]  # its fp32 input, for all it saved
    assert all(r["before_bytes"] is not None for r in rows if r["covered"])


def test_the_plan_offers_blocks_torch_export_captures_one_by_one():
    """Where the root's export is refused, each block is captured at its first call: the offer
    was checked before any call, so no block was offered."""
    from actfx.planner import make
    from actfx.planner.inventory import take_inventory

    torch.manual_seed(0)
    model, x = FunctionAtTheRoot(depth=3, block=BranchingBlock).train(), torch.randn(4, 8, 32)
    base = Config(bits=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        converted = make._quiet_convert(model, config=base)
        make._capture_now(converted, (x,))
        groups = take_inventory(converted, (x,)).groups
        blocks, allowance, why_not = make._blocks(model, converted, base, (x,), groups, 1.0, None, (x,))
    assert [b.path for b in blocks] == ["blocks.0", "blocks.1", "blocks.2"] and allowance > 0 and why_not is None
    assert all(b.input_bytes == x.numel() * 4 for b in blocks)
