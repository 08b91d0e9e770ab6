"""Before -> after, op by op: what a converted model saves for backward next to what the original saved.

One row per op of the original graph. The nodes the rewrite emitted for an op (packs of its
inputs, its variant calls, their unpacking) are found with ``actfx.passes.provenance`` and
their measured bytes summed into the op's row; the original op's own measurement is "before".
Where the rewrite cannot be replayed (a model converted with declared leaf modules), each op
of the rewritten graph is its own row, without "before". Where the model's root has no graph
at all, both runs charged modules, and rows are modules. In every case the rows add up to the
measured totals.
"""

from __future__ import annotations

import dataclasses
import math
import operator

import torch
import torch.nn as nn
from torch.fx import Graph

from actfx.config import KEEP_EXACT
from actfx.convert import is_converted
from actfx.passes.analyze import CALLS, Measurement, NodeSaved, module_path, target_name, trace_like
from actfx.passes.baked_values import BAKED
from actfx.passes.capture import SUBMODULES_CACHE, module_view
from actfx.passes.provenance import provenance
from actfx.passes.rewrite import SEED_BUFFER, SEED_STATE, SELF_ATTR

_VARIANTS = "actfx.variants."
_PLUMBING = "actfx.variants.packing"  # seed and pack calls: they feed variants and save nothing
_MASK_KINDS = {"relu": "1-bit mask", "leaky_relu": "1-bit mask", "hardtanh": "1-bit mask", "threshold": "1-bit mask",
               "dropout": "1-bit mask", "max_pool": "compact indices", "gather": "compact indices",
               "amax": "1-bit mask", "amin": "1-bit mask", "maximum": "1-bit mask", "minimum": "1-bit mask",
               "scatter_reduce": "1-bit masks", "masked_select": "its mask only",
               "aminmax": "1-bit masks"}


@dataclasses.dataclass
class Row:
    """One op of the converted model: what its backward keeps, before and after conversion."""

    node: str  # the original node's name (prefixed "path:" inside a converted submodule)
    op: str  # module class or function name, as in the original graph
    module_path: str | None
    covered: bool  # actfx put a compressed-save variant in its place
    kind: str = ""  # "packed 2-bit", "1-bit mask", "shared with X", "parameter", "not covered", ...
    before_bytes: int | None = None  # activation bytes it was first to keep (None: not measured)
    after_bytes: int | None = None
    before: list = dataclasses.field(default_factory=list)  # "float32[8, 64, 56, 56]" per saved tensor
    after: list = dataclasses.field(default_factory=list)
    shared_with: list = dataclasses.field(default_factory=list)  # rows that kept the same storage first
    reason: str | None = None  # why it is not covered

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def original_of(model: nn.Module) -> nn.Module:
    """The model as it was before ``actfx.convert``: a shallow view that shares every Parameter,
    buffer and unconverted submodule with ``model`` and runs the original forwards. Nothing is
    modified; converted modules are viewed as instances of the class they were made from."""
    if not any(is_converted(m) for m in model.modules()):
        return model
    view = module_view(model)
    if is_converted(model):
        view.__class__ = type(model).__bases__[0]
        for attr in (SEED_STATE, SELF_ATTR, "_actfx_record", SUBMODULES_CACHE, BAKED):
            view.__dict__.pop(attr, None)
        view._buffers = {k: v for k, v in model._buffers.items() if k != SEED_BUFFER}
    view._modules = {name: None if child is None else original_of(child) for name, child in model._modules.items()}
    return view


def breakdown(model: nn.Module, before: Measurement | None = None, after: Measurement | None = None) -> list[Row]:
    """Rows for a converted ``model``; ``before``/``after``: measurements of the original and of
    ``model`` (``actfx.passes.analyze.measure``), or None to list the ops without bytes."""
    record = getattr(model, "_actfx_record", None)
    if record is None:
        raise TypeError("breakdown expects a model returned by actfx.convert")
    if after is not None and "" not in record.graphs and not any(e.node is not None for e in after.nodes):
        found = _module_rows(record, before, after)
    else:
        found = _op_rows(model, record, before, after)
    names = {e.label: row.node for row, _, entries, _, _ in found for e in entries}
    for row, path, entries, orig, decisions in found:
        merged = _merge(entries, row.node)
        row.kind = _kind(record, row, path, merged, orig, decisions, names, measured=after is not None)
        if row.kind == "not covered":
            row.reason = _reason(record, row, path, _hooked(model, row.module_path))
        if after is not None:
            row.after_bytes = merged.activation_bytes
            row.after = [_describe(t, names) for t in merged.tensors]
            row.shared_with = sorted({names.get(n, n) for n in merged.shared_with} - {row.node})
        if orig is not None:
            row.before_bytes = orig.activation_bytes
            row.before = [_describe(t, {}) for t in orig.tensors]
        if row.covered and after is not None and row.after_bytes >= (row.before_bytes or 0) > 0 and not any(
                not (t.dtype.is_floating_point or t.dtype.is_complex) and t.counted for t in merged.tensors):
            planned = any(record.config.site_bits.get(d.key) == KEEP_EXACT
                          for d in decisions)
            # the variant packs nothing below min_numel, of complex values or in float64 (the
            # packing kernels take 16- and 32-bit floats), or a plan keeps it exact
            complex_values = any(t.dtype.is_complex for t in merged.tensors)
            float64 = any(t.dtype == torch.float64 for t in merged.tensors)
            small = all(math.prod(t.shape) < record.config.min_numel for t in merged.tensors
                        if t.counted and not t.parameter)
            # a large value the variant keeps on purpose (grid_sample's grid): its packed input was
            # the model's own input, which is not counted, so nothing shrank here
            row.kind = ("kept exact (plan)" if planned else "kept exact (complex values)" if complex_values
                        else "kept exact (float64)" if float64 else "kept exact (too small to pack)" if small
                        else "kept exact (backward nonlinear in it)")
    return [row for row, *_ in found]


# ------------------------------------------- rows, as (row, graph path, after entries, before entry, decisions)


def _op_rows(model, record, before, after) -> list:
    # a module called several times runs its graph each time: a node's entries are summed
    measured = _summed(after, lambda e: id(e.node)) if after else {}
    originals = _summed(before, lambda e: (e.graph_path, e.name)) if before else {}
    traced = before.graphs if before is not None else trace_like(original_of(model), model)
    found = []
    for path, graphs in record.graphs.items():
        graph = graphs[True]
        prov = provenance(graph, traced[path].owning_module, record.config, path,
                          captured=path in record.captured) if path in traced else None
        if prov is None:
            found += _rewritten_op_rows(path, graph, measured, model.get_submodule(path) if path else model)
            continue
        groups: dict = {}
        for node in graph.nodes:
            source = prov.sources.get(node)
            if source in prov.ops and node.op in CALLS:
                groups.setdefault(source, []).append(node)
        for source, nodes in groups.items():
            op, where = prov.ops[source]
            decision = prov.decisions.get(source)
            row = Row(f"{path}:{source}" if path else source, op, where, decision is not None)
            entries = [measured[id(n)] for n in nodes if id(n) in measured]
            orig = _original(originals, path, source, nodes)
            found.append((row, path, entries, orig, [decision] if decision else []))
    placed = {id(e.node) if e.node is not None else id(e) for _, _, entries, _, _ in found for e in entries}
    # a root that runs whole charges the modules outside the converted ones, in both runs
    modules = {e.module_path: e for e in before.nodes if e.node is None} if before else {}
    for entry in after.nodes if after else ():  # anything no row holds
        if (id(entry.node) if entry.node is not None else id(entry)) not in placed and entry.tensors:
            orig = modules.get(entry.module_path) if entry.node is None else None
            found.append((Row(entry.label, orig.target if orig is not None else entry.target, entry.module_path,
                              False), entry.graph_path, [entry], orig, []))
    return _whole_where_unpaired(found, before) if before is not None else found


def _whole_where_unpaired(found: list, before: Measurement) -> list:
    """Inside a root that runs whole, the original runs each converted block's traced graph; a
    call that graph was not traced for runs the block whole, charged per module. Such a block's
    rows cannot pair up op by op, so they become one row, both sides summed."""
    whole: dict = {}
    for e in before.nodes:
        if e.node is None and e.module_path and e.tensors:
            whole.setdefault(e.module_path, []).append(e)
    inside = lambda path, block: path == block or path.startswith(block + ".")  # noqa: E731
    blocks = sorted({path for _, path, _, _, _ in found if path and any(inside(m, path) for m in whole)}, key=len)
    outermost = [b for i, b in enumerate(blocks) if not any(inside(b, a) for a in blocks[:i])]
    for block in outermost:
        rows = [f for f in found if f[1] and inside(f[1], block)]
        found = [f for f in found if not (f[1] and inside(f[1], block))]
        orig = NodeSaved(block, "", "call_module", "", block)
        for path, entries in whole.items():
            if inside(path, block):
                orig.tensors.extend(t for e in entries for t in e.tensors)
                orig.target = entries[0].target if path == block else orig.target or entries[0].target
        row = Row(block, orig.target, block, any(r.covered for r, *_ in rows))
        found.append((row, block, [e for _, _, entries, _, _ in rows for e in entries], orig,
                      [d for *_, decisions in rows for d in decisions]))
    return found


def _summed(measurement: Measurement, key) -> dict:
    """``key(entry)`` -> the measured node's entries merged into one (usually there is one)."""
    calls: dict = {}
    for e in measurement.nodes:
        if e.node is not None:
            calls.setdefault(key(e), []).append(e)
    return {k: found[0] if len(found) == 1 else dataclasses.replace(found[0], tensors=[t for e in found for t in e.tensors])
            for k, found in calls.items()}


def _original(originals: dict, path: str, source: str, nodes: list) -> NodeSaved | None:
    """What the original saved for a row: a collapsed element-wise region's row holds every op
    it replaced (``sigmoid(h) * 2``: the sigmoid's output too, not only the product's saves)."""
    names = [source]
    for node in nodes:
        names += [m for m in node.meta.get("actfx_replaces", ()) if m not in names]
    found = [originals[(path, m)] for m in names if (path, m) in originals]
    return _merge(found, source) if len(found) > 1 else (found[0] if found else None)


def _rewritten_op_rows(path: str, graph: Graph, measured: dict, root: nn.Module) -> list:
    """Without provenance: each variant call and each op left as it was is a row of its own."""
    found = []
    for node in graph.nodes:
        where = getattr(node.target, "__module__", None) or "" if node.op == "call_function" else ""
        if node.op not in CALLS or node.target is operator.getitem or where == _PLUMBING:
            continue
        covered = where.startswith(_VARIANTS)
        row = Row(f"{path}:{node.name}" if path else node.name, target_name(node, root), module_path(node, path), covered)
        found.append((row, path, [measured[id(node)]] if id(node) in measured else [], None, []))
    return found


def _module_rows(record, before: Measurement | None, after: Measurement) -> list:
    """The root had no graph, so both runs charged modules: one row per module of the converted
    run. A converted module runs as one piece, so the original's entries for its submodules are
    summed into it (the longest path the converted run has)."""
    paths = {e.module_path for e in after.nodes}
    merged: dict = {}
    for orig in before.nodes if before else ():
        path = orig.module_path
        while path not in paths and path:
            path = path.rpartition(".")[0] or None
        entry = merged.setdefault(path, NodeSaved(orig.name, "", orig.op, orig.target, path))
        if orig.module_path == path:
            entry.name, entry.target = orig.name, orig.target
        entry.tensors.extend(orig.tensors)
    found = []
    for entry in after.nodes:
        orig = merged.get(entry.module_path)
        decisions = [d for d in record.decisions if d.module_path == entry.module_path or (
            entry.module_path and (d.module_path or "").startswith(entry.module_path + "."))]
        covered = entry.module_path in record.graphs and bool(decisions)
        row = Row(entry.label, orig.target if orig is not None else entry.target, entry.module_path, covered)
        found.append((row, entry.module_path or "", [entry], orig, decisions))
    return found


# ---------------------------------------------------------------- descriptions


def _merge(entries: list, name: str) -> NodeSaved:
    merged = NodeSaved(name, "", "", "", None)
    for e in entries:
        merged.tensors.extend(e.tensors)
    return merged


def _describe(t, names: dict) -> str:
    text = f"{str(t.dtype).removeprefix('torch.')}{list(t.shape)}"
    if t.parameter:
        return text + " (parameter)"
    if t.shared_with:
        return text + f" (= {names.get(t.shared_with, t.shared_with)})"
    return text if t.counted else text + " (again)"


def _kind(record, row: Row, path: str, after: NodeSaved, orig: NodeSaved | None, decisions: list,
          names: dict, measured: bool) -> str:
    if measured:
        kept = [t for e in (after, orig) if e is not None for t in e.tensors]
        if not kept:
            return "nothing saved"
        if all(t.parameter for t in kept):
            return "parameter"
    if not measured and not row.covered and row.module_path != path and row.module_path in record.graphs:
        return "nothing saved"  # the call of a module converted on its own: its ops have rows
    if not row.covered and measured and after.activation_bytes == 0 and (orig is None or orig.activation_bytes == 0):
        return "nothing saved"  # what it keeps another op keeps too (MaxUnpool: the pooling's indices)
    if not row.covered:
        def of_row(items) -> bool:
            return any(item.path in (row.module_path, "<root>") and item.what == row.op for item in items)

        listed = of_row(record.uncovered)
        if not listed and of_row(record.parameter_ops):
            return "parameter computation" if measured else "nothing saved"
        if measured and not listed and all(math.prod(t.shape) < record.config.min_numel
                                           for t in after.tensors if t.counted and not t.parameter):
            # an op left as it is on purpose for what it keeps (a channel dropout's one mask value
            # per channel) was listed as not covered
            return "kept exact (too small to pack)"
        return "not covered" if measured or listed else "nothing saved"
    others = sorted({names.get(n, n) for n in after.shared_with} - {row.node})
    if after.tensors and after.activation_bytes == 0 and others:
        return "shared with " + ", ".join(others)
    if not decisions:
        return "covered"
    kinds = [text for d in decisions for text in (d.saved or [_MASK_KINDS.get(d.kind, "nothing saved")])]
    return ", ".join(dict.fromkeys(kinds))


def _hooked(model: nn.Module, path: str) -> bool:
    """Whether the module at ``path`` has forward hooks (their ops run as written)."""
    try:
        module = model.get_submodule(path) if path else model
    except AttributeError:
        return False
    return bool(module._forward_hooks or module._forward_pre_hooks)


def _reason(record, row: Row, graph_path: str, hooked: bool = False) -> str:
    """Why an op that saves activations is left as it is, from the conversion record."""
    for item in record.uncovered:
        if item.what == row.op and item.path in (row.module_path, graph_path or "<root>"):
            return item.reason
    if hooked:
        return "its forward hooks run as written (their ops are not converted)"
    inside = [f"{item.what}: {item.reason}" for item in record.uncovered if item.path == row.module_path]
    if inside:
        return "; ".join(dict.fromkeys(inside))
    return "no compressed-save variant for this op: runs as is"
