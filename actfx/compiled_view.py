"""``actfx.show`` for a model from ``actfx.compile``: each saved value of each compiled graph.

Read from the GraphPlans the partitioner pass recorded while compiling (never re-traced): the
ATen op that produced each value, its module path, bytes before -> after and how it is kept.
"""

from __future__ import annotations

from rich import box
from rich.console import Console
from rich.table import Table

from actfx.passes.saved_plan import Storage
from actfx.units import format_bytes, format_ratio


def show_compiled(record, console: Console, title: str) -> list[dict]:
    if not record.plans and record.training_calls:
        console.print(f"{title}: nothing compiled for training: torch.compile captured no graph of the forward in "
                      f"{record.training_calls} call(s) with grad enabled, which ran eagerly with nothing packed "
                      "(TORCH_LOGS=graph_breaks says why; nn.LSTM/GRU/RNN are not traced by dynamo). "
                      "actfx.convert(model) packs what it can of such a model.")
        return []
    if not record.plans:
        console.print(f"{title}: nothing compiled for training yet. Run one training step (forward and "
                      "backward with grad enabled), then call actfx.show(model) again.")
        return []
    # the graphs the latest training call ran (a recompilation replaces graphs it no longer runs)
    latest = max(plan.last_call for plan in record.plans)
    plans = [(i, plan) for i, plan in enumerate(record.plans) if plan.last_call == latest]
    rows = []
    for index, plan in plans:
        for value in plan.saved:
            if value.reason == "parameter":
                continue
            rows.append({"graph": index, "node": value.name, "op": value.op, "module": value.module_path,
                         "shape": list(value.shape), "dtype": value.dtype, "before_bytes": value.bytes_before,
                         "after_bytes": value.bytes_after, "saved_as": value.saved_as,
                         "computed_in_forward": value.hoisted, "plan_key": value.site})
    terminal = console.is_terminal
    table = Table(title=title, box=box.ROUNDED if terminal else None, show_edge=terminal,
                  header_style="bold" if terminal else "", pad_edge=False)
    for col in ("graph", "saved value", "op", "module", "shape", "before", "after", "saved as"):
        table.add_column(col, justify="right" if col in ("before", "after", "graph") else "left")
    for row in rows:
        node = row["node"] + (" (from backward)" if row["computed_in_forward"] else "")
        table.add_row(str(row["graph"]), node, row["op"].replace("aten.", ""), row["module"],
                      "x".join(map(str, row["shape"])), format_bytes(row["before_bytes"]),
                      format_bytes(row["after_bytes"]), row["saved_as"])
    console.print(table)
    before = sum(p.bytes_before for _, p in plans)
    after = sum(p.bytes_after for _, p in plans)
    recomputed = sum(p.recomputed_ops for _, p in plans)
    budget = "PyTorch's default" if record.memory_budget is None else str(record.memory_budget)
    replaced = len(record.plans) - len(plans)
    console.print(f"saved for backward (parameters excluded): {format_bytes(before)} -> {format_bytes(after)} "
                  f"({format_ratio(before, after)}); {len(plans)} compiled graph(s) in the latest training call"
                  + (f" ({replaced} more compiled for other shapes or replaced by a recompilation, not counted)"
                     if replaced else "")
                  + f", memory budget {budget}, {recomputed} ops recomputed in backward by the partitioner or for actfx")
    if len(plans) > 1:
        console.print("several graphs: where they come from graph breaks, the code dynamo runs between them (a "
                      "data-dependent branch or loop, an untraced call) saves for backward as in eager PyTorch, "
                      "unpacked and not counted above (TORCH_LOGS=graph_breaks shows where)", highlight=False)
    if all(p.memory is not None for p in record.plans):
        forward = max(p.memory.forward_peak for p in record.plans)
        backward = max(p.memory.backward_peak for p in record.plans)
        console.print(f"one training step's worst point, beyond parameters, inputs and optimizer state: about "
                      f"{format_bytes(record.step_bytes)} (forward {format_bytes(forward)}, backward "
                      f"{format_bytes(backward)} with the gradients; Inductor's fusion estimated on the graphs)")
    exact = [v for _, p in plans for v in p.saved if v.storage is Storage.EXACT and v.reason not in
             ("parameter", "small")]
    if exact:
        console.print("kept exact: " + "; ".join(f"{v.name} ({v.reason})" for v in exact[:12])
                      + (f"; and {len(exact) - 12} more" if len(exact) > 12 else ""))
    return rows
