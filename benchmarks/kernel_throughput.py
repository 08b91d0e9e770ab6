"""Throughput of pack / unpack against a plain copy of the same tensor on the same device.

Run: python benchmarks/kernel_throughput.py [--device cpu|cuda] [--sizes 1MB 16MB ...] [--bits 1.6 2 4]
     [--dtypes float32 bfloat16] [--backend auto|triton|compiled|reference] [--json PATH]

`--backend compiled` is the torch.compile'd CPU path (the default on CPU), `reference` the eager
PyTorch one it replaced; compare them with `--device cpu --backend reference`.

Throughput counts bytes read + written (input + codes + meta for pack, the reverse for unpack);
"of copy" divides it by the throughput of `y.copy_(x)` (read + write) measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable

import torch
from rich.console import Console
from rich.table import Table

from actfx.kernels import TERNARY, pack_groups, unpack_groups

_UNITS = {"KB": 1 << 10, "MB": 1 << 20, "GB": 1 << 30}
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def parse_size(text: str) -> int:
    """'64MB' -> 67108864 (bytes of the input tensor)."""
    for unit, scale in _UNITS.items():
        if text.upper().endswith(unit):
            return int(float(text[: -len(unit)]) * scale)
    return int(text)


def time_it(fn: Callable[[], object], device: torch.device, repeats: int) -> float:
    """Median seconds per call after one warm-up call (CUDA events on GPU, perf_counter on CPU)."""
    fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize(device)
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _width(text: str):
    """``--bits``' text as a width: 1.6 is three levels (``actfx.kernels.TERNARY``)."""
    return TERNARY if text.strip() == "1.6" else int(text)


def bench_one(nbytes: int, dtype: torch.dtype, bits: int, group_size: int, device: torch.device, backend: str,
              repeats: int) -> dict:
    numel = nbytes // dtype.itemsize
    x = torch.randn(numel, device=device).to(dtype)
    y = torch.empty_like(x)
    seed = torch.zeros(1, dtype=torch.int64, device=device)
    codes, meta = pack_groups(x, seed, 0, bits, group_size, True, backend=backend)  # also the warm-up
    unpack_groups(codes, meta, x.shape, dtype, bits, group_size, backend=backend)
    packed = codes.nbytes + meta.nbytes
    copy_s = time_it(lambda: y.copy_(x), device, repeats)
    pack_s = time_it(lambda: pack_groups(x, seed, 0, bits, group_size, True, backend=backend), device, repeats)
    unpack_s = time_it(lambda: unpack_groups(codes, meta, x.shape, dtype, bits, group_size, backend=backend),
                       device, repeats)
    moved = x.nbytes + packed
    copy_bw = 2 * x.nbytes / copy_s
    return {
        "bytes": x.nbytes, "dtype": str(dtype).removeprefix("torch."), "bits": bits,
        "group_size": group_size, "copy_GBps": copy_bw / 1e9,
        "pack_GBps": moved / pack_s / 1e9, "unpack_GBps": moved / unpack_s / 1e9,
        "pack_of_copy": moved / pack_s / copy_bw, "unpack_of_copy": moved / unpack_s / copy_bw,
        "pack_ms": pack_s * 1e3, "unpack_ms": unpack_s * 1e3,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--sizes", nargs="+", default=None, help="input sizes, e.g. 1MB 64MB 1GB")
    parser.add_argument("--dtypes", nargs="+", default=list(_DTYPES), choices=list(_DTYPES))
    parser.add_argument("--bits", nargs="+", type=_width, default=[1, 1.6, 2, 4, 8],
                        help="widths: 1, 1.6 (three levels), 2, 4, 8")
    parser.add_argument("--group-size", type=int, default=256)
    parser.add_argument("--backend", default="auto", choices=["auto", "triton", "compiled", "reference"])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--json", default=None, help="also write the rows to this JSON file")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    device = torch.device(args.device)
    default = ["1MB", "16MB", "256MB", "1GB"] if device.type == "cuda" else ["1MB", "16MB", "64MB"]
    sizes = [parse_size(s) for s in (args.sizes or default)]

    rows = []
    title = f"actfx pack / unpack on {device}, backend {args.backend} (group_size={args.group_size}, stochastic pack"
    title += f", {torch.get_num_threads()} CPU threads)" if device.type == "cpu" else ")"
    table = Table(title=title)
    for col in ("MB", "dtype", "bits", "copy GB/s", "pack GB/s", "of copy", "unpack GB/s", "of copy",
                "pack ms", "unpack ms"):
        table.add_column(col, justify="right")
    for nbytes in sizes:
        for name in args.dtypes:
            for bits in args.bits:
                r = bench_one(nbytes, _DTYPES[name], bits, args.group_size, device, args.backend, args.repeats)
                rows.append(r)
                table.add_row(
                    f"{nbytes / 2**20:g}", r["dtype"], str(bits), f"{r['copy_GBps']:.1f}",
                    f"{r['pack_GBps']:.2f}", f"{r['pack_of_copy']:.2f}", f"{r['unpack_GBps']:.2f}",
                    f"{r['unpack_of_copy']:.2f}", f"{r['pack_ms']:.2f}", f"{r['unpack_ms']:.2f}",
                )
    Console(width=140).print(table)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"device": str(device), "torch": torch.__version__, "rows": rows}, fh, indent=1)


if __name__ == "__main__":
    main()
