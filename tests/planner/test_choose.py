"""actfx/planner/choose.py: widths by marginal variance per byte, within the budget."""

from __future__ import annotations

import itertools
import random

import pytest

from actfx.kernels import ALLOWED_BITS, TERNARY, levels, packed_nbytes
from actfx.planner.choose import BudgetError, Option, choose

WIDTHS = (1, 2, 4, 8)


def _option(numel: int, scale: float, widths=WIDTHS) -> Option:
    return Option({b: numel * b // 8 for b in widths}, {b: scale / levels(b) ** 2 for b in widths})


def _stored(numel: int, scale: float) -> Option:
    """Every width, with the bytes a pack really takes (groups of 256 and their min and step)."""
    return Option({b: packed_nbytes(numel, b, 256) for b in ALLOWED_BITS},
                  {b: scale / levels(b) ** 2 for b in ALLOWED_BITS})


def _brute_force(options, budget):
    best = None
    for widths in itertools.product(*[sorted(o.nbytes) for o in options]):
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


def test_three_levels_are_chosen_between_one_bit_and_two():
    """Three levels (1.75 bits a value with min and step) cost a quarter of 1 bit's variance for
    0.6 of 2 bits' extra bytes: below the line from 1 bit to 2, so a budget between them takes them
    for every group alike, where widths 1, 2, 4, 8 alone must leave some groups at 1 bit."""
    options = [_stored(4096, 1.0) for _ in range(4)]
    budget = 4 * packed_nbytes(4096, TERNARY, 256)
    assert choose(options, budget) == [TERNARY] * 4
    whole = [Option({b: o.nbytes[b] for b in WIDTHS}, {b: o.variance[b] for b in WIDTHS}) for o in options]
    widths = choose(whole, budget)
    assert sorted(widths) == [1, 1, 2, 2]
    assert sum(o.variance[b] for o, b in zip(options, widths)) > 2 * 4 * options[0].variance[TERNARY]


@pytest.mark.parametrize("stored", [False, True])
@pytest.mark.parametrize("seed", range(5))
def test_close_to_the_exhaustive_optimum(seed, stored):
    rng = random.Random(seed)
    make = _stored if stored else _option
    options = [make(rng.choice([256, 1024, 4096]), rng.uniform(0.01, 100)) for _ in range(5)]
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
