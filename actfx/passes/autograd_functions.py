"""Custom ``torch.autograd.Function`` calls during capture: kept whole, or refused.

fx traces into a Function's forward and torch.export inlines it; either way its backward is
dropped and autograd differentiates the forward's ops instead. For a straight-through estimator
(``round`` forward, identity backward) that is round's zero gradient: training silently wrong.
"""

from __future__ import annotations

import contextlib

import torch
from torch.autograd.function import BackwardCFunction
from torch.fx import Proxy, Tracer
from torch.utils._pytree import tree_leaves


def _caller(function: type):
    """A graph target running ``function.apply`` (its own forward and backward)."""

    def call(*args, **kwargs):
        return function.apply(*args, **kwargs)

    call.__name__ = call.__qualname__ = f"apply_{function.__name__}"
    call.actfx_function = function  # sites.py: an element-wise one keeps its derivative
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


@contextlib.contextmanager
def _contexts_noted(noted):
    """``noted(cls)`` for every custom Function whose apply runs, seen where its ``ctx`` is made:
    also an ``apply`` bound before the capture (``round_ste = RoundSTE.apply`` at import), which
    no patch of ``Function.apply`` reaches."""
    own = BackwardCFunction.__dict__.get("__init__")

    def init(self, *args, **kwargs):
        noted(type(self)._forward_cls)
        super(BackwardCFunction, self).__init__(*args, **kwargs)

    BackwardCFunction.__init__ = init
    try:
        yield
    finally:
        if own is None:
            del BackwardCFunction.__init__
        else:
            BackwardCFunction.__init__ = own


@contextlib.contextmanager
def functions_as_calls(tracer: Tracer, bound: list):
    """While fx traces, a Function called on traced values is recorded as one call: it runs as
    written, or keeps its derivative where it proves element-wise (``variants/custom_function.py``).
    A Function fx traced into instead (its apply bound before the trace) is appended to
    ``bound``: its backward would be dropped, so the caller refuses the trace."""
    on_values = []  # depth of applies run on plain values (their Functions run as they are)

    def apply(original, cls, *args, **kwargs):
        if any(isinstance(a, Proxy) for a in tree_leaves((args, kwargs))):
            return tracer.create_proxy("call_function", _caller(cls), args, kwargs)
        on_values.append(cls)
        try:
            return original(*args, **kwargs)
        finally:
            on_values.pop()

    def noted(cls):
        if not on_values and not cls.__module__.startswith("torch."):
            bound.append(cls)

    with _apply_replaced(apply), _contexts_noted(noted):
        yield


def inlined_functions(seen: list):
    """While torch.export captures, the names of the Functions it inlines are appended to
    ``seen`` (PyTorch's own, whose backward is the forward's gradient, are not; but a reentrant
    ``torch.utils.checkpoint`` is: its forward runs without gradients, and inlined, the
    checkpointed blocks were cut off from backward)."""
    from torch.utils.checkpoint import CheckpointFunction

    def noted(cls):
        if (not cls.__module__.startswith("torch.") or issubclass(cls, CheckpointFunction)) \
                and cls.__qualname__ not in seen:
            seen.append(cls.__qualname__)

    def apply(original, cls, *args, **kwargs):
        noted(cls)
        return original(*args, **kwargs)

    @contextlib.contextmanager
    def both():
        with _apply_replaced(apply), _contexts_noted(noted):
            yield

    return both()
