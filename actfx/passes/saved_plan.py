"""The typed record of what a compiled graph keeps for backward, one entry per saved value.

Written by ``pack_saved`` when Inductor partitions a graph, read by ``actfx.show`` and the
report: what is printed is what conversion decided, never reconstructed afterwards.
"""

from __future__ import annotations

import dataclasses
import enum
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from actfx.kernels.graph_pack import Rows
    from actfx.passes.graph_memory import PartitionMemory


class Storage(enum.Enum):
    PACKED = "packed"  # stochastic rounding to `bits` in groups (gradients unbiased)
    MASK = "mask"  # a boolean, 1 bit per value, exact
    EXACT = "exact"  # kept as is; `reason` says why


def site_key(module_path: str, op: str, occurrence: int = 1) -> str:
    """A compiled saved value's plan key: its module path and its ATen op without namespace and
    overload (``"layer1.0.conv1:convolution"``); Python's getitem (a tuple output) reads
    ``getitem``. The n-th value of one op in one module, in the order the graph saves them, is
    ``"path:op#n"``, so a plan sets each value's width."""
    if "getitem" in op:
        short = "getitem"
    else:
        parts = op.replace("aten.", "").split(".")
        short = parts[0] if parts[0] else op
    base = f"{module_path}:{short.replace(':', '_').replace(' ', '_')}"
    return base if occurrence == 1 else f"{base}#{occurrence}"


@dataclasses.dataclass(frozen=True)
class SavedValue:
    name: str  # the forward graph's node name
    op: str  # the ATen op that produced it (for hoisted values: the op computed in forward)
    module_path: str  # from nn_module_stack ("" when unknown)
    shape: tuple
    dtype: str
    bytes_before: int
    bytes_after: int
    storage: Storage
    bits: int | None = None
    reason: str = ""
    hoisted: bool = False  # computed in forward instead of backward (a derivative, a mask)
    site: str = ""  # ``"module.path:op"`` (``site_key``): how a plan for actfx.compile names this value
    rows: Rows | None = None  # graph_pack's row layout it is packed in (None: flat)
    apart: bool = False  # packed (or masked) by extern_pack's precompiled kernel, not in Inductor's code

    @property
    def saved_as(self) -> str:
        if self.storage is Storage.PACKED:
            return f"packed {self.bits}-bit" + self._by_kernel
        if self.storage is Storage.MASK:
            return "1-bit mask" + self._by_kernel
        return f"exact ({self.reason})" if self.reason else "exact"

    @property
    def _by_kernel(self) -> str:
        return ", by the CPU pack kernel" if self.apart else ""


@dataclasses.dataclass
class GraphPlan:
    """Everything one partitioned graph saves, and the ops the partitioner recomputes instead."""

    bytes_before: int = 0  # what the partitioner alone would save, parameters (not their copies) excluded
    saved: list[SavedValue] = dataclasses.field(default_factory=list)
    recomputed_ops: int = 0
    memory: PartitionMemory | None = None  # the pair's memory in a step, as Inductor would run it
    kinds: frozenset = frozenset()  # the Config.op_bits kinds of its forward ops (compiled_kinds)
    last_call: int = -1  # the model's training call that last ran this graph (actfx.compile counts them)

    @property
    def bytes_after(self) -> int:
        """Bytes kept for backward, parameters excluded (they are held anyway)."""
        return sum(v.bytes_after for v in self.saved if v.reason != "parameter")
