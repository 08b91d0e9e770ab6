"""One benchmark measurement in a process of its own, so one strategy's memory never shows in another's.

    python benchmarks/_worker.py '{"model": "resnet50", "strategy": "actfx2", "batch": 8}'

prints one line ``RESULT {json}``. A training step is forward, cross-entropy against fixed random
targets, backward, an SGD update and ``zero_grad(set_to_none=True)``. Per timed step it records:

* act_bytes: memory after forward minus memory before it (what the forward leaves alive: mostly
  what autograd saved for backward, plus the logits);
* peak_bytes: the step's high-water mark minus memory before it;
* step_s: wall time of the whole step (CUDA events on a GPU).

and, in one extra step, saved_bytes: the unique storages autograd keeps (``actfx.accounting``),
plus, under checkpointing, the block inputs that checkpointing itself keeps alive.
With ``"mode": "fits"`` it only runs two steps and exits 3 on CUDA out-of-memory (batch search).
"""

from __future__ import annotations

import gc
import json
import statistics
import sys
import time

import torch

from _memory import probe_for
from _strategies import Checkpointed, get_strategy, training_loss
from actfx.accounting import count_saved
from actfx.models import build_model, get_model_spec

OOM_EXIT = 3


def _inputs(name: str, batch: int, seq: int | None, device: torch.device) -> torch.Tensor:
    spec = get_model_spec(name)
    gen = torch.Generator().manual_seed(0)
    x = spec.example_input(batch, generator=gen)
    if seq is not None and spec.vocab_size is not None:
        x = x[:, :seq].contiguous()
    return x.to(device)


class Runner:
    """A prepared model, its optimizer and one fixed batch; `step` runs and measures one step."""

    def __init__(self, job: dict) -> None:
        self.device = torch.device(job.get("device", "cpu"))
        torch.manual_seed(0)
        model = build_model(job["model"]).to(self.device)
        self.strategy = get_strategy(job["strategy"])
        t0 = time.perf_counter()
        self.model = self.strategy.prepare(model)
        self.prepare_s = time.perf_counter() - t0
        self.optimizer = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)
        self.x = _inputs(job["model"], job["batch"], job.get("seq"), self.device)
        self.target = None
        self.probe = probe_for(self.device)

    def _loss(self) -> torch.Tensor:
        with self.strategy.forward_context(self.device):
            out = self.model(self.x)
        if self.target is None:
            gen = torch.Generator().manual_seed(1)
            self.target = torch.randint(out.shape[-1], out.shape[:-1], generator=gen).to(self.device)
        return training_loss(out, self.target)

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
        if self.device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
        t0 = time.perf_counter()
        loss = self._loss()
        after_forward = probe.current()
        self._finish(loss)
        del loss
        if self.device.type == "cuda":
            end.record()
            end.synchronize()
            seconds = start.elapsed_time(end) / 1e3
        else:
            seconds = time.perf_counter() - t0
        return {"step_s": seconds, "act_bytes": after_forward - before,
                "peak_bytes": probe.peak() - before, "base_bytes": before}

    def saved_bytes(self) -> dict:
        """Bytes autograd keeps for backward, counted by storage in one extra step."""
        held: dict[int, int] = {}

        def keep_inputs(module, args):
            for a in args:
                if isinstance(a, torch.Tensor):
                    held[a.untyped_storage().data_ptr()] = a.untyped_storage().nbytes()

        hooks = [m.register_forward_pre_hook(keep_inputs) for m in self.model.modules() if isinstance(m, Checkpointed)]
        try:
            # Outside the strategy's own hooks: save_on_cpu's (innermost) would hide the tensors.
            with count_saved(self.model) as counted:
                out = self.model(self.x)
                loss = training_loss(out, self.target)
            self._finish(loss)
        finally:
            for h in hooks:
                h.remove()
        return {"saved_bytes": counted.activation_bytes + sum(held.values()),
                "saved_by_checkpoint": sum(held.values())}


def measure(job: dict) -> dict:
    runner = Runner(job)
    for _ in range(job.get("warmup", 2)):
        runner.step()
    steps = [runner.step() for _ in range(job.get("repeats", 5))]
    result = {key: statistics.median(s[key] for s in steps) for key in steps[0]}
    result.update(
        job, step_times=[s["step_s"] for s in steps], prepare_s=runner.prepare_s,
        probe=runner.probe.kind, input_shape=list(runner.x.shape),
        params=sum(p.numel() for p in runner.model.parameters()),
        blocks=sum(isinstance(m, Checkpointed) for m in runner.model.modules()),
    )
    if job.get("count_saved", True):
        result.update(runner.saved_bytes())
    return result


def fits(job: dict) -> dict:
    try:
        runner = Runner(job)
        runner.step()
        runner.step()
    except torch.cuda.OutOfMemoryError:
        sys.exit(OOM_EXIT)
    return {"fits": True}


def main() -> None:
    job = json.loads(sys.argv[1])
    result = fits(job) if job.get("mode") == "fits" else measure(job)
    print("RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
