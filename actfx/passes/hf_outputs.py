"""Hugging Face transformers (v5) records hidden states and attentions with forward hooks.

Why here: a model's ``output_hidden_states`` (asked for by the user, or inside the model: a
Segformer's decode head reads its encoder's) is collected by hooks the model installs on its
layers at its first call that asks, and what it records is looked up by the model's class name.
A capture running that first call installs them as the model would (they are kept, not refused
as other hooks a forward registers are), and a converted or compiled copy's class, another one,
is registered as its original's (Segformer failed: its hidden states were None). Nothing is
done when transformers is not imported.
"""

from __future__ import annotations

import sys

import torch.nn as nn


def _registry():
    if "transformers" not in sys.modules:
        return None
    try:
        from transformers.utils import output_capturing
    except ImportError:
        return None
    return output_capturing


# The attribute a model is marked with once its recording hooks are on
RECORDING_FLAG = "_output_capturing_hooks_installed"


def is_recording_hook(hook) -> bool:
    """Whether ``hook`` is one of transformers' output-recording hooks (installed once, kept)."""
    return getattr(hook, "__module__", "") == "transformers.utils.output_capturing"


def share_recording(original: nn.Module, copy: nn.Module) -> None:
    """Register ``copy``'s class (a converted or compiled one) as recording what ``original``'s does."""
    capturing = _registry()
    if capturing is None or type(copy) is type(original):
        return
    recorded = capturing._CAN_RECORD_REGISTRY.get(original)
    if recorded and not capturing._CAN_RECORD_REGISTRY.get(copy):
        capturing._CAN_RECORD_REGISTRY[copy] = recorded
