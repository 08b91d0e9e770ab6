"""Rows of a saved value (a slice of its batch), rebuilt from the matching slice of its pieces.

A backward whose formula works sample by sample (a convolution's weight gradient is a sum over
the batch) can then read its packed input one slice at a time, and the input never exists
unpacked at full size. A value can be cut when every piece is: packed groups and mask bytes that
start and end at whole rows, per-channel affine maps, sums, and tensors kept as they are.
"""

from __future__ import annotations

import math

from actfx.variants.saved import PLAN_HEAD, claim_unpacked, materialize


def cuttable(plan: tuple) -> bool:
    """Whether rows of the value ``plan`` rebuilds can be rebuilt alone."""
    kind = plan[0]
    if kind in ("exact", "const", "zeros"):
        return True
    if kind == "watch":
        return cuttable(plan[3])
    if kind == "packed":
        shape, group_size = plan[1], plan[4]
        return len(shape) > 0 and math.prod(shape[1:]) % group_size == 0
    if kind == "masked":
        shape = plan[1]
        return len(shape) > 0 and math.prod(shape[1:]) % 8 == 0 and cuttable(plan[3])
    if kind == "affine":
        return plan[2] != 0 and cuttable(plan[4])
    if kind == "sum":
        return cuttable(plan[1]) and cuttable(plan[2])
    if kind == "permute":
        return plan[1][0] == 0 and cuttable(plan[2])
    return False


def settle(plan: tuple, storage: list) -> tuple[tuple, list]:
    """``plan`` and ``storage`` with each packed piece counted as read once (as ``materialize``
    counts it), and a piece another reader left unpacked used as it is."""
    return _settle(plan, iter(storage))


def _settle(plan, it):
    kind = plan[0]
    if kind in ("const", "zeros"):
        return plan, []
    if kind == "exact":
        return plan, [next(it)]
    if kind == "packed":
        codes, meta = next(it), next(it)
        value = claim_unpacked(codes, plan[1], plan[2])
        return (("exact",), [value]) if value is not None else (plan, [codes, meta])
    if kind == "sum":
        left, left_store = _settle(plan[1], it)
        right, right_store = _settle(plan[2], it)
        return ("sum", left, right), left_store + right_store
    head = [next(it) for _ in range(PLAN_HEAD.get(kind, 0))]
    inner, inner_store = _settle(plan[-1], it)
    return plan[:-1] + (inner,), head + inner_store


def rows(plan: tuple, storage: list, part: slice):
    """Rows ``part`` of the value, from a settled plan (``settle``) that is ``cuttable``."""
    cut_plan, cut_storage = _cut(plan, iter(storage), part)
    return materialize(cut_plan, iter(cut_storage), keep=False)


def _cut(plan, it, part):
    kind = plan[0]
    count = part.stop - part.start
    if kind == "const":
        return plan, []
    if kind == "zeros":
        return ("zeros", (count,) + tuple(plan[1][1:])) + plan[2:], []
    if kind == "exact":
        return plan, [next(it)[part]]
    if kind == "packed":
        codes, meta = next(it), next(it)
        shape, group_size = plan[1], plan[4]
        per_row = math.prod(shape[1:]) // group_size
        groups = slice(part.start * per_row, part.stop * per_row)
        return ("packed", (count,) + tuple(shape[1:])) + plan[2:], [codes[groups], meta[groups]]
    if kind == "masked":
        mask = next(it)
        shape = plan[1]
        per_row = math.prod(shape[1:]) // 8
        inner, inner_store = _cut(plan[3], it, part)
        return ("masked", (count,) + tuple(shape[1:]), plan[2], inner), [mask[part.start * per_row:part.stop * per_row],
                                                                          *inner_store]
    if kind == "sum":
        left, left_store = _cut(plan[1], it, part)
        right, right_store = _cut(plan[2], it, part)
        return ("sum", left, right), left_store + right_store
    head = [next(it) for _ in range(PLAN_HEAD.get(kind, 0))]  # masked was cut above
    inner, inner_store = _cut(plan[-1], it, part)
    return plan[:-1] + (inner,), head + inner_store

