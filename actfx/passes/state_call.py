"""``torch.func.functional_call`` that always hands a module its own tensors back.

Why: functional_call reads each name's original tensor just before it swaps a twin in. A
submodule registered under two parents (timm CoaT's shared convolutions) is reached by two
names, so the second read found the twin the first one had put there, and the restore left it
in place: after ``actfx.show`` the user's own model ran on FakeTensors and training failed.
"""

from __future__ import annotations

import torch
import torch.nn as nn

_TENSOR_TABLES = ("_parameters", "_buffers")


def call_with_state(module: nn.Module, state: dict, args: tuple, kwargs: dict | None = None):
    """``functional_call(module, state, args, kwargs)``; afterwards every submodule holds the
    tensors it held before (read once per submodule, before anything is swapped)."""
    held = [(table, dict(table)) for m in module.modules() for table in (m.__dict__[t] for t in _TENSOR_TABLES)]
    try:
        return torch.func.functional_call(module, state, args, kwargs or {})
    finally:
        for table, tensors in held:
            table.update(tensors)
