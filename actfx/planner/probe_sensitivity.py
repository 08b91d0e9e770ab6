"""Sensitivity of the packs PyTorch's saved tensors cannot stand in for, measured on the converted model.

Why: ``sensitivity`` puts rounding noise into what PyTorch saves, so it cannot reach a pack that
holds something PyTorch never saves: GELU's packed derivative, LayerNorm's normalised input, the
q, k, v from which attention's backward recomputes. Those packs were left at their default width,
which on a ViT is most of what it holds. Here the converted model itself runs, its compiled
forwards calling a probe in place of ``pack_value``: every pack is kept exact except one, which is
packed for real at its width, and ``Var_p = ||g(that pack) - g||^2`` comes from one forward and
backward (one draw, as in ``sensitivity``; recomputed attention's nonlinear error included). As
there, 1 and 2 bits are measured too where the pack may take them: the value is first rounded to
that width's levels (which the wider pack then holds exactly, up to its bf16 group range), other
widths scale by the rounding variance. One step per probed pack and width, on the planner's own
converted copy; the random state, the model's buffers and the forwards' globals are restored afterwards.
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


def probed_sensitivities(converted: nn.Module, inputs: tuple, wanted: set, *, loss_fn=None,
                         group_size: int = 256, seed: int = 0, floors: dict | None = None) -> dict:
    """{pack key: PackSensitivity} for each key in ``wanted`` (``pack_key``) that a training
    forward of ``converted`` on ``inputs`` (real tensors) packs; ``floors``: key -> the narrowest
    width that pack is ever packed at (narrower widths are not measured)."""
    if not wanted:
        return {}
    params = [p for p in converted.parameters() if p.requires_grad]
    probe = _Probe(group_size, torch.Generator().manual_seed(seed))

    def gradient():
        return seeded_gradient(converted, inputs, params, loss_fn, seed)

    result = {}
    with buffers_restored(converted), torch.enable_grad(), _probing(converted, probe):
        exact = gradient()
        for key in sorted(wanted & probe.seen):
            probe.start(key)
            noisy = squared_distance(gradient(), exact)
            values, width = probe.values, probe.bits
            if width is None:
                continue  # nothing was packed (too small to pay)
            measured = {width: noisy}
            floor = (floors or {}).get(key, 0)
            for bits in (b for b in MEASURED_BITS if floor <= b < width):
                probe.start(key, rounded_to=bits)
                measured[bits] = squared_distance(gradient(), exact)
            result[key] = PackSensitivity(per_width(
                measured.__getitem__, lambda b, values=values: sum(
                    float(rounding_variance(v, b, group_size).sum()) for v in values), widths=sorted(measured)))
    return result


class _Probe:
    """Stands in for ``pack_value``: keeps every value exact except the active pack's."""

    def __init__(self, group_size: int, generator: torch.Generator):
        self.seen: set = set()
        self.active = None
        self.values: list = []
        self.bits = None
        self.rounded_to = None  # first round the active value to this width's levels (None: no)
        self.group_size, self.generator = group_size, generator

    def start(self, key, rounded_to: int | None = None) -> None:
        self.active, self.values, self.bits, self.rounded_to = key, [], None, rounded_to

    def pack(self, path: str, streams: dict, x, seed, stream: int, bits: int, group_size: int, stochastic: bool,
             min_numel: int):
        source = streams.get(stream)
        key = pack_key(path, source) if source is not None else None
        self.seen.add(key)
        if key is None or key != self.active:
            return None, None
        value = x
        if self.rounded_to is not None:
            x = x + rounding_noise(x, self.rounded_to, self.group_size, self.generator).to(x.dtype)
        codes, meta = pack_value(x, seed, stream, bits, group_size, stochastic, min_numel)
        if codes is not None:
            self.values.append(value.detach().clone())
            self.bits = bits
        return codes, meta


@contextlib.contextmanager
def _probing(converted: nn.Module, probe: _Probe):
    """The converted model's compiled forwards call ``probe.pack`` instead of ``pack_value``."""
    swapped = []
    try:
        for path, pairs in converted._actfx_record.forwards.items():
            for graph, forward in pairs:
                streams = {n.args[2]: n.meta[PACK_META] for n in graph.nodes if PACK_META in n.meta}
                scope = forward.__globals__
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
