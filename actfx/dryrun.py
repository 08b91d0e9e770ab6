"""The dry run behind ``actfx report`` and ``actfx show``: build, convert, measure both, on fake tensors.

Nothing is allocated at the requested size and nothing runs on a GPU: the model is built on the
meta device where it allows it, inputs are meta tensors, and both forwards run on fake tensors
(``actfx.passes.analyze``). Each stage is a named step so callers can show progress.
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Callable

import torch
import torch.nn as nn

import actfx
from actfx.breakdown import Row, breakdown
from actfx.passes.analyze import DATA_DEPENDENT, Measurement, measure
from actfx.specs import ResolvedSpec, SpecError, build

STEPS = ("building the model", "converting", "measuring the original", "measuring actfx")


class StageError(RuntimeError):
    """A stage failed on the user's model or input; ``stage`` names it, the cause is chained."""

    def __init__(self, stage: str, err: BaseException):
        super().__init__(f"{stage} failed: {type(err).__name__}: {_first_line(err)}")
        self.stage = stage


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else "(no message)"


@dataclasses.dataclass
class DryRun:
    model: nn.Module
    converted: nn.Module
    inputs: tuple
    dtype: torch.dtype | None
    before: Measurement | None
    after: Measurement | None
    rows: list  # Row


def dry_run(spec: ResolvedSpec, input_shape: tuple | None, input_dtype: torch.dtype, *, bits: int,
            dtype: torch.dtype | None = None, step: Callable[[str], None] = lambda name: None,
            plan: actfx.Plan | None = None) -> DryRun:
    """Build ``spec``, convert it at ``bits`` (or with ``plan``'s widths) and measure both
    forwards on one batch of ``input_shape`` (no measuring when it is None: the rows then list ops
    without bytes)."""
    step(STEPS[0])
    model = _stage(STEPS[0], lambda: build(spec))
    step(STEPS[1])
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        converted = _stage(STEPS[1], lambda: actfx.convert(model, plan=plan) if plan is not None
                           else actfx.convert(model, bits=bits))
    inputs = () if input_shape is None else (torch.empty(input_shape, dtype=input_dtype, device="meta"),)
    measured = None  # the captured model's measurement, taken while checking that it runs
    if inputs and converted._actfx_record.capture_pending and on_meta(model):
        captured = _captured_on_meta(model, inputs, spec, dtype, converted._actfx_record.config)
        if captured is not None:
            (converted, measured), said = captured, []  # fx's partial view: moot
    for w in said:
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    before = after = None
    if input_shape is not None:
        step(STEPS[2])
        try:
            before = measure(model, inputs, dtype=dtype, like=converted)
        except Exception as err:  # noqa: BLE001 - named by _stage below unless it reads values
            failure = err
            if type(err).__name__ not in DATA_DEPENDENT or not on_meta(model):
                before = _stage(f"running {spec.text} on input {list(input_shape)}", lambda: _raise(failure))
            # The forward reads tensor values: only a real model can run it (on random inputs).
            model = _stage(STEPS[0], spec.factory)
            with warnings.catch_warnings():  # the first conversion already warned about the same model
                warnings.simplefilter("ignore")
                converted = _stage(STEPS[1], lambda: actfx.convert(model, plan=plan) if plan is not None
                                   else actfx.convert(model, bits=bits))
            before = _stage(f"running {spec.text} on input {list(input_shape)}",
                            lambda: measure(model, inputs, dtype=dtype, like=converted))
            measured = None  # of the model replaced above
        step(STEPS[3])
        after = measured if measured is not None else _stage(
            f"running converted {spec.text}", lambda: measure(converted, inputs, dtype=dtype))
    rows: list[Row] = breakdown(converted, before, after)
    return DryRun(model, converted, inputs, dtype, before, after, rows)


def _captured_on_meta(model, inputs, spec, dtype, config):
    """(the whole model captured by torch.export (``convert_on_meta``), as its first training
    call would, in ``dtype`` (the graph records it); its measurement), or None where that
    fails: the fx conversion then stays, with a warning."""
    from actfx.convert import convert_on_meta

    if dtype is not None:
        model.to(dtype)  # meta tensors: nothing is allocated
    try:
        captured = convert_on_meta(model, config, inputs)
        # runs on fake CPU tensors, where not every op has a kernel
        return captured, measure(captured, inputs, dtype=dtype)
    except Exception as err:  # noqa: BLE001 - export raises many kinds; fx's part is still measured
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        warnings.warn(f"actfx: torch.export could not capture {spec.text} on meta tensors ({first}); the report "
                      "counts what fx converted", stacklevel=3)
        return None


def on_meta(model: nn.Module) -> bool:
    return any(t.is_meta for t in [*model.parameters(), *model.buffers()])


def _raise(err: BaseException):
    raise err


def _stage(name: str, fn):
    try:
        return fn()
    except (StageError, SpecError):
        raise
    except Exception as err:  # noqa: BLE001 - the user's code can raise anything; name the stage
        if type(err).__name__ in DATA_DEPENDENT:
            err = RuntimeError(
                f"the forward branches on tensor values ({type(err).__name__}), which a dry run on fake tensors "
                "cannot evaluate; measure it on real inputs in Python: actfx.show(actfx.convert(model), inputs)")
        raise StageError(name, err) from err

