"""Pick a width per group: least total gradient variance within a byte budget.

Greedy by marginal variance per byte (the convex-hull greedy of a multiple-choice knapsack):
every group starts at the narrowest width; then, while bytes remain, the upgrade (to any wider
width) that removes the most variance per added byte and still fits is taken. Variance falls like
``1 / L^2`` (L = 2^b - 1 steps, 2 for three levels) while bytes grow like ``b``, so each group's
options are convex (three levels too: ``actfx/kernels/widths.py``) and the greedy is within one
upgrade of the optimum.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Option:
    """A group's cost at each width it may take (``KEEP_EXACT``: kept as it is)."""

    nbytes: dict  # bits -> bytes
    variance: dict  # bits -> gradient variance


class BudgetError(ValueError):
    """The budget cannot be met; ``smallest`` is the least the plan can reach (bytes)."""

    def __init__(self, message: str, smallest: int):
        super().__init__(message)
        self.smallest = smallest


def choose(options: list[Option], budget: int, floor: list | None = None) -> list[int]:
    """The width of each group, whose bytes sum to at most ``budget``; ``floor``: the narrowest
    width each group may take (None: any)."""
    chosen = [min(o.nbytes) for o in options] if floor is None else list(floor)
    used = sum(o.nbytes[b] for o, b in zip(options, chosen))
    if used > budget:
        raise BudgetError(f"the packs need {used} bytes at their narrowest{' allowed' if floor else ''}, over the "
                          f"budget of {budget}", used)
    while True:
        best = None
        for i, option in enumerate(options):
            now = chosen[i]
            for b in sorted(option.nbytes):
                if b <= now:
                    continue
                extra = option.nbytes[b] - option.nbytes[now]
                gain = option.variance[now] - option.variance[b]
                if used + extra > budget or gain <= 0:
                    continue
                ratio = gain / max(extra, 1)
                if best is None or ratio > best[0]:
                    best = (ratio, i, b, extra)
        if best is None:
            return chosen
        _, i, b, extra = best
        chosen[i] = b
        used += extra
