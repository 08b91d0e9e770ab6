"""Test-wide setup: run Triton kernels in its CPU interpreter when there is no GPU, and skip tests
marked `cuda` when there is none.

TRITON_INTERPRET must be set before `actfx/kernels/triton_pack.py` is imported (`@triton.jit`
reads it when the kernel is defined), hence here, before any test module imports actfx.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if item.get_closest_marker("cuda") is not None:
            item.add_marker(skip)
