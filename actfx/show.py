"""``actfx.show``: what conversion did to a model, op by op, and what it saves for backward.

People decide with numbers before they train: the table lists each op of the model as the
rewrite left it, how its backward keeps its values (packed at N bits, a 1-bit mask, shared with
another op, a parameter, not covered) and the bytes before -> after when input shapes are known. Shapes come
from ``example_inputs`` (real, meta or fake tensors: only shapes and dtypes are used, nothing is
computed) or from the inputs recorded at conversion. The same rows are returned as dicts.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn as nn
from rich import box
from rich.console import Console
from rich.table import Table
from rich.tree import Tree

from actfx.breakdown import Row, breakdown, original_of
from actfx.convert import is_converted
from actfx.outputs import grad_leaves
from actfx.passes.analyze import call_arguments, measure
from actfx.units import format_bytes, format_ratio


def show(model: nn.Module, example_inputs=None, *, console: Console | None = None, depth: int = 2) -> list[dict]:
    """Print the rewritten graph of a converted ``model`` (table, module tree, totals, ops left
    uncovered with the reason) and return its rows. ``example_inputs``: a tensor, a tuple of
    positional inputs, a dict of keyword inputs or an ``(args, kwargs)`` pair; ``depth``: how many module levels the tree shows."""
    from actfx.compiled import compiled_record

    if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        model = model.module  # the wrapper runs this module's forward
    record = compiled_record(model)
    if record is not None:
        if example_inputs is not None:
            _training_step(model, example_inputs)
        from actfx.compiled_view import show_compiled

        return show_compiled(record, console or default_console(), f"actfx: {type(model).__name__}, compiled")
    if not is_converted(model) or getattr(model, "_actfx_record", None) is None:
        raise TypeError(
            f"actfx.show expects a model returned by actfx.convert or actfx.compile, got {type(model).__name__}; "
            "call actfx.show(actfx.convert(model), example_inputs)"
        )
    inputs = example_inputs if example_inputs is not None else recorded_inputs(model)
    before = after = None
    if inputs is not None:
        try:
            before = measure(original_of(model), inputs, like=model)
            after = measure(model, inputs)
        except RuntimeError as err:  # a forward that runs for real can still fail on fake tensors
            before = after = None
            warnings.warn(f"actfx.show: could not measure {type(model).__name__} on fake tensors ({type(err).__name__}: "
                          f"{str(err).strip().splitlines()[0] if str(err).strip() else ''}); showing the conversion "
                          "without bytes", stacklevel=2)
    rows = breakdown(model, before, after)
    totals = (before.activation_bytes, after.activation_bytes) if after is not None else None
    render(rows, console or default_console(), title=f"actfx: {type(model).__name__}", depth=depth, totals=totals)
    return [row.as_dict() for row in rows]


def _training_step(model: nn.Module, example_inputs) -> None:
    """One forward and backward of a compiled model on ``example_inputs`` (real tensors), so the
    partitioner pass runs and records its plan; gradients it leaves are cleared."""
    args, kwargs = call_arguments((example_inputs,) if isinstance(example_inputs, torch.Tensor) else example_inputs)
    was_training = model.training
    model.train()
    with torch.enable_grad():
        out = model(*args, **kwargs)
        leaves = grad_leaves(out)
        if leaves:
            torch.autograd.backward([t.float().sum() for t in leaves])
    model.zero_grad(set_to_none=True)
    model.train(was_training)


def recorded_inputs(model: nn.Module):
    """Meta tensors shaped like the inputs of the model's last training call, else like those
    recorded on the root graph's placeholders at conversion (``node.meta["val"]`` or
    ``["tensor_meta"]``), or None when there are none."""
    record = model._actfx_record
    last = record.last_training_inputs
    # A root torch.export captured runs its graph on the call's flattened inputs (keywords
    # included), which its placeholders list: they come first.
    if last is not None and "" not in record.captured:
        return tuple(torch.empty(shape, dtype=dtype, device="meta") for shape, dtype in last)
    graphs = record.graphs.get("")
    if not graphs:
        return None
    inputs = []
    for node in graphs[True].nodes:
        if node.op != "placeholder":
            continue
        meta = node.meta.get("val", node.meta.get("tensor_meta"))
        shape = _example_shape(meta)
        if shape is None:
            return None
        inputs.append(torch.empty(shape, dtype=meta.dtype, device="meta"))
    return tuple(inputs) or None


def _example_shape(meta) -> tuple | None:
    """``meta``'s shape with export's symbolic sizes (dynamic batch and length) at the values of
    the call it captured; None when there is none."""
    if meta is None or not hasattr(meta, "shape"):
        return None
    sizes = []
    for size in meta.shape:
        hint = size if isinstance(size, int) else getattr(getattr(size, "node", None), "hint", None)
        if hint is None:
            return None
        sizes.append(int(hint))
    return tuple(sizes)


def default_console() -> Console:
    """The terminal, or plain text wide enough for the table when output is a file or a pipe."""
    console = Console()
    return console if console.is_terminal else Console(width=200, no_color=True, highlight=False)


# ---------------------------------------------------------------- rendering


def _listed(row: Row) -> bool:
    return row.kind != "nothing saved"


def render(rows: list[Row], console: Console, *, title: str, depth: int = 2, totals: tuple | None = None) -> None:
    """The table, the module tree (when bytes are known), totals and the ops left uncovered.
    ``totals``: (before, after) activation bytes as measured."""
    terminal = console.is_terminal
    table = Table(title=title, box=box.ROUNDED if terminal else None, show_edge=terminal,
                  header_style="bold" if terminal else "", pad_edge=False)
    for column, justify in (("node", "left"), ("op", "left"), ("module", "left"), ("before", "right"),
                            ("after", "right"), ("saved as", "left")):
        table.add_column(column, justify=justify, overflow="fold")
    hidden = 0
    for row in rows:
        if not _listed(row):
            hidden += 1
            continue
        style = "red" if row.kind == "not covered" else ("dim" if row.kind == "parameter" else None)
        table.add_row(row.node, row.op, row.module_path or "", format_bytes(row.before_bytes),
                      format_bytes(row.after_bytes), row.kind, style=style)
    console.print(table)
    if hidden:
        console.print(f"({_ops(hidden)} that save{'s' if hidden == 1 else ''} nothing for backward not listed)")
    console.print()
    if any(r.before_bytes is not None or r.after_bytes is not None for r in rows):
        _print_tree(rows, console, depth)
        console.print()
    _print_totals(console, totals)
    uncovered = [r for r in rows if r.kind == "not covered"]
    if uncovered:
        head = f"{_ops(len(uncovered))} not covered (they save what PyTorch saves):"
        console.print(f"[bold red]{head}[/]" if terminal else head, highlight=False)
        for r in uncovered:
            where = f" in {r.module_path}" if r.module_path and r.module_path.replace(".", "_") != r.node else ""
            console.print(f"  {r.node} ({r.op}){where}: {r.reason}", highlight=False, markup=False)


def _ops(n: int) -> str:
    return f"{n} op" if n == 1 else f"{n} ops"


def _print_totals(console: Console, totals: tuple | None) -> None:
    if totals is None:
        console.print("bytes: unknown (pass example_inputs, or --input-shape on the command line)")
        return
    before, after = totals
    console.print(f"activations kept for backward: {format_bytes(before)} -> {format_bytes(after)} "
                  f"({format_ratio(before, after)} smaller)", highlight=False)


def module_totals(rows: list[Row], depth: int) -> dict:
    """{module path prefix (up to ``depth`` levels): [before, after]}, "" for the whole model."""
    totals: dict = {"": [0, 0]}
    for row in rows:
        parts = (row.module_path or "").split(".") if row.module_path else []
        for level in range(min(depth, len(parts)) + 1):
            key = ".".join(parts[:level])
            entry = totals.setdefault(key, [0, 0])
            entry[0] += row.before_bytes or 0
            entry[1] += row.after_bytes or 0
    return totals


def _print_tree(rows: list[Row], console: Console, depth: int) -> None:
    totals = module_totals(rows, depth)

    def label(key: str) -> str:
        before, after = totals[key]
        return f"{key or 'model'}: {format_bytes(before)} -> {format_bytes(after)} ({format_ratio(before, after)})"

    children: dict = {}
    for key, (before, after) in totals.items():
        if key and (before or after):
            children.setdefault(key.rpartition(".")[0], []).append(key)
    if console.is_terminal:
        tree = Tree(label(""))
        _grow(tree, "", children, label)
        console.print(tree, highlight=False)
    else:
        lines = []
        _indent(lines, "", children, label, 0)
        console.print("\n".join(lines), highlight=False, markup=False)


def _grow(branch, key, children, label) -> None:
    for child in children.get(key, []):
        _grow(branch.add(label(child)), child, children, label)


def _indent(lines, key, children, label, level) -> None:
    lines.append("  " * level + label(key))
    for child in children.get(key, []):
        _indent(lines, child, children, label, level + 1)
