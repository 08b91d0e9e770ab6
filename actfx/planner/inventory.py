"""What a plan can choose: the packs a converted model makes, their sizes, and the units that set their bits.

A pack's width is the widest its consumers ask for (``Config.bits_for`` per consumer op), so
consumer ops that share a pack must share a width. Units (``"module.path:kind"``) and packs form
a bipartite graph; its connected components (networkx) are the groups the planner gives one width
each. Sizes come from one forward on fake tensors (``actfx.passes.analyze.measure``) at the batch
to plan for: nothing is allocated, so a batch of 64 ResNet-50 images costs what a batch of one does.
"""

from __future__ import annotations

import dataclasses

import networkx as nx
import torch.nn as nn

from actfx.config import KEEP_EXACT
from actfx.kernels import packed_nbytes
from actfx.passes.analyze import Measurement, measure
from actfx.passes.rewrite import PACK_META, PackSource
from actfx.planner.probe_sensitivity import pack_key


@dataclasses.dataclass(frozen=True)
class Pack:
    graph_path: str
    source: PackSource
    numel: int
    bits: int  # in the measured conversion
    storage: int = 0  # bytes of the storage the value lives in (held when it is kept exact)
    itemsize: int = 4

    def nbytes(self, bits: int, group_size: int) -> int:
        return self.storage if bits == KEEP_EXACT else packed_nbytes(self.numel, self.width(bits), group_size)

    def width(self, bits: int) -> int:
        """The width it is packed at when its units ask for ``bits`` (never below its floor)."""
        return bits if bits == KEEP_EXACT else max(bits, self.source.floor)

    @property
    def key(self) -> tuple:
        return pack_key(self.graph_path, self.source)


@dataclasses.dataclass(frozen=True)
class Group:
    """Units that share packs, and the packs they set the width of."""

    units: tuple  # "module.path:kind", sorted
    packs: tuple  # Pack

    def nbytes(self, bits: int, group_size: int) -> int:
        return sum(p.nbytes(bits, group_size) for p in self.packs)

    @property
    def numel(self) -> int:
        return sum(p.numel for p in self.packs)


@dataclasses.dataclass(frozen=True)
class Inventory:
    groups: tuple  # Group
    other_bytes: int  # held activations that are not packs (masks, exact values, indices)
    measured: Measurement  # the converted model's fake forward

    def pack_bytes(self, group_size: int) -> int:
        return sum(g.nbytes(g.packs[0].bits, group_size) for g in self.groups)


def take_inventory(converted: nn.Module, inputs, *, dtype=None) -> Inventory:
    """The groups of a converted model and what it holds besides them, measured at ``inputs``
    (real, meta or fake tensors: only shapes are read)."""
    measured = measure(converted, inputs, dtype=dtype)
    config = converted._actfx_record.config
    packs = []
    for entry in measured.nodes:
        if entry.node is None or not entry.packed_numel:
            continue
        source = entry.node.meta.get(PACK_META)
        if source is not None:
            packs.append(Pack(entry.graph_path, source, entry.packed_numel, int(entry.node.args[3]),
                              entry.packed_storage, entry.packed_itemsize))
    graph = nx.Graph()
    for i, pack in enumerate(packs):
        graph.add_node(("pack", i))
        for unit in pack.source.units:
            graph.add_edge(("pack", i), ("unit", unit))
    for unit, i in _affine_readers(converted._actfx_record.decisions, packs):
        graph.add_edge(("pack", i), ("unit", unit))
    groups = []
    for component in nx.connected_components(graph):
        units = tuple(sorted(name for kind, name in component if kind == "unit"))
        members = tuple(packs[i] for kind, i in sorted(n for n in component if n[0] == "pack"))
        groups.append(Group(units, members))
    groups.sort(key=lambda g: g.units)
    packed = sum(packed_nbytes(p.numel, p.bits, config.group_size) for p in packs)
    return Inventory(tuple(groups), measured.activation_bytes - packed, measured)


def _affine_readers(decisions, packs) -> list:
    """(unit, pack index) for each op that reads a norm's output rebuilt from the norm's own pack
    (a linear after LayerNorm reads ``w x̂ + b``). The rebuild holds only while the reader asks for
    no more bits than that pack has; wider, the reader packs a copy of its own, so the two share a
    width (vit_tiny: LayerNorm at 1 bit under a 2-bit linear held 17680 bytes no inventory listed)."""
    index = {(p.graph_path, p.source.value): i for i, p in enumerate(packs)}
    found = []
    for d in decisions:
        for tree in d.sources:
            if tree is not None and tree[0] == "affine":
                inner = tree[-1]
                # a tree names the packed value, not whether the pack is derived (x̂ is)
                i = index.get((d.graph_path, inner[1])) if inner[0] in ("pack", "normalized") else None
                if i is not None:
                    found.append((d.key, i))
    return found
