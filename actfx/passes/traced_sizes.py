"""Tensor factories called with a traced size (``torch.zeros(x.shape[0], 16)``) recorded as graph
calls while fx traces.

Why: fx hands the forward a Proxy for ``x.shape[0]``, and ``torch.zeros`` cannot parse a Proxy as
a size ("zeros() takes 1 positional argument but 2 were given"): the whole forward failed to
trace over a recurrent or spiking net's initial state, and the model fell back to torch.export
at its first call (which specialises other sizes) or, where export failed too, to its
submodules (a spiking net: 1.17x). The factory is swapped for the trace, as fx swaps the
functions it wraps, and records a call when a size is traced; otherwise it runs as it is.
"""

from __future__ import annotations

import contextlib

import torch
from torch.fx import Proxy
from torch.utils._pytree import tree_leaves

_FACTORIES = ("zeros", "ones", "empty", "full", "rand", "randn")


def _recording(factory):
    def call(*args, **kwargs):
        traced = [a for a in tree_leaves((args, kwargs)) if isinstance(a, Proxy)]
        if not traced:
            return factory(*args, **kwargs)
        return traced[0].tracer.create_proxy("call_function", factory, args, kwargs)

    call.__name__ = call.__qualname__ = factory.__name__
    return call


@contextlib.contextmanager
def traced_sizes():
    """While fx traces: ``torch.zeros``/``ones``/``empty``/``full``/``rand``/``randn`` take traced
    sizes."""
    originals = {name: getattr(torch, name) for name in _FACTORIES}
    for name, factory in originals.items():
        setattr(torch, name, _recording(factory))
    try:
        yield
    finally:
        for name, factory in originals.items():
            setattr(torch, name, factory)
