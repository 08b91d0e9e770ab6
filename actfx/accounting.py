"""Count the bytes autograd holds for backward, by storage, as a training step really runs.

Every tensor saved for backward passes through ``torch.autograd.graph.saved_tensors_hooks``,
including the packed codes that actfx's variants save, so the same counter measures plain
PyTorch and a converted model. Storages are counted once however many ops save them, and
parameters and buffers (alive anyway) are reported apart from activations.
"""

from __future__ import annotations

import contextlib
import dataclasses

import torch


def _storage_key(t: torch.Tensor):
    try:
        storage = t.untyped_storage()
        return (t.device.type, t.device.index, storage.data_ptr()), storage.nbytes()
    except (RuntimeError, NotImplementedError):
        return ("id", id(t)), t.numel() * t.element_size()


@dataclasses.dataclass
class SavedBytes:
    activation_bytes: int = 0
    parameter_bytes: int = 0
    count: int = 0
    by_dtype: dict = dataclasses.field(default_factory=dict)


@contextlib.contextmanager
def count_saved(model: torch.nn.Module | None = None):
    """``with count_saved(model) as result:`` run forward; result holds what backward keeps."""
    result = SavedBytes()
    params = set()
    if model is not None:
        for t in list(model.parameters()) + list(model.buffers()):
            params.add(_storage_key(t)[0])
    seen: set = set()

    def pack(t):
        key, nbytes = _storage_key(t)
        if key not in seen:
            seen.add(key)
            result.count += 1
            if key in params:
                result.parameter_bytes += nbytes
            else:
                result.activation_bytes += nbytes
                result.by_dtype[str(t.dtype)] = result.by_dtype.get(str(t.dtype), 0) + nbytes
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yield result
