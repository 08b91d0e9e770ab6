"""What a model returned, read for backward."""

from __future__ import annotations

import torch


def grad_leaves(out) -> list[torch.Tensor]:
    """The tensors in ``out`` (any nesting of tuples, lists, dicts, dataclass outputs) that
    autograd can differentiate: a step's backward starts from them."""
    return [t for t in torch.utils._pytree.tree_leaves(out) if isinstance(t, torch.Tensor) and t.requires_grad]
