"""Seeds for the compiled path's stochastic rounding, drawn without touching torch's RNG stream.

Why: Inductor's seed buffer draws from torch's default generator, so each packed forward moved
the global stream on. Dropout masks then differed from torch.compile's from the second step on,
and so did everything the user drew afterwards (``torch.rand``, data shuffling). As eager
conversions own a ``SeedState``, each compiled model owns a ``SeedStream``: its compiled graphs
run inside ``stream.active()``, and the graph's one ``actfx::pack_seeds`` call (an opaque op)
bumps that stream's counter on the host and builds the seeds on the device from Python
integers (no copy, no host sync). The stream restarts when ``torch.manual_seed`` changes
``torch.initial_seed()``, so packs stay reproducible per seed.
"""

from __future__ import annotations

import contextlib
import threading

import torch

from actfx.variants.packing import _mix

_ACTIVE = threading.local()  # the stream of the compiled graph running on this thread, during its call


class SeedStream:
    """One compiled model's seeds: a counter of its packed forwards, restarted by a new
    ``torch.manual_seed``. Two models compiled under one seed draw the same sequence, each
    at its own pace (neither moves the other's counter)."""

    def __init__(self) -> None:
        self.seen = torch.initial_seed()
        self.calls = 0

    def next_base(self) -> int:
        current = torch.initial_seed()
        if current != self.seen:
            self.seen, self.calls = current, 0
        self.calls += 1
        return _mix(self.seen, self.calls)

    @contextlib.contextmanager
    def active(self):
        previous = getattr(_ACTIVE, "stream", None)
        _ACTIVE.stream = self
        try:
            yield
        finally:
            _ACTIVE.stream = previous

    def __repr__(self) -> str:
        return f"SeedStream(calls={self.calls})"


def calls_with(compiled, stream: SeedStream, before=None):
    """``compiled`` (a compiled graph's callable) run with ``stream`` active, after ``before()``
    if given; called as the original is (its ``_boxed_call`` flag, if any, is carried over)."""

    def run(*args, **kwargs):
        if before is not None:
            before()
        with stream.active():
            return compiled(*args, **kwargs)

    if hasattr(compiled, "_boxed_call"):
        run._boxed_call = compiled._boxed_call
    return run


# cudagraph_unsafe: a CUDA graph replay would not run the host-side counter and would repeat
# one step's rounding noise in every step.
@torch.library.custom_op("actfx::pack_seeds", mutates_args=(), tags=(torch._C.Tag.cudagraph_unsafe,))
def pack_seeds(count: int, device: torch.device) -> list[torch.Tensor]:
    """``count`` int64 seeds on ``device`` from the active stream (their low 32 bits differ), each
    a tensor of its own: a pack reads its seed as an argument, not at a constant index into one
    buffer, so packs of the same shape generate the same kernel source and Inductor compiles it
    once (ResNet-50's forward: 50 kernels, 27 distinct apart from that index)."""
    stream = getattr(_ACTIVE, "stream", None)
    if stream is None:
        raise RuntimeError("actfx: a packed compiled graph ran outside its model's call; call the model "
                           "actfx.compile returned (or the torch.compile(..., backend=actfx.backend()) one)")
    base = stream.next_base() & 0x7FFFFFFF
    seeds = torch.arange(count, dtype=torch.int64, device=device) * 0x9E3779B9 + base
    return [seed.clone() for seed in seeds.unbind()]


@pack_seeds.register_fake
def _(count, device):
    return [torch.empty((), dtype=torch.int64, device=device) for _ in range(count)]
