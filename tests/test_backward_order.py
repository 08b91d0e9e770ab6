"""actfx.compile's backward runs each unpack where ``pack_saved`` put it, before its first reader."""

from __future__ import annotations

import math
import re

import pytest
import torch

import actfx
from actfx.models import build_model


def _buffers_at_worst(code: str) -> tuple[int, int]:
    """(bytes of the buffers a generated ``call`` holds at its worst point, its largest buffer),
    from its allocations and ``del`` statements in order."""
    body = code[code.index("def call("):]
    live, now, worst, largest = {}, 0, 0, 0
    for line in body.splitlines():
        made = re.search(r"(buf\d+) = empty_strided_\w+\(\(([\d, ]*)\), \([\d, ]*\), torch\.(\w+)\)", line)
        if made:
            numel = math.prod(int(size) for size in made.group(2).split(",") if size.strip())
            live[made.group(1)] = numel * getattr(torch, made.group(3)).itemsize
            now += live[made.group(1)]
            worst, largest = max(worst, now), max(largest, live[made.group(1)])
        for name in re.findall(r"\bdel (buf\d+)", line):
            now -= live.pop(name, 0)
    return worst, largest


@pytest.mark.slow
def test_unpacks_are_not_moved_to_the_start_of_backward():
    """Inductor's reordering for peak memory sized each unpack's reads (packed bytes, lo, step) by
    the unpacked table's loop ranges, found it cheaper to run every unpack first, and the
    unpacked tables all lived at once (gpt_tiny at batch 32: backward RSS peak 31 -> 53 MiB).
    Backward graphs keep their order: at most about two MLP-sized tables at a time."""
    from torch._inductor.utils import run_and_get_code

    torch.manual_seed(0)
    model, x = build_model("gpt_tiny"), torch.randint(256, (8, 128))
    compiled = actfx.compile(model, bits=2)

    def step():
        compiled(x).float().square().mean().backward()

    _, codes = run_and_get_code(step)
    backward = [c for c in codes if "tangents_" in c]
    assert backward
    worst, largest = _buffers_at_worst(backward[-1])
    assert largest > 0 and worst <= 3 * largest, (worst, largest)
