"""A weight's computation from parameters alone, run so that what its own ops keep for backward
is made again there (see passes/parameter_rebuild.py): its consumers make the weight again
too, so nothing weight-sized stays between forward and backward."""

from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint


def made_from_parameters(rebuild, *leaves):
    """``rebuild(*leaves)``, as a non-reentrant checkpoint where autograd records it (no random
    ops inside: the rebuild was checked for them, so no RNG state is kept)."""
    if torch.compiler.is_compiling() or not torch.is_grad_enabled():
        return rebuild(*leaves)
    return checkpoint(rebuild, *leaves, use_reentrant=False, preserve_rng_state=False)
