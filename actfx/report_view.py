"""The ``actfx report`` result: one JSON-able dict, and the tables printed from it."""

from __future__ import annotations

import torch
from rich import box
from rich.console import Console
from rich.table import Table

from actfx.dryrun import DryRun
from actfx.report import FRAGMENTATION, StaticCosts, estimate
from actfx.units import format_bytes, format_ratio


def layers(rows: list, top: int | None = None) -> list[dict]:
    """Rows summed per module (ops outside any module stand alone), most activation bytes first."""
    by_key: dict = {}
    for row in rows:
        key = row.module_path or row.node
        entry = by_key.setdefault(key, {"layer": key, "ops": [], "before_bytes": 0, "after_bytes": 0})
        if row.op not in entry["ops"]:
            entry["ops"].append(row.op)
        entry["before_bytes"] += row.before_bytes or 0
        entry["after_bytes"] += row.after_bytes or 0
    ranked = sorted(by_key.values(), key=lambda e: (-e["before_bytes"], -e["after_bytes"]))
    ranked = [e for e in ranked if e["before_bytes"] or e["after_bytes"]]
    return ranked[:top] if top is not None else ranked


def summarize(run: DryRun, costs: StaticCosts, *, spec: str, bits: int, optimizer: str, gpu: str | None,
              capacity: int | None, top: int, seconds: float, plan: str | None = None) -> dict:
    shape = list(run.inputs[0].shape)
    batch = shape[0] if shape else 1
    base = estimate(run.before, costs, batch, capacity, "baseline")
    ours = estimate(run.after, costs, batch, capacity, "actfx")
    return {
        "spec": spec,
        "input_shape": shape,
        "input_dtype": str(run.inputs[0].dtype).removeprefix("torch."),
        "dtype": str(run.dtype or torch.float32).removeprefix("torch."),
        "bits": bits,
        "plan": plan,
        "optimizer": optimizer,
        "gpu": gpu,
        "gpu_memory_bytes": capacity,
        "batch": batch,
        "activation_bytes_baseline": base.activation_bytes,
        "activation_bytes_actfx": ours.activation_bytes,
        "activation_ratio": base.activation_bytes / ours.activation_bytes if ours.activation_bytes else None,
        "param_bytes": costs.param_bytes,
        "grad_bytes": costs.grad_bytes,
        "optimizer_bytes": costs.optimizer_bytes,
        "buffer_bytes": costs.buffer_bytes,
        "margin_bytes": costs.margin_bytes,
        "output_bytes": base.output_bytes,
        "workspace_bytes_baseline": base.workspace_bytes,
        "workspace_bytes_actfx": ours.workspace_bytes,
        "fragmentation": FRAGMENTATION,
        "peak_bytes_baseline": base.peak_bytes,
        "peak_bytes_actfx": ours.peak_bytes,
        "max_batch_baseline": base.max_batch,
        "max_batch_actfx": ours.max_batch,
        "uncovered": [{"node": r.node, "op": r.op, "module_path": r.module_path, "reason": r.reason}
                      for r in run.rows if r.kind == "not covered"],
        "layers": layers(run.rows, top),
        "nodes": [r.as_dict() for r in run.rows],
        "seconds": round(seconds, 2),
    }


def render(summary: dict, console: Console) -> None:
    terminal = console.is_terminal
    style = {"box": box.SIMPLE_HEAD if terminal else None, "pad_edge": False,
             "header_style": "bold" if terminal else ""}
    gpu = summary["gpu"] or ("GPU" if summary["gpu_memory_bytes"] else None)
    console.print(
        f"actfx report: {summary['spec']}, input {summary['input_shape']} {summary['input_dtype']}, "
        f"{summary['dtype']} training, "
        + (f"widths from {summary['plan']}" if summary.get("plan") else f"{summary['bits']}-bit activations")
        + f", {summary['optimizer']}"
        + (f", {gpu} ({format_bytes(summary['gpu_memory_bytes'])})" if gpu else ""),
        highlight=False, markup=False,
    )
    top = Table(title=f"Top {len(summary['layers'])} layers by activation memory", title_justify="left", **style)
    for column in ("layer", "ops", "baseline", "actfx", "ratio"):
        top.add_column(column, justify="left" if column in ("layer", "ops") else "right", overflow="fold")
    for e in summary["layers"]:
        top.add_row(e["layer"], ", ".join(e["ops"]), format_bytes(e["before_bytes"]),
                    format_bytes(e["after_bytes"]), format_ratio(e["before_bytes"], e["after_bytes"]))
    console.print()
    console.print(top)
    console.print()

    memory = Table(title="Training memory (estimated)", title_justify="left", **style)
    for column in ("", "baseline", "actfx"):
        memory.add_column(column, justify="left" if not column else "right")
    s = summary
    same = lambda key: (format_bytes(s[key]), format_bytes(s[key]))  # noqa: E731
    memory.add_row("activations kept for backward", format_bytes(s["activation_bytes_baseline"]),
                   format_bytes(s["activation_bytes_actfx"]) + f" ({format_ratio(s['activation_bytes_baseline'], s['activation_bytes_actfx'])} smaller)")
    memory.add_row("parameters", *same("param_bytes"))
    memory.add_row("gradients", *same("grad_bytes"))
    memory.add_row(f"optimizer state ({s['optimizer']})", *same("optimizer_bytes"))
    memory.add_row("buffers", *same("buffer_bytes"))
    memory.add_row("model output x2", format_bytes(2 * s["output_bytes"]), format_bytes(2 * s["output_bytes"]))
    memory.add_row("backward working set", format_bytes(s["workspace_bytes_baseline"]),
                   format_bytes(s["workspace_bytes_actfx"]))
    memory.add_row("CUDA context and workspaces", *same("margin_bytes"))
    memory.add_row("peak training memory", format_bytes(s["peak_bytes_baseline"]), format_bytes(s["peak_bytes_actfx"]),
                   style="bold" if terminal else None)
    if s["gpu_memory_bytes"] is not None:
        memory.add_row(f"largest batch on {gpu}", _batch(s["max_batch_baseline"]), _batch(s["max_batch_actfx"]),
                       style="bold" if terminal else None)
    console.print(memory)
    console.print()
    if s["gpu_memory_bytes"] is None:
        console.print("largest batch: pass --gpu t4|v100-16|a100-40|a100-80|h100|h200 or --gpu-memory 24GiB")
    if s["uncovered"]:
        count = len(s["uncovered"])
        console.print(f"{count} op{'' if count == 1 else 's'} not covered (they save what PyTorch saves); "
                      "`actfx show` lists them with the reason", highlight=False)
    console.print(f"done in {s['seconds']:.1f} s (dry run on fake tensors: nothing allocated, no GPU used)",
                  highlight=False)


def _batch(n) -> str:
    if n is None:
        return "unbounded"
    return "does not fit" if n == 0 else str(n)
