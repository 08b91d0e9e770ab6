"""Side effects of a capture's run on the user's objects, found and undone.

fx runs the forward's Python on real objects while it traces. Three effects were silently wrong:
a random draw the graph does not record (LayerDrop's ``torch.rand(1).item() < p``: one draw's
branch kept for every call), traced values stored into a list or dict attribute (a mixture of
experts' auxiliary losses: the graph does not append, and fx proxies were left in the list), and
a parameter's data replaced or changed in place inside forward (MoCo's and BYOL's momentum
encoders: moved once per trace, at conversion, and never again, since the graph does not record
ops on the real parameters that ``parameters()`` yields). Each is undone or stopped before it
happens, and refused here, so the module is captured another way or runs its own forward.
"""

from __future__ import annotations

import contextlib
import functools
import random
import sys

import torch
import torch.nn as nn
from torch._subclasses.fake_tensor import FakeTensor
from torch.fx import Proxy
from torch.utils._python_dispatch import TorchDispatchMode


class TraceEffect(RuntimeError):
    """The forward did something while traced that the captured graph would not do again."""


def _numpy_random():
    numpy = sys.modules.get("numpy")
    return getattr(numpy, "random", None)


@contextlib.contextmanager
def random_draws_refused():
    """Raise TraceEffect (after restoring the generators) if the traced run drew random numbers
    from torch's CPU generator, Python's ``random`` or NumPy's: the graph keeps that draw."""
    numpy_random = _numpy_random()
    states = (torch.random.get_rng_state(), random.getstate(),
              numpy_random.get_state() if numpy_random is not None else None)
    yield
    now = (torch.random.get_rng_state(), random.getstate(),
           numpy_random.get_state() if numpy_random is not None else None)
    drew = not torch.equal(states[0], now[0]) or states[1] != now[1] or (
        states[2] is not None and not _same_numpy_state(states[2], now[2]))
    torch.random.set_rng_state(states[0])
    random.setstate(states[1])
    if states[2] is not None:
        numpy_random.set_state(states[2])
    if drew:
        raise TraceEffect("the forward draws random numbers that no traced input depends on (torch.rand(1).item(), "
                          "random.random()), which a captured graph would keep from one call for every call")


def _same_numpy_state(a, b) -> bool:
    return a[0] == b[0] and (a[1] == b[1]).all() and tuple(a[2:]) == tuple(b[2:])


def _holds_traced(value) -> bool:
    leaves = torch.utils._pytree.tree_leaves(value, is_leaf=lambda v: isinstance(v, (Proxy, torch.Tensor)))
    return any(isinstance(v, (Proxy, FakeTensor)) for v in leaves)


def _contents(value):
    return list(value) if isinstance(value, (list, set)) else dict(value)


@functools.cache
def _module_own() -> frozenset:
    """nn.Module's own tables (hooks, parameters, ...), read from a bare module once."""
    return frozenset(vars(nn.Module()))


def containers_kept(modules) -> tuple:
    """Snapshots of the list, dict and set attributes of ``modules`` (their contents, shallow)."""
    return tuple((m, name, value, _contents(value)) for m in modules for name, value in vars(m).items()
                 if type(value) in (list, dict, set) and name not in _module_own())


def restore_containers(kept: tuple) -> list:
    """Put back the contents of containers the run filled with traced values; (module, name) of each."""
    changed = []
    for m, name, value, before in kept:
        now = _contents(value)
        added = [v for v in (now.values() if isinstance(now, dict) else now)
                 if not any(v is old for old in (before.values() if isinstance(before, dict) else before))]
        if _holds_traced(added):
            value.clear()
            value.update(before) if isinstance(value, (dict, set)) else value.extend(before)
            changed.append((m, name))
    return changed


def parameters_kept(trees) -> tuple:
    """(name, parameter, its data, data pointer, version) of every parameter of ``trees``."""
    return tuple((name, p, p.data, p.data_ptr(), p._version)
                 for root in trees for name, p in root.named_parameters(remove_duplicate=False))


def restore_parameters(kept: tuple) -> list:
    """Names of parameters whose data the run replaced (put back) or changed in place (cannot be)."""
    changed = []
    for name, p, data, pointer, version in kept:
        if p.data_ptr() != pointer:
            with torch.no_grad():
                p.data = data
            changed.append(name)
        elif p._version != version:
            changed.append(name)
    return changed



class _ParameterWrites(TorchDispatchMode):
    """Raises TraceEffect before an op writes into a parameter's storage (``p.data.mul_(m)``)."""

    def __init__(self, storages: dict) -> None:
        super().__init__()
        self.storages = storages

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func._schema.is_mutable:
            for i, argument in enumerate(func._schema.arguments):
                if argument.alias_info is None or not argument.alias_info.is_write:
                    continue
                value = args[i] if i < len(args) else kwargs.get(argument.name)
                for tensor in value if isinstance(value, (list, tuple)) else (value,):
                    name = self.storages.get(_storage(tensor))
                    if name is not None:
                        raise TraceEffect(
                            f"the forward changes the parameter {name!r} in place outside the traced ops (a "
                            "momentum update through .data), which a captured graph does not record; keep such "
                            "updates out of forward, in the training step")
        return func(*args, **kwargs)


def _storage(tensor) -> int | None:
    if type(tensor) not in (torch.Tensor, nn.Parameter) or tensor.device.type == "meta":
        return None
    return tensor.untyped_storage().data_ptr() or None


@contextlib.contextmanager
def parameter_writes_refused(trees):
    """Stop, with TraceEffect, an op of the traced run that would write into a parameter of
    ``trees``: fx runs ops on the real parameters ``parameters()`` yields, so a momentum update
    moved the model once at conversion and was then missing from the graph."""
    storages = {_storage(p): name for root in trees for name, p in root.named_parameters(remove_duplicate=False)}
    storages.pop(None, None)
    with _ParameterWrites(storages):
        yield
