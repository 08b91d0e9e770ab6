"""``actfx.plan(..., path="compile")``: widths for the values ``actfx.compile`` packs.

1. partition the model as ``actfx.compile`` would, on meta tensors at the batch to plan for
   (``estimate_compiled``): every saved value, its bytes and how the pass keeps it;
2. calibrate on the same partition with real inputs (``compiled_sensitivity``);
3. pick widths per site (``"module:op"``; values sharing a site share a width) with the same
   knapsack as the eager path (``choose``), then partition again with the chosen widths and
   report what that holds.

The peak is the compiled step's own (``PeakModel`` with ``CompiledRecord.step_bytes``): the
partitioned forward and backward walked in order as Inductor runs them (``passes/graph_memory``:
pointwise chains fused, buffers freed after their last reader). The eager conversion's working
set stood in before and overestimated a compiled gpt_tiny's step by 31-35%
(``benchmarks/planner.py peak --path compile``): it counts every intermediate of backward, while
the compiled step's worst point is often in forward.
"""

from __future__ import annotations

import copy
import dataclasses
import math

import torch
import torch.nn as nn

from actfx.compiled_estimate import as_fx_code, estimate_compiled
from actfx.config import KEEP_EXACT, Config
from actfx.kernels import ALLOWED_BITS, graph_pack
from actfx.passes.saved_plan import Storage
from actfx.planner.choose import BudgetError, Option, choose
from actfx.planner.compiled_sensitivity import compiled_sensitivities
from actfx.planner.peak import peak_model
from actfx.planner.sensitivity import warn_if_compounding
from actfx.planner.plan import Plan, Site, site_order
from actfx.units import format_bytes


def plan_compiled(model: nn.Module, planned_inputs: tuple, calibration: tuple, *, activation_limit: int | None,
                  peak_limit: int | None, words: str, batch: int, base: Config, memory_budget: float | None,
                  optimizer: str, gpu: bool, dtype=None, loss_fn=None) -> Plan:
    """A compile plan holding at most ``activation_limit`` bytes of activations, or else peaking
    at most at ``peak_limit`` (see the module docstring)."""
    meta = tuple(x.to("meta") if isinstance(x, torch.Tensor) else x for x in planned_inputs)
    shape_only = copy.deepcopy(model).to("meta")  # the partition at the planned batch costs no memory
    estimate = _estimate_on_meta(shape_only, meta, base, memory_budget)
    peak = peak_model(model, estimate.step_bytes, estimate.bytes_after, optimizer=optimizer, gpu=gpu, dtype=dtype)
    room = activation_limit if activation_limit is not None else peak.activation_room(peak_limit)
    sensitivity = compiled_sensitivities(model, calibration, base, memory_budget, loss_fn=loss_fn)
    group = base.group_size
    values: dict = {}
    fixed = 0
    for plan in estimate.plans:
        for v in plan.saved:
            if v.reason == "parameter":
                continue
            if v.storage is Storage.PACKED and v.site in sensitivity:
                values.setdefault(v.site, []).append(v)
            else:
                fixed += v.bytes_after
    sites = sorted(values, key=site_order)
    options = []
    for site in sites:
        nbytes = {b: sum(graph_pack.packed_value_bytes(v.shape, b, group, v.rows) for v in values[site])
                  for b in ALLOWED_BITS}
        nbytes[KEEP_EXACT] = sum(v.bytes_before for v in values[site])
        variance = {**sensitivity[site].variance, KEEP_EXACT: 0.0}
        options.append(Option(nbytes, variance))
    try:
        widths = choose(options, room - fixed)
    except BudgetError as err:
        smallest = fixed + err.smallest
        what = (f"held activations of at least {format_bytes(smallest)}" if activation_limit is not None
                else f"a peak of at least {format_bytes(peak.peak(smallest))}")
        raise BudgetError(f"cannot meet the {words}: every planned value at 1 bit still needs {what}; raise the "
                          "budget or lower the batch", smallest if activation_limit is not None
                          else peak.peak(smallest)) from None
    chosen = {site: width for site, width in zip(sites, widths)}
    config = dataclasses.replace(base, site_bits=chosen)
    final = _estimate_on_meta(shape_only, meta, config, memory_budget)
    variance = sum(o.variance[w] for o, w in zip(options, widths))
    warn_if_compounding(model, as_fx_code(model, config, memory_budget)[0], calibration, loss_fn, variance,
                        remedy="let the partitioner recompute more (a lower memory_budget)")
    held = final.bytes_after
    numel_bits = numel = 0
    for site, width in chosen.items():
        for v in values[site]:
            numel_bits += math.prod(v.shape) * (32 if width == KEEP_EXACT else width)
            numel += math.prod(v.shape)
    plan_sites = []
    for site, option, width in zip(sites, options, widths):
        module, _, op = site.rpartition(":")
        plan_sites.append(Site(module, op, width, option.nbytes[width], option.variance[width]))
    return Plan(tuple(plan_sites), base.bits, group, batch, held, peak.peak(held, final.step_bytes),
                numel_bits / numel if numel else float(base.bits),
                variance, words, path="compile",
                memory_budget=memory_budget,
                ops=tuple(sorted({v.site for plan in final.plans for v in plan.saved if v.storage is Storage.PACKED})))


def _estimate_on_meta(model: nn.Module, meta: tuple, config: Config, memory_budget):
    """The partition at the planned batch on meta tensors, or one line saying why it cannot run
    there (a Hugging Face model with its cache on builds real tensors under dynamo: the dynamo
    error ran to dozens of lines)."""
    try:
        return estimate_compiled(model, meta, config, memory_budget)
    except Exception as err:  # noqa: BLE001 - dynamo raises many kinds
        first = str(err).strip().splitlines()[0][:160] if str(err).strip() else type(err).__name__
        raise RuntimeError(f"actfx.plan(path='compile') could not partition {type(model).__name__} on meta tensors "
                           f"({type(err).__name__}: {first}); for a Hugging Face model set config.use_cache=False, "
                           "or plan with path='eager'") from err
