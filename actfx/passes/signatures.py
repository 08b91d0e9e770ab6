"""Python signatures of the functional ops actfx rewrites, to bind fx call arguments by name.

``torch.fx.operator_schemas.normalize_function`` cannot bind many of these (overloaded builtins,
boolean-dispatch wrappers), so each canonical op gets a plain stub with PyTorch's parameter
names and defaults.
"""

from __future__ import annotations

import inspect


def _conv(input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1): ...
def _conv_transpose(input, weight, bias=None, stride=1, padding=0, output_padding=0, groups=1, dilation=1): ...
def _linear(input, weight, bias=None): ...
def _batch_norm(input, running_mean, running_var, weight=None, bias=None, training=False, momentum=0.1, eps=1e-5): ...
def _relu(input, inplace=False): ...
def _hardtanh(input, min_val=-1.0, max_val=1.0, inplace=False): ...
def _leaky_relu(input, negative_slope=0.01, inplace=False): ...
def _dropout(input, p=0.5, training=True, inplace=False): ...
def _torch_dropout(input, p, train): ...
def _max_pool(input, kernel_size, stride=None, padding=0, dilation=1, ceil_mode=False, return_indices=False): ...
def _adaptive_max_pool(input, output_size, return_indices=False): ...
def _binary(input, other): ...
def _addmm(input, mat1, mat2, beta=1, alpha=1): ...
def _sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False): ...
def _softmax(input, dim=None, _stacklevel=3, dtype=None): ...
def _rms_norm(input, normalized_shape, weight=None, eps=None): ...
def _layer_norm(input, normalized_shape, weight=None, bias=None, eps=1e-5): ...
def _group_norm(input, num_groups, weight=None, bias=None, eps=1e-5): ...
def _instance_norm(input, running_mean=None, running_var=None, weight=None, bias=None, use_input_stats=True,
                   momentum=0.1, eps=1e-5): ...
def _div(input, other, rounding_mode=None): ...
def _cross_entropy(input, target, weight=None, size_average=None, ignore_index=-100, reduce=None, reduction="mean",
                   label_smoothing=0.0): ...


SIGNATURES = {name: inspect.signature(fn) for name, fn in {
    "conv": _conv,
    "conv_transpose": _conv_transpose,
    "linear": _linear,
    "batch_norm": _batch_norm,
    "relu": _relu,
    "hardtanh": _hardtanh,
    "leaky_relu": _leaky_relu,
    "dropout": _dropout,
    "torch_dropout": _torch_dropout,
    "max_pool": _max_pool,
    "adaptive_max_pool": _adaptive_max_pool,
    "binary": _binary,
    "addmm": _addmm,
    "layer_norm": _layer_norm,
    "sdpa": _sdpa,
    "softmax": _softmax,
    "rms_norm": _rms_norm,
    "group_norm": _group_norm,
    "instance_norm": _instance_norm,
    "div": _div,
    "cross_entropy": _cross_entropy,
}.items()}


def bind(signature: str, args, kwargs) -> dict | None:
    """Arguments by name with defaults applied, or None when the call does not fit."""
    try:
        bound = SIGNATURES[signature].bind(*args, **kwargs)
    except TypeError:
        return None
    bound.apply_defaults()
    return dict(bound.arguments)
