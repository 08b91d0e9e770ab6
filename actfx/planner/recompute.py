"""Recompute as a plan choice: blocks whose forward backward reruns from their exact inputs.

Why: a transformer block held at 2 bits costs about what its one fp32 input costs. Rerunning it in
backward (activation checkpointing, ``Config.recompute_modules``) holds only that input, exactly,
so nothing inside it adds gradient variance and its bytes go to the other packs, at the price of
one more forward of the block. Candidates are repeated blocks: the children of ``nn.ModuleList`` /
``nn.Sequential`` containers whose ops make packs (the outermost such blocks). A block recomputed
drops the groups whose ops all run inside it and holds its inputs (bytes and forward FLOPs from
one forward on fake tensors). The choice is greedy: while the allowance of rerun FLOPs lasts, add
the block that lowers the least total variance reachable within the budget (``choose`` on what
is left) the most per FLOP; where no width fits, the one that lowers the bytes needed the most.
"""

from __future__ import annotations

import dataclasses

import networkx as nx
import torch
import torch.nn as nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils.flop_counter import FlopCounterMode

from actfx.passes.analyze import _Twins
from actfx.planner.choose import BudgetError, choose


@dataclasses.dataclass(frozen=True)
class Block:
    path: str
    input_bytes: int  # held while it is recomputed (its tensor inputs, exact)
    flops: int  # its forward, rerun in backward
    groups: frozenset  # indices of the inventory's planned groups whose ops all run inside it


def candidate_paths(model: nn.Module, units) -> list:
    """Outermost children of ModuleList / Sequential containers inside which some unit runs,
    found on the module tree as a networkx DiGraph (parent -> child)."""
    tree = nx.DiGraph()
    for path, module in model.named_modules():
        tree.add_node(path, container=isinstance(module, (nn.ModuleList, nn.Sequential)))
        if path:
            tree.add_edge(path.rpartition(".")[0], path)
    running = {unit.rpartition(":")[0] for unit in units} & set(tree)
    holds = set(running).union(*(nx.ancestors(tree, m) for m in running))  # a unit runs at or below
    blocks = {child for parent, child in tree.edges if tree.nodes[parent]["container"] and child in holds}
    order = {path: i for i, path in enumerate(tree)}
    return sorted((b for b in blocks if not nx.ancestors(tree, b) & blocks), key=order.get)


def measure_blocks(model: nn.Module, inputs: tuple, paths: list, groups, *, dtype=None) -> tuple:
    """(a ``Block`` per path that holds some of ``groups``, the whole forward's FLOPs), from one
    forward on fake tensors (inputs may be real, meta or fake)."""
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    twin = _Twins(mode, dtype)
    state = {name: twin(t) for name, t in [*model.named_parameters(), *model.named_buffers()]}
    args = [twin(x) if isinstance(x, torch.Tensor) else x for x in inputs]
    seen: dict = {}
    counter = FlopCounterMode(display=False)
    handles = []
    for path in paths:
        handles.append(model.get_submodule(path).register_forward_pre_hook(_entered(path, seen, counter),
                                                                             with_kwargs=True))
        handles.append(model.get_submodule(path).register_forward_hook(_left(path, seen, counter), with_kwargs=True))
    try:
        with mode, counter, torch.no_grad():
            if dtype is not None:
                args = [x.to(dtype) if isinstance(x, torch.Tensor) and x.is_floating_point() else x for x in args]
            torch.func.functional_call(model, state, tuple(args))
    finally:
        for h in handles:
            h.remove()
    blocks = []
    for path in paths:
        if path not in seen or "flops" not in seen[path]:
            continue  # not called on this input
        members = frozenset(i for i, g in enumerate(groups) if all(_inside(u, path) for u in g.units))
        if members:
            blocks.append(Block(path, seen[path]["bytes"], seen[path]["flops"], members))
    return blocks, counter.get_total_flops()


def _inside(unit: str, path: str) -> bool:
    module = unit.rpartition(":")[0]
    return module == path or module.startswith(path + ".")


def _entered(path, seen, counter):
    def hook(module, args, kwargs):
        storages = {}
        for t in torch.utils._pytree.tree_leaves((args, kwargs)):
            if isinstance(t, torch.Tensor) and t.is_floating_point():
                storages[t.untyped_storage()._cdata] = t.untyped_storage().nbytes()
        seen.setdefault(path, {})["bytes"] = sum(storages.values())
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
            trial = _evaluate(options, [*chosen, block], room)
            gain = _gain(best, trial)
            if gain > 0 and (step is None or gain / max(block.flops, 1) > step[0]):
                step = (gain / max(block.flops, 1), block, trial)
        if step is None:
            break
        _, block, best = step
        chosen.append(block)
        spent += block.flops
    if best[0] != "fits":
        raise BudgetError(f"the packs need {best[1]} bytes at their narrowest, over the budget of {room}", best[1])
    return Choice(tuple(chosen), best[2])


def _evaluate(options: list, blocks: list, room: int) -> tuple:
    """("fits", variance, widths) or ("over", bytes needed at the narrowest)."""
    dropped = set().union(*(b.groups for b in blocks)) if blocks else set()
    kept = [i for i in range(len(options)) if i not in dropped]
    left = room - sum(b.input_bytes for b in blocks)
    try:
        widths = choose([options[i] for i in kept], left)
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
