"""Gradient hooks a forward registers on its own tensors: torch.export drops them.

``z.register_hook(lambda g: g.clamp(-c, c))`` inside forward clips z's gradient at every step;
torch.export records the forward's ops but not the hook, so a forward rebuilt from the export
trains without it (a clipped MLP converted from its export: one step's gradient 27x its norm off,
the mean of 32 no closer). Capture refuses such a forward: converted submodule by submodule, it
runs as written and registers its hooks.
"""

from __future__ import annotations

import contextlib

import torch


@contextlib.contextmanager
def registered_hooks(seen: list):
    """While torch.export captures, what each ``Tensor.register_hook`` call registers is
    appended to ``seen`` (the hook is still registered, as the forward asked)."""
    original = torch.Tensor.register_hook

    def register(tensor, hook):
        seen.append(getattr(hook, "__qualname__", type(hook).__name__))
        return original(tensor, hook)

    torch.Tensor.register_hook = register
    try:
        yield
    finally:
        torch.Tensor.register_hook = original
