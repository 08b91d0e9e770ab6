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


@contextlib.contextmanager
def entered_saved_tensor_hooks(seen: list):
    """While torch.export captures, the class of each ``saved_tensors_hooks`` block the forward
    enters is appended to ``seen``. Why: a non-reentrant ``torch.utils.checkpoint`` (Hugging Face's
    ``gradient_checkpointing_enable()``) is such a block; export traces through it, so the
    captured graph would keep the block's activations (packed) where the original recomputed
    them, and a converted Llama held 148 KB against the checkpointed original's 83 KB."""
    hooks = torch.autograd.graph.saved_tensors_hooks
    original = hooks.__enter__

    def enter(self):
        seen.append(type(self).__name__)
        return original(self)

    hooks.__enter__ = enter
    try:
        yield
    finally:
        hooks.__enter__ = original
