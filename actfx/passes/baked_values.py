"""The plain Python values a traced forward read, and whether they changed since.

Why: fx runs the forward's Python once and keeps what it read as constants of the graph: a
temperature or gradient-reversal weight annealed during training, ``LeakyReLU.negative_slope``,
``LayerNorm.eps``, timm's ``DropPath.drop_prob`` schedules, ``grad_checkpointing`` switched on
later; the converted model kept computing with the value at conversion, silently. The values of
every module's plain attributes (numbers, strings, None, small tuples of them) are noted at
conversion; a converted forward that finds one changed runs the model's own forward instead
(correct, nothing packed) and says so.
"""

from __future__ import annotations

import torch.nn as nn

from actfx.passes.hf_outputs import RECORDING_FLAG

# nn.Module's own bookkeeping (train / eval have graphs of their own) and markers set at a first call
_NOT_READ = frozenset({"training", "_is_full_backward_hook", RECORDING_FLAG})
_PLAIN = (bool, int, float, str, type(None))


def _plain(value, depth: int = 0) -> bool:
    if type(value) in _PLAIN:
        return True
    return type(value) is tuple and depth == 0 and len(value) <= 8 and all(_plain(v, 1) for v in value)


def baked_values(module: nn.Module) -> tuple:
    """(module, path, name, value) for every plain attribute in ``module``'s tree."""
    return tuple((m, path, name, value) for path, m in module.named_modules() for name, value in m.__dict__.items()
                 if name not in _NOT_READ and not name.startswith(("_actfx", "__")) and _plain(value))


def changed_value(baked: tuple) -> str | None:
    """``path.name`` of the first attribute whose value is not the one noted, or None."""
    for m, path, name, value in baked:
        now = m.__dict__.get(name, value)
        if now is not value and not (type(now) is type(value) and now == value):
            return f"{path}.{name}" if path else name
    return None
