"""How much smaller are the activations held between forward and backward? By byte count and by RSS.

    python benchmarks/memory_ratio.py                        # ResNet-50, MobileNetV2, DenseNet-121, VGG-16-BN
    python benchmarks/memory_ratio.py --models resnet50 --batch 8 --bits 2 --json out.json

Plain PyTorch and actfx run in fresh processes (`_worker.py`, memory mode: on CPU with
MALLOC_MMAP_THRESHOLD_=65536 so freed memory leaves RSS). Two measures of the same thing:

* count: unique storages autograd keeps for backward (``actfx.accounting.count_saved``), exact;
* held: memory after forward minus before it (RSS on CPU, the CUDA allocator on a GPU), which also
  includes the logits and allocator rounding.

Issue target: ResNet-50 at bits=2 keeps at least 12x less (goal 16x).
"""

from __future__ import annotations

import argparse
import json

import torch
from rich.console import Console
from rich.table import Table

from _launch import WorkerFailed, run_job

MODELS = ("resnet50", "mobilenet_v2", "densenet121", "vgg16_bn")
TARGET, GOAL = 12.0, 16.0
MIB = 1 << 20


def measure(models, batch: int, bits: int, device: str, threads: int | None = None, on_done=None) -> list[dict]:
    """One row per model: plain and actfx bytes by count and by held memory, and their ratios."""
    rows = []
    for model in models:
        row = {"model": model, "batch": batch, "bits": bits}
        try:
            for key, strategy in (("plain", "plain"), ("actfx", f"actfx{bits}")):
                r = run_job({"mode": "memory", "model": model, "strategy": strategy, "batch": batch,
                             "device": device, "threads": threads})
                row[f"{key}_saved"], row[f"{key}_held"] = r["saved_bytes"], r["act_bytes"]
                if on_done:
                    on_done(model, strategy)
            row["count_ratio"] = row["plain_saved"] / row["actfx_saved"]
            row["held_ratio"] = row["plain_held"] / row["actfx_held"] if row["actfx_held"] > 0 else None
        except WorkerFailed as err:
            row["error"] = str(err).splitlines()[-1]
        rows.append(row)
    return rows


def render(rows: list[dict], console: Console) -> None:
    table = Table(title=f"activations kept for backward, plain PyTorch vs actfx (bits={rows[0]['bits']})")
    for col in ("model", "batch", "plain MiB (count)", "actfx MiB (count)", "x less (count)",
                "plain MiB (held)", "actfx MiB (held)", "x less (held)"):
        table.add_column(col, justify="left" if col == "model" else "right")
    for r in rows:
        if "error" in r:
            table.add_row(r["model"], str(r["batch"]), f"[red]{r['error'][:80]}", *[""] * 5)
            continue
        held = "-" if r["held_ratio"] is None else f"{r['held_ratio']:.1f}x"
        table.add_row(r["model"], str(r["batch"]), f"{r['plain_saved'] / MIB:,.1f}", f"{r['actfx_saved'] / MIB:,.1f}",
                      f"{r['count_ratio']:.1f}x", f"{r['plain_held'] / MIB:,.1f}", f"{r['actfx_held'] / MIB:,.1f}", held)
    console.print(table)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=list(MODELS))
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--bits", type=int, default=2, choices=[1, 2, 4, 8])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, help="torch.set_num_threads in the workers")
    p.add_argument("--json", metavar="PATH")
    args = p.parse_args(argv)
    console = Console(width=max(Console().width, 120))
    with console.status("measuring") as status:
        rows = measure(args.models, args.batch, args.bits, args.device, args.threads,
                       on_done=lambda m, s: status.update(f"measured {m} {s}"))
    render(rows, console)
    r50 = next((r for r in rows if r["model"] == "resnet50" and "error" not in r), None)
    if r50 is not None and args.bits == 2:
        verdict = "goal met" if r50["count_ratio"] >= GOAL else "target met" if r50["count_ratio"] >= TARGET else "MISSED"
        console.print(f"ResNet-50 bits=2: {r50['count_ratio']:.1f}x by count (target {TARGET:.0f}x, goal {GOAL:.0f}x): {verdict}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
