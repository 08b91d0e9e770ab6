"""The batch of example inputs, and meta stand-ins for them at another batch."""

from __future__ import annotations

import torch


def batch_of(inputs) -> int:
    for x in inputs:
        if isinstance(x, torch.Tensor) and x.dim() > 0:
            return int(x.shape[0])
    raise ValueError("example_inputs have no tensor with a batch dimension; pass (tensor,) with the batch first")


def with_batch(inputs, batch: int) -> tuple:
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise ValueError(f"batch must be a positive int, got {batch!r}")
    return tuple(torch.empty((batch, *x.shape[1:]), dtype=x.dtype, device="meta")
                 if isinstance(x, torch.Tensor) and x.dim() > 0 else x for x in inputs)
