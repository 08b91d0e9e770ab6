"""actfx against PyTorch's own tools, as measured in issue 11: held memory and step time.

    python benchmarks/compile_table.py [--models hf_gpt2 resnet50] [--threads 2] [--repeats 5]
    python benchmarks/compile_table.py --device cuda     # the same table on a GPU

Models: a Hugging Face GPT-2 (4 layers, d512, 8 heads, 256 tokens, batch 4, dropout 0; needs
transformers) and ResNet-50 at batch 8 (224x224); loss = mean of the output. Each strategy's
memory is measured in a fresh process (RSS with MALLOC_MMAP_THRESHOLD_=65536, empty Inductor
cache): held = memory after forward minus before, median of 3 steps after the first; the first
step (which compiles) is timed there alone. Step times: all strategies in one process,
interleaved round-robin, median; ratios against the same run's torch.compile.

On a GPU (``--device cuda``) this process measures everything: held = growth of
``torch.cuda.memory_allocated`` across the forward (exact, so no fresh process is needed), step
time between synchronizations, and CUDA kernels launched per step (torch.profiler). First steps
share the process's Inductor caches (set TORCHINDUCTOR_CACHE_DIR to a fresh directory for cold
ones), so later strategies can reuse kernels an earlier one compiled.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
from _memory import CpuProbe, CudaProbe  # noqa: E402
from _strategies import checkpoint_blocks  # noqa: E402

import actfx  # noqa: E402
from actfx.models import build_model  # noqa: E402

STRATEGIES = ["eager", "actfx_convert2", "checkpoint", "compile", "compile_budget0.3",
              "actfx_compile2", "actfx_compile2_budget0.3", "actfx_compile2_kernel"]


def build(model_name: str, device: str = "cpu"):
    torch.manual_seed(0)
    if model_name == "hf_gpt2":
        from transformers import GPT2Config, GPT2LMHeadModel

        cfg = GPT2Config(n_layer=4, n_embd=512, n_head=8, n_positions=256, resid_pdrop=0.0, embd_pdrop=0.0,
                         attn_pdrop=0.0, use_cache=False)
        model = GPT2LMHeadModel(cfg)
        x = torch.randint(0, cfg.vocab_size, (4, 256), generator=torch.Generator().manual_seed(0))
        return model.to(device), x.to(device), lambda m, inp: m(input_ids=inp).logits.mean()
    model = build_model(model_name)
    x = torch.randn(8, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    return model.to(device), x.to(device), lambda m, inp: m(inp).mean()


def prepare(strategy: str, model, x):
    from _strategies import _budget_backend

    if strategy == "eager":
        return model
    if strategy == "actfx_convert2":
        return actfx.convert(model, bits=2, example_inputs=(x,)) if hasattr(model, "config") else actfx.convert(model, bits=2)
    if strategy == "checkpoint":
        checkpoint_blocks(model)
        return model
    if strategy == "compile":
        return torch.compile(model)
    if strategy == "compile_budget0.3":
        return torch.compile(model, backend=_budget_backend(0.3))
    if strategy == "actfx_compile2":
        return actfx.compile(model, bits=2)
    if strategy == "actfx_compile2_budget0.3":
        return actfx.compile(model, bits=2, memory_budget=0.3)
    if strategy == "actfx_compile2_kernel":  # Config.pack_kernel: the precompiled CPU pack kernel
        return actfx.compile(model, config=actfx.Config(bits=2, pack_kernel=True))
    raise ValueError(f"unknown strategy {strategy!r}; choose from {', '.join(STRATEGIES)}")


def _first_step_and_held(prepared, model, x, loss_fn, probe) -> dict:
    """The first step (it compiles), timed alone; then the bytes a forward holds, median of 3."""
    probe.sync()
    t0 = time.perf_counter()
    loss_fn(prepared, x).backward()
    probe.sync()
    first = time.perf_counter() - t0
    model.zero_grad(set_to_none=True)
    held = []
    for _ in range(3):
        before = probe.current()
        loss = loss_fn(prepared, x)
        held.append(probe.current() - before)
        loss.backward()
        del loss
        model.zero_grad(set_to_none=True)
    return {"held_bytes": statistics.median(held), "first_step_s": first}


def memory_worker(model_name: str, strategy: str) -> dict:
    model, x, loss_fn = build(model_name)
    prepared = prepare(strategy, model, x)
    probe = CpuProbe()
    probe.check_env()
    return _first_step_and_held(prepared, model, x, loss_fn, probe)


def _interleaved_medians(runs: dict, repeats: int, warmup: int, sync=lambda: None) -> dict:
    """Median seconds of each ``(step, model)`` in ``runs``, run round-robin (the order rotates
    every round) after ``warmup`` untimed rounds; gradients are cleared outside the timing."""
    names = list(runs)
    times = {name: [] for name in names}
    for r in range(repeats + warmup):
        for name in names[r % len(names):] + names[:r % len(names)]:
            step, model = runs[name]
            sync()
            t0 = time.perf_counter()
            step()
            sync()
            elapsed = time.perf_counter() - t0
            model.zero_grad(set_to_none=True)
            if r >= warmup:
                times[name].append(elapsed)
    return {name: statistics.median(ts) for name, ts in times.items()}


def _step(prepared, x, loss_fn):
    return lambda: loss_fn(prepared, x).backward()


def time_worker(model_name: str, strategies: list[str], repeats: int) -> dict:
    torch._dynamo.config.cache_size_limit = 64  # several compiled copies of one model's code
    runs = {}
    for name in strategies:
        model, x, loss_fn = build(model_name)
        runs[name] = (_step(prepare(name, model, x), x, loss_fn), model)
    return _interleaved_medians(runs, repeats, warmup=1)


def _kernels_per_step(step) -> int:
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    return sum(1 for e in prof.events() if e.device_type == DeviceType.CUDA)


def gpu_worker(model_name: str, strategies: list[str], repeats: int) -> dict:
    """Every strategy in this process on the GPU: held bytes, first step, kernels, step times."""
    torch._dynamo.config.cache_size_limit = 64
    runs, rows = {}, {}
    probe = CudaProbe(torch.device("cuda"))
    for name in strategies:
        model, x, loss_fn = build(model_name, "cuda")
        try:
            prepared = prepare(name, model, x)
            rows[name] = _first_step_and_held(prepared, model, x, loss_fn, probe)
            runs[name] = (_step(prepared, x, loss_fn), model)
            rows[name]["kernels"] = _kernels_per_step(runs[name][0])
            model.zero_grad(set_to_none=True)
        except Exception as e:  # noqa: BLE001 - a strategy that fails is a row that says why
            rows[name] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"}
            runs.pop(name, None)
        print(f"  ({name}: {json.dumps(rows[name])})", flush=True)
    with _timing_turn():
        times = _interleaved_medians(runs, repeats, warmup=2, sync=probe.sync)
    for name, t in times.items():
        rows[name]["step_s"] = t
    return rows


@contextlib.contextmanager
def _timing_turn():
    """Exclusive use of the GPU while timing, when several benchmarks share one machine
    (``ACTFX_TIMING_LOCK`` names a lock file; ``benchmarks/gpu_check.sh`` sets it)."""
    path = os.environ.get("ACTFX_TIMING_LOCK")
    if not path:
        yield
        return
    import fcntl

    with open(path) as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _gpu_table(model: str, args) -> None:
    """The GPU table for one model, measured in this process (partial rows print as they come)."""
    print(f"\n{model} ({torch.cuda.get_device_name()}, torch {torch.__version__}): "
          "held MB / step ms / vs compile / first step s / CUDA kernels per step", flush=True)
    rows = gpu_worker(model, args.strategies, args.repeats)
    base = rows.get("compile", {}).get("step_s")
    for s in args.strategies:
        r = rows[s]
        if "error" in r:
            print(f"  {s:26s} error: {r['error']}")
            continue
        ratio = f"{r['step_s'] / base:.2f}x" if base else "-"
        print(f"  {s:26s} {r['held_bytes'] / 1e6:8.1f} MB  {r['step_s'] * 1e3:8.2f} ms  {ratio:>6s}  "
              f"{r['first_step_s']:7.1f} s  {r['kernels']:6d}")


def _run(args: list[str], memory: bool, threads: int) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    if memory:
        env.update(MALLOC_MMAP_THRESHOLD_="65536", TORCHINDUCTOR_CACHE_DIR=tempfile.mkdtemp(prefix="actfx_ic_"))
    else:
        env.pop("MALLOC_MMAP_THRESHOLD_", None)
    proc = subprocess.run([sys.executable, __file__, *args], env=env, capture_output=True, text=True)
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    return {"error": proc.stderr.strip().splitlines()[-1][:200] if proc.stderr.strip() else f"exit {proc.returncode}"}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["hf_gpt2", "resnet50"])
    p.add_argument("--strategies", nargs="+", default=STRATEGIES, choices=STRATEGIES)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--worker", choices=["memory", "time"], help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.device == "cuda":
        for model in args.models:
            _gpu_table(model, args)
        return
    torch.set_num_threads(args.threads)
    if args.worker == "memory":
        print("RESULT " + json.dumps(memory_worker(args.models[0], args.strategies[0])))
        return
    if args.worker == "time":
        print("RESULT " + json.dumps(time_worker(args.models[0], args.strategies, args.repeats)))
        return
    for model in args.models:
        rows = {s: _run(["--worker", "memory", "--models", model, "--strategies", s, "--threads", str(args.threads)],
                        True, args.threads) for s in args.strategies}
        times = _run(["--worker", "time", "--models", model, "--threads", str(args.threads), "--repeats",
                      str(args.repeats), "--strategies", *args.strategies], False, args.threads)
        base = times.get("compile")
        print(f"\n{model} (CPU, {args.threads} threads): held MB / step s / vs compile / first step s")
        for s in args.strategies:
            r, t = rows[s], times.get(s)
            if "error" in r:
                print(f"  {s:26s} error: {r['error']}")
                continue
            ratio = f"{t / base:.2f}x" if t and base else "-"
            step = f"{t:.3f}" if t else times.get("error", "-")
            print(f"  {s:26s} {r['held_bytes'] / 1e6:8.1f} MB  {step:>7s} s  {ratio:>6s}  {r['first_step_s']:7.1f} s")


if __name__ == "__main__":
    main()
