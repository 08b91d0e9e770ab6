"""Gradient variance per width of each value ``actfx.compile`` packs, measured on its own graphs.

The same estimate as the eager path's (``sensitivity``), taken where the compiled path packs:
the model is captured and partitioned exactly as ``actfx.compile`` does it (min-cut partitioner,
then actfx's pass: hoisting, masks, exact statistics), but the graphs run as plain fx code and
each value the pass would pack stays saved as it is, read in backward through a ``Probe``. One
forward on real calibration inputs, one exact backward, then two backwards per site (a value and
the decorrelation copies that share its width) with its values stochastically rounded, each with
noise of its own, to 1 and to 2 bits where backward reads them:

    Var_s(b) = || g(noise on s at b bits) - g ||^2,   Var_s(b > 2) = Var_s(2) * sum sigma^2(b) / sum sigma^2(2)

(``sigma^2`` the per-value rounding variance, ``sensitivity.rounding_variance``; ``sensitivity``
says why 1 bit is measured, not scaled). Nothing is kept
on the model; training steps after planning read fixed widths and never sync with the host.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from actfx.compiled_estimate import as_fx_code
from actfx.config import Config
from actfx.passes.saved_plan import Storage
from actfx.planner.sensitivity import (_gradient, _projection, measured_variance, rounding_noise,
                                       rounding_variance)


class Probe:
    """Backward reads each would-be-packed value through ``read``: it keeps a copy the first
    time and adds the active value's noise while one backward runs."""

    def __init__(self, record):
        self.record = record  # the graph being partitioned is the next plan it records
        self.values: dict = {}  # (graph index, node name) -> copy of the value
        self.active: dict = {}  # key -> noise, while one backward runs

    def key(self, name: str) -> tuple:
        return (len(self.record.plans), name)

    def read(self, value: torch.Tensor, key: tuple) -> torch.Tensor:
        if key not in self.values:
            self.values[key] = value.detach().clone()
        if key in self.active:
            return value + self.active[key].to(value.dtype)
        return value


def compiled_sensitivities(model: nn.Module, inputs: tuple, config: Config, memory_budget: float | None, *,
                           loss_fn=None, seed: int = 0) -> dict:
    """{site ("module:op"): PackSensitivity} over the values actfx.compile would pack in
    ``model`` on ``inputs`` (real tensors); values sharing a site add their variances."""
    compiled, record = as_fx_code(model, config, memory_budget)
    probe = record.probe = Probe(record)
    was_training = model.training
    model.train()
    try:
        return _measure(model, inputs, compiled, record, probe, config, loss_fn, seed)
    except (RuntimeError, IndexError) as err:
        # The partition runs here as fx code, which Inductor never does: a failure of that path
        # (as torchvision's ResNets had, before saved_pair kept argument names unique) names
        # the eager planner as the way on.
        raise RuntimeError(f"actfx.plan(path='compile') could not calibrate {type(model).__name__} on its "
                           f"compiled partition ({type(err).__name__}: {str(err).splitlines()[0][:120]}); "
                           "plan with path='eager' and actfx.convert(model, plan=plan) instead") from err
    finally:
        model.train(was_training)


def _measure(model, inputs, compiled, record, probe, config, loss_fn, seed) -> dict:
    """The forward, the exact backward and one backward per probed value (see the module docstring)."""
    params = [p for p in model.parameters() if p.requires_grad]
    generator = torch.Generator().manual_seed(seed)
    group = config.group_size
    result: dict = {}
    with torch.enable_grad():
        out = compiled(*inputs)
        loss = loss_fn(out) if loss_fn is not None else _projection(out, generator)
        exact = _gradient(loss, params)
        sites = {(index, v.name): v.site for index, plan in enumerate(record.plans) for v in plan.saved
                 if v.storage is Storage.PACKED}
        members: dict = {}  # site -> keys of its values (a value and its decorrelation copies)
        for key in sorted(probe.values):
            if key in sites and probe.values[key].is_floating_point():
                members.setdefault(sites[key], []).append(key)
        for site, keys in members.items():
            def start(bits, keys=keys):
                probe.active = {k: rounding_noise(probe.values[k], bits, group, generator) for k in keys}

            def scale(bits, keys=keys):
                return sum(float(rounding_variance(probe.values[k], bits, group).sum()) for k in keys)

            result[site] = measured_variance(start, loss, params, exact, scale)
        probe.active = {}
    return result
