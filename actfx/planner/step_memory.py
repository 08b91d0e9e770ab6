"""The memory one training step needs above its parameters, measured on fake tensors.

One forward and backward of the converted model run under ``FakeTensorMode`` (nothing is
allocated, any batch costs the same) inside PyTorch's ``MemTracker``, which follows every tensor
alive at each moment: gradients as backward produces them, what forward keeps, and the transient
tensors of backward (incoming and outgoing gradients, actfx's unpacked copies, the temporaries of
each op's backward). Its peak is what the step adds on top of parameters, buffers and optimizer
state; the model's own parameters and buffers are swapped for fake twins, and nothing of the
model is modified (gradients are taken with ``torch.autograd.grad``, never stored on it).
"""

from __future__ import annotations

import warnings

import torch
import torch.nn as nn
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode, disable_fake_tensor_cache

from actfx.outputs import grad_leaves
from actfx.passes.analyze import _Twins
from actfx.passes.capture import training_mode
from actfx.passes.state_call import call_with_state


def step_bytes(converted: nn.Module, inputs, *, dtype=None) -> int:
    """Peak bytes of gradients, held activations and temporaries during one forward + backward
    of ``converted`` on ``inputs`` (real, meta or fake tensors: only shapes and dtypes are read).

    Where the tracked fake step cannot run (Hugging Face models build masks under ``vmap``,
    whose wrapped tensors ``MemTracker`` cannot read), the report's formula stands in, with a
    warning: gradients + held activations + 2 x output + 3 x the largest op output."""
    try:
        return _tracked_step(converted, inputs, dtype)
    except Exception as err:  # noqa: BLE001 - any failure of the tracked run: the formula still holds
        from actfx.passes.analyze import measure
        from actfx.report import WORKING_SET, static_costs

        warnings.warn(f"actfx.plan: the fake-tensor step of {type(converted).__name__} failed ({type(err).__name__}: "
                      f"{str(err).splitlines()[0] if str(err) else ''}); its peak uses the report's formula "
                      f"instead (backward's working set: 3x the largest op output)", stacklevel=3)
        measured = measure(converted, inputs, dtype=dtype)
        gradients = static_costs(converted, "sgd", dtype).grad_bytes
        return (gradients + measured.activation_bytes + 2 * measured.output_bytes
                + WORKING_SET["actfx"] * measured.largest_output_bytes)


class _NoHook:
    """A hook handle with nothing to remove."""

    def remove(self) -> None:
        pass


_NO_HOOK = _NoHook()


def _tracked_step(converted: nn.Module, inputs, dtype) -> int:
    from torch.distributed._tools.mem_tracker import MemTracker, _MemRefType

    mode = FakeTensorMode(allow_non_fake_inputs=True)
    twin = _Twins(mode, dtype)
    named = [*converted.named_parameters(), *converted.named_buffers()]
    state = {name: twin(t) for name, t in named}
    trainable = [state[name] for name, p in converted.named_parameters() if p.requires_grad]
    args = [twin(x) if isinstance(x, torch.Tensor) and not isinstance(x, FakeTensor) else x for x in inputs]
    # FakeTensorMode's dispatch cache keeps tensors alive that the real step frees (views of
    # linear outputs, detached q, k, v): with it on, gpt_tiny's step read 20.2 MiB, not 13.7
    # (13.2 measured).
    with training_mode(converted, True), mode, disable_fake_tensor_cache(mode), torch.enable_grad():
        if dtype is not None:
            args = [x.to(dtype) if isinstance(x, torch.Tensor) and x.is_floating_point() else x for x in args]
        tracker = MemTracker()
        for name, p in converted.named_parameters():
            if not p.requires_grad:  # frozen (LoRA's base, a teacher): no gradient to follow, and
                # the tracker's hook on one raised; it skips parameters it holds handles for
                tracker._param_to_grad_hook_handles[state[name]] = (_NO_HOOK, _NO_HOOK)
        with tracker:
            out = call_with_state(converted, state, tuple(args))
            leaves = grad_leaves(out)
            loss = sum(t.float().sum() for t in leaves)
            del out, leaves
            grads = torch.autograd.grad(loss, trainable, allow_unused=True)
            del grads, loss
        peak = tracker.get_tracker_snapshot("peak")
    # The tracker attributes the fake parameters and buffers to the modules; they are held anyway.
    held_anyway = (_MemRefType.PARAM, _MemRefType.BUFFER)
    return int(sum(d["Total"] - sum(d.get(k, 0) for k in held_anyway) for d in peak.values()))
