"""Pack what the partitioner saves: the compiled path's one pass over forward and backward graphs.

Why: torch.compile's min-cut partitioner decides what backward recomputes and what forward
saves; this pass decides how each saved value is stored, and Inductor then fuses each pack into
the kernel that produces the value and each unpack into the backward kernel that reads it.

For each saved tensor (a forward output the backward reads), in order:

1. *Hoist* backward values that depend on saved values alone but are nonlinear in one that would
   be packed (GELU's derivative, a ReLU's ``x <= 0`` mask, ``x * x``): they are computed in
   forward instead and saved, so the backward becomes linear in what it reads.
2. Classify with the ATen op rules (``actfx.rules`` via ``noise_degree``): parameters, their
   casts, graph inputs that need no gradient (the caller's data), integers and small values stay
   exact (an input with a gradient is an activation an earlier graph handed over: packed);
   booleans become 1-bit masks; float values every gradient is linear in are packed at the
   configured bits (stochastic rounding, unbiased); values some gradient is still nonlinear in
   stay exact, with the op that made it so.
3. Rewrite: forward outputs the packed pieces in the value's place, backward takes them as
   inputs and unpacks right before the first reader. ``meta["val"]`` is set on every new node.

Values the partitioner recomputes stay recomputed; a value read by several backward ops is packed
once. The result is recorded as a ``GraphPlan`` for ``actfx.show``.
"""

from __future__ import annotations

import collections

import torch
from torch import fx

from actfx.config import KEEP_EXACT, Config
from actfx.kernels import TERNARY, extern_pack, graph_pack
from actfx.kernels.ops import realized_op
from actfx.passes import (decorrelate, forward_cse, hoist, linearize, noise_degree, rematerialize, rms_inputs,
                          stored_layout)
from actfx.passes.compiled_kinds import chosen_kind, node_kinds
from actfx.passes.graph_emit import broadcast_zero, emit, fuse_seeds
from actfx.passes.graph_memory import view_base, written_by_extern
from actfx.passes.index_range import compact_dtype
from actfx.passes.saved_plan import GraphPlan, SavedValue, Storage, site_key
from actfx.passes.saved_pair import (SavedPair, hint, is_normalisation_statistic, module_path, nbytes, numel, op_name,
                                     parameter_nodes, static_shape, val, written_inputs)
from actfx.rules import rule_for

aten = torch.ops.aten

SYMBOLIC_SIZES = "dynamic shape (packing needs static sizes)"  # why a value with symbolic sizes stays exact


class PackSaved:
    """One run of the pass on a partitioned pair: the steps (``linearize``, ``hoist``,
    ``rematerialize``) read and change it; ``classify`` and ``rewrite`` finish."""

    def __init__(self, fwd, bwd, num_fwd_outputs: int, static_indices, config: Config, probe=None):
        self.g = SavedPair(fwd, bwd, num_fwd_outputs)
        self.config = config
        self.probe = probe
        self.params = parameter_nodes(self.g.fwd, static_indices)
        self.written = written_inputs(self.g.fwd)  # buffers the forward writes in place
        self.handed_over = self.g.inputs_with_gradient() - self.params - self.written
        self.user_outputs = set(self.g.outputs()[:num_fwd_outputs])
        self.exact_reason: dict[str, str] = {}
        self.hoisted: dict[str, str] = {}  # fwd node name -> op description
        self.layouts: stored_layout.StoredLayouts | None = None  # set by rewrite, once the forward has all its nodes
        self._scatters: bool | None = None  # whether the backward scatters (``_realize``), read once

    def read_as_is(self, node: fx.Node) -> bool:
        """Whether backward may read ``node``, a parameter or buffer or a value computed from them,
        as forward saw it: not a buffer the forward writes in place (backward would read the
        new value: spectral norm's vectors)."""
        return node in self.params and node not in self.written

    def packable(self, fwd_node: fx.Node) -> str | None:
        """None if the value may be packed, else why it stays exact."""
        value = val(fwd_node)
        if fwd_node in self.params:
            return parameter_reason(fwd_node)
        if fwd_node.op == "placeholder" and fwd_node not in self.handed_over:
            return "graph input"
        if fwd_node in self.user_outputs:
            return "also a forward output"
        if not static_shape(fwd_node):
            return SYMBOLIC_SIZES
        if value.dtype == torch.bool:
            return None
        if value.is_complex():
            return "complex"
        if not value.is_floating_point():
            return "integer"
        if numel(fwd_node) < self.config.min_numel:
            return "small"
        if self._is_statistic(fwd_node):
            return "normalisation statistic"
        return None

    def _is_statistic(self, node: fx.Node, depth: int = 4) -> bool:
        """A normalisation statistic, a view of one (BatchNorm's per-channel mean squeezed to
        [C]), or pointwise math of statistics and parameters alone (``rsqrt * weight``): one
        value per channel, which every gradient of the norm is scaled by. Packing 1024 of them
        saved 3.5 KB and cost a pack's generated code each (42 such packs in ResNet-50)."""
        node = view_base(node)
        if is_normalisation_statistic(node):
            return True
        if depth == 0 or node.op != "call_function" or not isinstance(node.target, torch._ops.OpOverload) \
                or torch.Tag.pointwise not in node.target.tags:
            return False
        inputs = node.all_input_nodes
        return any(a not in self.params for a in inputs) and all(
            a in self.params or self._is_statistic(a, depth - 1) for a in inputs)

    def sources(self) -> dict[fx.Node, fx.Node]:
        """Backward placeholder -> forward node, for saved float values that could be packed."""
        return {bwd: fwd for fwd, bwd in self.g.saved_tensors()
                if self.packable(fwd) is None and val(fwd).is_floating_point()}

    def classify(self) -> dict[fx.Node, Storage]:
        """Forward saved node -> storage, fixing the set of packed sources until no gradient is
        nonlinear in any of them."""
        sources = self.sources()
        while True:
            biased = noise_degree.biased_sources(self.g.bwd, sources)
            if not biased:
                break
            for src, culprit in biased.items():
                self.exact_reason[sources[src].name] = f"nonlinear use by {op_name(culprit)} in backward"
                del sources[src]
        decisions = {}
        packed = set(sources.values())
        for fwd, _ in self.g.saved_tensors():
            if fwd in packed:
                decisions[fwd] = Storage.PACKED
            elif val(fwd).dtype == torch.bool and self.packable(fwd) is None:
                decisions[fwd] = Storage.MASK
            else:
                decisions[fwd] = Storage.EXACT
                self.exact_reason.setdefault(fwd.name, self.packable(fwd) or "")
        return decisions

    def rewrite(self, decisions: dict[fx.Node, Storage]) -> GraphPlan:
        plan = GraphPlan()
        self.layouts = stored_layout.StoredLayouts(self.g.fwd)
        copies = views_to_copy(self.g, decisions, self.user_outputs) if self.probe is None else set()
        sites = self._sites()
        for fwd, bwd in self.g.saved_tensors():
            storage = decisions[fwd]
            op = self.hoisted.get(fwd.name, op_name(fwd))
            site = sites[fwd]
            bits = self._bits(fwd, site) if storage is Storage.PACKED else None
            if bits == KEEP_EXACT:
                storage, bits = Storage.EXACT, None
                self.exact_reason[fwd.name] = "plan"
            self._replace_shape_only_uses(bwd)
            if not bwd.users:
                self.g.drop_saved(fwd)
                continue
            rows = self._rows(fwd, self.config.group_size) if storage is Storage.PACKED else None
            mask_rows = self._rows(fwd, _MASK_MIN_ROWS) if storage is Storage.MASK else None
            apart = self.probe is None and self._packs_apart(fwd, storage, rows or mask_rows, bits)
            if storage is Storage.PACKED and self.probe is not None:
                after = self._probe(fwd, bwd, bits, rows)
            elif storage is Storage.PACKED:
                after = self._pack(fwd, bwd, bits, rows, apart)
            elif storage is Storage.MASK:
                after = self._mask(fwd, bwd, mask_rows, apart)
            elif self.exact_reason.get(fwd.name) == "integer" and (narrow := compact_dtype(fwd)) is not None:
                after = self._narrow(fwd, bwd, narrow)
                self.exact_reason[fwd.name] = f"integer, stored as {str(narrow).replace('torch.', '')}"
            elif fwd in copies:  # a view of a larger value nothing else keeps: its own storage
                after = self._store(fwd, bwd, lambda v: v.clone(memory_format=torch.contiguous_format),
                                    lambda c, like: c, key=("own copy",))
                reason = self.exact_reason.get(fwd.name, "")
                self.exact_reason[fwd.name] = reason + " (its own copy: the view held its base)"
            else:
                after = nbytes(fwd)
            plan.saved.append(SavedValue(
                name=fwd.name, op=op, module_path=module_path(fwd),
                shape=tuple(hint(s) for s in val(fwd).shape), dtype=str(val(fwd).dtype).replace("torch.", ""),
                bytes_before=nbytes(fwd), bytes_after=after, storage=storage, bits=bits,
                reason=self.exact_reason.get(fwd.name, "") if storage is Storage.EXACT else "",
                hoisted=fwd.name in self.hoisted, site=site, rows=rows, apart=apart))
        if self.config.user_op_bits:  # read only to say that a kind the user set matches no op
            plan.kinds = frozenset().union(*(node_kinds(n) for n in self.g.fwd.nodes))
        self.g.bwd.eliminate_dead_code()
        fuse_seeds(self.g.fwd)
        return plan

    def _sites(self) -> dict:
        """Forward saved node -> the key a plan names it by (``site_key``). A decorrelation copy
        (a forward ``alias`` of another saved value) takes its source's key: backward multiplies
        the two packs, so a plan gives them one width and calibration rounds them together. Keyed
        apart, each measured alone added nothing where the source is zero: a tiny Hugging Face
        DeiT's all-zero class-token row (rstd 1e6) measured 3e-5 |g|^2 per copy at 1 bit and
        2.3 |g|^2 for both, and the plan came out 2x worse than uniform 2-bit."""
        saved = [fwd for fwd, _ in self.g.saved_tensors()]
        members = set(saved)
        sources = {fwd: _copy_source(fwd, members) for fwd in saved}
        seen: collections.Counter = collections.Counter()
        sites = {}
        for fwd in saved:
            if sources[fwd] is None:
                path, op = module_path(fwd), self.hoisted.get(fwd.name, op_name(fwd))
                seen[site_key(path, op)] += 1
                sites[fwd] = site_key(path, op, seen[site_key(path, op)])
        return {fwd: sites[sources[fwd] or fwd] for fwd in saved}

    def _bits(self, fwd: fx.Node, site: str) -> int:
        """A plan's width for this value (``Config.site_bits`` keyed by its ``site``), else the
        per-module / per-kind width."""
        planned = self.config.site_bits.get(site) if self.config.site_bits else None
        return planned if planned is not None else self.config.bits_for(self._kind(fwd), module_path(fwd))

    def _probe(self, fwd: fx.Node, bwd: fx.Node, bits: int, rows: graph_pack.Rows | None) -> int:
        """Calibration (``actfx.plan(path="compile")``): the value stays saved as it is and
        backward reads it through the probe, which can add one pack's rounding noise."""
        read = self.g.bwd.call_function(self.probe.read, (bwd, self.probe.key(fwd.name)))
        read.meta["val"] = bwd.meta["val"]
        self.first_use(bwd).prepend(read)
        for user in list(bwd.users):
            if user is not read:
                user.replace_input_with(bwd, read)
        return graph_pack.packed_value_bytes(tuple(val(fwd).shape), bits, self.config.group_size, rows)

    def _kind(self, fwd: fx.Node) -> str:
        """The Config.op_bits kind of a saved value: a kind the user set a width for that the
        value answers to (``compiled_kinds``); else values of attention (the op that was
        decomposed, ``meta["original_aten"]``, is softmax or SDPA, for it or a forward reader)
        are "attention" and keep their 8-bit default; everything else uses ``bits``."""
        chosen = chosen_kind(fwd, self.config.user_op_bits, self.hoisted.get(fwd.name))
        if chosen is not None:
            return chosen
        for node in (fwd, *fwd.users):
            original = str(node.meta.get("original_aten", ""))
            if "softmax" in original or "scaled_dot_product" in original:
                return "attention"
        return "default"

    def first_use(self, placeholder: fx.Node) -> fx.Node:
        order = {n: i for i, n in enumerate(self.g.bwd.nodes)}
        return min(placeholder.users, key=order.get)

    def _replace_shape_only_uses(self, placeholder: fx.Node) -> None:
        """Ops that read only the shape of a saved value get a broadcast zero of that shape
        (static shapes only: a symbolic one would have to come from the graph's size nodes)."""
        if not static_shape(placeholder):
            return
        for user in list(placeholder.users):
            rule = rule_for(user.target)
            positions = [i for i, a in enumerate(user.args) if a is placeholder]
            if positions and all(i in rule.shape_only for i in positions) and placeholder not in user.kwargs.values():
                zero = emit(self.g.bwd, broadcast_zero, [placeholder], before=user, key="zero")
                user.replace_input_with(placeholder, zero)

    def _rows(self, fwd: fx.Node, min_rows: int) -> graph_pack.Rows | None:
        """This value's row layout, None for the flat layout."""
        inner, plane = self.layouts.columns_and_plane(fwd)
        return graph_pack.row_layout(tuple(val(fwd).shape), inner, plane, min_rows)

    def _pack(self, fwd: fx.Node, bwd: fx.Node, bits: int, rows: graph_pack.Rows | None, apart: bool) -> int:
        group, stochastic = self.config.group_size, self.config.stochastic
        pack = extern_pack.pack_extern if apart else graph_pack.pack_values
        apart_in = self._realize(fwd, rows, mask=False, bits=bits)
        return self._store(fwd, bwd, lambda x: pack(x, bits, group, stochastic, rows),
                           lambda c, lo, hi, x: _realized(graph_pack.unpack_values(c, lo, hi, x, bits, rows, group),
                                                          apart_in),
                           key=("pack", pack.__name__, bits, group, stochastic, rows, apart_in))

    def _realize(self, fwd: fx.Node, rows: graph_pack.Rows | None, mask: bool, bits=1) -> bool:
        """Whether this value's unpack must be a buffer of its own: Inductor's C++ backend fused an
        unpack cut back from a padded table into a scatter (``index_add``, an indexing's
        backward) with a loop over whole groups only, and the last partial group's entries got
        no gradient (a graph-attention layer: 46% off). Realized where the backward scatters."""
        if self._scatters is None:
            self._scatters = any(n.op == "call_function" and n.target in _SCATTERS for n in self.g.bwd.nodes)
        return self._scatters and graph_pack.padded(tuple(val(fwd).shape), self.config.group_size, rows, mask, bits)

    def _packs_apart(self, fwd: fx.Node, storage: Storage, rows: graph_pack.Rows | None, bits) -> bool:
        """Whether ``fwd`` is packed by the precompiled kernel (``extern_pack``, with
        ``Config.pack_kernel``) rather than as ATen math Inductor generates code for: masks, and
        values an extern kernel writes (no pack can join it), where that kernel can read them
        (binary widths: three levels are generated)."""
        if not self.config.pack_kernel:
            return False
        if storage is Storage.MASK:
            return extern_pack.extern_mask_applies(val(fwd), rows)
        return (storage is Storage.PACKED and bits != TERNARY and written_by_extern(fwd)
                and extern_pack.extern_pack_applies(val(fwd), rows))

    def _mask(self, fwd: fx.Node, bwd: fx.Node, rows: graph_pack.Rows | None, apart: bool) -> int:
        pack = extern_pack.pack_mask_extern if apart else graph_pack.pack_mask
        apart_in = self._realize(fwd, rows, mask=True)
        return self._store(fwd, bwd, lambda m: pack(m, rows),
                           lambda p, m: _realized(graph_pack.unpack_mask(p, m, rows), apart_in),
                           key=("pack_mask", pack.__name__, rows, apart_in))

    def _narrow(self, fwd: fx.Node, bwd: fx.Node, dtype: torch.dtype) -> int:
        """An index saved in the narrower ``dtype`` its producer bounds it to (``index_range``),
        widened back to its own type for backward."""
        return self._store(fwd, bwd, lambda i: i.to(dtype), lambda i, like: i.to(like.dtype), key=("narrow", dtype))

    def _store(self, fwd: fx.Node, bwd: fx.Node, store, restore, *, key: tuple) -> int:
        """Save ``store(value)``'s pieces in place of ``fwd`` (computed right after it) and give
        backward ``restore(*pieces, like=value)`` before its first reader; returns the pieces'
        bytes. ``key`` names both functions for graph_emit's template cache."""
        pieces = emit(self.g.fwd, store, [fwd], before=fwd.next, key=("store", *key))
        pieces = (pieces,) if isinstance(pieces, fx.Node) else tuple(pieces)
        holders = [self.g.add_saved(p, fwd) for p in pieces]
        restored = emit(self.g.bwd, restore, [*holders, bwd], before=self.first_use(bwd), key=("restore", *key))
        self._swap(bwd, restored)
        self.g.drop_saved(fwd)
        return sum(nbytes(p) for p in pieces)

    def _swap(self, placeholder: fx.Node, unpacked: fx.Node) -> None:
        """Readers of ``placeholder`` read ``unpacked`` (shapes are static, so the unpack itself
        does not read the placeholder)."""
        placeholder.replace_all_uses_with(unpacked)


def _realized(value, apart: bool):
    return realized_op(value) if apart else value


# Backward ops that add into an output at indices (``PackSaved._realize``)
_SCATTERS = {aten.index_add.default, aten.index_add_.default, aten.scatter_add.default, aten.scatter_add_.default,
             aten.index_put.default, aten.index_put_.default, aten._unsafe_index_put.default,
             aten.scatter_reduce.two, aten.scatter_reduce_.two, aten.index_reduce.default}

# A mask is packed in rows (see graph_pack) from this many rows up: its padding stays under 1/8.
_MASK_MIN_ROWS = 64


def views_to_copy(g: SavedPair, decisions: dict, user_outputs: set) -> set:
    """Values kept exact that are views of a larger value no one else keeps (q and k sliced from
    one qkv projection for the fused attention kernel, v packed): each view held the whole base
    (a third of it for v, unused). Copied into their own storage where, per base, the copies are
    smaller than it."""
    views: dict = collections.defaultdict(list)
    kept = set()  # bases held whole anyway
    for fwd, _ in g.saved_tensors():
        base = view_base(fwd)
        if decisions.get(fwd) is Storage.EXACT and base is not fwd:
            views[base].append(fwd)
        elif decisions.get(fwd) is not Storage.PACKED and decisions.get(fwd) is not Storage.MASK:
            kept.add(fwd)  # held whole (exact, or a placeholder's value)
    kept |= {view_base(o) for o in user_outputs if isinstance(o, fx.Node)}  # a returned view holds its base too
    copies = set()
    for base, group in views.items():
        if base in kept or base.op == "placeholder" or not static_shape(base):
            continue
        if all(static_shape(v) for v in group) and sum(nbytes(v) for v in group) < nbytes(base):
            copies.update(group)
    return copies


def parameter_reason(node: fx.Node) -> str:
    """Why a value computed from parameters alone stays exact: "parameter" where it is one or a
    view of one (no memory of its own), "parameter copy" where it is a cast or a computation of
    them (held for backward like any value: the bytes count)."""
    return "parameter copy" if view_base(node).op == "call_function" else "parameter"


def pack_saved(fwd: fx.GraphModule, bwd: fx.GraphModule, *, num_fwd_outputs: int, static_indices,
               config: Config, probe=None, hoisting: bool = True) -> GraphPlan:
    """Run the pass in place on a partitioned pair; returns what each saved value became.
    ``probe``: calibrating (see ``actfx.planner.compiled_sensitivity``): values to pack are kept
    and read through ``probe.read(value, name)`` instead. ``hoisting``: compute in forward the
    backward values that are nonlinear in packed ones (``linearize``, ``hoist``); without it such
    values keep their inputs exact."""
    run = PackSaved(fwd, bwd, num_fwd_outputs, static_indices, config, probe)
    before = sum(nbytes(f) for f, _ in run.g.saved_tensors()
                 if f not in run.params or parameter_reason(f) != "parameter")
    dependent = noise_degree.tangent_dependent(run.g.bwd)
    recomputed = sum(1 for n in run.g.bwd.nodes if n.op == "call_function" and n not in dependent)
    rematerialize.rematerialize(run)
    rematerialize.fixed_factors(run)
    rematerialize.repeated_parameter_copies(run)
    hoist.relu_as_select(run)
    hoist.masks_once(run)
    if hoisting:
        linearize.linearize(run)
        hoist.hoist(run)
        hoist.normalised_inputs(run)
        hoist.raw_reads_from_normalised(run)
        rms_inputs.rms_inputs(run)
    forward_cse.merge_copies(run)
    hoist.saved_masks_once(run)
    decorrelate.decorrelate(run)
    decisions = run.classify()
    plan = run.rewrite(decisions)
    plan.bytes_before = before
    plan.recomputed_ops = recomputed
    fwd.graph.lint()
    bwd.graph.lint()
    fwd.recompile()
    bwd.recompile()
    return plan


def kept_as_is(fwd: fx.GraphModule, bwd: fx.GraphModule, *, num_fwd_outputs: int, static_indices, config: Config,
               reason: str) -> GraphPlan:
    """The plan of a pair the pass leaves as the partitioner made it: every saved value exact."""
    run = PackSaved(fwd, bwd, num_fwd_outputs, static_indices, config)
    plan = GraphPlan()
    for f, _ in run.g.saved_tensors():
        value = val(f)
        plan.saved.append(SavedValue(
            name=f.name, op=op_name(f), module_path=module_path(f), shape=tuple(hint(s) for s in value.shape),
            dtype=str(value.dtype).replace("torch.", ""), bytes_before=nbytes(f), bytes_after=nbytes(f),
            storage=Storage.EXACT, reason=parameter_reason(f) if f in run.params else reason))
    plan.bytes_before = plan.bytes_after
    return plan


def _copy_source(fwd: fx.Node, saved: set) -> fx.Node | None:
    """The saved value ``fwd`` is a forward alias of (a decorrelation copy), else None."""
    source = fwd
    while source.target is aten.alias.default and isinstance(source.args[0], fx.Node):
        source = source.args[0]
        if source in saved and source.target is not aten.alias.default:
            return source
    return None
