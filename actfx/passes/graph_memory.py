"""Bytes a partitioned graph has alive at its worst point, as Inductor runs it.

Why: ``actfx.plan(path="compile")`` needs the compiled step's peak, and it is not the eager
conversion's: Inductor inlines chains of pointwise ops into the kernels that read them (their
intermediates never exist) and frees each buffer after its last reader; the eager working set
overestimated a compiled gpt_tiny's step by 31-35%. This walks the fx graph with Inductor's rules:

- a value takes memory if a kernel writes it: a reduction's or an extern op's output (matmul,
  convolution), a pointwise value an extern op or the caller reads, or one several ops read whose
  recomputation would run exp, log or tanh again or is large (Inductor's CPU heuristic,
  ``StorageBox.should_realize_on_reuse``); actfx's own pack arithmetic is fused;
- views share their base's memory; a tuple's elements live and die apart;
- an inlined value is read when the kernel it is inlined into runs;
- in forward, actfx's packs run as soon as their value exists (Inductor fuses them into the
  producer's kernel), wherever the partitioner left the saved node;
- a backward's incoming gradients live until it returns (Inductor's code never frees them, and
  the autograd Function's arguments hold them).

An estimate, not a replay: Inductor's scheduler reorders kernels and at times stores a value twice,
and extern kernels have workspaces of their own. Checked against the RSS peak of real steps by
``benchmarks/planner.py peak --path compile``.
"""

from __future__ import annotations

import dataclasses
import math
import operator

import torch
import torch.fx as fx
from torch._functorch._aot_autograd.utils import _is_tangent
from torch.multiprocessing.reductions import StorageWeakRef

from actfx.passes.graph_emit import EMITTED
from actfx.passes.saved_pair import hint

# Lowered by Inductor as loops that read their inputs in place, so they fuse like pointwise ops.
_FUSABLE = {"clone", "_to_copy", "copy", "lift_fresh_copy", "full", "scalar_tensor", "zeros", "ones", "empty",
            "full_like", "zeros_like", "ones_like", "empty_like", "iota", "arange", "embedding", "index",
            "gather", "index_select", "cat", "constant_pad_nd", "slice_scatter", "select_scatter", "expand_copy",
            "permute_copy", "rand", "randn", "rand_like", "randn_like"}
_REDUCTIONS = {"sum", "mean", "amax", "amin", "max", "min", "var_mean", "var", "std", "prod", "argmax", "argmin",
               "logsumexp", "any", "all"}
_RESHAPES = {"_unsafe_view", "view", "reshape", "alias"}


@dataclasses.dataclass(frozen=True)
class GraphMemory:
    peak: int  # most bytes alive at once: the graph's own values and the inputs it frees
    end: int  # alive when it returns: its outputs (those not among the caller's kept inputs)


def _kind(node: fx.Node) -> str:
    if node.op != "call_function":
        return node.op
    target = node.target
    if target is operator.getitem:
        return "view"
    if not isinstance(target, torch._ops.OpOverload):
        return "extern"
    name = target.overloadpacket.__name__
    if name in _RESHAPES or any(r.alias_info is not None for r in target._schema.returns):
        return "view"
    if torch.Tag.pointwise in target.tags or name in _FUSABLE:
        return "pointwise"
    return "reduction" if name in _REDUCTIONS else "extern"


def view_base(node: fx.Node) -> fx.Node:
    """The value ``node`` is a view of (itself if it is not a view)."""
    while _kind(node) == "view" and node.target is not operator.getitem and node.args \
            and isinstance(node.args[0], fx.Node):
        node = node.args[0]
    return node


def written_by_extern(node: fx.Node) -> bool:
    """Whether ``node`` is (a view of) an extern kernel's output: a matmul's or a convolution's,
    which no pointwise code can join (or an element of its tuple)."""
    base = view_base(node)
    if base.target is operator.getitem and isinstance(base.args[0], fx.Node):
        base = base.args[0]
    return _kind(base) == "extern"


def _readers(node: fx.Node, kinds: dict) -> list:
    """The ops that read ``node``, looking through views."""
    found = []
    for user in node.users:
        found.extend(_readers(user, kinds) if kinds[user] == "view" else [user])
    return found


# Inductor realises a pointwise value read by several ops when inlining it would recompute one of
# these on the CPU (``StorageBox.should_realize_on_reuse``), or when it is large or reads much.
_HEAVY = ("exp", "log", "sigmoid", "tanh", "silu", "softmax", "softplus", "erf", "gelu")
_LARGE_INNER_FN = 50  # Inductor's realize_cpu_opcount_threshold
_MANY_READS = 4  # Inductor's realize_reads_threshold


@dataclasses.dataclass
class _Inlined:
    """A pointwise value Inductor would compute inside its readers: what that costs them."""

    heavy: bool
    ops: int
    reads: frozenset


def _shared(node: fx.Node, kinds: dict) -> bool:
    """Read by more than one op (Inductor's ``mark_reuse`` count, views passed through)."""
    return len(node.users) > 1 or any(kinds[u] == "view" and _shared(u, kinds) for u in node.users)


def _written_values(nodes: list, kinds: dict) -> set:
    """The nodes whose value a kernel writes to memory; every other value is inlined into the
    loops that read it (a view lives in its base)."""
    written, inlined = set(), {}
    for n in nodes:
        kind = kinds[n]
        if kind == "view":
            base = n.all_input_nodes[0] if n.all_input_nodes else None
            if base in inlined:
                inlined[n] = inlined[base]
            continue
        if kind != "pointwise":
            if kind in ("extern", "reduction", "placeholder"):
                written.add(n)
            continue
        heavy = any(h in n.target.overloadpacket.__name__ for h in _HEAVY)
        ops, reads = 1, set()
        for a in n.all_input_nodes:
            if a in inlined:
                heavy, ops, reads = heavy or inlined[a].heavy, ops + inlined[a].ops, reads | inlined[a].reads
            else:
                reads.add(a)
        must = any(kinds[r] in ("extern", "output") for r in _readers(n, kinds))
        # actfx's own pack arithmetic is written to fuse (its codes are never stored)
        reused = (_shared(n, kinds) and not n.meta.get(EMITTED)
                  and (heavy or ops > _LARGE_INNER_FN or len(reads) > _MANY_READS))
        if must or reused:
            written.add(n)
        else:
            inlined[n] = _Inlined(heavy, ops, frozenset(reads))
    return written


def _storages(node: fx.Node) -> list:
    found = []

    def visit(value):
        if isinstance(value, torch.Tensor):
            try:  # a symbolic size counts at its hint (the size this compile was traced at)
                found.append((StorageWeakRef(value.untyped_storage()), hint(value.untyped_storage().nbytes())))
            except (NotImplementedError, RuntimeError, TypeError):  # no storage (sparse, nested), no hint
                pass
        elif isinstance(value, (tuple, list)):
            for v in value:
                visit(v)

    visit(node.meta.get("val"))
    return found


def graph_memory(gm: fx.GraphModule, kept: set, *, packs_early: bool = False, held_by_caller: set = frozenset()
                 ) -> GraphMemory:
    """``gm``'s memory in graph order (see the module docstring). ``kept``: names of the
    placeholders the caller keeps alive (parameters, inputs): never counted. ``held_by_caller``:
    placeholders counted but alive to the end. Every other placeholder is counted from the start
    and freed after its last reader. ``packs_early``
    (forward graphs): actfx's packs run as soon as their value exists, as Inductor fuses them
    into its producer's kernel, wherever the partitioner left the saved value's node."""
    nodes = list(gm.graph.nodes)
    kinds = {n: _kind(n) for n in nodes}
    if packs_early:
        nodes = _packs_early(nodes, kinds)
    storages = {n: _storages(n) for n in nodes}
    values = _written_values(nodes, kinds)
    written = {k for n in values for k, _ in storages[n]}
    for out in nodes[-1].all_input_nodes:  # a returned view makes its base real
        written.update(k for k, _ in storages[out])
    runs_at = _run_positions(nodes, kinds, values)
    size, first, last = {}, {}, {}
    for i, n in enumerate(nodes):
        if n.op == "output":
            for out in n.all_input_nodes:  # returned: alive after the graph
                for key, _ in storages[out]:
                    last[key] = math.inf
            continue
        # a tuple's elements live as long as their getitems' readers, each on its own
        tuple_output = isinstance(n.meta.get("val"), (tuple, list))
        read_until = i if tuple_output else max((runs_at[u] for u in n.users), default=i)
        for key, nbytes in storages[n]:
            if key not in written:
                continue
            size[key] = nbytes
            first.setdefault(key, -1 if n.op == "placeholder" else i)
            last[key] = math.inf if n.name in held_by_caller else max(last.get(key, i), read_until)
    held = {k for n in nodes if n.op == "placeholder" and n.name in kept for k, _ in storages[n]}
    return _sweep(len(nodes), size, first, last, held)


def _packs_early(nodes: list, kinds: dict) -> list:
    """``nodes`` reordered: views and emitted nodes right after their latest input."""
    earliest = {}
    for i, n in enumerate(nodes):
        movable = n.meta.get(EMITTED) or kinds[n] == "view"
        earliest[n] = max((earliest[a] for a in n.all_input_nodes), default=0) if movable else i
    order = {n: i for i, n in enumerate(nodes)}
    return sorted(nodes, key=lambda n: (earliest[n], order[n]))


def _run_positions(nodes: list, kinds: dict, values: set) -> dict:
    """When each node's reads happen: a written value's own position; an inlined one (or a
    view) reads its inputs inside the kernels of its readers, so at the last of those."""
    position = {n: i for i, n in enumerate(nodes)}
    runs_at = {}
    for n in reversed(nodes):
        if n in values or kinds[n] in ("extern", "reduction", "output"):
            runs_at[n] = position[n]
        else:
            runs_at[n] = max((runs_at[u] for u in n.users), default=position[n])
    return runs_at


def _sweep(count: int, size: dict, first: dict, last: dict, held: set) -> GraphMemory:
    """Allocate each buffer before the op that writes it runs, free it after its last reader."""
    allocs, frees = {}, {}
    for key, nbytes in size.items():
        if key in held:
            continue
        allocs.setdefault(max(first[key], 0), []).append(nbytes)
        if last[key] != math.inf:
            frees.setdefault(last[key], []).append(nbytes)
    live = peak = 0
    for i in range(count):
        live += sum(allocs.get(i, ()))
        peak = max(peak, live)
        live -= sum(frees.get(i, ()))
    return GraphMemory(peak, live)


@dataclasses.dataclass(frozen=True)
class PartitionMemory:
    """One partitioned graph pair's memory in a training step, bytes beyond the parameters and
    inputs the caller holds anyway."""

    forward_peak: int  # the forward's worst point (what it saves so far included)
    outputs: int  # the forward's outputs to the caller (not saved for backward)
    backward_peak: int  # the backward's worst point: saved values until their last reader, incoming
    #                     gradients, temporaries, and the gradients it has produced so far
    gradients: int  # what the backward returns (parameter and input gradients)


def partition_memory(fwd: fx.GraphModule, bwd: fx.GraphModule, num_fwd_outputs: int) -> PartitionMemory:
    """Forward and backward of one partition, walked as ``graph_memory`` does."""
    inputs = {n.name for n in fwd.graph.nodes if n.op == "placeholder"}
    forward = graph_memory(fwd, inputs, packs_early=True)
    saved_inputs = {n.name for n in bwd.graph.nodes if n.op == "placeholder"} & inputs  # parameters saved as is
    # the incoming gradients are the autograd Function's arguments: alive until backward returns
    tangents = {n.name for n in bwd.graph.find_nodes(op="placeholder") if _is_tangent(n)}
    backward = graph_memory(bwd, saved_inputs, held_by_caller=tangents)
    returned = fwd.graph.output_node().args[0]
    outputs = {}
    for node in returned[:num_fwd_outputs]:
        if isinstance(node, fx.Node) and node.op != "placeholder":
            outputs.update(_storages(node))
    incoming = {k: b for n in bwd.graph.nodes if n.name in tangents for k, b in _storages(n)}
    return PartitionMemory(forward.peak, sum(outputs.values()), backward.peak, backward.end - sum(incoming.values()))


def step_peak(partitions: list) -> int:
    """The worst point of one training step through ``partitions``: (PartitionMemory, bytes it
    saves) per compiled graph, in forward order. Forward i runs with what the graphs before it
    saved; backward i runs with what those still hold, the last graph's outputs (the loss reads
    them) and the gradients of the graphs after it."""
    worst = saved_before = 0
    before = []
    for memory, saved in partitions:
        before.append(saved_before)
        worst = max(worst, saved_before + memory.forward_peak)
        saved_before += saved
    outputs = partitions[-1][0].outputs if partitions else 0
    gradients = 0
    for (memory, _), held in zip(reversed(partitions), reversed(before)):
        worst = max(worst, held + outputs + memory.backward_peak + gradients)
        gradients += memory.gradients
    return worst
