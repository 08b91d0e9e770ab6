"""Test-wide setup: run Triton kernels in its CPU interpreter when there is no GPU, one compute
thread per pytest-xdist process, skip tests marked `cuda` when there is none and those marked
`slow` unless asked for.

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


def pytest_addoption(parser):
    parser.addoption("--run-slow", action="store_true",
                     help="also run the tests marked slow (compile-heavy; about 15 more minutes on 2 cores, cold cache)")


def pytest_collection_modifyitems(config, items):
    """Skip `cuda` tests without a GPU, and `slow` ones unless --run-slow: the default run has to
    fit CI's 10 minutes with an empty Inductor cache (all tests: 23 min on 2 cores, session 48)."""
    skips = {}
    if not config.getoption("--run-slow"):
        skips["slow"] = pytest.mark.skip(reason="slow: run with --run-slow")
    if not torch.cuda.is_available():
        skips["cuda"] = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        for marker, skip in skips.items():
            if item.get_closest_marker(marker) is not None:
                item.add_marker(skip)
