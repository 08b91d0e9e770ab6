"""The conversion targets in one table: memory, gradient quality and conversion time, each with its verdict.

    python benchmarks/convert_targets.py [--batch 8] [--grad-batch 4] [--samples 8] [--json out.json]

* ResNet-50 at bits=2: activations kept for backward at least 12x smaller than plain (goal 16x),
  by byte count and by held memory (`memory_ratio.py`; MobileNetV2, DenseNet-121 and VGG-16-BN
  are listed for reference).
* Gradients on ResNet-50: at bits=8, one compressed gradient is within 2% of the exact one
  (||g_8 - g|| / ||g||); at bits=2, the mean of K compressed gradients approaches the exact one
  like 1/sqrt(K) (log-log slope of the error against K near -0.5; `gradient_quality.py`).
* Converting ResNet-152 takes under 2 s (median of 3, model construction not included).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from rich.console import Console
from rich.table import Table

import actfx
import gradient_quality
import memory_ratio
from actfx.models import build_model

SLOPE_RANGE = (-0.6, -0.4)  # -0.5 is exact 1/sqrt(K); a bias would flatten the curve towards 0


def conversion_seconds(name: str = "resnet152", repeats: int = 3) -> float:
    times = []
    for _ in range(repeats):
        model = build_model(name)
        t0 = time.perf_counter()
        actfx.convert(model, bits=2)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=8, help="batch for the memory measurement")
    p.add_argument("--grad-batch", type=int, default=4, help="batch for the gradient measurements")
    p.add_argument("--samples", type=int, default=8, help="K compressed gradients at bits=2")
    p.add_argument("--memory-models", nargs="+", default=list(memory_ratio.MODELS))
    p.add_argument("--threads", type=int, help="torch.set_num_threads here and in the workers")
    p.add_argument("--json", metavar="PATH")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    console = Console(width=max(Console().width, 120))
    checks = []

    with console.status("memory: plain vs actfx in fresh processes"):
        rows = memory_ratio.measure(args.memory_models, args.batch, 2, device, args.threads)
    memory_ratio.render(rows, console)
    for r in rows:
        if r["model"] == "resnet50" and "error" not in r:
            for how in ("count", "held"):
                v = r[f"{how}_ratio"]
                ok = v is not None and v >= memory_ratio.TARGET
                checks.append((f"ResNet-50 bits=2 activations, x less ({how})", f"{v:.1f}x" if v else "-",
                               f">= {memory_ratio.TARGET:.0f}x (goal {memory_ratio.GOAL:.0f}x)", ok))

    with console.status("gradients: ResNet-50 at bits=8"):
        g8 = gradient_quality.measure("resnet50", args.grad_batch, [8], 2)["bits"][8]
    err8 = g8["overall"]["rel_error"]
    checks.append(("ResNet-50 bits=8 relative gradient error", f"{100 * err8:.2f}%", "< 2%", err8 < 0.02))
    with console.status(f"gradients: ResNet-50 at bits=2, K={args.samples}"):
        g2 = gradient_quality.measure("resnet50", args.grad_batch, [2], args.samples)["bits"][2]
    slope = g2["curve_slope"]
    curve = ", ".join(f"K={k}: {e:.3f}" for k, e in g2["curve"])
    checks.append(("ResNet-50 bits=2 error of the K-mean vs K (log-log slope)", f"{slope:.2f} ({curve})",
                   f"in [{SLOPE_RANGE[0]}, {SLOPE_RANGE[1]}]", SLOPE_RANGE[0] <= slope <= SLOPE_RANGE[1]))

    with console.status("conversion time: ResNet-152"):
        seconds = conversion_seconds()
    checks.append(("actfx.convert(resnet152) time", f"{seconds:.2f} s", "< 2 s", seconds < 2.0))

    table = Table(title="conversion targets")
    for col in ("target", "measured", "required", "verdict"):
        table.add_column(col)
    for name, measured, required, ok in checks:
        table.add_row(name, measured, required, "[green]pass" if ok else "[red]FAIL")
    console.print(table)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"memory": rows, "grad_bits8": g8["overall"], "grad_bits2": {k: g2[k] for k in ("overall", "curve", "curve_slope")},
                       "convert_resnet152_s": seconds,
                       "checks": [dict(zip(("target", "measured", "required", "ok"), c)) for c in checks]}, f, indent=2)


if __name__ == "__main__":
    main()
