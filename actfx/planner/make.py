"""``actfx.plan``: choose a width per op so a training step fits a byte budget with the least harm.

1. convert the model at the default width and measure, on fake tensors at the batch to plan for,
   every pack it makes (``inventory``);
2. calibrate: one forward on real inputs, one backward per pack with only that pack rounded,
   gives each pack's gradient variance per width (``sensitivity``); packs PyTorch has no saved
   tensor for are probed on the converted model, one step each (``probe_sensitivity``);
3. turn the budget into bytes for the packs (``peak``, from one forward and backward on fake
   tensors, ``step_memory``) and pick widths: least summed variance within those bytes
   (``choose``); the chosen conversion's step is measured again, and if the peak still exceeds the
   budget the pack bytes shrink by the excess and widths are chosen again.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import math
import re
import warnings

import torch
import torch.nn as nn

from actfx.config import Config, check_bits
from actfx.convert import convert
from actfx.passes.analyze import DATA_DEPENDENT, measure, trace_like
from actfx.passes.capture import buffers_restored, training_mode
from actfx.passes.outline_recompute import outlinable
from actfx.passes.trace_effects import parameters_kept, restore_parameters
from actfx.planner.assemble import assemble, joint_key, option
from actfx.planner.batch import batch_of, with_batch
from actfx.planner.choose import BudgetError
from actfx.planner.inventory import take_inventory
from actfx.planner.peak import largest_batch, peak_model
from actfx.planner.plan import CHECKPOINT, Plan
from actfx.planner.probe_sensitivity import probed_sensitivities
from actfx.planner.recompute import AUTO_SHARE, candidate_paths, measure_blocks, outermost, pick
from actfx.planner.sensitivity import pack_sensitivities, warn_if_compounding
from actfx.planner.step_memory import step_bytes
from actfx.report import GPUS, OPTIMIZER_STATES
from actfx.units import format_bytes, parse_bytes

PATHS = ("eager", "compile")


def _input_errors_named(fn):
    """``fn`` (``plan``) with a model that fails on its example inputs named in one line: the
    fake-tensor run's own log (a traceback per failed op) is silenced, and the error says which
    inputs did not fit, with the op's message (the cause stays chained)."""

    @functools.wraps(fn)
    def checked(model, example_inputs, **kwargs):
        logger = logging.getLogger("torch._subclasses.fake_tensor")
        level = logger.level
        logger.setLevel(logging.CRITICAL)
        try:
            return fn(model, example_inputs, **kwargs)
        except RuntimeError as err:
            if "While executing" not in str(err):
                raise
            inputs = example_inputs if isinstance(example_inputs, (tuple, list)) else (example_inputs,)
            shapes = ", ".join(str(list(x.shape)) if isinstance(x, torch.Tensor) else type(x).__name__ for x in inputs)
            raise ValueError(f"actfx.plan: {type(model).__name__} failed on example_inputs of shape {shapes} "
                             f"({str(err).strip().splitlines()[0]}); check the inputs' shapes and dtypes") from err
        finally:
            logger.setLevel(level)

    return checked


def _model_left_as_it_was(plan_fn):
    """Planning runs the model (capture, calibration, the memory step): its buffers (BatchNorm's
    running statistics), parameters a forward replaces (a momentum encoder) and the global random
    stream are put back afterwards; ``actfx.plan`` moved them before."""
    @functools.wraps(plan_fn)
    def planned(model, *args, **kwargs):
        kept = parameters_kept((model,)) if isinstance(model, nn.Module) else ()
        try:
            with buffers_restored(model) if isinstance(model, nn.Module) else contextlib.nullcontext(), \
                    torch.random.fork_rng(devices=[]):
                return plan_fn(model, *args, **kwargs)
        finally:
            restore_parameters(kept)
    return planned


@_input_errors_named
@_model_left_as_it_was
def plan(model: nn.Module, example_inputs, *, budget=None, activation_budget=None, gpu: str | None = None,
         batch: int | None = None, optimizer: str = "adamw", path: str = "eager", loss_fn=None,
         calibration_inputs=None, bits: int = 2, group_size: int = 256, dtype: torch.dtype | None = None,
         memory_budget: float | None = None, recompute="auto") -> Plan:
    """A plan for ``model`` (see the module docstring); give exactly one of:

    - ``budget``: peak training memory, bytes or a string such as ``"6GiB"``;
    - ``activation_budget``: bytes held for backward at the batch of ``example_inputs``;
    - ``gpu`` (a name from ``actfx report``'s table, e.g. ``"t4"``): fit ``batch`` on it, or
      without ``batch`` the largest batch the default width fits (with ``path="compile"``, the largest
      the compiled plan fits).

    ``example_inputs``: a tensor or tuple of positional inputs, real (also used to calibrate) or
    meta (then pass ``calibration_inputs``, a small real batch); the first dimension is the batch.
    Calibration costs one backward per pack at its batch: give a large ``example_inputs`` as meta
    tensors with a few real samples as ``calibration_inputs``.
    ``loss_fn(output) -> scalar`` for calibration (default: output projected on a fixed Gaussian).
    ``optimizer``: whose state the peak counts (sgd, adam, adamw).
    ``path="compile"``: widths for the values ``actfx.compile`` packs (apply with
    ``actfx.compile(model, plan=plan)``), with the partitioner's ``memory_budget`` as given there.
    ``recompute`` (eager path; on the compiled one the partitioner recomputes): which repeated
    blocks may be rerun in backward from their exact inputs instead of held (``recompute.py``):
    a fraction ``r`` in (0, 1] lets them cost up to ``r`` of the forward's FLOPs wherever that
    lowers the gradient variance; ``"auto"`` is ``r = 0.3`` (about a tenth of a step) and, where
    no widths fit the budget, as many more as fitting takes; ``False`` never.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"actfx.plan expects a torch.nn.Module, got {type(model).__name__}")
    given = [name for name, v in (("budget", budget), ("activation_budget", activation_budget), ("gpu", gpu))
             if v is not None]
    if len(given) != 1:
        raise ValueError(f"actfx.plan needs exactly one of budget=, activation_budget= or gpu=, got "
                         f"{', '.join(given) or 'none'}; e.g. actfx.plan(model, x, budget='6GiB')")
    if batch is not None and gpu is None:
        raise ValueError("batch= goes with gpu= (fit that batch on that GPU); with budget= or activation_budget= "
                         "the batch is the one of example_inputs")
    if path not in PATHS:
        raise ValueError(f"path must be one of {', '.join(PATHS)}, got {path!r}")
    if memory_budget is not None and path != "compile":
        raise ValueError("memory_budget= is the compiled partitioner's; it goes with path='compile'")
    if path == "compile":
        from actfx.compiled import _check_budget

        memory_budget = _check_budget(memory_budget)
    if not (recompute == "auto" or recompute is False or (
            isinstance(recompute, (int, float)) and not isinstance(recompute, bool) and 0 <= recompute <= 1)):
        raise ValueError(f"recompute must be 'auto', False or a fraction of the forward's FLOPs in [0, 1], "
                         f"got {recompute!r}")
    if recompute not in ("auto", False, 0) and path == "compile":
        raise ValueError("recompute= is the eager path's; with path='compile' the partitioner chooses what to "
                         "recompute (pass memory_budget=)")
    if optimizer not in OPTIMIZER_STATES:
        raise ValueError(f"unknown optimizer {optimizer!r}; use one of {', '.join(OPTIMIZER_STATES)}")
    check_bits(bits)
    limit = None if gpu is not None else _bytes(budget if budget is not None else activation_budget,
                                                   "budget" if budget is not None else "activation_budget")
    capacity = GPUS[_gpu(gpu)] if gpu is not None else None
    inputs = example_inputs if isinstance(example_inputs, (tuple, list)) else (example_inputs,)
    if any(isinstance(x, (dict, tuple, list)) for x in inputs):
        raise TypeError("actfx.plan takes positional inputs (a tensor or a tuple of them), not keywords or "
                        "nested (args, kwargs); plan a small wrapper module whose forward passes them on")
    calibration = calibration_inputs if calibration_inputs is not None else inputs
    calibration = calibration if isinstance(calibration, (tuple, list)) else (calibration,)
    if any(isinstance(x, torch.Tensor) and x.is_meta for x in calibration):
        raise ValueError("calibration needs real tensors: example_inputs are on the meta device, so pass "
                         "calibration_inputs=(a small real batch,)")
    base = Config(bits=bits, group_size=group_size)
    converted = _quiet_convert(model, config=base)
    _capture_now(converted, calibration)
    planned_inputs = with_batch(inputs, batch) if batch is not None else inputs
    step = None
    fit_batch = gpu is not None and batch is None
    if fit_batch:
        batch, step = largest_batch(model, converted, inputs, GPUS[_gpu(gpu)], optimizer=optimizer, dtype=dtype)
        planned_inputs = with_batch(inputs, batch)
    if path == "compile":
        for _ in range(4):
            try:
                return _plan_compiled_at(model, planned_inputs, calibration, capacity=capacity, limit=limit,
                                         activation_budget=activation_budget, gpu=gpu, optimizer=optimizer,
                                         dtype=dtype, base=base, memory_budget=memory_budget, loss_fn=loss_fn)
            except _CompiledOverBudget as over:
                error = over.error
                # the batch was sized for the eager conversion at the default width, which can
                # hold less than the compiled partition (values it keeps exact): shrink to fit
                if not fit_batch:
                    raise error from None
                fixed = over.fixed_bytes
                now = batch_of(planned_inputs)
                smaller = math.floor(now * (capacity - fixed) / max(error.smallest - fixed, 1) * 0.99)
                if not 1 <= smaller < now:
                    raise error from None
                planned_inputs, step = with_batch(inputs, smaller), None
        raise error
    settings = dict(limit=limit, capacity=capacity, activation_budget=activation_budget, gpu=gpu, optimizer=optimizer,
                    dtype=dtype, calibration=tuple(calibration), loss_fn=loss_fn, group_size=group_size,
                    recompute=recompute, bits=bits)
    return _best_of_attention_variants(model, converted, base, planned_inputs, step, settings)


def _best_of_attention_variants(model, converted, base, planned_inputs, step, settings) -> Plan:
    """The plan with the lower predicted variance of two conversions where the model has
    attention that may read packed probabilities (``Config.attention_math``): q and k then take
    any width, at 2 S values per query row more. The built-in ViT's widths-only plan at uniform
    2-bit's bytes: see README ("Planning to a budget")."""
    plans, errors = [], []
    try:
        plans.append(_plan_widths(model, converted, base, planned_inputs, step, **settings))
    except BudgetError as err:
        errors.append(err)
    if any(d.kind == "sdpa" for d in converted._actfx_record.decisions):
        math_base = dataclasses.replace(base, attention_math=True)
        try:
            math_converted = _quiet_convert(model, config=math_base)
            _capture_now(math_converted, settings["calibration"])
            plans.append(_plan_widths(model, math_converted, math_base, planned_inputs, None, **settings))
        except BudgetError as err:
            errors.append(err)
        except Exception as err:  # noqa: BLE001 - a second way to plan; the first stands on its own
            warnings.warn(f"actfx.plan: planning {type(model).__name__} with attention reading packed probabilities "
                          f"failed ({type(err).__name__}: {str(err).splitlines()[0][:160] if str(err) else ''}); "
                          "the plan keeps the fused attention", stacklevel=4)
    if not plans:
        raise min(errors, key=lambda e: e.smallest)
    result, chosen = min(plans, key=lambda p: p[0].gradient_variance)
    warn_if_compounding(model, chosen, settings["calibration"], settings["loss_fn"], result.gradient_variance)
    return result


def _plan_widths(model, converted, base, planned_inputs, step, *, limit, capacity, activation_budget, gpu, optimizer,
                 dtype, calibration, loss_fn, group_size, recompute, bits) -> tuple:
    """(the eager plan, the model converted with it) for ``converted`` (``model`` converted with
    ``base``) at the batch of ``planned_inputs``: widths (and recomputed blocks) within the budget."""
    inventory, peak, (room, words, total) = _budget_at(model, converted, planned_inputs, step, limit=limit,
                                                       capacity=capacity, activation_budget=activation_budget,
                                                       gpu=gpu, optimizer=optimizer, dtype=dtype)
    if not inventory.groups and any(any(s.startswith("packed") for s in d.saved) for d in converted._actfx_record.decisions):
        # packs made where the measured forward does not see them one by one: only in submodules
        # of a root neither fx nor torch.export captured (Hugging Face PhiMoE's custom Function)
        warnings.warn(f"actfx.plan: {type(model).__name__}'s packs are made inside submodules of a forward that "
                      "neither fx nor torch.export captured, where the plan cannot list them: the plan keeps the "
                      "default widths; plan the submodules that convert on their own", stacklevel=4)
    sensitivity = _sensitivities(model, converted, inventory, tuple(calibration), loss_fn, group_size)
    planned = [g for g in inventory.groups if joint_key(g) in sensitivity or any(p.key in sensitivity for p in g.packs)]
    fixed = [g for g in inventory.groups if g not in planned]
    fixed_bytes = inventory.other_bytes + sum(g.nbytes(g.packs[0].bits, group_size) for g in fixed)
    sources = _rebuild_sources(converted._actfx_record.decisions)
    options = [option(g, sensitivity, group_size, exact=not any(p.key[:2] in sources for p in g.packs))
               for g in planned]
    blocks, allowance, unmeasured, charged, shrinks, shrunk = [], 0, None, False, 0, 0
    only_to_fit = False  # "auto" past its allowance: blocks added only while no widths fit
    if recompute not in (False, 0):
        blocks, allowance, unmeasured = _offered_blocks(model, converted, base, planned_inputs, planned, recompute,
                                                        dtype, calibration)
    for _ in range(8):
        try:
            try:
                picked = pick(options, blocks, room - fixed_bytes, None if only_to_fit else allowance)
            except BudgetError:
                if recompute != "auto" or only_to_fit:
                    raise
                only_to_fit = True
                if unmeasured:
                    warnings.warn(unmeasured, stacklevel=4)
                picked = pick(options, blocks, room - fixed_bytes, None)
        except BudgetError as err:
            # what the packs' estimate misses, as measured on earlier tries: the room shrank by it
            smallest = fixed_bytes + err.smallest + shrunk
            what = (f"held activations of at least {format_bytes(smallest)}" if activation_budget is not None
                    else f"a peak of at least {format_bytes(peak.peak(smallest))}")
            rerun = " (recomputing the blocks where that helps)" if blocks else ""  # None/[]: none offered
            raise BudgetError(f"cannot meet the {words}: every planned op at 1 bit{rerun} still needs {what}; "
                              "raise the budget or lower the batch", peak.peak(smallest)
                              if activation_budget is None else smallest) from None
        widths = [picked.widths.get(i) for i in range(len(planned))]
        result = assemble(inventory, planned, widths, options, fixed_bytes, peak, bits, group_size,
                          batch_of(planned_inputs), words, picked.blocks)
        result = dataclasses.replace(result, attention_math=base.attention_math)
        # Measure what the chosen widths really hold and need (an op whose input is kept exact
        # may keep statistics it recomputes from a pack), and correct the room by any excess.
        chosen = _quiet_convert(model, config=result.config())
        _capture_now(chosen, calibration)
        held = measure(chosen, planned_inputs, dtype=dtype).activation_bytes
        step = step_bytes(chosen, planned_inputs, dtype=dtype)
        result = dataclasses.replace(result, activation_bytes=held, predicted_peak_bytes=peak.peak(held, step),
                                     ops=tuple(sorted({d.key for d in chosen._actfx_record.decisions})))
        over = (held - limit if activation_budget is not None else result.predicted_peak_bytes - total)
        if over <= 0:
            return result, chosen
        excess = over if activation_budget is not None else math.ceil(over / peak.fragmentation)
        if picked.blocks and not charged:
            # first charge a recomputed block what it holds beyond its inputs (once): shrinking
            # the room instead would squeeze every width and could undo the gain of recomputing
            charged = True
            share = math.ceil(excess / len(picked.blocks))
            # and every repeat of it (layers.3 for layers.0): a repeat cuts the same rebuild
            # chains, and charged one at a time each was tried in turn (HF BERT: 9 captures, 2x the plan's time)
            like = {_repeat_pattern(b.path) for b in picked.blocks}
            blocks = [dataclasses.replace(b, extra=b.extra + share) if _repeat_pattern(b.path) in like else b
                      for b in blocks]
        elif picked.blocks and not only_to_fit:
            # recomputed modules again held more than their inputs (a module boundary that cuts a
            # rebuild chain makes the op outside pack on its own): offer only the outermost
            # blocks, less those that failed charged (BERT's embeddings were tried four times),
            # then none (widths only fit this room); shrinking the room instead narrowed
            # every width to 1 bit, where noise compounds (EfficientNet-B0 at 64 px: a gradient
            # 7.7e6x its norm off)
            failed = {_repeat_pattern(b.path) for b in picked.blocks}
            outer = [b for b in outermost(blocks) if _repeat_pattern(b.path) not in failed]
            blocks, charged = (outer if len(outer) < len(blocks) else []), False
        else:
            shrinks += 1
            room -= excess * shrinks  # widening steps: an excess that survives one correction
            shrunk += excess * shrinks
    raise BudgetError(f"cannot meet the {words}: the closest plan found holds {format_bytes(result.activation_bytes)}"
                      f" and peaks at {format_bytes(result.predicted_peak_bytes)}; raise the budget or lower the "
                      "batch", result.activation_bytes if activation_budget is not None
                      else result.predicted_peak_bytes)


def _quiet_convert(model: nn.Module, **options) -> nn.Module:
    """``convert(model, **options)`` without its note that the first training call captures the
    model: the plan makes that call itself (``_capture_now``), once for every conversion it tries."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"actfx\.convert: .* does not trace as a whole")
        return convert(model, **options)


def _capture_now(converted: nn.Module, calibration: tuple) -> None:
    """One training forward on the calibration inputs: a model fx cannot trace is captured by
    torch.export at its first real training call, and the plan must measure that capture (fake
    and meta calls capture nothing). The model's buffers (BatchNorm's statistics) are restored.
    Models fx converted need nothing (a real forward would only compile pack kernels)."""
    if not converted._actfx_record.capture_pending:
        return
    if batch_of(calibration) == 1:
        # export fixes a batch of 1 into the capture, and the plan measures other batches
        calibration = tuple(torch.cat([x, x]) if isinstance(x, torch.Tensor) and x.dim() > 0 else x
                            for x in calibration)
    with buffers_restored(converted), torch.enable_grad(), training_mode(converted, True):
        converted(*calibration)


class _CompiledOverBudget(Exception):
    """A compile plan over its budget: the user's BudgetError, and the peak's fixed bytes."""

    def __init__(self, error: BudgetError, fixed_bytes: int):
        super().__init__(str(error))
        self.error, self.fixed_bytes = error, fixed_bytes


def _budget_at(model, converted, planned_inputs, step, *, limit, capacity, activation_budget, gpu, optimizer,
               dtype) -> tuple:
    """(inventory, peak model, _room) at the batch of ``planned_inputs``; ``step``: the step's
    measured bytes there, or None to measure them."""
    inventory = take_inventory(converted, planned_inputs, dtype=dtype)
    if step is None:
        step = step_bytes(converted, planned_inputs, dtype=dtype)
    peak = peak_model(model, step, inventory.measured.activation_bytes, optimizer=optimizer, gpu=gpu is not None,
                      dtype=dtype)
    return inventory, peak, _room(peak, limit, capacity, activation_budget, gpu, planned_inputs)


def _room(peak, limit, capacity, activation_budget, gpu, planned_inputs) -> tuple:
    """(bytes the held activations may take, the budget in words, the peak budget)."""
    words, total = _budget_words(limit, capacity, activation_budget, gpu, planned_inputs)
    return (limit if activation_budget is not None else peak.activation_room(total)), words, total


def _budget_words(limit, capacity, activation_budget, gpu, planned_inputs) -> tuple:
    """(the budget in words, the peak budget; None for an activation budget)."""
    if activation_budget is not None:
        return f"activation budget {format_bytes(limit)}", None
    total = capacity if gpu is not None else limit
    words = (f"{gpu} ({format_bytes(total)}) at batch {batch_of(planned_inputs)}" if gpu is not None
             else f"peak budget {format_bytes(total)}")
    return words, total


def _plan_compiled_at(model, planned_inputs, calibration, *, capacity, limit, activation_budget, gpu, optimizer,
                      dtype, base, memory_budget, loss_fn) -> Plan:
    """The compile plan at the batch of ``planned_inputs``; over budget: _CompiledOverBudget.
    Its peak is the compiled step's (``make_compiled``), not the eager conversion's."""
    from actfx.planner.make_compiled import plan_compiled

    words, total = _budget_words(limit, capacity, activation_budget, gpu, planned_inputs)
    fixed = peak_model(model, 0, 0, optimizer=optimizer, gpu=gpu is not None, dtype=dtype).fixed_bytes
    try:
        result = plan_compiled(model, tuple(planned_inputs), tuple(calibration), activation_limit=(
            limit if activation_budget is not None else None), peak_limit=total, words=words,
            batch=batch_of(planned_inputs), base=base, memory_budget=memory_budget, loss_fn=loss_fn,
            optimizer=optimizer, gpu=gpu is not None, dtype=dtype)
    except BudgetError as err:
        raise _CompiledOverBudget(err, fixed) from None
    over = (result.activation_bytes - limit if activation_budget is not None
            else result.predicted_peak_bytes - total)
    if over > 0:
        raise _CompiledOverBudget(BudgetError(
            f"cannot meet the {words}: the closest compiled plan found holds {format_bytes(result.activation_bytes)} "
            f"and peaks at {format_bytes(result.predicted_peak_bytes)}; raise the budget or lower the batch",
            result.activation_bytes if activation_budget is not None else result.predicted_peak_bytes), fixed)
    return result


def _repeat_pattern(path: str) -> str:
    """``path`` with its container indices blanked: ``encoder.layer.#.attention``."""
    return re.sub(r"(?:(?<=\.)|^)\d+(?=\.|$)", "#", path)


def _offered_blocks(model, converted, base: Config, inputs, planned, recompute, dtype, calibration) -> tuple:
    """``_blocks``, warning where no blocks could be measured: at once for an explicit fraction;
    for ``"auto"`` (returned as the third item) only once the widths alone miss the budget, since
    recompute is then a gain on top of widths and its measurement never stops a plan."""
    try:
        blocks, allowance, unmeasured = _blocks(model, converted, base, inputs, planned, recompute, dtype, calibration)
    except Exception as err:  # noqa: BLE001 - re-raised for an explicit fraction
        if recompute != "auto":
            raise
        warnings.warn(f"actfx.plan: measuring which modules of {type(model).__name__} could be recomputed failed "
                      f"({type(err).__name__}: {str(err).splitlines()[0][:160] if str(err) else ''}); the plan "
                      "chooses widths only (recompute=False skips the measurement)", stacklevel=5)
        return [], 0, None
    if unmeasured and recompute != "auto":
        warnings.warn(unmeasured, stacklevel=5)
        unmeasured = None
    return blocks, allowance, unmeasured


def _blocks(model, converted, base: Config, inputs, planned, recompute, dtype, calibration) -> tuple:
    """(the blocks the plan may recompute, the FLOPs it may spend on them, why none were measured
    or None). Only blocks the conversion can wrap count, each checked by converting with every
    candidate of its depth named (and calling it, where torch.export captures blocks one by one
    at their first call); in a root torch.export captured, the blocks its flat graph can
    outline (``passes/outline_recompute``; converting again would capture again)."""
    units = {u for g in planned for u in g.units}
    paths = candidate_paths(model, units)
    captured = converted._actfx_record.captured.get("")
    if captured is not None:  # a root torch.export captured: the blocks its flat graph can outline
        present = outlinable(captured, paths)
    else:
        present = set()
        for depth in sorted({p.count(".") for p in paths}):  # paths of one depth never nest: one conversion each
            level = tuple(p for p in paths if p.count(".") == depth)
            wrapped = _quiet_convert(model, config=dataclasses.replace(base, recompute_modules=level))
            _capture_now(wrapped, calibration)  # blocks torch.export captures at their first call, one by one
            present |= {d.module_path for d in wrapped._actfx_record.decisions if d.kind == CHECKPOINT}
    paths = [p for p in paths if p in present]
    try:
        blocks, total = measure_blocks(model, inputs, paths, planned, dtype=dtype)
    except Exception as err:  # noqa: BLE001 - re-raised unless the forward reads tensor values
        if type(err).__name__ not in DATA_DEPENDENT:
            raise
        # shapes that depend on values (MoE routing's nonzero) have no fake-tensor run
        return [], 0, (f"actfx.plan: {type(model).__name__}'s forward has shapes that depend on tensor values "
                       f"({type(err).__name__}), so the modules it could recompute were not measured; the plan "
                       "chooses widths only")
    return blocks, (AUTO_SHARE if recompute == "auto" else recompute) * total, None


def _sensitivities(model, converted, inventory, calibration: tuple, loss_fn, group_size: int) -> dict:
    """{pack key or ``joint_key(group)``: PackSensitivity}: noise put into PyTorch's saved tensors
    where a pack stands for one (one forward for all), else the converted model probed one group
    at a time, its other packs rounded together."""
    found = pack_sensitivities(model, trace_like(model, converted), converted._actfx_record.decisions,
                               calibration, loss_fn=loss_fn, group_size=group_size)
    sensitivity = dict(found)
    unmeasured = {joint_key(g): {p.key for p in g.packs if p.key not in sensitivity} for g in inventory.groups}
    unmeasured = {name: keys for name, keys in unmeasured.items() if keys}
    floors = {p.key: p.source.floor for g in inventory.groups for p in g.packs}
    sensitivity.update(probed_sensitivities(converted, calibration, unmeasured, loss_fn=loss_fn,
                                            group_size=group_size, floors=floors))
    return sensitivity


def _rebuild_sources(decisions) -> set:
    """(graph path, value) of the packs others are rebuilt from (BN's input under a ReLU's mask,
    a residual sum's terms): keeping one exact would change how those values are stored, so it
    is not offered."""
    found = set()

    def walk(path, tree, inside):
        if tree is None:
            return
        if tree[0] in ("pack", "normalized"):
            if inside:  # a tree names the packed value, not whether the pack is derived: match both
                found.add((path, tree[1]))
            return
        for part in tree[1:]:
            if isinstance(part, tuple):  # BatchNorm reading its own x̂ rebuilds nothing else
                walk(path, part, inside or tree[0] != "unnormalized")

    for d in decisions:
        for tree in d.sources:
            walk(d.graph_path, tree, False)
    return found


def _gpu(name: str) -> str:
    key = str(name).lower()
    if key not in GPUS:
        raise ValueError(f"unknown GPU {name!r}; use one of {', '.join(GPUS)}, or budget='24GiB'")
    return key


def _bytes(value, name: str) -> int:
    n = parse_bytes(value) if isinstance(value, str) else value
    if isinstance(n, bool) or not isinstance(n, (int, float)) or not 0 < n < math.inf:  # NaN fails too
        raise ValueError(f"{name} must be a positive number of bytes or a string such as '6GiB', got {value!r}")
    return int(n)
