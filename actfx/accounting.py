"""Count the bytes autograd holds for backward, by storage, as a training step really runs.

Every tensor saved for backward passes through ``torch.autograd.graph.saved_tensors_hooks``,
including the packed codes that actfx's variants save, so the same counter measures plain
PyTorch and a converted model. Storages are counted once however many ops save them, and
parameters, buffers and other tensors the model holds (alive anyway) are reported apart from
activations.
"""

from __future__ import annotations

import contextlib
import dataclasses
import weakref

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


class _Held:
    """What the pack hook hands autograd: alive exactly as long as the graph keeps the tensor."""

    __slots__ = ("tensor", "__weakref__")

    def __init__(self, tensor):
        self.tensor = tensor


@contextlib.contextmanager
def count_saved(model: torch.nn.Module | None = None):
    """``with count_saved(model) as result:`` run forward; on exit ``result`` holds the bytes
    autograd still keeps for backward (tensors saved by graphs freed during forward, e.g. a
    module recomputed later, are not counted)."""
    result = SavedBytes()
    params = set()
    if model is not None:
        # model state: parameters, buffers, and tensors kept as plain attributes (a value fx
        # folded from buffers at conversion, ``_tensor_constant0``: held by the model, computed once)
        attributes = [v for m in model.modules() for v in vars(m).values() if isinstance(v, torch.Tensor)]
        for t in list(model.parameters()) + list(model.buffers()) + attributes:
            params.add(_storage_key(t)[0])
    held: list = []

    def pack(t):
        box = _Held(t)
        held.append((weakref.ref(box), _storage_key(t), t.dtype))
        return box

    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda box: box.tensor):
            yield result
    finally:
        seen: set = set()
        for ref, (key, nbytes), dtype in held:
            if ref() is None or key in seen:
                continue
            seen.add(key)
            result.count += 1
            if key in params:
                result.parameter_bytes += nbytes
            else:
                result.activation_bytes += nbytes
                result.by_dtype[str(dtype)] = result.by_dtype.get(str(dtype), 0) + nbytes
