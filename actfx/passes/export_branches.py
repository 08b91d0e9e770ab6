"""While torch.export captures a model, its code that asks ``torch.compiler.is_exporting()``
alone is answered as eager PyTorch answers it: False.

Why: such code picks between what the model runs and an export-friendly rewrite of it. Hugging
Face's gated delta rule (Qwen3-Next, Qwen3.5, OLMo-Hybrid, ...) solves its triangular system
with ``linalg.solve_triangular``, but under export by a 63-step forward substitution: the graph
captured from that branch rounded differently from the model (tiny Qwen3-Next: logits 3.0e-7
off, where a converted forward must be identical) and took 2.3x longer to capture.

Code that also asks whether it is compiling keeps export's answer: there ``is_exporting()`` tells
torch.compile from torch.export (Mamba's ``is_compiling() and not is_exporting()`` picks
``associative_scan`` under torch.compile), and the eager path is the one export's answer leads
to, since ``is_compiling()`` itself must stay True under export (it guards data-dependent
branches export cannot trace). PyTorch's own calls keep the true answer.
"""

from __future__ import annotations

import contextlib
import sys

import torch

# names whose presence in the asking code means it tells compile from export
_COMPILE_CHECKS = frozenset({"is_compiling", "is_torchdynamo_compiling", "is_dynamo_compiling"})


def _tells_compile_from_export(frame) -> bool:
    """Whether the code asking (the caller, or the caller's caller where the caller is a
    wrapper such as transformers' ``is_torchdynamo_exporting``) also asks if it is compiling."""
    for _ in range(2):
        if frame is None:
            return False
        if _COMPILE_CHECKS.intersection(frame.f_code.co_names):
            return True
        frame = frame.f_back
    return False


class _EagerAnswer:
    """``torch.compiler.is_exporting`` for the duration of one capture; ``changed`` records
    whether it answered anything other than the truth (only then is a retry worth making)."""

    def __init__(self, real):
        self.real = real
        self.changed = False

    def __call__(self) -> bool:
        truth = self.real()
        if not truth:
            return False
        caller = sys._getframe(1)
        if caller.f_globals.get("__name__", "").split(".")[0] == "torch" or _tells_compile_from_export(caller):
            return truth
        self.changed = True
        return False


@contextlib.contextmanager
def eager_branches():
    """Model code asking ``is_exporting()`` alone is answered False inside; yields the answerer
    (its ``changed`` says whether any code was answered so)."""
    real = torch.compiler.is_exporting
    answer = _EagerAnswer(real)
    torch.compiler.is_exporting = answer
    try:
        yield answer
    finally:
        torch.compiler.is_exporting = real
