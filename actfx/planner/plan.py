"""``actfx.Plan``: a width per op, what it is expected to cost, saved as readable JSON.

A plan is static: ``actfx.convert(model, plan=plan)`` bakes its widths into the rewritten graph
(``Config.site_bits``), so training steps read no statistics and never sync with the host.
"""

from __future__ import annotations

import dataclasses
import json

from actfx.config import KEEP_EXACT, Config
from actfx.kernels import check_bits, check_group_size

FORMAT = "actfx-plan/1"
CHECKPOINT = "checkpoint"  # a site's op when the plan recomputes that module in backward


def site_order(key: str) -> tuple:
    """Sort key for site keys: ``:linear#10`` after ``:linear#9``."""
    base, _, occurrence = key.partition("#")
    return base, int(occurrence) if occurrence.isdigit() else 1


@dataclasses.dataclass(frozen=True)
class Site:
    """One op the plan sets the width of (``module`` path and ``op`` kind, as ``actfx.show`` names
    them); ``bytes`` and ``variance`` are those of the packs it is first consumer of."""

    module: str
    op: str
    bits: int | float  # 1, 1.6 (three levels), 2, 4, 8, or KEEP_EXACT (written "exact" in JSON)
    bytes: int
    variance: float | None  # None: not measured (kept at the default width)

    def __post_init__(self):
        if self.bits != KEEP_EXACT:
            check_bits(self.bits)
        if ":" in self.module or ":" in self.op:
            raise ValueError(f"plan site {self.module!r}/{self.op!r}: names cannot contain ':'")

    @property
    def key(self) -> str:
        return f"{self.module}:{self.op}"

    @property
    def planned(self) -> bool:
        return self.variance is not None


@dataclasses.dataclass(frozen=True)
class Plan:
    """Widths for one model at one batch, and what they are expected to cost."""

    sites: tuple  # Site
    bits: int  # the default width (ops the plan does not set)
    group_size: int
    batch: int
    activation_bytes: int  # held for backward at ``batch`` (exact: summed from the chosen packs)
    predicted_peak_bytes: int
    average_bits: float  # code bits per packed value, weighted by size (three levels: 1.625 at groups of 256)
    gradient_variance: float  # predicted, at the calibration batch (sum over measured packs)
    budget: str = ""  # what the plan was made to fit, in words
    path: str = "eager"  # "eager": sites are actfx.convert's ops; "compile": actfx.compile's saved values
    memory_budget: float | None = None  # compile: the partitioner's activation_memory_budget planned with
    ops: tuple = ()  # eager: every op the planned conversion converted (a larger model is refused)
    attention_math: bool = False  # eager: attention reads packed probabilities (``Config.attention_math``)

    def __post_init__(self):
        check_bits(self.bits)
        check_group_size(self.group_size)
        keys = [s.key for s in self.sites]
        if len(set(keys)) != len(keys):
            raise ValueError("a plan lists each module:op once; found duplicates")
        if self.path not in ("eager", "compile"):
            raise ValueError(f"a plan's path is 'eager' or 'compile', got {self.path!r}")

    def config_for(self, path: str, **given) -> Config:
        """The settings applying the plan on ``path`` ("eager": actfx.convert, "compile":
        actfx.compile); refuses a plan made for the other path, or widths ``given`` beside it."""
        apply = {"eager": "actfx.convert", "compile": "actfx.compile"}
        if self.path != path:
            raise ValueError(f"this plan was made for {apply[self.path]} (path='{self.path}'); apply it with "
                             f"{apply[self.path]}(model, plan=plan), or plan for {apply[path]} with "
                             f"actfx.plan(..., path='{path}')")
        clash = [f"{name}={value!r}" for name, value in given.items() if value is not None]
        if clash:
            raise ValueError(f"plan= and {', '.join(clash)} both set the widths; pass the plan alone "
                             "(it carries its own widths and group size)")
        return self.config()

    def config(self) -> Config:
        """The conversion settings that apply the plan."""
        return Config(bits=self.bits, group_size=self.group_size,
                      site_bits={s.key: s.bits for s in self.sites if s.planned},
                      recompute_modules=tuple(s.module for s in self.recomputed), attention_math=self.attention_math)

    @property
    def recomputed(self) -> tuple:
        """The sites of the modules the plan reruns in backward from their exact inputs."""
        return tuple(s for s in self.sites if s.op == CHECKPOINT)

    # ------------------------------------------------------------ JSON

    def to_dict(self) -> dict:
        head = {k: getattr(self, k) for k in ("bits", "group_size", "batch", "activation_bytes",
                                               "predicted_peak_bytes", "average_bits", "gradient_variance", "budget",
                                               "path", "memory_budget", "attention_math")}
        sites = [{**dataclasses.asdict(s), "bits": "exact" if s.bits == KEEP_EXACT else s.bits} for s in self.sites]
        return {"format": FORMAT, **head, "sites": sites, "ops": list(self.ops)}

    def save(self, path) -> None:
        with open(path, "w") as f:
            json.dump(self.to_dict(), f, indent=1)
            f.write("\n")

    @classmethod
    def load(cls, path) -> "Plan":
        try:
            with open(path) as f:
                data = json.load(f)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path} is not a plan: not JSON ({err}); write one with actfx plan ... --out") from None
        return cls.from_dict(data, where=str(path))

    @classmethod
    def from_dict(cls, data: dict, where: str = "plan") -> "Plan":
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise ValueError(f"{where} is not an actfx plan (expected \"format\": \"{FORMAT}\"); "
                             "write one with actfx.plan(...).save(path) or actfx plan ... --out")
        try:
            sites = tuple(Site(**{**s, "bits": KEEP_EXACT if s["bits"] == "exact" else s["bits"]})
                          for s in data["sites"])
            fields = {k: data[k] for k in ("bits", "group_size", "batch", "activation_bytes",
                                           "predicted_peak_bytes", "average_bits", "gradient_variance")}
        except (KeyError, TypeError) as err:
            raise ValueError(f"{where}: malformed plan ({type(err).__name__}: {err}); write it again with actfx plan") \
                from None
        return cls(sites=sites, budget=data.get("budget", ""), path=data.get("path", "eager"),
                   memory_budget=data.get("memory_budget"), ops=tuple(data.get("ops", ())),
                   attention_math=bool(data.get("attention_math", False)), **fields)

    # ------------------------------------------------------------ printing

    def summary(self, console=None) -> None:
        """Print per-op widths and bytes with rich."""
        from actfx.planner.view import render

        render(self, console)


def plan_config(plan, path: str, **given) -> Config:
    """``plan.config_for(path, **given)`` for a ``plan=`` argument, refusing what is not a Plan."""
    if not isinstance(plan, Plan):
        raise TypeError(f"plan must be an actfx.Plan, got {type(plan).__name__}")
    return plan.config_for(path, **given)


def _refuse_missing(missing: list) -> None:
    if missing:
        raise ValueError(f"the plan sets widths for {len(missing)} op(s) this model does not have (e.g. "
                         f"{missing[0]!r}); it was made for another model: plan this one with actfx.plan")


def check_plan_paths(site_bits, model) -> None:
    """Before converting: refuse a plan naming modules ``model`` lacks (as ``check_plan_fits``
    would after; ``Config.check_paths`` would call it a misspelt path)."""
    names = {name for name, _ in model.named_modules()}
    _refuse_missing([key for key in site_bits if key.split(":")[0] and key.split(":")[0] not in names])


def check_plan_fits(site_bits, decisions, ops=()) -> None:
    """Refuse a plan whose widths (``site_bits``) name ops the conversion's ``decisions`` lack, or,
    where the plan lists the ``ops`` it was made for, a conversion with ops beyond them: a plan
    made for another model would silently leave the default widths (a GPT-2 plan on a GPT-2 one
    layer deeper held 1.19x the planned bytes)."""
    present = {d.key for d in decisions}
    _refuse_missing([key for key in site_bits if key not in present])
    known = set(ops)
    extra = [key for key in present if known and key not in known]
    if extra:
        raise ValueError(f"this model has {len(extra)} op(s) the plan was not made for (e.g. {sorted(extra)[0]!r}); "
                         "it was made for a smaller model: plan this one with actfx.plan")
