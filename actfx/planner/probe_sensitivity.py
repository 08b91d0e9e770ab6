"""Sensitivity of the packs PyTorch's saved tensors cannot stand in for, measured on the converted model.

Why: ``sensitivity`` puts rounding noise into what PyTorch saves, so it cannot reach a pack that
holds something PyTorch never saves: GELU's packed derivative, LayerNorm's normalised input, the
q, k, v from which attention's backward recomputes. Those packs were left at their default width,
which on a ViT is most of what it holds. Here the converted model itself runs, its compiled
forwards calling a probe in place of ``pack_value``: every pack is kept exact except the ones
probed together (a group's, which share a width), packed for real at their width, and
``Var = ||g(those packs) - g||^2`` comes from one forward and backward (one draw, as in
``sensitivity``; recomputed attention's nonlinear error included). As there, 1 and 2 bits are
measured too where the packs may take them: the values are first rounded to that width's levels
(which the wider pack then holds exactly, up to its bf16 group range), other widths scale by the
rounding variance. One step per probed group and width, on the planner's own converted copy; the
random state, the model's buffers and the forwards' globals are restored afterwards.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn as nn

from actfx.passes.capture import buffers_restored
from actfx.passes.rewrite import PACK_META
from actfx.planner.sensitivity import (MEASURED_BITS, PackSensitivity, per_width, rounding_noise, rounding_variance,
                                       seeded_gradient, squared_distance)
from actfx.variants.packing import pack_value


def pack_key(path: str, source) -> tuple:
    """How the planner names a pack: its graph, the value it stores, and whether it stores
    something derived from that value (GELU's derivative) rather than the value itself."""
    return (path, source.value, source.derived)


def probed_sensitivities(converted: nn.Module, inputs: tuple, wanted: dict, *, loss_fn=None,
                         group_size: int = 256, seed: int = 0, floors: dict | None = None) -> dict:
    """{name: PackSensitivity} for each ``name -> pack keys`` in ``wanted`` (``pack_key``) that a
    training forward of ``converted`` on ``inputs`` (real tensors) packs: the named packs rounded
    together in one backward, at a width ``b`` each at ``max(b, floor)``; ``floors``: key -> the
    narrowest width that pack is ever packed at. Why together: packs one op's backward multiplies
    (attention's q, k, v and probabilities at 1 bit) add noise to each other's products that no
    pack shows alone (the built-in ViT's plan measured 6x its summed estimate)."""
    if not wanted:
        return {}
    floors = floors or {}
    params = [p for p in converted.parameters() if p.requires_grad]
    probe = _Probe(group_size, torch.Generator().manual_seed(seed))

    def gradient():
        return seeded_gradient(converted, inputs, params, loss_fn, seed)

    result = {}
    with buffers_restored(converted), torch.enable_grad(), _probing(converted, probe):
        exact = gradient()
        for name in sorted(wanted):
            keys = set(wanted[name]) & probe.seen
            if not keys:
                continue
            probe.start(keys)
            noisy = squared_distance(gradient(), exact)
            values, packed = dict(probe.values), dict(probe.bits)
            if not packed:
                continue  # nothing was packed (too small to pay)
            width = max(packed.values())
            measured = {width: noisy}
            for bits in (b for b in MEASURED_BITS if b < width):
                narrower = {k: max(bits, floors.get(k, 0)) for k in packed if max(bits, floors.get(k, 0)) < packed[k]}
                if narrower:
                    probe.start(keys, rounded_to=narrower)
                    measured[bits] = squared_distance(gradient(), exact)
                else:
                    measured[bits] = noisy

            def rounding(b, values=values):
                return sum(float(rounding_variance(v, max(b, floors.get(k, 0)), group_size).sum())
                           for k, vs in values.items() for v in vs)

            result[name] = PackSensitivity(per_width(measured.__getitem__, rounding, widths=sorted(measured)))
    return result


class _Probe:
    """Stands in for ``pack_value``: keeps every value exact except the active packs'."""

    def __init__(self, group_size: int, generator: torch.Generator):
        self.seen: set = set()
        self.active: set = set()
        self.values: dict = {}  # key -> the values packed under it in this step
        self.bits: dict = {}  # key -> the width it was packed at
        self.rounded_to: dict = {}  # key -> first round its values to this width's levels
        self.group_size, self.generator = group_size, generator

    def start(self, keys: set, rounded_to: dict | None = None) -> None:
        self.active, self.values, self.bits, self.rounded_to = set(keys), {}, {}, dict(rounded_to or {})

    def pack(self, path: str, streams: dict, x, seed, stream: int, bits: int, group_size: int, stochastic: bool,
             min_numel: int):
        source = streams.get(stream)
        key = pack_key(path, source) if source is not None else None
        self.seen.add(key)
        if key is None or key not in self.active:
            return None, None
        value = x
        if key in self.rounded_to and isinstance(x, torch.Tensor):  # a loss's target has no gradient: None
            x = x + rounding_noise(x, self.rounded_to[key], self.group_size, self.generator).to(x.dtype)
        codes, meta = pack_value(x, seed, stream, bits, group_size, stochastic, min_numel)
        if codes is not None:
            self.values.setdefault(key, []).append(value.detach().clone())
            self.bits[key] = bits
        return codes, meta


@contextlib.contextmanager
def _probing(converted: nn.Module, probe: _Probe):
    """The converted model's compiled forwards call ``probe.pack`` instead of ``pack_value``."""
    swapped = []
    try:
        for path, pairs in converted._actfx_record.forwards.items():
            for graph, forward in pairs:
                streams = {n.args[2]: n.meta[PACK_META] for n in graph.nodes if PACK_META in n.meta}
                scope = forward.generated.__globals__  # the code fx generated, not its runnable wrapper
                for name, value in list(scope.items()):
                    if value is pack_value:
                        swapped.append((scope, name))
                        scope[name] = _bound(probe, path, streams)
        yield
    finally:
        for scope, name in swapped:
            scope[name] = pack_value


def _bound(probe: _Probe, path: str, streams: dict):
    def pack(*args):
        return probe.pack(path, streams, *args)
    return pack
