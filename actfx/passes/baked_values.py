"""The plain Python values a traced forward read, and whether they changed since.

Why: fx runs the forward's Python once and keeps what it read as constants of the graph: a
temperature or gradient-reversal weight annealed during training, ``LeakyReLU.negative_slope``,
``LayerNorm.eps``, timm's ``DropPath.drop_prob`` schedules, ``grad_checkpointing`` switched on
later; and the submodules it called (a GELU swapped for a SiLU, a Linear wrapped by a LoRA
layer after conversion ran the old ones). The values of every module's plain attributes
(numbers, strings, None, small tuples of them), its submodules and any forward set on an
instance are noted at conversion; a converted forward that finds one changed runs the model's
own forward instead (correct, nothing packed) and says so.
"""

from __future__ import annotations

import torch.nn as nn

from actfx.passes.hf_outputs import RECORDING_FLAG

BAKED = "_actfx_baked"  # instance attribute of a converted module: what its graphs were traced with

# nn.Module's own bookkeeping (train / eval have graphs of their own) and markers set at a first call
_NOT_READ = frozenset({"training", "_is_full_backward_hook", RECORDING_FLAG})
_PLAIN = (bool, int, float, str, type(None))


def _plain(value, depth: int = 0) -> bool:
    if type(value) in _PLAIN:
        return True
    return type(value) is tuple and depth == 0 and len(value) <= 8 and all(_plain(v, 1) for v in value)


def _settings(module: nn.Module) -> dict:
    """The module's plain attributes a forward may read (not nn.Module's or actfx's own)."""
    return {name: value for name, value in module.__dict__.items()
            if name not in _NOT_READ and not name.startswith(("_actfx", "__")) and _plain(value)}


def baked_values(module: nn.Module) -> tuple:
    """What ``module``'s tree was traced with: (module, path, name, value) for every plain
    attribute, for every submodule slot (its module then) and for ``forward`` (an instance's
    own forward, or None)."""
    tree = list(module.named_modules())
    values = tuple((m, path, name, value) for path, m in tree for name, value in _settings(m).items())
    tied = _tied_parameters(module)
    slots = tuple((m, path, name, child, child is not None and any(id(p) in tied for p in child.parameters()))
                  for path, m in tree for name, child in m._modules.items())
    forwards = tuple((m, path, "forward", m.__dict__.get("forward")) for path, m in tree)
    return values, slots, forwards


def _tied_parameters(module: nn.Module) -> set:
    """ids of the parameters reached under more than one name (GPT-2's embedding and head)."""
    seen: dict = {}
    for _, p in module.named_parameters(remove_duplicate=False):
        seen[id(p)] = seen.get(id(p), 0) + 1
    return {key for key, count in seen.items() if count > 1}


def changed_value(baked: tuple) -> str | None:
    """``path.name`` of the first attribute, submodule or forward that is not the one traced, or None."""
    if not baked:
        return None
    values, slots, forwards = baked
    for m, path, name, value in values:
        now = m.__dict__.get(name, value)
        if now is not value and not (type(now) is type(value) and now == value):
            return f"{path}.{name}" if path else name
    for m, path, name, traced, tied in slots:
        now = m._modules[name] if name in m._modules else None  # TorchScript's module dict has no get
        # a module holding a tied parameter: a graph may read it through the other name (torch.export
        # names one of them), so a new module there is a change even of the same kind
        if now is not traced and (tied or not _same_kind(now, traced)):
            return f"{path}.{name}" if path else name
    for m, path, name, traced in forwards:
        if m.__dict__.get(name) is not traced:
            return f"{path}.{name}" if path else name
    return None


def _same_kind(new, old) -> bool:
    """A module the graph serves as it served ``old``: one of its class, without submodules,
    with the same plain settings (a re-initialised ``fc = nn.Linear(2048, 10)``; the graph reads
    its weights when it runs)."""
    if type(new) is not type(old) or new._modules or old._modules:
        return False
    return _settings(new) == _settings(old)
