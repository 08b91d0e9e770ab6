"""actfx/planner/choose.py: widths by marginal variance per byte, within the budget."""

from __future__ import annotations

import itertools
import random

import pytest

from actfx.planner.choose import BudgetError, Option, choose

WIDTHS = (1, 2, 4, 8)


def _option(numel: int, scale: float) -> Option:
    return Option({b: numel * b // 8 for b in WIDTHS}, {b: scale / (2**b - 1) ** 2 for b in WIDTHS})


def _brute_force(options, budget):
    best = None
    for widths in itertools.product(WIDTHS, repeat=len(options)):
        nbytes = sum(o.nbytes[b] for o, b in zip(options, widths))
        if nbytes <= budget:
            variance = sum(o.variance[b] for o, b in zip(options, widths))
            best = variance if best is None else min(best, variance)
    return best


def test_the_sensitive_group_gets_the_bits():
    options = [_option(1024, 1.0), _option(1024, 100.0)]
    assert choose(options, 128 + 512) == [1, 4]  # 1 + 100/225, where [2, 2] would be 1/9 + 100/9
    assert choose(options, 1024) == [4, 4]  # then evening out wins: 101/225 against 1 + 100/65025 for [1, 8]
    assert choose(options, 10**9) == [8, 8]


@pytest.mark.parametrize("seed", range(5))
def test_close_to_the_exhaustive_optimum(seed):
    rng = random.Random(seed)
    options = [_option(rng.choice([256, 1024, 4096]), rng.uniform(0.01, 100)) for _ in range(5)]
    budget = rng.randint(sum(o.nbytes[1] for o in options), sum(o.nbytes[8] for o in options))
    widths = choose(options, budget)
    assert sum(o.nbytes[b] for o, b in zip(options, widths)) <= budget
    got = sum(o.variance[b] for o, b in zip(options, widths))
    # The greedy can strand less than one upgrade's bytes; on these convex curves that costs
    # at most a factor of a few, and usually nothing.
    assert got <= 4 * _brute_force(options, budget)


def test_over_budget_says_how_much_is_needed():
    with pytest.raises(BudgetError) as err:
        choose([_option(1024, 1.0)], 10)
    assert err.value.smallest == 128
