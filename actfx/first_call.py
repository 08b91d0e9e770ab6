"""Capture a model with torch.export at its first training call, from that call's inputs.

Why: fx cannot trace Hugging Face v5 models, and it keeps ``torch.fx.wrap``-ed helpers (torchvision's
Swin attention) whole, so what they save is neither seen nor packed; torch.export sees through
both but needs example inputs. The first training call has real ones: the model is converted
as far as fx goes until then, and captured whole from that call on (``actfx.convert``).
"""

from __future__ import annotations

import inspect
import warnings

import torch
import torch.nn as nn

from actfx.config import Config
from actfx.passes.capture import (
    autocast_state, changed_hooks, hooks_now, stateful_hooks_inside, uncalled_submodules, under_function_transform,
    warn_hooks_changed,
)
from actfx.passes.export_capture import ExportRefused, parameter_dtypes, warn_if_cast


def _real_call(args, kwargs) -> bool:
    """Real tensors only: a dry run (fake or meta tensors, ``actfx.show``) captures nothing, nor
    does a call with a PackedSequence, which torch.export cannot take (it failed with "'dict'
    object has no attribute 'device'"; such a call runs as PyTorch runs it)."""
    from torch._subclasses.fake_tensor import FakeTensor

    if any(isinstance(v, nn.utils.rnn.PackedSequence) for v in (*args, *kwargs.values())):
        return False
    leaves = torch.utils._pytree.tree_leaves((args, kwargs))
    return not any(isinstance(t, FakeTensor) or (isinstance(t, torch.Tensor) and t.is_meta) for t in leaves)


def _own_parameters(module: nn.Module) -> bool:
    """The module runs with its Parameters, not tensors swapped in by ``functional_call``
    (``actfx.show``'s measuring run on copies): a capture then would record the copies."""
    return all(isinstance(p, nn.Parameter) for p in module.parameters())


_TRANSPARENT_MODULES = ("torch", "actfx", "operator", "math", "builtins", "_operator")


def opaque_calls(graph) -> list:
    """Calls of Python functions fx did not trace into (``torch.fx.wrap``: torchvision's Swin
    attention, timm's no-trace helpers): what they save is neither seen nor packed."""
    if graph is None:
        return []
    return [n for n in graph.nodes if n.op == "call_function" and inspect.isfunction(n.target)
            and not hasattr(n.target, "actfx_pointwise")
            and (n.target.__module__ or "").split(".")[0] not in _TRANSPARENT_MODULES]


def capture_at_first_call(model: nn.Module, config: Config, record, exported_forward, fallback=None, path: str = ""):
    """The forward of a module fx cannot trace (or traces around opaque calls), the model's root
    or the submodule at ``path``: its own forward (``fallback``: the fx-converted one) until the
    first training call, which captures it whole with ``exported_forward``
    (``convert._exported_forward``) from that call's inputs; from then on training calls export
    can take run the captured graph (``record`` then describes it at ``path``), the others
    ``fallback``. A submodule's capture runs only where the root's failed (the root's graph
    inlines it otherwise); a class export refused once is not retried in this model."""
    base = fallback or type(model).forward
    record.first_call_capture = True
    # this module's captures, one per autocast state (a graph export took records the casts that
    # state made: a model captured in fp32 and trained under bf16 autocast ran its fp32 graph,
    # and Hugging Face's RMSNorm, `x.to(input_dtype)` with the dtype read at capture, skipped its
    # cast back: logits 4e-3 off, silently): "forward", "call", or "failed"
    captures: dict = {}
    inlined = uncalled_submodules(model, ())  # export inlines every submodule

    def forward(self, *args, **kwargs):
        if (self.training and torch.is_grad_enabled() and not torch.compiler.is_compiling()
                and not under_function_transform(self)):
            captured = captures.setdefault(autocast_state(), {})
            if not captured and _real_call(args, kwargs) and _own_parameters(self):
                _capture(self, captured, args, kwargs)
            bound = captured["call"].bind(args, kwargs) if "call" in captured else None
            if bound is None and "call" in captured:
                warn_uncaptured_call(self, captured["call"], args, kwargs)
            hooked = changed_hooks(self, inlined, captured["hooks"]) if bound is not None else None
            if hooked is not None:
                warn_hooks_changed(self, hooked)
                bound = None
            elif bound is not None and warn_if_cast(self, captured["dtypes"]):
                bound = None
            if bound is not None and captured.get("ran"):
                return captured["forward"](self, *bound[0], **bound[1])
            if bound is not None:
                try:
                    out = captured["forward"](self, *bound[0], **bound[1])
                except Exception as err:  # noqa: BLE001 - a graph export could not run (a buffer
                    # reassigned with another shape): the module keeps what fx converted
                    _give_up(captured, err)
                    return base(self, *args, **kwargs)
                captured["ran"] = True
                return out
        return base(self, *args, **kwargs)

    def _give_up(captured, err):
        previous = captured.get("previous")
        if previous is not None:
            _merge(record, previous, path)
        captured.clear()
        captured["failed"] = True
        warnings.warn(f"actfx: the graph torch.export captured from {type(model).__name__} at its first training "
                      f"call does not run ({str(err).splitlines()[0] if str(err) else type(err).__name__}), so "
                      f"it keeps what fx converted{not_recomputed(config, path)}", stacklevel=4)

    def _capture(self, captured, args, kwargs):
        from actfx.breakdown import original_of

        if path and type(model) in record.export_refused:
            captured["failed"] = True
            return
        if stateful_hooks_inside(self):
            captured["failed"] = True  # export would run them once, on fake tensors
            warnings.warn(f"actfx: torch.export does not capture {type(model).__name__} at its first training call: a "
                          "forward hook inside it keeps state (export would run it once, at capture), so it keeps "
                          f"what fx converted{not_recomputed(config, path)}", stacklevel=4)
            return
        inner = next((name or path for name, m in self.named_modules()
                      if getattr(type(m).__bases__[0], "_actfx_converted", False)), None)  # converted twice
        if inner is not None:
            # export would capture it again at this model's widths: its own would be lost, silently
            captured["failed"] = True
            warnings.warn(f"actfx: {inner} was converted on its own before the model holding it, so torch.export does "
                          "not capture it there (that would convert it again at the model's widths) and it keeps what fx "
                          "converted; to capture the model whole, convert the original once, with "
                          f"Config(module_bits={{{inner!r}: bits}}) for a width of its own", stacklevel=4)
            return
        whole = type(record)(config)
        try:
            # Export what will run: this model's own state (a buffer the original reassigned
            # since, like ConViT's position indices, must not be baked in), original forwards.
            # Identity hooks: the caller's saved-tensor hooks must not see export's fake tensors.
            with torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t):
                forward, call = exported_forward(original_of(self), (tuple(args), dict(kwargs)), config, whole, path)
        except Exception as err:  # noqa: BLE001 - export raises many kinds; the fallback stays
            captured["failed"] = True
            record.export_refused.add(type(model))
            cause = (err.__cause__ or err) if isinstance(err, RuntimeError) and str(err).startswith("actfx:") else err
            where = f"{type(model).__name__} ({path})" if path else type(model).__name__
            # the exception's type too: some say only an op's name (a fake-quantize op export
            # does not support with a dynamic batch: "aten.fake_quantize_per_tensor_affine_cachemask");
            # actfx's own refusals without their advice to convert without example_inputs
            said = cause.problem if isinstance(cause, ExportRefused) else str(cause).splitlines()[0] if str(cause) else ""
            reason = said if said.startswith("actfx:") else f"{type(cause).__name__}: {said}" if said else type(cause).__name__
            warnings.warn(f"actfx: torch.export could not capture {where} at its first training "
                          f"call ({reason}), so it keeps what fx converted{not_recomputed(config, path)}", stacklevel=4)
            return
        for name, value in call.carried.items():
            object.__setattr__(self, name, value)
        captured["previous"] = _part(record, path)
        _merge(record, whole, path)
        if not path:
            record.capture_pending = False
            from actfx.planner.plan import check_plan_fits

            check_plan_fits(record.config.site_bits, record.decisions, record.plan_ops)  # known only now
        captured.update(forward=forward, call=call, hooks=hooks_now(self, inlined),  # export ran these
                        dtypes=parameter_dtypes(self))

    return forward


def _inside(key: str, path: str) -> bool:
    return not path or key == path or key.startswith(path + ".")


def _part(record, path: str):
    """What ``record`` holds about the module at ``path`` and below (a record of its own)."""
    part = type(record)(record.config)
    part.decisions = [d for d in record.decisions if _inside(d.graph_path, path)]
    part.uncovered = [u for u in record.uncovered if _inside(u.path, path)]
    part.parameter_ops = [u for u in record.parameter_ops if _inside(u.path, path)]
    for attr in ("graphs", "forwards", "captured", "calls"):
        setattr(part, attr, {k: v for k, v in getattr(record, attr).items() if _inside(k, path)})
    return part


def _merge(record, part, path: str) -> None:
    """``record`` with what it held at ``path`` and below replaced by ``part``."""
    record.decisions = [d for d in record.decisions if not _inside(d.graph_path, path)] + list(part.decisions)
    record.uncovered = [u for u in record.uncovered if not _inside(u.path, path)] + list(part.uncovered)
    record.parameter_ops = [u for u in record.parameter_ops if not _inside(u.path, path)] + list(part.parameter_ops)
    for attr in ("graphs", "forwards", "captured", "calls"):
        kept = {k: v for k, v in getattr(record, attr).items() if not _inside(k, path)}
        kept.update(getattr(part, attr))
        setattr(record, attr, kept)


def warn_uncaptured_call(module: nn.Module, call, args: tuple, kwargs: dict) -> None:
    """Once per model: a training call the exported graph cannot take runs the original forward,
    packing nothing (a Hugging Face model captured from ``input_ids`` and trained with ``labels``;
    an image size torch.export specialised)."""
    if module.__dict__.get("_actfx_warned_uncaptured"):
        return
    module.__dict__["_actfx_warned_uncaptured"] = True
    name = type(module).__mro__[1].__name__
    warnings.warn(
        f"actfx: a training call of {name} does not fit the graph torch.export captured ({call.mismatch(args, kwargs)}): "
        "such calls run the original forward and pack nothing; convert with example_inputs shaped as training "
        "calls it", stacklevel=3)


def not_recomputed(config, path: str) -> str:
    """What a warning about ``path`` running uncaptured adds where ``Config.recompute_modules``
    names it: neither fx nor torch.export gave a graph to rerun it from (it had passed silently)."""
    if path and path in config.recompute_modules:
        return f"; Config.recompute_modules names {path}, which is therefore not recomputed"
    return ""
