"""Recompute as a plan choice (actfx/planner/recompute.py) and Config.recompute_modules."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import actfx
from actfx.accounting import count_saved
from actfx.config import Config
from actfx.models import build_model
import actfx.planner.make
from actfx.planner.choose import Option
from actfx.planner.recompute import (Block, Choice, _evaluate, candidate_paths, held_bytes, measure_blocks,
                                     outermost, pick)


class Mlp(nn.Module):
    def __init__(self, d=32):
        super().__init__()
        self.norm, self.up, self.act, self.down = nn.LayerNorm(d), nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d)

    def forward(self, x):
        return x + self.down(self.act(self.up(self.norm(x))))


class Stack(nn.Module):
    def __init__(self, depth=3, d=32, block=Mlp):
        super().__init__()
        self.blocks = nn.ModuleList(block(d) for _ in range(depth))

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return x


def _held(model, x) -> int:
    with count_saved(model) as saved:
        out = model(x)
    del out
    return saved.activation_bytes


def _grads(model, x):
    return torch.autograd.grad(model(x).square().mean(), list(model.parameters()))


def test_recomputed_modules_hold_only_their_inputs_and_give_the_exact_gradient():
    torch.manual_seed(0)
    model, x = Stack(), torch.randn(8, 16, 32)
    converted = actfx.convert(model, config=Config(bits=2, recompute_modules=("blocks.0", "blocks.1", "blocks.2")))
    kinds = [(d.module_path, d.kind) for d in converted._actfx_record.decisions]
    assert kinds == [("blocks.0", "checkpoint"), ("blocks.1", "checkpoint"), ("blocks.2", "checkpoint")]
    assert _held(converted, x) == 3 * x.numel() * 4  # each block's fp32 input, nothing inside
    with torch.no_grad():
        assert torch.equal(converted(x), model(x))
    for a, b in zip(_grads(converted, x), _grads(model, x)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_recompute_modules_must_be_module_paths():
    with pytest.raises(TypeError, match="recompute_modules must be a tuple of module paths"):
        Config(recompute_modules="blocks.0")


def test_candidates_are_the_repeated_blocks_and_the_composite_modules_inside_them():
    model = build_model("vit_tiny")
    units = [f"encoder.layers.encoder_layer_{i}.mlp.1:gelu" for i in range(4)] + ["conv_proj:conv"]
    # the MLP (a Sequential with children) is offered beside its block; its GELU (a leaf) is not,
    # nor is anything wider than a block (the encoder) or outside the repeated blocks (conv_proj)
    assert candidate_paths(model, units) == [p for i in range(4) for p in (f"encoder.layers.encoder_layer_{i}",
                                                                         f"encoder.layers.encoder_layer_{i}.mlp")]
    # the plan's fallback when recomputed parts overshoot: the blocks alone
    blocks = [Block(p, frozenset(), 1, frozenset({i})) for i, p in enumerate(candidate_paths(model, units))]
    assert [b.path for b in outermost(blocks)] == [f"encoder.layers.encoder_layer_{i}" for i in range(4)]


@pytest.mark.slow
def test_an_allowance_trades_recompute_for_variance_at_the_same_bytes():
    torch.manual_seed(0)
    model, x = build_model("gpt_tiny"), torch.randint(256, (4, 64))
    uniform = _held(actfx.convert(model, bits=2), x)
    widths_only = actfx.plan(model, x, activation_budget=uniform, recompute=False)
    assert not widths_only.recomputed
    planned = actfx.plan(model, x, activation_budget=uniform, recompute=1.0)
    assert [s.module for s in planned.recomputed] == ["h.0", "h.1"]
    assert planned.gradient_variance < 0.1 * widths_only.gradient_variance
    converted = actfx.convert(model, plan=planned)
    assert _held(converted, x) == planned.activation_bytes <= uniform
    assert {(d.module_path, d.kind) for d in converted._actfx_record.decisions} >= {("h.0", "checkpoint"),
                                                                                   ("h.1", "checkpoint")}
    # only the final LayerNorm's pack is left (8 bits): the gradient is within a percent of exact
    exact = torch.cat([g.reshape(-1) for g in _grads(model, x)])
    got = torch.cat([g.reshape(-1) for g in _grads(converted, x)])
    assert float((got - exact).norm() / exact.norm()) < 0.02


@pytest.mark.slow
def test_the_default_recomputes_a_vit_block_where_that_lowers_the_variance():
    """``recompute="auto"`` spends up to ``AUTO_SHARE`` of the forward's FLOPs where that lowers
    the variance (it used to recompute only where no widths fit): a 4-layer ViT at uniform 2-bit's
    bytes reruns one encoder layer, whose q and k otherwise keep 8 bits, and the rest widens."""
    torch.manual_seed(0)
    model, x = build_model("vit_tiny"), torch.randn(4, 3, 32, 32)
    nn.init.normal_(model.heads.head.weight, std=0.02)  # torchvision zeroes it: no gradient reaches the packs
    uniform = _held(actfx.convert(model, bits=2), x)
    widths_only = actfx.plan(model, x, activation_budget=uniform, recompute=False)
    planned = actfx.plan(model, x, activation_budget=uniform)
    assert [s.module for s in planned.recomputed] == ["encoder.layers.encoder_layer_0"]
    assert planned.gradient_variance < 0.3 * widths_only.gradient_variance
    assert _held(actfx.convert(model, plan=planned), x) == planned.activation_bytes <= uniform


def test_a_plan_with_recompute_saves_loads_and_reapplies(tmp_path):
    torch.manual_seed(0)
    model, x = Stack(), torch.randn(8, 16, 32)
    plan = actfx.plan(model, x, activation_budget=2 * _held(actfx.convert(model, bits=2), x), recompute=1.0)
    assert plan.recomputed
    path = tmp_path / "plan.json"
    plan.save(path)
    sites = {s["module"]: s for s in json.loads(path.read_text())["sites"] if s["op"] == "checkpoint"}
    assert set(sites) == {s.module for s in plan.recomputed}
    again = actfx.Plan.load(path)
    assert again == plan and again.config().recompute_modules == plan.config().recompute_modules


def test_recompute_is_refused_where_it_does_not_apply():
    model, x = Stack(), torch.randn(2, 4, 32)
    with pytest.raises(ValueError, match="recompute must be 'auto', False or a fraction"):
        actfx.plan(model, x, activation_budget=10_000, recompute="yes")
    with pytest.raises(ValueError, match="recompute= is the eager path's"):
        actfx.plan(model, x, activation_budget=10_000, recompute=0.5, path="compile")


def test_recompute_modules_must_name_submodules():
    with pytest.raises(ValueError, match="names 'blocks.7', which is not a submodule of Stack"):
        actfx.convert(Stack(), config=Config(recompute_modules=("blocks.7",)))


class ConvBlock(nn.Module):
    def __init__(self, c=8):
        super().__init__()
        self.conv, self.bn, self.act = nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c), nn.Hardswish()

    def forward(self, x):
        return x + self.act(self.bn(self.conv(x)))


def test_a_recomputed_block_with_batch_norm_counts_the_batch_once():
    """The replay in backward must not update BatchNorm's running statistics again (it crashed:
    vjp refuses num_batches_tracked.add_ on a captured buffer)."""
    torch.manual_seed(0)
    model, x = nn.Sequential(ConvBlock(), ConvBlock()), torch.randn(4, 8, 6, 6)
    reference = nn.Sequential(ConvBlock(), ConvBlock())
    reference.load_state_dict(model.state_dict())
    converted = actfx.convert(model, config=Config(recompute_modules=("0", "1")))
    assert [d.kind for d in converted._actfx_record.decisions] == ["checkpoint", "checkpoint"]
    got = torch.autograd.grad(converted(x).square().mean(), list(model.parameters()))
    want = torch.autograd.grad(reference(x).square().mean(), list(reference.parameters()))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    for name, buffer in reference.state_dict().items():
        torch.testing.assert_close(model.state_dict()[name], buffer, rtol=0, atol=0)
    assert int(model[0].bn.num_batches_tracked) == 1


class Parallel(nn.Module):
    """Two branches reading one tensor (GPT-J's parallel attention and MLP, reduced to MLPs)."""

    def __init__(self, d=32):
        super().__init__()
        self.a = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))
        self.b = nn.Sequential(nn.Linear(d, 2 * d), nn.Tanh(), nn.Linear(2 * d, d))

    def forward(self, x):
        return x + self.a(x) + self.b(x)


def test_two_recomputed_branches_reading_one_tensor_hold_it_once():
    torch.manual_seed(0)
    model, x = Stack(depth=1, block=Parallel), torch.randn(8, 16, 32)
    converted = actfx.convert(model, config=Config(recompute_modules=("blocks.0.a", "blocks.0.b")))
    assert _held(converted, x) == x.numel() * 4
    groups = actfx.planner.make.take_inventory(actfx.convert(model), (x,)).groups
    blocks, _ = measure_blocks(model, (x,), ["blocks.0.a", "blocks.0.b"], groups)
    assert [b.path for b in blocks] == ["blocks.0.a", "blocks.0.b"]
    assert held_bytes(blocks) == held_bytes(blocks[:1]) == x.numel() * 4  # the union of what they read: x once
    assert blocks[0].input_bytes + blocks[1].input_bytes == 2 * x.numel() * 4


@pytest.mark.slow
def test_a_small_allowance_recomputes_a_branch_inside_a_block():
    torch.manual_seed(0)
    model, x = Stack(depth=2, block=Parallel), torch.randn(8, 16, 32)
    uniform = _held(actfx.convert(model, bits=2), x)
    widths_only = actfx.plan(model, x, activation_budget=2 * uniform, recompute=False)
    planned = actfx.plan(model, x, activation_budget=2 * uniform, recompute=0.45)  # below a block's FLOPs
    recomputed = [s.module for s in planned.recomputed]
    assert recomputed and all(m.startswith("blocks.") and m.count(".") == 2 for m in recomputed), recomputed
    assert planned.gradient_variance < widths_only.gradient_variance
    converted = actfx.convert(model, plan=planned)
    assert _held(converted, x) == planned.activation_bytes <= 2 * uniform
    assert {d.module_path for d in converted._actfx_record.decisions if d.kind == "checkpoint"} == set(recomputed)


def test_recompute_only_widens_what_is_left_where_the_widths_alone_fit():
    """Narrowing the other packs to pay for a recompute is refused even where the summed
    variance says it helps: that sum assumes independent noise, and at 1 bit everywhere noise
    compounds across layers (EfficientNet-B0 at 64 px measured a gradient 10^6x its norm off)."""
    widths = {1: 10, 2: 20, 4: 40, 8: 80}
    options = [Option(widths, {1: 1e4, 2: 1e3, 4: 100, 8: 10}), Option(widths, {1: 30, 2: 3, 4: 0.3, 8: 0.03}),
               Option(widths, {1: 30, 2: 3, 4: 0.3, 8: 0.03})]
    block = Block("blocks.0", frozenset({("x", 75)}), flops=1, groups=frozenset({0}))
    alone = _evaluate(options, [], 100)
    assert alone == ("fits", 103.3, {0: 4, 1: 4, 2: 2})
    assert _evaluate(options, [block], 100) == ("fits", 60, {1: 1, 2: 1})  # less summed variance, 1 bit
    assert pick(options, [block], 100, allowance=10) == Choice((), {0: 4, 1: 4, 2: 2})
    wide = Block("blocks.0", frozenset({("x", 35)}), flops=1, groups=frozenset({0}))  # pays for itself
    chosen = pick(options, [wide], 100, allowance=10)
    assert chosen.blocks == (wide,) and all(w >= alone[2][i] for i, w in chosen.widths.items())


class _Attention(nn.Module):
    def __init__(self, d=32, heads=4):
        super().__init__()
        self.heads, self.qkv, self.out = heads, nn.Linear(d, 3 * d), nn.Linear(d, d)

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.qkv(x).reshape(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        p = (q @ k.transpose(-1, -2) * (d // self.heads) ** -0.5).softmax(-1)
        return self.out((p @ v).transpose(1, 2).reshape(b, t, d))


class _Block(nn.Module):
    def __init__(self, d=32):
        super().__init__()
        self.norm, self.attn, self.fc = nn.LayerNorm(d), _Attention(d), nn.Linear(d, d)

    def forward(self, x):
        x = x + self.attn(self.norm(x))
        return x + nn.functional.gelu(self.fc(x))


class HandAssembled(nn.Module):
    """Blocks as attributes (``self.block1``), no ModuleList: hand-written models often look so."""

    def __init__(self, d=32):
        super().__init__()
        self.block1, self.block2, self.head = _Block(d), _Block(d), nn.Linear(d, 10)

    def forward(self, x):
        return self.head(self.block2(self.block1(x)))


@pytest.mark.slow
def test_hand_assembled_blocks_are_candidates_and_recomputed():
    """Composite children of a plain module are offered (not the head, a leaf, nor the whole
    model); on 64-token attention a recomputed block holds its fp32 input, less than its packs."""
    torch.manual_seed(0)
    model, x = HandAssembled(), torch.randn(4, 64, 32)
    units = [d.key for d in actfx.convert(model)._actfx_record.decisions]
    assert candidate_paths(model, units) == ["block1", "block1.attn", "block2", "block2.attn"]
    uniform = _held(actfx.convert(model, bits=2), x)
    planned = actfx.plan(model, x, activation_budget=uniform, recompute=1.0)
    assert {s.module for s in planned.recomputed} == {"block1", "block2"}
    converted = actfx.convert(model, plan=planned)
    assert _held(converted, x) == planned.activation_bytes < uniform
    for exact, got in zip(_grads(model, x), _grads(converted, x)):
        torch.testing.assert_close(got, exact, rtol=1e-4, atol=1e-6)


class _Routed(nn.Module):
    """Top-2 routing (MoE): ``torch.where`` picks each expert's tokens, a shape fake tensors cannot know."""

    def __init__(self, d=32, experts=4):
        super().__init__()
        self.router = nn.Linear(d, experts)
        self.experts = nn.ModuleList([nn.Sequential(nn.Linear(d, 64), nn.GELU(), nn.Linear(64, d))
                                      for _ in range(experts)])

    def forward(self, x):
        w, idx = self.router(x).softmax(-1).topk(2, -1)
        out = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            tok, slot = torch.where(idx == e)
            out = out.index_add(0, tok, expert(x[tok]) * w[tok, slot, None])
        return out


class _RoutedNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([_Routed() for _ in range(2)])
        self.out = nn.Linear(32, 10)

    def forward(self, x):
        for block in self.blocks:
            x = x + block(F.layer_norm(x, (32,)))
        return self.out(x)


def test_a_forward_with_value_dependent_shapes_plans_widths_only():
    """Measuring what blocks would recompute runs on fake tensors, where ``nonzero`` has no size:
    recompute=0.3, and the default "auto" once widths alone missed the budget, raised
    DynamicOutputShapeException instead of a plan or a BudgetError."""
    torch.manual_seed(0)
    model, x = _RoutedNet(), torch.randn(64, 32)
    with count_saved(model) as held:
        out = actfx.convert(model, bits=2)(x)  # noqa: F841 - what a live output's graph holds is what counts
    with pytest.warns(UserWarning, match="shapes that depend on tensor values"):
        plan = actfx.plan(model, (x,), activation_budget=held.activation_bytes, recompute=0.3)
    assert not plan.recomputed and plan.activation_bytes <= held.activation_bytes
    with pytest.warns(UserWarning, match="shapes that depend on tensor values"), pytest.raises(actfx.BudgetError):
        actfx.plan(model, (x,), activation_budget=held.activation_bytes // 2, recompute="auto")
