"""Recompute as a plan choice: blocks whose forward backward reruns from their exact inputs.

Why: a transformer block held at 2 bits costs about what its one fp32 input costs. Rerunning it in
backward (activation checkpointing, ``Config.recompute_modules``) holds only that input, exactly,
so nothing inside it adds gradient variance and its bytes go to the other packs, at the price of
one more forward of the block.

Candidates are the repeated blocks (the outermost children of ``nn.ModuleList`` /
``nn.Sequential`` containers whose ops make packs) and the composite modules inside them (a
block's attention, its MLP): a sub-block costs a fraction of the block's FLOPs and may hold all of
its variance. Models assembled by hand (``self.block1 = Block()``, no container) offer their
composite parts the same way. Regions wider than a block are not offered: their whole forward
would live at once during their backward.

What a recompute needs is measured in one forward on fake tensors: every tensor a block reads,
keyed by its storage. A set of recomputed blocks holds the union of what its blocks read, so two
blocks reading one tensor hold it once. A block recomputed
drops the groups whose ops all run inside it. The choice is greedy: while the allowance of rerun
FLOPs lasts, add the block that lowers the least total variance reachable within the budget
(``choose`` on what is left) the most per FLOP; where no width fits, the one that lowers the bytes
needed the most. Then single exchanges (a block for the chosen ones it overlaps) while they lower
the variance within the allowance. Where the widths alone fit, a recompute may only widen the
groups left (their widths without recompute are the floor).
"""

from __future__ import annotations

import dataclasses

import networkx as nx
import torch
import torch.nn as nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils.flop_counter import FlopCounterMode

from actfx.passes.analyze import _Twins
from actfx.passes.state_call import call_with_state
from actfx.planner.choose import BudgetError, choose


# ``recompute="auto"``'s allowance, a share of the forward's FLOPs (a step is about three
# forwards, so about a tenth of a step): enough for one of a 4-layer ViT's blocks, where q and k
# otherwise keep 8 bits; ResNet-50 takes none at any share (a bottleneck's fp32 input costs more
# than its packs). README "Planning to a budget" has the measured steps.
AUTO_SHARE = 0.3


@dataclasses.dataclass(frozen=True)
class Block:
    path: str
    inputs: frozenset  # (value id, bytes) of the tensors it reads: held, exact, while it is recomputed
    flops: int  # its forward, rerun in backward
    groups: frozenset  # indices of the inventory's planned groups whose ops all run inside it
    extra: int = 0  # bytes it was found to hold beyond its inputs (charged after a measurement)

    @property
    def input_bytes(self) -> int:
        return sum(n for _, n in self.inputs) + self.extra


def held_bytes(blocks) -> int:
    """What recomputing ``blocks`` holds: each tensor they read once (the union of their inputs,
    keyed by storage), plus what each holds beyond its inputs."""
    read = dict(item for block in blocks for item in block.inputs)
    return sum(read.values()) + sum(b.extra for b in blocks)


def outermost(blocks: list) -> list:
    """The blocks not inside another of ``blocks`` (the repeated blocks, without their parts)."""
    return [b for b in blocks if not any(b.path.startswith(o.path + ".") for o in blocks)]


def candidate_paths(model: nn.Module, units) -> list:
    """The repeated blocks inside which some unit runs (outermost children of ModuleList /
    Sequential containers), their composite descendants inside which units run, and the
    composite parts of hand-assembled models (``self.enc1 = DoubleConv(...)``: a composite child
    of a plain module, holding some but not all of the units and no repeated block), found on the
    module tree as a networkx DiGraph (parent -> child); in tree order. Leaf modules are not
    offered: recomputing one op from its exact input is the "keep exact" width."""
    tree = nx.DiGraph()
    for path, module in model.named_modules():
        tree.add_node(path, container=isinstance(module, (nn.ModuleList, nn.Sequential)),
                      callable_=not isinstance(module, (nn.ModuleList, nn.ModuleDict)),
                      composite=next(module.children(), None) is not None)
        if path:
            tree.add_edge(path.rpartition(".")[0], path)
    running = {unit.rpartition(":")[0] for unit in units} & set(tree)
    holds = set(running).union(*(nx.ancestors(tree, m) for m in running))  # a unit runs at or below
    blocks = {child for parent, child in tree.edges if tree.nodes[parent]["container"] and child in holds}
    repeated = {b for b in blocks if not nx.ancestors(tree, b) & blocks}
    inner = {d for b in repeated for d in nx.descendants(tree, b)
             if d in holds and tree.nodes[d]["composite"] and tree.nodes[d]["callable_"]}
    # every unit inside it: the whole model (a wrapper's one child), wider than any block
    whole = {m for m in holds if running <= nx.descendants(tree, m) | {m}}
    parts = {child for parent, child in tree.edges
             if not tree.nodes[parent]["container"] and child in holds and child not in whole
             and tree.nodes[child]["composite"] and tree.nodes[child]["callable_"]
             and not nx.descendants(tree, child) & blocks and not nx.ancestors(tree, child) & repeated}
    order = {path: i for i, path in enumerate(tree)}
    return sorted(repeated | inner | parts, key=order.get)


def measure_blocks(model: nn.Module, inputs: tuple, paths: list, groups, *, dtype=None) -> tuple:
    """(a ``Block`` per path that holds some of ``groups``, the whole forward's FLOPs), from one
    forward on fake tensors (inputs may be real, meta or fake)."""
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    twin = _Twins(mode, dtype)
    state = {name: twin(t) for name, t in [*model.named_parameters(), *model.named_buffers()]}
    args = [twin(x) if isinstance(x, torch.Tensor) else x for x in inputs]
    seen: dict = {}
    alive: list = []  # tensors read by a block stay referenced, so a value's id is never reused
    counter = FlopCounterMode(display=False)
    handles = []
    for path in paths:
        handles.append(model.get_submodule(path).register_forward_pre_hook(_entered(path, seen, counter, alive),
                                                                             with_kwargs=True))
        handles.append(model.get_submodule(path).register_forward_hook(_left(path, seen, counter), with_kwargs=True))
    try:
        with mode, counter, torch.no_grad():
            if dtype is not None:
                args = [x.to(dtype) if isinstance(x, torch.Tensor) and x.is_floating_point() else x for x in args]
            call_with_state(model, state, tuple(args))
    finally:
        for h in handles:
            h.remove()
    blocks = []
    for path in paths:
        if path not in seen or "flops" not in seen[path]:
            continue  # not called on this input
        members = frozenset(i for i, g in enumerate(groups) if all(_inside(u, path) for u in g.units))
        if members:
            blocks.append(Block(path, frozenset(seen[path]["inputs"].items()), seen[path]["flops"], members))
    return blocks, counter.get_total_flops()


def _inside(unit: str, path: str) -> bool:
    module = unit.rpartition(":")[0]
    return module == path or module.startswith(path + ".")


def _entered(path, seen, counter, alive):
    def hook(module, args, kwargs):
        storages = {}
        for t in torch.utils._pytree.tree_leaves((args, kwargs)):
            if isinstance(t, torch.Tensor) and t.is_floating_point():
                alive.append(t)
                storages[t.untyped_storage()._cdata] = t.untyped_storage().nbytes()
        seen.setdefault(path, {}).setdefault("inputs", {}).update(storages)  # every call's inputs
        seen[path]["start"] = counter.get_total_flops()
    return hook


def _left(path, seen, counter):
    def hook(module, args, kwargs, output):
        seen[path]["flops"] = seen[path].get("flops", 0) + counter.get_total_flops() - seen[path]["start"]
    return hook


@dataclasses.dataclass(frozen=True)
class Choice:
    blocks: tuple  # Block, recomputed
    widths: dict  # planned group index -> width, for the groups left


def pick(options: list, blocks: list, room: int, allowance: float) -> Choice:
    """Blocks to recompute (at most ``allowance`` FLOPs of them; ``math.inf``: as many as it takes)
    and widths for the groups left, least total variance within ``room`` bytes. With
    ``allowance=None`` blocks are added only while no widths fit (raises ``BudgetError`` when even
    every block recomputed does not fit)."""
    chosen: list = []
    best = _evaluate(options, chosen, room)
    # Where the widths alone fit, recompute may only widen what is left, never narrow it: the
    # variance estimate adds packs' noise independently, which holds near the widths it was
    # measured at; at 1 bit everywhere noise compounds across layers (torchvision
    # EfficientNet-B0 at 64 px: a plan that recomputed two blocks and narrowed the rest to 1.03
    # bits predicted less variance and measured a gradient 10^6x its norm off).
    floor = best[2] if best[0] == "fits" else None
    spent = 0
    while True:
        if allowance is None and best[0] == "fits":
            break
        step = None
        for block in blocks:
            if block in chosen or any(block.groups & b.groups for b in chosen):
                continue
            if allowance is not None and spent + block.flops > allowance:
                continue
            trial = _evaluate(options, [*chosen, block], room, floor)
            gain = _gain(best, trial)
            if gain > 0 and (step is None or gain / max(block.flops, 1) > step[0]):
                step = (gain / max(block.flops, 1), block, trial)
        if step is None:
            break
        _, block, best = step
        chosen.append(block)
        spent += block.flops
    if allowance is not None:
        chosen, best = _exchange(options, blocks, chosen, best, room, allowance, floor)
    if best[0] != "fits":
        raise BudgetError(f"the packs need {best[1]} bytes at their narrowest, over the budget of {room}", best[1])
    return Choice(tuple(chosen), best[2])


def _exchange(options: list, blocks: list, chosen: list, best: tuple, room: int, allowance: float,
              floor: dict | None) -> tuple:
    """Improve the greedy choice by single exchanges: a block not chosen replaces the chosen blocks
    it overlaps (a whole block for its MLP, or the reverse) wherever that lowers the variance within
    the allowance. Greedy per FLOP takes a cheap sub-block first and can then never take its block."""
    improved = True
    while improved:
        improved = False
        for block in blocks:
            if block in chosen:
                continue
            kept = [b for b in chosen if not block.groups & b.groups]
            if sum(b.flops for b in kept) + block.flops > allowance:
                continue
            trial = _evaluate(options, [*kept, block], room, floor)
            if _gain(best, trial) > 0:
                chosen, best, improved = [*kept, block], trial, True
    return chosen, best


def _evaluate(options: list, blocks: list, room: int, floor: dict | None = None) -> tuple:
    """("fits", variance, widths) or ("over", bytes needed at the narrowest), each group left at
    least as wide as ``floor`` says (planned group index -> width; None: any width)."""
    dropped = set().union(*(b.groups for b in blocks)) if blocks else set()
    kept = [i for i in range(len(options)) if i not in dropped]
    left = room - held_bytes(blocks)
    try:
        widths = choose([options[i] for i in kept], left, None if floor is None else [floor[i] for i in kept])
    except BudgetError as err:
        return ("over", err.smallest + room - left)
    variance = sum(options[i].variance[w] for i, w in zip(kept, widths))
    return ("fits", variance, dict(zip(kept, widths)))


def _gain(now: tuple, trial: tuple) -> float:
    if trial[0] == "fits" and now[0] == "over":
        return 1e300  # fitting at all beats any variance; per FLOP, the cheapest block that fits wins
    if trial[0] == "over":
        return now[1] - trial[1] if now[0] == "over" else 0.0
    return now[1] - trial[1]
