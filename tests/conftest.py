"""Test-wide setup: run Triton kernels in its CPU interpreter when there is no GPU, one compute
thread per pytest-xdist process, and skip tests marked `cuda` when there is none.

TRITON_INTERPRET must be set before `actfx/kernels/triton_pack.py` is imported (`@triton.jit`
reads it when the kernel is defined), hence here, before any test module imports actfx.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Under pytest-xdist (`-n 2`, the README's command) each test process computes on one thread: two
# processes of two threads each on 2 cores made a pure-compute test 3-6x slower (test_lm_parity:
# 33 s alone, 104-192 s beside compile-heavy tests).
if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if item.get_closest_marker("cuda") is not None:
            item.add_marker(skip)
