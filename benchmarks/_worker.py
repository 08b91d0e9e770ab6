"""Benchmark measurements, each run in a process of its own by compare.py / memory_ratio.py.

    python benchmarks/_worker.py '{"mode": "memory", "model": "resnet50", "strategy": "actfx2", "batch": 8}'
    python benchmarks/_worker.py '{"mode": "time", "model": "resnet50", "strategies": ["plain", "actfx2"], "batch": 8}'

Each prints one line ``RESULT {json}``. A training step is forward, cross-entropy against fixed
random targets, backward, an SGD update and ``zero_grad(set_to_none=True)``.

* memory: one strategy in a fresh process (on CPU started with MALLOC_MMAP_THRESHOLD_, see
  `_memory`), so one strategy's memory never shows in another's. Per step, the medians of
  act_bytes (memory after forward minus before it: what the forward leaves alive for backward,
  plus the logits) and peak_bytes (the step's high-water mark minus memory before it), after a
  first step that counts saved_bytes: unique storages autograd keeps (`actfx.accounting.count_saved`).
* time: all strategies in one process on shared parameters, steps interleaved round-robin (order
  rotated each round), so drift in machine load hits every strategy alike; the median step time
  of each. No mmap threshold here: it would charge every temporary a fresh page-faulting mmap.
* fits: two steps at a batch size; exit status 3 on CUDA out-of-memory (batch search).
"""

from __future__ import annotations

import contextlib
import gc
import json
import statistics
import sys
import time

import torch
from torch import nn

from _memory import probe_for
from _strategies import Checkpointed, WithLoss, get_strategy
from actfx.accounting import count_saved
from actfx.models import build_model, get_model_spec

OOM_EXIT = 3


def _inputs(name: str, batch: int, seq: int | None, device: torch.device) -> torch.Tensor:
    spec = get_model_spec(name)
    x = spec.example_input(batch, generator=torch.Generator().manual_seed(0))
    if seq is not None and spec.vocab_size is not None:
        x = x[:, :seq].contiguous()
    return x.to(device)


def _fresh_model(name: str, device: torch.device) -> nn.Module:
    torch.manual_seed(0)
    return build_model(name).to(device)


class Runner:
    """One strategy applied to a model, with its optimizer and a fixed batch; `step` measures one step."""

    def __init__(self, strategy: str, model: nn.Module, x: torch.Tensor) -> None:
        self.device = x.device
        self.strategy = get_strategy(strategy)
        with torch.no_grad():
            out_shape = model(x).shape
        gen = torch.Generator().manual_seed(1)
        self.target = torch.randint(out_shape[-1], out_shape[:-1], generator=gen).to(self.device)
        t0 = time.perf_counter()
        self.model = self.strategy.prepare(WithLoss(model))  # the loss is part of what is converted
        self.prepare_s = time.perf_counter() - t0
        self.optimizer = torch.optim.SGD(model.parameters(), lr=1e-4)  # stateless: no extra memory
        self.x = x
        self.probe = probe_for(self.device)

    def _loss(self, hooks: bool = True) -> torch.Tensor:
        with self.strategy.forward_context(self.device) if hooks else contextlib.nullcontext():
            return self.model(self.x, self.target)

    def _finish(self, loss: torch.Tensor) -> None:
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def step(self) -> dict:
        gc.collect()
        probe = self.probe
        probe.sync()
        before = probe.current()
        probe.reset_peak()
        cuda = self.device.type == "cuda"
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
        t0 = time.perf_counter()
        loss = self._loss()
        after_forward = probe.current()
        self._finish(loss)
        del loss
        if cuda:
            end.record()
            end.synchronize()
            seconds = start.elapsed_time(end) / 1e3
        else:
            seconds = time.perf_counter() - t0
        return {"step_s": seconds, "act_bytes": after_forward - before,
                "peak_bytes": probe.peak() - before, "base_bytes": before}

    def saved_bytes(self) -> dict:
        """Bytes autograd keeps for backward, counted by storage in one extra step.

        Checkpointing's kept block inputs are included: non-reentrant checkpointing saves them
        through ordinary saved-tensor hooks before installing its own.
        """
        # Without the strategy's own context: save_on_cpu's hooks, being innermost, would hide
        # the tensors; it keeps the same bytes, only in host memory.
        with count_saved(self.model) as counted:
            loss = self._loss(hooks=False)
        self._finish(loss)
        return {"saved_bytes": counted.activation_bytes}


def measure_memory(job: dict) -> dict:
    device = torch.device(job.get("device", "cpu"))
    x = _inputs(job["model"], job["batch"], job.get("seq"), device)
    runner = Runner(job["strategy"], _fresh_model(job["model"], device), x)
    runner.probe.check_env()
    t0 = time.perf_counter()
    counted = runner.saved_bytes()  # doubles as the first warm-up step (and compiles compiled strategies)
    first_step_s = time.perf_counter() - t0
    for _ in range(job.get("warmup", 1) - 1):
        runner.step()
    steps = [runner.step() for _ in range(job.get("repeats", 2))]
    result = {key: statistics.median(s[key] for s in steps) for key in ("act_bytes", "peak_bytes", "base_bytes")}
    result.update(
        prepare_s=runner.prepare_s, first_step_s=first_step_s, probe=runner.probe.kind, input_shape=list(x.shape),
        blocks=sum(isinstance(m, Checkpointed) for m in runner.model.modules()), **counted,
    )
    return result


def measure_time(job: dict) -> dict:
    device = torch.device(job.get("device", "cpu"))
    x = _inputs(job["model"], job["batch"], job.get("seq"), device)
    shared = _fresh_model(job["model"], device)
    runners, failed = {}, {}
    for name in job["strategies"]:
        # Checkpointing rewraps blocks in place, so it gets a model of its own.
        try:
            model = _fresh_model(job["model"], device) if name == "checkpoint" else shared
            runners[name] = Runner(name, model, x)
        except Exception as err:  # noqa: BLE001 - one strategy failing must not lose the others
            failed[name] = {"error": f"{type(err).__name__}: {err}"}
    times: dict[str, list[float]] = {name: [] for name in runners}
    rounds = job.get("warmup", 1) + job.get("repeats", 5)
    for r in range(rounds):
        names = list(runners)
        if not names:
            break
        for name in names[r % len(names):] + names[: r % len(names)]:
            try:
                seconds = runners[name].step()["step_s"]
            except Exception as err:  # noqa: BLE001
                failed[name] = {"error": f"{type(err).__name__}: {err}"}
                del runners[name]
                continue
            if r >= job.get("warmup", 1):
                times[name].append(seconds)
    result = {name: {"step_s": statistics.median(times[name]), "step_min_s": min(times[name]), "step_times": times[name],
                     "prepare_s": runner.prepare_s} for name, runner in runners.items()}
    return {**result, **failed}


def fits(job: dict) -> dict:
    try:
        device = torch.device(job["device"])
        runner = Runner(job["strategy"], _fresh_model(job["model"], device),
                        _inputs(job["model"], job["batch"], job.get("seq"), device))
        runner.step()
        runner.step()
    except torch.cuda.OutOfMemoryError:
        sys.exit(OOM_EXIT)
    except RuntimeError as err:  # cuDNN / cuBLAS report running out of memory in their own words
        if "out of memory" in str(err).lower() or "NOT_ENOUGH_MEMORY" in str(err):
            sys.exit(OOM_EXIT)
        raise
    return {"fits": True}


_MODES = {"memory": measure_memory, "time": measure_time, "fits": fits}


def main() -> None:
    job = json.loads(sys.argv[1])
    if job.get("threads"):
        torch.set_num_threads(job["threads"])
    print("RESULT " + json.dumps(_MODES[job["mode"]](job)), flush=True)


if __name__ == "__main__":
    main()
