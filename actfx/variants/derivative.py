"""GELU and SiLU that keep a packed copy of their *derivative* instead of their input.

Both cost the same bits per value, but backward is then ``grad * derivative``: linear in what is
stored, so stochastic rounding keeps the gradient unbiased. Recomputing the derivative at a
packed input evaluates a non-linear function at a quantized point and is biased: measured at
2 bits (benchmarks/fewbit_vs_input.py) the mean of 64 GELU gradients stayed 0.25 away from the
exact one from the input, 0.027 from the derivative (one sample: 0.62 vs 0.22). This is the
few-bit-derivative idea of Novikov et al. (2023), with actfx's per-group format.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F

from actfx.variants.pointwise import from_packed_derivative
from actfx.variants.common import needs_saving

_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)


def _silu(x):
    s = torch.sigmoid(x)
    return s * (1.0 + x * (1.0 - s))


def _gelu(x):
    return 0.5 * (1.0 + torch.erf(x * (1.0 / math.sqrt(2.0)))) + x * torch.exp(-0.5 * x * x) * _INV_SQRT_2PI


def _gelu_tanh(x):
    t = torch.tanh(_SQRT_2_OVER_PI * (x + 0.044715 * x * x * x))
    return 0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * _SQRT_2_OVER_PI * (1.0 + 3 * 0.044715 * x * x)


DERIVATIVES = {"silu": _silu, "gelu": _gelu, "gelu_tanh": _gelu_tanh}
FUNCTIONS = {"silu": F.silu, "gelu": F.gelu, "gelu_tanh": F.gelu}


def derivative_of(kind: str, x):
    """The activation's derivative at ``x`` (fp32, outside autograd), or None when no backward."""
    if not needs_saving(x):
        return None
    with torch.no_grad():
        return DERIVATIVES[kind](x.detach().float())


def activation(spec, kind, kwargs, x, *run):
    """The activation ``kind`` (F.silu / F.gelu with ``kwargs``) whose backward reads the packed
    derivative run (its head: the derivative)."""
    return from_packed_derivative(functools.partial(FUNCTIONS[kind], **dict(kwargs)), kind, spec, x, *run)
