"""The memory planner, measured: gradient error at equal held bytes, and predicted vs measured peak.

    python benchmarks/planner.py quality                  # vit_tiny and resnet50, uniform 2-bit vs the plan
    python benchmarks/planner.py quality --models vit_tiny --batch 8 --samples 8
    python benchmarks/planner.py quality --path compile   # the same for actfx.plan(path="compile")
    python benchmarks/planner.py peak                     # resnet50 and gpt_tiny, three batches each, CPU RSS
    python benchmarks/planner.py peak --path compile --models gpt_tiny   # the same for actfx.compile
    python benchmarks/planner.py maxbatch --limit 1GiB    # resnet50: largest batch under a CPU peak, predicted vs found
    python benchmarks/planner.py parity                   # LM parity test's setup: fp32, uniform 2-bit, plan <= 1.5 bits

quality: for each model, on one fixed random batch with random labels (cross-entropy), the exact
gradient g, then K gradients of the model converted at uniform 2 bits and K of the model converted
with ``actfx.plan(model, x, activation_budget=<what uniform 2-bit holds>)``. The plan is
calibrated on a *different* random batch of the same size (same loss), so it is not fitted to the
batch it is judged on. Printed per model: held bytes (``count_saved``), average bits,
one-step error sqrt(mean_k ||g_k - g||^2) / ||g||, and the error of the mean of K,
||mean_k g_k - g|| / ||g|| (falls like 1/sqrt(K) when unbiased). Models at initialisation;
torchvision-style ViTs start with a zero head, which leaves every other gradient zero, so the
head is re-initialised N(0, 0.02) first (as timm does). ``--path compile``: the same with
uniform 2-bit ``actfx.compile`` against ``actfx.plan(path="compile")``, held bytes from the
compiled pass's record, the packed partitions run as fx code (the ATen pack math Inductor would
fuse, without generating code).

peak: each (model, batch) in a fresh process started with MALLOC_MMAP_THRESHOLD_=65536 and one
thread: a plan with ``activation_budget`` = what uniform 2-bit holds (calibrated on one small
sample), one warm-up step at the batch (actfx's kernels compile, AdamW's state appears), then a
second step: its peak RSS (VmHWM, reset before it) minus the RSS at its start (parameters and
AdamW state, no gradients: ``zero_grad(set_to_none=True)``), against the plan's prediction of the
same, ``predicted_peak_bytes - parameters - optimizer state - buffers`` (= gradients + held
activations + 2 x output + 3 x largest op output). The full predicted peak adds parameters,
AdamW state and buffers, which are counted exactly. ``--path compile``: the plan is
``actfx.plan(path="compile")`` applied with ``actfx.compile`` (the warm-up step compiles).

maxbatch: for ResNet-50 (224 px) converted at uniform 2 bits with AdamW, the largest batch whose
full peak (parameters + AdamW state + buffers, counted, plus the measured step peak as in `peak`)
stays under ``--limit``: predicted by bisection on the fake-tensor step (``step_bytes``), found by
bisection on real steps, each batch in a fresh subprocess. ``--device cuda``: the real steps run
on the GPU in this process, their full peak read from the allocator (``max_memory_allocated``) with
the allocator capped at ``--limit`` (``set_per_process_memory_fraction``), as on a card that size;
a step that runs out of memory does not fit. It also prints the batch ``actfx.plan``'s GPU rule
predicts (``planner.peak.largest_batch``: a 1 GiB margin and 1.10 fragmentation on the fake step).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

import actfx
from actfx.accounting import count_saved
from actfx.cli import parse_recompute
from actfx.kernels import code_bits
from actfx.models import build_model, get_model_spec

SHAPES = {"vit_tiny": None, "resnet50": (3, 64, 64), "gpt_tiny": (64,), "resnet20": None}


def _model(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    model = build_model(name)
    for pname, p in model.named_parameters():
        if "head" in pname and p.dim() == 2 and not p.detach().any():
            torch.nn.init.normal_(p, std=0.02)
    return model


def _batch(name: str, batch: int, seed: int):
    spec = get_model_spec(name)
    gen = torch.Generator().manual_seed(seed)
    x = spec.example_input(batch, generator=gen)
    shape = SHAPES.get(name)
    if shape is not None:
        x = x[(slice(None), *[slice(0, n) for n in shape])].contiguous()
    return x, gen


def _labels(model, x, gen):
    with torch.no_grad():
        out = model(x)
    return torch.randint(out.shape[-1], out.shape[:-1], generator=gen)


def _gradient(model, params, x, y) -> torch.Tensor:
    """One step's gradient of ``params``; ``model`` may be a compiled function (``as_fx_code``)."""
    for p in params:
        p.grad = None
    out = model(x)
    F.cross_entropy(out.flatten(0, -2).float(), y.flatten()).backward()
    g = torch.cat([(torch.zeros(p.numel()) if p.grad is None else p.grad.reshape(-1)).double() for p in params])
    for p in params:
        p.grad = None
    return g


def _errors(model, params, x, y, exact, samples) -> dict:
    total, sq, seconds = torch.zeros_like(exact), 0.0, []
    for _ in range(samples):
        start = time.perf_counter()
        g = _gradient(model, params, x, y)
        seconds.append(time.perf_counter() - start)
        total += g
        sq += float((g - exact).square().sum())
    norm = float(exact.norm())
    return {"one_step": math.sqrt(sq / samples) / norm, "mean_of_k": float((total / samples - exact).norm()) / norm,
            "step_s": sorted(seconds)[len(seconds) // 2]}


def _average_bits(converted, x) -> float:
    from actfx.planner.inventory import take_inventory

    packs = [p for g in take_inventory(converted, (x,)).groups for p in g.packs]
    return sum(p.numel * code_bits(p.bits, 256) for p in packs) / sum(p.numel for p in packs)


def _held(model, x) -> int:
    with count_saved(model) as saved:
        out = model(x)
    del out
    return saved.activation_bytes


def quality(name: str, batch: int, samples: int, fraction: float = 1.0, recompute="auto") -> dict:
    model = _model(name)
    params = [p for p in model.parameters() if p.requires_grad]
    x, gen = _batch(name, batch, seed=0)
    y = _labels(model, x, gen)
    exact = _gradient(model, params, x, y)
    uniform = actfx.convert(model, bits=2)
    held = _held(uniform, x)
    xc, genc = _batch(name, batch, seed=1)
    yc = _labels(model, xc, genc)
    loss = lambda out: F.cross_entropy(out.flatten(0, -2).float(), yc.flatten())  # noqa: E731
    plan = actfx.plan(model, x, activation_budget=int(held * fraction), calibration_inputs=(xc,), loss_fn=loss,
                      recompute=recompute)
    planned = actfx.convert(model, plan=plan)
    return {
        "model": name, "input": list(x.shape), "samples": samples, "fraction": fraction,
        "uniform": {"held": held, "bits": _average_bits(uniform, x), **_errors(uniform, params, x, y, exact, samples)},
        "plan": {"held": _held(planned, x), "predicted_held": plan.activation_bytes, "bits": plan.average_bits,
                 "recomputed": [s.module for s in plan.recomputed], **_errors(planned, params, x, y, exact, samples)},
    }


def _record_bits(record) -> float:
    from actfx.passes.saved_plan import Storage

    packed = [v for p in record.plans for v in p.saved if v.storage is Storage.PACKED]
    return sum(math.prod(v.shape) * v.bits for v in packed) / max(sum(math.prod(v.shape) for v in packed), 1)


def quality_compiled(name: str, batch: int, samples: int, fraction: float = 1.0) -> dict:
    """``quality`` for ``actfx.plan(path="compile")``: uniform 2-bit actfx.compile against the
    compile plan at the bytes uniform holds (the compiled record's bytes)."""
    from actfx.compiled_estimate import as_fx_code
    from actfx.config import Config

    model = _model(name)
    params = [p for p in model.parameters() if p.requires_grad]
    x, gen = _batch(name, batch, seed=0)
    y = _labels(model, x, gen)
    exact = _gradient(model, params, x, y)
    uniform, uniform_record = as_fx_code(model, Config(bits=2))
    uniform_errors = _errors(uniform, params, x, y, exact, samples)
    held = uniform_record.bytes_after
    xc, genc = _batch(name, batch, seed=1)
    yc = _labels(model, xc, genc)
    loss = lambda out: F.cross_entropy(out.flatten(0, -2).float(), yc.flatten())  # noqa: E731
    plan = actfx.plan(model, x, activation_budget=int(held * fraction), calibration_inputs=(xc,), loss_fn=loss,
                      path="compile")
    planned, planned_record = as_fx_code(model, plan.config())
    planned_errors = _errors(planned, params, x, y, exact, samples)
    return {
        "model": name, "input": list(x.shape), "samples": samples, "fraction": fraction, "path": "compile",
        "uniform": {"held": held, "bits": _record_bits(uniform_record), **uniform_errors},
        "plan": {"held": planned_record.bytes_after, "predicted_held": plan.activation_bytes,
                 "bits": plan.average_bits, **planned_errors},
    }


# ---------------------------------------------------------------- parity (tests/test_lm_parity.py setup)


def parity(fractions=(0.55, 0.5, 0.45, 0.4), most_bits: float = 1.5) -> dict:
    """Final validation loss over seeds 0-2 of the LM parity test's model and steps: fp32, uniform
    2-bit, and a plan at the largest fraction of uniform 2-bit's bytes averaging <= ``most_bits``
    (calibrated on one training batch at seed 0's initialisation)."""
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
    import test_lm_parity as lm
    from actfx.models.gpt import GPT, GPTConfig

    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=256, n_positions=lm.SEQ, n_layer=2, n_head=4, n_embd=64, dropout=0.0))
    data = lm.corpus()
    x, y = lm.sample(data[: int(0.9 * data.numel())], lm.BATCH, torch.Generator().manual_seed(5))
    uniform = _held(actfx.convert(model, bits=2), x)
    loss = lambda out: F.cross_entropy(out.flatten(0, 1), y.flatten())  # noqa: E731
    for fraction in fractions:
        plan = actfx.plan(model, x, activation_budget=int(uniform * fraction), loss_fn=loss, recompute=False)
        if plan.average_bits <= most_bits:
            break
    else:
        raise SystemExit(f"no plan at {fractions} of uniform 2-bit's bytes averages <= {most_bits} bits")
    rows = {name: [lm.validation_loss(config, seed) for seed in lm.SEEDS]
            for name, config in (("fp32", None), ("uniform 2", actfx.Config(bits=2)), ("plan", plan.config()))}
    return {"fraction": fraction, "bits": plan.average_bits, "held": plan.activation_bytes, "uniform_held": uniform,
            "losses": rows}


# ---------------------------------------------------------------- peak (one process per point)


def _rss(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} missing from /proc/self/status")


PEAK_SHAPES = {"resnet50": (3, 224, 224), "gpt_tiny": (128,)}
CALIBRATION_SHAPES = {"resnet50": (3, 64, 64), "gpt_tiny": (128,)}


def peak_worker(name: str, batch: int, recompute="auto", path: str = "eager") -> dict:
    from actfx.report import static_costs

    torch.manual_seed(0)
    SHAPES[name] = PEAK_SHAPES.get(name)
    x, gen = _batch(name, batch, seed=0)
    model = _model(name)
    y = _labels(model, x, gen)
    held2 = _held(actfx.convert(model, bits=2), x)
    SHAPES[name] = CALIBRATION_SHAPES.get(name)
    xc, _ = _batch(name, 1, seed=1)
    if path == "compile":
        plan = actfx.plan(model, x, activation_budget=held2, calibration_inputs=(xc,), path="compile")
        stepped = actfx.compile(model, plan=plan)  # the warm-up step in _step_peak compiles it
    else:
        plan = actfx.plan(model, x, activation_budget=held2, calibration_inputs=(xc,), recompute=recompute)
        stepped = actfx.convert(model, plan=plan)
    costs = static_costs(model, "adamw")
    measured = _step_peak(stepped, model, x, y)
    fixed = costs.param_bytes + costs.optimizer_bytes + costs.buffer_bytes
    return {"model": name, "batch": batch, "input": list(x.shape), "predicted_peak": plan.predicted_peak_bytes,
            "predicted": plan.predicted_peak_bytes - fixed, "measured": measured, "held": plan.activation_bytes,
            "fixed": fixed, "recomputed": [s.module for s in plan.recomputed]}


def step_worker(name: str, batch: int) -> dict:
    """The measured step peak of uniform 2-bit at ``batch`` (as in peak_worker, no plan)."""
    torch.manual_seed(0)
    SHAPES[name] = PEAK_SHAPES.get(name)
    x, gen = _batch(name, batch, seed=0)
    model = _model(name)
    y = _labels(model, x, gen)
    return {"batch": batch, "measured": _step_peak(actfx.convert(model, bits=2), model, x, y)}


def _adamw_step(converted, model, x, y):
    """One training step of ``converted`` (cross-entropy, AdamW), as a function to call."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step():
        out = converted(x)
        F.cross_entropy(out.flatten(0, -2).float(), y.flatten()).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def _step_peak(converted, model, x, y) -> int:
    """RSS peak of one AdamW training step of ``converted`` above the level before it (after a
    warm-up step, so optimizer state and kernels exist already)."""
    import gc

    step = _adamw_step(converted, model, x, y)
    step()
    gc.collect()
    start = _rss("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    step()
    return _rss("VmHWM") - start


def _bisect(fits, low: int, high: int) -> int:
    """Largest b in [low, high) with fits(b), given fits(low) and not fits(high)."""
    while high - low > 1:
        mid = (low + high) // 2
        low, high = (mid, high) if fits(mid) else (low, mid)
    return low


def _cuda_full_peak(name: str, batch: int) -> int | None:
    """Allocator peak (``max_memory_allocated``) of the second AdamW step of ``name`` converted at
    uniform 2 bits, at ``batch`` on the GPU: parameters, AdamW state, gradients, the batch, held
    activations and backward's working set. None when the step runs out of memory."""
    import gc

    torch.manual_seed(0)
    SHAPES[name] = PEAK_SHAPES.get(name)
    x, gen = _batch(name, batch, seed=0)
    s = {"model": _model(name).cuda(), "x": x.cuda()}  # one dict, emptied after the step or its OOM
    try:
        s["y"] = _labels(s["model"], s["x"], gen).cuda()
        s["step"] = _adamw_step(actfx.convert(s["model"], bits=2), s["model"], s["x"], s["y"])
        s["step"]()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        s["step"]()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated()
    except torch.cuda.OutOfMemoryError:
        return None
    finally:
        s.clear()
        gc.collect()
        torch.cuda.empty_cache()


def maxbatch(name: str, limit: int, device: str = "cpu") -> dict:
    from actfx.planner.step_memory import step_bytes
    from actfx.report import static_costs

    model = _model(name)
    fixed = (lambda c: c.param_bytes + c.optimizer_bytes + c.buffer_bytes)(static_costs(model, "adamw"))
    converted = actfx.convert(model, bits=2)
    shape = PEAK_SHAPES.get(name) or get_model_spec(name).input_shape

    def predicted_fits(b):
        return fixed + step_bytes(converted, (torch.empty(b, *shape, device="meta"),)) <= limit

    high = 256
    while predicted_fits(high):
        high *= 2
    predicted = _bisect(predicted_fits, 0, high)
    tried = {}
    if device == "cuda":
        # a card of `limit` bytes: the caching allocator refuses to grow past it (OutOfMemoryError)
        torch.cuda.set_per_process_memory_fraction(min(1.0, limit / torch.cuda.get_device_properties(0).total_memory))

        def fits_on_gpu(b):
            peak = _cuda_full_peak(name, b)
            tried[b] = peak if peak is not None else float("inf")
            return peak is not None and peak <= limit

        from actfx.planner.peak import largest_batch

        found = _bisect(fits_on_gpu, 0, 2 * max(predicted, 1) + 1)
        rule = largest_batch(model, converted, (torch.empty(64, *shape, device="meta"),), limit, optimizer="adamw")[0]
        return {"model": name, "limit": limit, "predicted": predicted, "predicted_gpu_rule": rule, "found": found,
                "tried": tried, "device": torch.cuda.get_device_name()}
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": "1"}

    def fits(b):
        out = subprocess.run([sys.executable, __file__, "step-worker", name, str(b)], env=env, capture_output=True,
                             text=True, check=True)
        tried[b] = json.loads(out.stdout.strip().splitlines()[-1])["measured"] + fixed
        return tried[b] <= limit

    found = _bisect(fits, 0, 2 * max(predicted, 1) + 1)
    return {"model": name, "limit": limit, "predicted": predicted, "found": found, "tried": tried}


def peak(models, batches, recompute: str = "auto", path: str = "eager") -> list:
    rows = []
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": "1"}
    for name in models:
        for batch in batches[name]:
            out = subprocess.run([sys.executable, __file__, "peak-worker", name, str(batch), recompute, path], env=env,
                                 capture_output=True, text=True, check=True)
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    return rows


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=("quality", "peak", "maxbatch", "parity", "peak-worker", "step-worker"))
    p.add_argument("--limit", default="1GiB", help="maxbatch: the full peak to stay under")
    p.add_argument("args", nargs="*")
    p.add_argument("--models", nargs="+")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--samples", type=int, default=8)
    p.add_argument("--fractions", type=float, nargs="+", default=[1.0],
                   help="quality: plan for these fractions of what uniform 2-bit holds")
    p.add_argument("--recompute", default="auto",
                   help="quality (eager) and peak: actfx.plan's recompute= (auto, off, or a fraction of forward FLOPs)")
    p.add_argument("--path", choices=("eager", "compile"), default="eager",
                   help="quality and peak: plan for actfx.convert (eager) or actfx.compile (compile)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                   help="maxbatch: real steps on the GPU (allocator peak, memory capped at --limit) instead of CPU RSS")
    p.add_argument("--json", metavar="PATH")
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    if a.what == "peak-worker":
        extra = [*a.args[2:], "auto", "eager"][:2]
        print(json.dumps(peak_worker(a.args[0], int(a.args[1]), parse_recompute(extra[0]), extra[1])))
        return
    if a.what == "step-worker":
        print(json.dumps(step_worker(a.args[0], int(a.args[1]))))
        return
    if a.what == "parity":
        torch.set_num_threads(2)
        r = parity()
        print(f"plan at {r['fraction']:g}x uniform 2-bit's bytes ({r['held']} of {r['uniform_held']}): "
              f"average {r['bits']:.2f} bits")
        for name, losses in r["losses"].items():
            print(f"{name:10} final validation loss, seeds 0-2: {', '.join(f'{v:.3f}' for v in losses)}; "
                  f"mean {sum(losses) / len(losses):.3f}")
        return
    if a.what == "maxbatch":
        from actfx.units import parse_bytes

        rows = [maxbatch(name, parse_bytes(a.limit), a.device) for name in (a.models or ["resnet50"])]
        for r in rows:
            tried = ", ".join(f"{b}: {v / 2**20:.0f} MiB" if v != float("inf") else f"{b}: out of memory"
                              for b, v in sorted(r["tried"].items()))
            if "device" in r:
                print(f"on {r['device']}, allocator peak, memory capped at the limit; actfx.plan's GPU rule "
                      f"(1 GiB margin, 1.10 fragmentation) predicts {r['predicted_gpu_rule']}:")
            print(f"{r['model']}: largest batch under {a.limit}: predicted {r['predicted']}, found {r['found']} "
                  f"(full peak per batch tried: {tried})")
        if a.json:
            with open(a.json, "w") as f:
                json.dump(rows, f, indent=1)
        return
    if a.what == "quality":
        recompute = parse_recompute(a.recompute)
        if a.path == "compile":
            rows = [quality_compiled(name, a.batch, a.samples, f) for name in (a.models or ["vit_tiny", "resnet50"])
                    for f in a.fractions]
        else:
            rows = [quality(name, a.batch, a.samples, f, recompute) for name in (a.models or ["vit_tiny", "resnet50"])
                    for f in a.fractions]
        print(f"{'model':10} {'input':18} {'':12} {'held':>10} {'bits':>5} {'1-step err':>10} {'mean-of-K err':>13}"
              f" {'step s':>7}")
        for r in rows:
            for which in ("uniform", "plan"):
                e = r[which]
                label = "uniform 2" if which == "uniform" else f"plan x{r['fraction']:g}"
                print(f"{r['model']:10} {str(r['input']):18} {label:12} {e['held']:>10} {e['bits']:>5.2f} "
                      f"{e['one_step']:>10.4f} {e['mean_of_k']:>13.4f} {e.get('step_s', math.nan):>7.3f}")
            if r["plan"].get("recomputed"):
                print(f"{'':10} recomputed in backward: {', '.join(r['plan']['recomputed'])}")
            print(f"{'':10} one-step error ratio uniform/plan: {r['uniform']['one_step'] / r['plan']['one_step']:.2f}x"
                  f" (K={r['samples']})")
    else:
        models = a.models or ["resnet50", "gpt_tiny"]
        batches = {"resnet50": [4, 8, 16], "gpt_tiny": [8, 16, 32]}
        rows = peak(models, {m: batches.get(m, [4, 8, 16]) for m in models}, a.recompute, a.path)
        print("step peak above its start (RSS, MiB): predicted vs measured; full peak adds the fixed part")
        print(f"{'model':10} {'input':20} {'held':>8} {'predicted':>9} {'measured':>9} {'error':>7} "
              f"{'fixed':>7} {'full peak error':>15}")
        for r in rows:
            full = (r["predicted"] - r["measured"]) / (r["measured"] + r["fixed"])
            print(f"{r['model']:10} {str(r['input']):20} {r['held'] / 2**20:>8.1f} {r['predicted'] / 2**20:>9.1f} "
                  f"{r['measured'] / 2**20:>9.1f} {(r['predicted'] - r['measured']) / r['measured']:>+7.1%} "
                  f"{r['fixed'] / 2**20:>7.1f} {full:>+15.1%}"
                  + (f"  recomputed: {', '.join(r['recomputed'])}" if r.get("recomputed") else ""))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
