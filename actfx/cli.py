"""The ``actfx`` command: ``report`` (training memory before/after, largest batch), ``show`` (op by op),
``plan`` (a width per op for a memory budget), ``models`` (the built-in names).

Bad input (an unknown spec, an import error, a factory that raises, a malformed shape, invalid
bits or GPU) ends with one line that says what is wrong and how to fix it, and exit code 2;
``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import sys
import time

import torch
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from actfx.config import check_bits
from actfx.kernels import TERNARY
from actfx.dryrun import STEPS, StageError, dry_run, on_meta
from actfx.models import list_models
from actfx.report import GPUS, OPTIMIZER_STATES, gpu_capacity, static_costs
from actfx.specs import SpecError, build, resolve
from actfx.units import parse_bytes

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
INPUT_DTYPES = {**DTYPES, "long": torch.long, "int64": torch.long, "int32": torch.int32}


class UsageError(ValueError):
    """Bad command-line input; the message says how to fix it."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line and exit 2, instead of usage + message
        raise UsageError(f"{message} (see `{self.prog} --help`)")


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="actfx", description="Dry-run memory reports for actfx: no GPU, no real batch.")
    sub = parser.add_subparsers(dest="command", metavar="{report,show,plan,models}", parser_class=_Parser)
    sub.required = True

    def common(p, shape_required):
        p.add_argument("spec", help="built-in name (actfx models), torchvision:NAME, timm:NAME, "
                                    "transformers:TYPE, path/to/file.py:factory or package.module:attr")
        p.add_argument("--input-shape", required=shape_required, metavar="B,C,H,W",
                       help="input shape with the batch first, e.g. 64,3,224,224 or 8,512")
        p.add_argument("--input-dtype", metavar="DTYPE",
                       help=f"input dtype: {', '.join(INPUT_DTYPES)} (default: the model's, else --dtype)")
        p.add_argument("--dtype", default="float32", metavar="DTYPE",
                       help="dtype parameters and activations are held in: float32, bfloat16, float16")
        p.add_argument("--bits", default="2", help="bits per saved activation: 1, 1.6 (three levels), 2, 4 or 8 (default 2)")
        p.add_argument("--debug", action="store_true", help="show tracebacks")

    report = sub.add_parser("report", help="activation and peak training memory, baseline vs actfx")
    common(report, True)
    report.add_argument("--gpu", metavar="NAME", help=f"GPU for the largest-batch estimate: {', '.join(GPUS)}")
    report.add_argument("--gpu-memory", metavar="SIZE", help="GPU memory instead of --gpu, e.g. 16GiB or 24GB")
    report.add_argument("--optimizer", default="adamw", metavar="NAME",
                        help=f"optimizer whose state to count: {', '.join(OPTIMIZER_STATES)} (default adamw)")
    report.add_argument("--json", metavar="PATH", help="also write the full report as JSON (- for stdout: "
                        "JSON alone there, the table on stderr)")
    report.add_argument("--top", default="10", metavar="N", help="layers to list (default 10)")
    report.add_argument("--compile", action="store_true",
                        help="what actfx.compile would save: the partition on meta tensors, no code generated")
    report.add_argument("--memory-budget", metavar="F", help="with --compile: the partitioner's "
                        "activation_memory_budget, 0 < F <= 1 (default: PyTorch's)")
    report.add_argument("--plan", metavar="PATH", help="convert with this plan (actfx plan --out) instead of --bits")

    plan = sub.add_parser("plan", help="a width per op so training fits a memory budget (least gradient variance)")
    common(plan, True)
    plan.add_argument("--budget", metavar="SIZE", help="peak training memory to fit, e.g. 6GiB")
    plan.add_argument("--activation-budget", metavar="SIZE", help="bytes held for backward at --input-shape's batch")
    plan.add_argument("--gpu", metavar="NAME", help=f"fit a GPU: {', '.join(GPUS)} (with --batch, or the largest batch)")
    plan.add_argument("--batch", metavar="N", help="with --gpu: the batch to fit")
    plan.add_argument("--optimizer", default="adamw", metavar="NAME",
                      help=f"optimizer whose state to count: {', '.join(OPTIMIZER_STATES)} (default adamw)")
    plan.add_argument("--calibration-shape", metavar="B,C,H,W",
                      help="shape of the random batch the sensitivities are measured on (default: one sample, "
                           "dims after the first two cut to 64 when the model accepts that)")
    plan.add_argument("--compile", action="store_true",
                      help="plan for actfx.compile: widths per value the compiled pass packs (default: actfx.convert)")
    plan.add_argument("--memory-budget", metavar="F", help="with --compile: the partitioner's "
                      "activation_memory_budget to plan under, 0 < F <= 1 (default: PyTorch's)")
    plan.add_argument("--recompute", metavar="R", help="blocks the plan may rerun in backward from exact inputs: "
                      "a fraction of the forward's FLOPs in (0, 1] to spend where that lowers the gradient "
                      "error, auto (the default: 0.3, and more where no widths fit) or off")
    plan.add_argument("--out", metavar="PATH", help="write the plan as JSON (actfx.Plan.load, actfx report --plan)")

    show = sub.add_parser("show", help="each op: what backward saves, before -> after")
    common(show, False)

    models = sub.add_parser("models", help="list the built-in models")
    models.add_argument("--debug", action="store_true", help=argparse.SUPPRESS)
    return parser


# ---------------------------------------------------------------- argument checks


def _shape(text: str | None) -> tuple | None:
    if text is None:
        return None
    try:
        shape = tuple(int(part) for part in text.replace("x", ",").split(","))
    except ValueError:
        shape = ()
    if not shape or any(d <= 0 for d in shape):
        raise UsageError(f"--input-shape {text!r} is not a shape; write positive sizes with the batch "
                         "first, separated by commas, e.g. 64,3,224,224")
    return shape


def _int(text: str, flag: str, low: int = 1) -> int:
    try:
        value = int(text)
    except ValueError:
        raise UsageError(f"{flag} must be an integer, got {text!r}") from None
    if value < low:
        raise UsageError(f"{flag} must be at least {low}, got {value}")
    return value


def _choice(text: str, table: dict, flag: str):
    if text.lower() not in table:
        raise UsageError(f"{flag} {text!r} is not supported; use one of {', '.join(table)}")
    return table[text.lower()]


def _bits(text: str) -> int | float:
    try:
        return check_bits(TERNARY if text.strip() == "1.6" else int(text))
    except (ValueError, TypeError):
        raise UsageError(f"--bits {text!r} is not supported; use 1, 1.6 (three levels), 2, 4 or 8") from None


# ---------------------------------------------------------------- commands


@dataclasses.dataclass(frozen=True)
class _Options:
    shape: tuple | None
    dtype: torch.dtype
    input_dtype: torch.dtype | None  # None: the model's own, else dtype
    bits: int
    capacity: int | None = None
    optimizer: str = "adamw"
    top: int = 10


def _options(args) -> _Options:
    """Every flag checked before anything is imported or built, so bad input fails fast."""
    options = _Options(
        shape=_shape(args.input_shape),
        dtype=_choice(args.dtype, DTYPES, "--dtype"),
        input_dtype=_choice(args.input_dtype, INPUT_DTYPES, "--input-dtype") if args.input_dtype else None,
        bits=_bits(args.bits),
    )
    if args.command != "report":
        return options
    if args.plan is not None and args.bits != "2":
        raise UsageError("--plan and --bits both set the widths; give one")
    try:
        capacity = gpu_capacity(args.gpu, args.gpu_memory)
    except ValueError as err:
        raise UsageError(str(err)) from None
    optimizer = _choice(args.optimizer, {k: k for k in OPTIMIZER_STATES}, "--optimizer")
    return dataclasses.replace(options, capacity=capacity, optimizer=optimizer, top=_int(args.top, "--top"))


def _check_rank(args, spec, shape) -> None:
    """A built-in spec's input has a known rank: a shape of another rank is the user's slip."""
    if shape is not None and spec.input_shape is not None and len(shape) != len(spec.input_shape) + 1:
        sample = ", ".join(map(str, spec.input_shape))
        raise UsageError(f"--input-shape {args.input_shape} has {len(shape)} sizes but {args.spec} takes "
                         f"[batch, {sample}]; e.g. --input-shape 8,{sample.replace(' ', '')}")


def _dry_run(args, options: _Options, err_console: Console):
    spec = resolve(args.spec)
    shape = options.shape
    _check_rank(args, spec, shape)
    input_dtype = options.input_dtype
    if input_dtype is None:
        input_dtype = spec.input_dtype if spec.input_dtype not in (None, torch.float32) else options.dtype
    steps = STEPS if shape is not None else STEPS[:2]
    try:
        with _progress(err_console, steps) as step:
            run = dry_run(spec, shape, input_dtype, bits=options.bits, step=step, plan=_load_plan(args),
                          dtype=None if options.dtype == torch.float32 else options.dtype)
        if run.before is not None and run.before.on_real_tensors:
            err_console.print("note: the forward branches on tensor values, so it ran for real on random inputs "
                              "of that shape (not a dry run on fake tensors)", highlight=False)
        return run
    except StageError as err:
        if spec.input_shape is None or shape is None or tuple(shape[1:]) == tuple(spec.input_shape) \
                or err.stage == STEPS[1]:  # conversion does not depend on the input shape
            raise
        sample = ",".join(map(str, spec.input_shape))
        raise UsageError(f"{err}; {args.spec} is built for inputs of [batch, {sample.replace(',', ', ')}]: "
                         f"try --input-shape {shape[0]},{sample}") from None


def _load_plan(args):
    path = getattr(args, "plan", None)
    if path is None:
        return None
    from actfx.planner.plan import Plan

    try:
        return Plan.load(path)
    except OSError as err:
        raise UsageError(f"cannot read --plan {path!r}: {err.strerror}; write one with actfx plan ... --out") from None
    except ValueError as err:
        raise UsageError(str(err)) from None


@contextlib.contextmanager
def _progress(console: Console, steps: tuple):
    """A bar over the dry run's steps on a terminal (gone when done); nothing on a pipe."""
    if not console.is_terminal:
        yield lambda name: None
        return
    with Progress(TextColumn("{task.description}"), BarColumn(), TimeElapsedColumn(),
                  console=console, transient=True) as progress:
        task = progress.add_task(steps[0], total=len(steps))

        def step(name):
            if name != steps[0]:
                progress.advance(task)
            progress.update(task, description=name)

        yield step
        progress.advance(task)


def _report(args, console: Console, err_console: Console, started: float) -> int:
    from actfx.report_view import render, summarize

    if args.memory_budget is not None and not args.compile:
        raise UsageError("--memory-budget applies to the compiled path; add --compile")
    if args.compile:
        return _report_compiled(args, console, started)
    options = _options(args)
    run = _dry_run(args, options, err_console)
    costs = static_costs(run.model, options.optimizer, run.dtype)
    summary = summarize(run, costs, spec=args.spec, bits=options.bits, optimizer=options.optimizer, gpu=args.gpu,
                        capacity=options.capacity, top=options.top, seconds=time.perf_counter() - started,
                        plan=args.plan)
    if args.json == "-":  # JSON alone on stdout (for pipes), the table on stderr
        render(summary, Console(stderr=True, width=200, no_color=True, highlight=False))
        print(json.dumps(summary, indent=1))
        return 0
    render(summary, console)
    if args.json:
        try:
            with open(args.json, "w") as f:
                json.dump(summary, f, indent=1)
        except OSError as err:
            raise UsageError(f"cannot write --json {args.json!r}: {err.strerror}; pick a writable path") from None
        console.print(f"wrote {args.json}", highlight=False)
    return 0


def _report_compiled(args, console: Console, started: float) -> int:
    from actfx.compiled_estimate import estimate_compiled
    from actfx.compiled_view import show_compiled
    from actfx.config import Config

    options = _options(args)
    budget = _memory_budget(args.memory_budget)
    if options.shape is None:
        raise UsageError("--compile needs --input-shape")
    plan = _load_plan(args)
    config = Config(bits=options.bits)
    if plan is not None:
        if args.memory_budget is not None:
            raise UsageError("--plan carries its own --memory-budget; give one")
        try:
            config, budget = plan.config_for("compile"), plan.memory_budget
        except ValueError as err:
            raise UsageError(str(err)) from None
    spec = resolve(args.spec)
    model = build(spec)
    dtype = options.input_dtype or (spec.input_dtype if spec.input_dtype not in (None, torch.float32) else options.dtype)
    inputs = (torch.empty(options.shape, dtype=dtype, device="meta"),) if on_meta(model) else (
        torch.zeros(options.shape, dtype=dtype) if not dtype.is_floating_point else torch.randn(options.shape, dtype=dtype),)
    try:
        record = estimate_compiled(model, inputs, config, budget)
    except Exception as err:  # noqa: BLE001 - the user's model can raise anything; name the stage
        raise StageError(f"partitioning {args.spec} on input {list(options.shape)}", err) from err
    widths = f"widths from {args.plan}" if plan is not None else f"{options.bits}-bit"
    show_compiled(record, console, f"actfx report --compile: {args.spec}, {widths} (estimate, no code generated)")
    console.print(f"done in {time.perf_counter() - started:.1f} s", highlight=False)
    return 0


def parse_recompute(text: str | None):
    """``--recompute``'s text as ``actfx.plan``'s ``recompute=`` (auto, off, or a fraction)."""
    if text is None or text == "auto":
        return "auto"
    if text == "off":
        return False
    return _fraction(text, f"--recompute {text!r} must be auto, off or a fraction in (0, 1], e.g. 0.3")


def _memory_budget(text: str | None) -> float | None:
    if text is None:
        return None
    return _fraction(text, f"--memory-budget {text!r} must be a number in (0, 1], e.g. 0.3")


def _fraction(text: str, error: str) -> float:
    """``text`` as a number in (0, 1], else a UsageError saying ``error``."""
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0.0 < value <= 1.0:
        raise UsageError(error)
    return value


def _show(args, console: Console, err_console: Console, started: float) -> int:
    from actfx.show import render

    options = _options(args)
    run = _dry_run(args, options, err_console)
    totals = (run.before.activation_bytes, run.after.activation_bytes) if run.after is not None else None
    render(run.rows, console, title=f"actfx show: {args.spec}, {options.bits}-bit", totals=totals)
    console.print(f"done in {time.perf_counter() - started:.1f} s", highlight=False)
    return 0


def _plan(args, console: Console, err_console: Console, started: float) -> int:
    from actfx.planner import BudgetError
    from actfx.planner.make import plan

    options = _options(args)
    given = [flag for flag, v in (("--budget", args.budget), ("--activation-budget", args.activation_budget),
                                  ("--gpu", args.gpu)) if v is not None]
    if len(given) != 1:
        raise UsageError(f"give exactly one of --budget, --activation-budget or --gpu (got {', '.join(given) or 'none'})")
    if args.batch is not None and args.gpu is None:
        raise UsageError("--batch goes with --gpu; with --budget or --activation-budget the batch is --input-shape's")
    batch = _int(args.batch, "--batch") if args.batch is not None else None
    if args.memory_budget is not None and not args.compile:
        raise UsageError("--memory-budget applies to the compiled path; add --compile")
    memory_budget = _memory_budget(args.memory_budget)
    recompute = parse_recompute(args.recompute)
    if args.recompute is not None and args.compile:
        raise UsageError("--recompute plans actfx.convert; with --compile the partitioner recomputes "
                         "(use --memory-budget)")
    optimizer = _choice(args.optimizer, {k: k for k in OPTIMIZER_STATES}, "--optimizer")
    sizes = {}
    for flag, text in (("--budget", args.budget), ("--activation-budget", args.activation_budget)):
        if text is not None:
            try:
                sizes[flag] = parse_bytes(text)
            except ValueError as err:
                raise UsageError(f"{flag}: {err}") from None
    if args.gpu is not None and args.gpu.lower() not in GPUS:
        raise UsageError(f"unknown GPU {args.gpu!r}; use one of {', '.join(GPUS)}, or --budget 24GiB")
    spec = resolve(args.spec)
    _check_rank(args, spec, options.shape)
    input_dtype = options.input_dtype or (spec.input_dtype if spec.input_dtype not in (None, torch.float32)
                                          else options.dtype)
    # Calibration runs one sample through hundreds of small backward passes: a second thread only
    # adds overhead there (resnet50 --gpu t4 on 2 cores: 19.7 s with one thread, 31.4 s with two).
    torch.set_num_threads(1)
    torch.manual_seed(0)  # the same random weights, hence the same plan, on every run
    model = spec.factory()  # real weights: calibration runs it
    if not isinstance(model, torch.nn.Module):
        raise UsageError(f"{args.spec} did not build a torch.nn.Module")
    example = torch.empty(options.shape, dtype=input_dtype, device="meta")
    # The model is built (and calibrated) in float32; --dtype sizes what is held and the peak.
    calibration = _calibration_input(model, args, options.shape,
                                     torch.float32 if input_dtype.is_floating_point else input_dtype)
    try:
        result = plan(model, (example,), budget=sizes.get("--budget"), activation_budget=sizes.get("--activation-budget"),
                      gpu=args.gpu, batch=batch, optimizer=optimizer, calibration_inputs=(calibration,),
                      bits=options.bits, dtype=None if options.dtype == torch.float32 else options.dtype,
                      path="compile" if args.compile else "eager", memory_budget=memory_budget,
                      recompute=recompute)
    except BudgetError as err:
        print(f"actfx: error: {err}", file=sys.stderr)
        return 2
    except ValueError as err:  # the planner's checks of what it was given (a zero budget, ...)
        raise UsageError(str(err)) from err
    except Exception as err:  # noqa: BLE001 - the model failed on this input: say where, as report does
        raise StageError(f"planning {args.spec} on input {list(options.shape)}", err) from err
    result.summary(console)
    if args.out:
        try:
            result.save(args.out)
        except OSError as err:
            raise UsageError(f"cannot write --out {args.out!r}: {err.strerror}; pick a writable path") from None
        console.print(f"wrote {args.out}", highlight=False)
    console.print(f"done in {time.perf_counter() - started:.1f} s", highlight=False)
    return 0


def _calibration_input(model, args, shape: tuple, dtype: torch.dtype) -> torch.Tensor:
    """A random real batch to measure sensitivities on: --calibration-shape, else one sample with
    the dims after the first two cut to 64 (images: 64x64) if the model runs on that, else one sample."""
    generator = torch.Generator().manual_seed(0)

    def make(s):
        if dtype.is_floating_point:
            return torch.randn(s, generator=generator, dtype=dtype)
        vocab = getattr(getattr(model, "config", None), "vocab_size", None) or 256
        return torch.randint(min(vocab, 256), s, generator=generator, dtype=dtype)

    if args.calibration_shape is not None:
        return make(_shape(args.calibration_shape))
    full = (1, *shape[1:])
    small = (1, *shape[1:2], *(min(d, 64) for d in shape[2:]))
    if small != full:
        x = make(small)
        try:
            with torch.no_grad():
                model(x)
            return x
        except Exception:  # noqa: BLE001 - the model needs its full input size
            pass
    return make(full)


def _models(args, console: Console) -> int:
    from rich.table import Table

    table = Table(box=None, pad_edge=False, header_style="bold" if console.is_terminal else "")
    for column in ("name", "input (one sample)", "description"):
        table.add_column(column)
    for spec in list_models():
        dtype = "token ids" if spec.vocab_size is not None else "float"
        table.add_row(spec.name, f"{list(spec.input_shape)} {dtype}", spec.description)
    console.print(table)
    return 0


def main(argv=None) -> int:
    """Entry point of the ``actfx`` script; returns the exit code (0, or 2 for bad input)."""
    started = time.perf_counter()
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    console = Console(highlight=False) if Console().is_terminal else Console(width=200, no_color=True, highlight=False)
    err_console = Console(stderr=True)
    try:
        with _quiet(debug):
            return _dispatch(argv, console, err_console, started)
    except (UsageError, SpecError, StageError) as err:
        if debug:
            raise
        print(f"actfx: error: {err}" + (" (--debug shows the traceback)" if isinstance(err, StageError) else ""),
              file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


@contextlib.contextmanager
def _quiet(debug: bool):
    """Fake-tensor dispatch logs a traceback before raising on a shape error; the one-line error
    says it better (``--debug`` keeps it)."""
    logger = logging.getLogger("torch._subclasses.fake_tensor")
    level = logger.level
    if not debug:
        logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


def _joined_negative_values(argv: list) -> list:
    """``--input-shape -1,3,224,224`` as ``--input-shape=-1,...``: argparse would read the value
    as an option and say "expected one argument"; this way the shape check names the problem."""
    out = []
    for arg in argv:
        if out and out[-1] in ("--input-shape", "--batch") and arg[:1] == "-" and arg[1:2].isdigit():
            out[-1] = f"{out[-1]}={arg}"
        else:
            out.append(arg)
    return out


def _dispatch(argv, console, err_console, started) -> int:
    args = _parser().parse_args(_joined_negative_values(argv))
    if args.command == "models":
        return _models(args, console)
    if args.command == "report":
        return _report(args, console, err_console, started)
    if args.command == "plan":
        return _plan(args, console, err_console, started)
    return _show(args, console, err_console, started)


if __name__ == "__main__":
    sys.exit(main())
