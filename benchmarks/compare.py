"""actfx against what users would pick instead, side by side in one run.

    python benchmarks/compare.py                      # 5 models x 7 strategies (~10 min on 2 CPU cores)
    python benchmarks/compare.py --quick              # smoke run on small models (< 2 min)
    python benchmarks/compare.py --models resnet50 --batch 8 --strategies plain actfx2 checkpoint \\
        --json out.json --plot out.png

Strategies: plain PyTorch; actfx at bits 1/2/4/8; ``torch.utils.checkpoint`` per residual /
transformer block; ``torch.autograd.graph.save_on_cpu``. For each model and strategy it reports

* activations: memory the forward leaves alive for backward (after forward minus before it);
  RSS on CPU, ``torch.cuda.memory_allocated`` on a GPU; and saved: the same by byte accounting of
  what autograd keeps (``actfx.accounting.count_saved``; it sees the block inputs checkpointing keeps);
* peak: the step's high-water mark above the memory held before it (VmHWM after resetting it
  through /proc/self/clear_refs on CPU, ``max_memory_allocated`` on a GPU);
* step time: median of --repeats steps after warm-up; all strategies of a model run interleaved
  in one process, so changes in machine load hit them alike;
* ratios to plain PyTorch measured in the same run; on a GPU, the largest batch that fits.

Memory is measured in a fresh process per strategy (on CPU with MALLOC_MMAP_THRESHOLD_=65536, so
freed memory leaves RSS). Writes a table, JSON (--json) and a memory-vs-time plot (--plot, needs
matplotlib).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from _batch_search import largest_batch
from _launch import WorkerFailed, run_job
from _plot import plot_tradeoff
from _strategies import STRATEGIES
from actfx.models import get_model_spec

MODELS = ("resnet50", "resnet152", "resnet56", "vit_b_16", "gpt2")
# Batches small enough that the whole default run stays near 10 minutes on 2 CPU cores, and
# large enough on a GPU that kernels are not launch-bound. seq cuts GPT-2's 1024 tokens on CPU.
CPU_BATCH = {"resnet50": 8, "resnet152": 2, "resnet56": 32, "vit_b_16": 2, "gpt2": 1}
GPU_BATCH = {"resnet50": 64, "resnet152": 32, "resnet56": 128, "vit_b_16": 32, "gpt2": 8}
CPU_SEQ = 256
QUICK_MODELS = ("resnet56", "vit_tiny", "gpt_tiny")
QUICK_BATCH = {"resnet56": 16, "vit_tiny": 16, "gpt_tiny": 4}
MIB = 1 << 20


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", help=f"built-in model names (default: {' '.join(MODELS)})")
    p.add_argument("--strategies", nargs="+", choices=list(STRATEGIES), default=list(STRATEGIES))
    p.add_argument("--batch", type=int, help="batch size for every model (default: per model and device)")
    p.add_argument("--seq", type=int, help=f"tokens per sequence for language models (default: {CPU_SEQ} on CPU, full on GPU)")
    p.add_argument("--repeats", type=int, default=5, help="timed steps per strategy (median reported)")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, help="torch.set_num_threads in every worker (default: torch's "
                   "choice); 1 gives steadier CPU timings on a busy machine")
    p.add_argument("--quick", action="store_true", help="small models, 3 repeats: a smoke run under 2 minutes")
    p.add_argument("--max-batch", action=argparse.BooleanOptionalAction, default=None,
                   help="search the largest batch that fits (default: on for CUDA, impossible on CPU)")
    p.add_argument("--json", metavar="PATH", help="write all results as JSON")
    p.add_argument("--plot", metavar="PATH", help="write a memory-vs-step-time plot (needs matplotlib)")
    args = p.parse_args(argv)
    if args.quick:
        args.models = args.models or list(QUICK_MODELS)
        args.repeats = min(args.repeats, 3)
    args.models = args.models or list(MODELS)
    for name in args.models:
        get_model_spec(name)  # unknown names fail now, with a suggestion
    if args.repeats < 1 or args.warmup < 0:
        p.error("--repeats must be >= 1 and --warmup >= 0")
    cuda = args.device.startswith("cuda")
    if args.max_batch is None:
        args.max_batch = cuda
    elif args.max_batch and not cuda:
        p.error("--max-batch needs a CUDA device: on CPU an oversized batch swaps instead of failing")
    return args


def job_for(args, model: str) -> dict:
    cuda = args.device.startswith("cuda")
    table = QUICK_BATCH if args.quick else (GPU_BATCH if cuda else CPU_BATCH)
    batch = args.batch or table.get(model, 32 if cuda else 8)
    seq = args.seq or (None if cuda else CPU_SEQ)
    spec = get_model_spec(model)
    seq = None if spec.vocab_size is None or seq is None else min(seq, spec.input_shape[0])
    return {"model": model, "batch": batch, "seq": seq, "device": args.device,
            "warmup": args.warmup, "repeats": args.repeats, "threads": args.threads}


def with_ratios(rows: list[dict]) -> list[dict]:
    """Add plain/strategy memory ratios (x smaller) and strategy/plain time ratios, per model."""
    plain = {r["model"]: r for r in rows if r["strategy"] == "plain" and "error" not in r}
    for row in rows:
        base = plain.get(row["model"])
        if base is None or "error" in row:
            continue
        for key in ("act", "saved", "peak"):
            mine, ref = row.get(f"{key}_bytes"), base.get(f"{key}_bytes")
            row[f"{key}_ratio"] = ref / mine if mine and ref else None
        if row.get("step_s") and base.get("step_s"):
            row["time_ratio"] = row["step_s"] / base["step_s"]
            row["time_ratio_min"] = row["step_min_s"] / base["step_min_s"]
        if row.get("max_batch") and base.get("max_batch"):
            row["max_batch_ratio"] = row["max_batch"] / base["max_batch"]
    return rows


def _mib(v) -> str:
    return "-" if v is None else f"{v / MIB:,.1f}"


def _x(v, digits=2) -> str:
    return "-" if v is None else f"{v:.{digits}f}x"


def _disagree(row: dict) -> bool:
    """RSS and the byte count differ by over 25%: small tensors were served from freed heap memory."""
    held, counted = row.get("act_bytes"), row.get("saved_bytes")
    return bool(held is not None and counted and abs(held - counted) > 0.25 * counted)


def render(rows: list[dict], device: str, console: Console) -> None:
    probe = "GPU allocator" if device.startswith("cuda") else "RSS"
    table = Table(title=f"actfx vs alternatives on {device}: memory by {probe} and by byte count, "
                        "ratios against plain PyTorch in the same run")
    for col in ("model", "strategy", "batch", "activations MiB", "x less", "saved MiB", "x less", "peak MiB",
                "x less", "step s", "x plain", "first step s", "max batch"):
        table.add_column(col, justify="left" if col in ("model", "strategy") else "right")
    for r in rows:
        if "error" in r:
            table.add_row(r["model"], r["strategy"], str(r.get("batch", "")), f"[red]{r['error'][:60]}", *[""] * 9)
            continue
        mark = "*" if _disagree(r) else ""
        table.add_row(
            r["model"], r["strategy"], str(r["batch"]), _mib(r.get("act_bytes")) + mark, _x(r.get("act_ratio"), 1) + mark,
            _mib(r.get("saved_bytes")), _x(r.get("saved_ratio"), 1), _mib(r.get("peak_bytes")),
            _x(r.get("peak_ratio"), 1), "-" if r.get("step_s") is None else f"{r['step_s']:.3f}",
            _x(r.get("time_ratio")), "-" if r.get("first_step_s") is None else f"{r['first_step_s']:.1f}",
            str(r.get("max_batch", "-")),
        )
    console.print(table)
    console.print(
        "activations = memory after forward - before it; saved = unique storages autograd keeps "
        "(actfx.accounting.count_saved); peak = step high-water mark - memory before it; "
        "step = forward + loss + backward + SGD update, median; first step = the first one, alone in a fresh "
        "process (compiled strategies compile there, with an empty Inductor cache)."
    )
    if any(_disagree(r) for r in rows):
        console.print("* RSS and byte count disagree by over 25%: allocations below glibc's mmap threshold reuse "
                      "freed heap memory, so small packed tensors barely move RSS; trust the byte count there.")
    if not device.startswith("cuda") and any(r["strategy"] == "save_on_cpu" for r in rows):
        console.print("save_on_cpu on CPU: saved tensors already live in host memory, so it holds what plain holds.")


def run(args, console: Console) -> list[dict]:
    rows: list[dict] = []
    per_model = len(args.strategies) + 1 + (len(args.strategies) if args.max_batch else 0)
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=True) as progress:
        task = progress.add_task("starting", total=per_model * len(args.models))
        for model in args.models:
            base = job_for(args, model)
            results = {}
            for strategy in args.strategies:
                progress.update(task, description=f"{model} memory: {strategy}")
                try:
                    # Memory barely varies from step to step (within 1 MiB here): one measured step,
                    # after the warm-up step that counts the saved bytes.
                    results[strategy] = run_job({**base, "mode": "memory", "strategy": strategy, "repeats": 1})
                except WorkerFailed as err:
                    results[strategy] = {"error": str(err).splitlines()[-1]}
                progress.advance(task)
            progress.update(task, description=f"{model} step time: {len(args.strategies)} strategies interleaved")
            try:
                timing = run_job({**base, "mode": "time", "strategies": args.strategies})
            except WorkerFailed as err:
                timing = {s: {"error": str(err).splitlines()[-1]} for s in args.strategies}
            progress.advance(task)
            for strategy in args.strategies:
                row = {**base, "strategy": strategy, **results[strategy]}
                if "error" in timing.get(strategy, {}) and "error" not in row:
                    row["error"] = timing[strategy]["error"]
                row.update({k: v for k, v in timing.get(strategy, {}).items() if k != "error"})
                if args.max_batch and "error" not in row:
                    progress.update(task, description=f"{model} largest batch: {strategy}")
                    try:
                        row["max_batch"] = largest_batch({**base, "strategy": strategy}, base["batch"])
                    except WorkerFailed as err:
                        row["max_batch_error"] = str(err).splitlines()[0]
                if args.max_batch:
                    progress.advance(task)
                rows.append(row)
    return with_ratios(rows)


def main(argv=None) -> None:
    args = parse_args(argv)
    console = Console(width=max(Console().width, 150))  # the table is wide; do not squeeze it into 80 columns
    started, load_before = time.time(), os.getloadavg()
    if not args.device.startswith("cuda") and not args.threads and load_before[0] > 0.5 * (os.cpu_count() or 1):
        console.print(f"[yellow]load average {load_before[0]:.1f} on {os.cpu_count()} CPUs: other processes compete "
                      "for the cores; multi-threaded steps then stall on each other, so consider --threads 1")
    rows = run(args, console)
    render(rows, args.device, console)
    meta = {"device": args.device, "torch": torch.__version__, "python": platform.python_version(),
            "cpu_threads": args.threads or torch.get_num_threads(), "seconds": time.time() - started,
            "loadavg_before": load_before, "loadavg_after": os.getloadavg(), "argv": sys.argv[1:]}
    if args.device.startswith("cuda"):
        meta["gpu"] = torch.cuda.get_device_name(torch.device(args.device))
    console.print(f"took {meta['seconds']:.0f} s; load average {load_before[0]:.1f} -> {meta['loadavg_after'][0]:.1f}"
                  f" on {os.cpu_count()} CPUs (timings are only comparable within one run)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "results": rows}, f, indent=2)
        console.print(f"wrote {args.json}")
    if args.plot:
        if plot_tradeoff(rows, args.plot):
            console.print(f"wrote {args.plot}")
        else:
            console.print("matplotlib is not installed: no plot (pip install matplotlib)")


if __name__ == "__main__":
    main()
