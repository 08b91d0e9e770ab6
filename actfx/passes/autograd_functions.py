"""Custom ``torch.autograd.Function`` calls during capture: kept whole, or refused.

fx traces into a Function's forward and torch.export inlines it; either way its backward is
dropped and autograd differentiates the forward's ops instead. For a straight-through estimator
(``round`` forward, identity backward) that is round's zero gradient: training silently wrong.
"""

from __future__ import annotations

import contextlib

import torch
from torch.fx import Proxy, Tracer
from torch.utils._pytree import tree_leaves


def _caller(function: type):
    """A graph target running ``function.apply`` (its own forward and backward)."""

    def call(*args, **kwargs):
        return function.apply(*args, **kwargs)

    call.__name__ = call.__qualname__ = f"apply_{function.__name__}"
    return call


@contextlib.contextmanager
def _apply_replaced(apply):
    """``Function.apply`` routed through ``apply(original, cls, ...)``, ``original`` bound to
    ``cls``. Bound with ``__get__`` because the stored attribute is a Python ``classmethod`` in
    some torch releases and a C ``classmethod_descriptor`` (no ``__func__``) in others (2.14)."""
    original = torch.autograd.Function.__dict__["apply"]
    torch.autograd.Function.apply = classmethod(
        lambda cls, *args, **kwargs: apply(original.__get__(None, cls), cls, *args, **kwargs))
    try:
        yield
    finally:
        torch.autograd.Function.apply = original


def functions_as_calls(tracer: Tracer):
    """While fx traces, a Function called on traced values is recorded as one call: it runs as
    written (its saved tensors are its own; ``actfx.show`` lists it as not covered)."""

    def apply(original, cls, *args, **kwargs):
        if any(isinstance(a, Proxy) for a in tree_leaves((args, kwargs))):
            return tracer.create_proxy("call_function", _caller(cls), args, kwargs)
        return original(*args, **kwargs)

    return _apply_replaced(apply)


def inlined_functions(seen: list):
    """While torch.export captures, the names of the Functions it inlines are appended to
    ``seen`` (PyTorch's own, whose backward is the forward's gradient, are not; but a reentrant
    ``torch.utils.checkpoint`` is: its forward runs without gradients, and inlined, the
    checkpointed blocks were cut off from backward)."""
    from torch.utils.checkpoint import CheckpointFunction

    def apply(original, cls, *args, **kwargs):
        if not cls.__module__.startswith("torch.") or issubclass(cls, CheckpointFunction):
            seen.append(cls.__qualname__)
        return original(*args, **kwargs)

    return _apply_replaced(apply)
