"""Does the dry run's activation estimate match what a real training step holds?

For each model and mode (baseline, actfx), the dry run (`actfx.passes.analyze.measure`, fake
tensors) is compared with a real forward in a fresh process: the bytes autograd keeps by unique
storage (`actfx.accounting.count_saved`) and the memory the forward leaves allocated, read from
the process (RSS, with MALLOC_MMAP_THRESHOLD_=65536 so freed blocks leave RSS; see `_memory`) or,
on CUDA, from `torch.cuda.memory_allocated`. The forward's output is subtracted: the caller holds
it, not autograd.

    python benchmarks/report_accuracy.py [--device cpu|cuda] [--models resnet18:8:3x128x128 ...]
"""

from __future__ import annotations

import argparse
import gc
import json
import subprocess
import sys

import torch

import actfx
from _memory import cpu_worker_env, probe_for
from actfx.accounting import count_saved
from actfx.models import build_model, get_model_spec
from actfx.passes.analyze import measure

# name:batch[:sample shape]: small enough for a laptop CPU, large enough that each packed tensor
# passes the 64 KiB mmap threshold (smaller ones come from the heap, which RSS sees late or never).
DEFAULT_CASES = ("resnet18:8:3x128x128", "resnet50:4:3x128x128", "mobilenet_v2:16:3x128x128",
                 "vit_tiny:128", "gpt_tiny:64", "llama_tiny:64", "unet_small:4")


def _case(text: str) -> tuple[str, tuple, torch.dtype]:
    name, batch, *shape = text.split(":")
    spec = get_model_spec(name)
    sample = tuple(int(d) for d in shape[0].split("x")) if shape else spec.input_shape
    return name, (int(batch), *sample), spec.input_dtype


def _model(name: str, converted: bool, device: str):
    torch.manual_seed(0)
    model = build_model(name).to(device).train()
    return actfx.convert(model, bits=2) if converted else model


def _input(shape, dtype, device):
    if dtype == torch.long:
        return torch.randint(0, 200, shape, device=device)
    return torch.randn(shape, device=device)


def worker(request: dict) -> dict:
    """In a fresh process: one warm-up step, then one forward measured three ways."""
    name, shape, dtype = _case(request["case"])
    device = torch.device(request["device"])
    model = _model(name, request["converted"], device)
    x = _input(shape, dtype, device)
    model(x).float().sum().backward()  # warm-up: lazy allocations, kernel workspaces
    model.zero_grad(set_to_none=True)
    probe = probe_for(device)
    probe.check_env()
    gc.collect()
    probe.sync()
    before = probe.current()
    with count_saved(model) as saved:
        out = model(x)
        probe.sync()
        after = probe.current()
    held = after - before - out.untyped_storage().nbytes()
    del out
    return {"count_saved": saved.activation_bytes, "memory": held, "probe": probe.kind}


def run_worker(case: str, converted: bool, device: str) -> dict:
    request = json.dumps({"case": case, "converted": converted, "device": device})
    env = cpu_worker_env() if device == "cpu" else None
    done = subprocess.run([sys.executable, __file__, "--worker", request], capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"worker for {case} failed:\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--models", nargs="*", default=list(DEFAULT_CASES), metavar="NAME:BATCH[:CxHxW]")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return
    header = f"{'model':14} {'input':18} {'mode':8} {'dry run':>11} {'count_saved':>11} {'memory':>11} {'err saved':>9} {'err mem':>8}"
    print(header)
    print("-" * len(header))
    worst = 0.0
    for case in args.models:
        name, shape, dtype = _case(case)
        for converted in (False, True):
            estimate = measure(_model(name, converted, "meta"), torch.empty(shape, dtype=dtype, device="meta"))
            real = run_worker(case, converted, args.device)
            est = estimate.activation_bytes
            err_saved = (est - real["count_saved"]) / real["count_saved"]
            err_mem = (est - real["memory"]) / real["memory"]
            worst = max(worst, abs(err_saved), abs(err_mem))
            print(f"{name:14} {'x'.join(map(str, shape)):18} {'actfx' if converted else 'baseline':8} "
                  f"{est / 2**20:9.2f}Mi {real['count_saved'] / 2**20:9.2f}Mi {real['memory'] / 2**20:9.2f}Mi "
                  f"{err_saved:+9.1%} {err_mem:+8.1%}")
    print(f"\nmemory = {'RSS' if args.device == 'cpu' else 'torch.cuda.memory_allocated'} after forward - before "
          f"- output; worst error {worst:.1%}")


if __name__ == "__main__":
    main()
