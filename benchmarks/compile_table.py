"""actfx against PyTorch's own tools, as measured in issue 11: held memory and step time.

    python benchmarks/compile_table.py [--models hf_gpt2 resnet50] [--threads 2] [--repeats 5]

Models: a Hugging Face GPT-2 (4 layers, d512, 8 heads, 256 tokens, batch 4, dropout 0; needs
transformers) and ResNet-50 at batch 8 (224x224); loss = mean of the output. Each strategy's
memory is measured in a fresh process (RSS with MALLOC_MMAP_THRESHOLD_=65536, empty Inductor
cache): held = memory after forward minus before, median of 3 steps after the first; the first
step (which compiles) is timed there alone. Step times: all strategies in one process,
interleaved round-robin, median; ratios against the same run's torch.compile.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
from _memory import CpuProbe  # noqa: E402
from _strategies import checkpoint_blocks  # noqa: E402

import actfx  # noqa: E402
from actfx.models import build_model  # noqa: E402

STRATEGIES = ["eager", "actfx_convert2", "checkpoint", "compile", "compile_budget0.3",
              "actfx_compile2", "actfx_compile2_budget0.3"]


def build(model_name: str):
    torch.manual_seed(0)
    if model_name == "hf_gpt2":
        from transformers import GPT2Config, GPT2LMHeadModel

        cfg = GPT2Config(n_layer=4, n_embd=512, n_head=8, n_positions=256, resid_pdrop=0.0, embd_pdrop=0.0,
                         attn_pdrop=0.0, use_cache=False)
        model = GPT2LMHeadModel(cfg)
        x = torch.randint(0, cfg.vocab_size, (4, 256), generator=torch.Generator().manual_seed(0))
        return model, x, lambda m, inp: m(input_ids=inp).logits.mean()
    model = build_model(model_name)
    x = torch.randn(8, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    return model, x, lambda m, inp: m(inp).mean()


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
    raise ValueError(f"unknown strategy {strategy!r}; choose from {', '.join(STRATEGIES)}")


def memory_worker(model_name: str, strategy: str) -> dict:
    model, x, loss_fn = build(model_name)
    prepared = prepare(strategy, model, x)
    probe = CpuProbe()
    probe.check_env()
    t0 = time.perf_counter()
    loss_fn(prepared, x).backward()
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


def time_worker(model_name: str, strategies: list[str], repeats: int) -> dict:
    torch._dynamo.config.cache_size_limit = 64  # several compiled copies of one model's code
    runs = {}
    for name in strategies:
        model, x, loss_fn = build(model_name)
        runs[name] = (prepare(name, model, x), model, x, loss_fn)
    times = {name: [] for name in strategies}
    for r in range(repeats + 1):
        order = strategies[r % len(strategies):] + strategies[:r % len(strategies)]
        for name in order:
            prepared, model, x, loss_fn = runs[name]
            t0 = time.perf_counter()
            loss_fn(prepared, x).backward()
            elapsed = time.perf_counter() - t0
            model.zero_grad(set_to_none=True)
            if r > 0:
                times[name].append(elapsed)
    return {name: statistics.median(ts) for name, ts in times.items()}


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
    p.add_argument("--worker", choices=["memory", "time"], help=argparse.SUPPRESS)
    args = p.parse_args()
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
