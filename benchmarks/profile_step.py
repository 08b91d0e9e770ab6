"""Where does a converted model's training step spend its time? Packing kernels against the rest.

    python benchmarks/profile_step.py --model resnet50 --batch 8 --bits 2 [--threads 1] [--compile]

Profiles one step (after a warm-up) of plain PyTorch and of the converted model with
torch.profiler and splits the converted step into the actfx custom ops (pack_groups,
unpack_groups, pack_bits, unpack_bits: total time including the aten ops inside them) and
everything else; then lists the aten ops that take the most time inside each actfx op. Profiling
adds a few microseconds per op, which inflates many-small-op code: the unprofiled step times are
printed too.

``--compile``: torch.compile(model) against actfx.compile(model, bits) instead. Inductor names
its CPU kernels in the profile (``cpp.enable_kernel_profile``, set for this process), so the step
splits into Inductor's generated kernels (where the packs, unpacks and fused pointwise work run)
and the external ops (convolutions, matmuls); the slowest of actfx's kernels are listed.
"""

from __future__ import annotations

import argparse
import re
import statistics
import time
from collections import defaultdict

import torch
from rich.console import Console
from rich.table import Table
from torch.profiler import ProfilerActivity, profile

import actfx
from _strategies import training_loss
from actfx.models import build_model, get_model_spec


def _step(model, x, target) -> None:
    training_loss(model(x), target).backward()
    model.zero_grad(set_to_none=True)


def _timed(model, x, target, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        _step(model, x, target)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def interleaved_medians(console, args, labelled: dict, x, target) -> list[float]:
    """Median unprofiled step of each model (interleaved, so load changes hit all), printed with
    the ratio of the second to the first."""
    times = {label: [] for label in labelled}
    for _ in range(args.repeats):
        for label, model in labelled.items():
            times[label].append(_timed(model, x, target, 1))
    medians = [statistics.median(ts) for ts in times.values()]
    console.print(f"{args.model} batch {args.batch}, {torch.get_num_threads()} threads, unprofiled medians of "
                  f"{args.repeats}: " + ", ".join(f"{label} {m:.3f} s" for label, m in zip(labelled, medians))
                  + f" ({medians[1] / medians[0]:.2f}x)")
    return medians


def breakdown(prof) -> tuple[dict, dict, float, dict]:
    """(ms per actfx op incl. children, ms per (actfx op, aten op) self time inside it, total ms,
    self ms per op name outside the actfx ops)."""
    outer: dict[str, float] = defaultdict(float)
    inner: dict[tuple[str, str], float] = defaultdict(float)
    outside: dict[str, float] = defaultdict(float)
    total = 0.0
    for ev in prof.events():
        owner, parent = None, ev.cpu_parent
        while parent is not None:
            if parent.name.startswith("actfx::"):
                owner = parent.name
            parent = parent.cpu_parent
        self_ms = ev.self_cpu_time_total / 1e3
        total += self_ms
        if ev.name.startswith("actfx::") and owner is None:
            outer[ev.name] += ev.cpu_time_total / 1e3
        if owner is not None:
            inner[(owner, ev.name)] += self_ms
        elif not ev.name.startswith("actfx::"):
            outside[ev.name] += self_ms
    return dict(outer), dict(inner), total, dict(outside)


def _is_inductor_kernel(name: str) -> bool:
    return "cpp_fused" in name or name.startswith("triton_") or "_triton_" in name


def compiled_breakdown(prof) -> tuple[float, dict, dict]:
    """(total self ms, self ms per op outside Inductor's kernels, (ms, calls) per Inductor kernel)."""
    ops: dict[str, float] = defaultdict(float)
    kernels: dict[str, list] = defaultdict(lambda: [0.0, 0])
    total = 0.0
    for ev in prof.key_averages():
        ms = ev.self_cpu_time_total / 1e3
        total += ms
        if _is_inductor_kernel(ev.key):
            entry = kernels[re.sub(r"^graph_\d+_", "", ev.key)]
            entry[0] += ms
            entry[1] += ev.count
        else:
            ops["compiled graph calls" if ev.key.startswith("## Call CompiledFxGraph") else ev.key] += ms
    return total, dict(ops), dict(kernels)


def compare_compiled(args, model, twin, x, target, console) -> None:
    """torch.compile(model) against actfx.compile(twin, bits): unprofiled medians, then one
    profiled step each split into Inductor kernels and external ops."""
    plain, ours = torch.compile(model), actfx.compile(twin, bits=args.bits)
    with torch._inductor.config.patch({"cpp.enable_kernel_profile": True}):
        for name, compiled in (("torch.compile", plain), ("actfx.compile", ours)):
            t0 = time.perf_counter()
            _step(compiled, x, target)  # compiles forward and backward
            console.print(f"{name}: first step (compiles) {time.perf_counter() - t0:.1f} s")
    interleaved_medians(console, args, {"torch.compile": plain, f"actfx.compile bits={args.bits}": ours}, x, target)
    result = {}
    for name, compiled in (("torch.compile", plain), ("actfx.compile", ours)):
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            _step(compiled, x, target)
        result[name] = compiled_breakdown(prof)
    (plain_total, plain_ops, plain_kernels), (total, ops, kernels) = result["torch.compile"], result["actfx.compile"]
    table = Table(title="profiled step, self ms")
    for col in ("part", "torch.compile", f"actfx.compile bits={args.bits}"):
        table.add_column(col, justify="left" if col == "part" else "right")
    kernel_ms = (sum(ms for ms, _ in plain_kernels.values()), sum(ms for ms, _ in kernels.values()))
    table.add_row(f"Inductor kernels ({len(plain_kernels)} / {len(kernels)} distinct)", f"{kernel_ms[0]:.0f}",
                  f"{kernel_ms[1]:.0f}")
    for op in sorted(set(ops) | set(plain_ops), key=lambda o: -max(ops.get(o, 0.0), plain_ops.get(o, 0.0)))[: args.top]:
        table.add_row(op, f"{plain_ops.get(op, 0.0):.0f}", f"{ops.get(op, 0.0):.0f}")
    table.add_row("whole step", f"{plain_total:.0f}", f"{total:.0f}")
    console.print(table)
    console.print("slowest actfx.compile kernels: " + "; ".join(
        f"{name[:90]} {ms:.0f} ms ({calls}x)" for name, (ms, calls) in
        sorted(kernels.items(), key=lambda kv: -kv[1][0])[: args.top]))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="resnet50")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--bits", type=int, default=2)
    p.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's choice)")
    p.add_argument("--repeats", type=int, default=3, help="unprofiled timed steps (median)")
    p.add_argument("--top", type=int, default=8, help="aten ops listed per actfx op (with --compile: rows and kernels)")
    p.add_argument("--compile", action="store_true", help="torch.compile against actfx.compile")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = build_model(args.model)
    x = get_model_spec(args.model).example_input(args.batch, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = model(x)
    target = torch.randint(out.shape[-1], out.shape[:-1], generator=torch.Generator().manual_seed(1))
    console = Console(width=120)
    if args.compile:
        torch.manual_seed(0)
        compare_compiled(args, model, build_model(args.model), x, target, console)
        return
    converted = actfx.convert(model, bits=args.bits)
    _step(model, x, target)
    _step(converted, x, target)  # warm-up: first-call costs (Inductor compiles the CPU kernels)
    interleaved_medians(console, args, {"plain": model, f"actfx bits={args.bits}": converted}, x, target)
    with profile(activities=[ProfilerActivity.CPU]) as prof_plain:
        _step(model, x, target)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        _step(converted, x, target)
    outer, inner, total, outside = breakdown(prof)
    _, _, plain_total, plain_ops = breakdown(prof_plain)
    table = Table(title=f"profiled step: actfx bits={args.bits} {total:.0f} ms, plain {plain_total:.0f} ms")
    for col in ("part", "ms", "% of actfx step", "ms / plain step"):
        table.add_column(col, justify="left" if col == "part" else "right")
    for name, ms in sorted(outer.items(), key=lambda kv: -kv[1]):
        table.add_row(name, f"{ms:.0f}", f"{100 * ms / total:.1f}", f"{ms / plain_total:.2f}")
    rest = total - sum(outer.values())
    table.add_row("everything else", f"{rest:.0f}", f"{100 * rest / total:.1f}", f"{rest / plain_total:.2f}")
    console.print(table)
    for name in sorted(outer, key=lambda n: -outer[n]):
        rows = sorted(((op, ms) for (owner, op), ms in inner.items() if owner == name), key=lambda kv: -kv[1])
        console.print(f"inside {name}: " + ", ".join(f"{op} {ms:.0f} ms" for op, ms in rows[: args.top]))
    grown = sorted(((op, ms - plain_ops.get(op, 0.0)) for op, ms in outside.items()), key=lambda kv: -kv[1])
    console.print("outside the actfx ops, self time added over plain: "
                  + ", ".join(f"{op} {ms:+.0f} ms" for op, ms in grown[: args.top]))


if __name__ == "__main__":
    main()
