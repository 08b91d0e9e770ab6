"""Turn a model SPEC from the command line into a model, without downloading anything.

    resnet50                      a built-in reference model (``actfx models`` lists them)
    torchvision:resnet50          torchvision.models.get_model(name, weights=None)
    timm:vit_base_patch16_224     timm.create_model(name, pretrained=False)
    transformers:gpt2             a model type's default config, random init (AutoConfig.for_model)
    path/to/file.py:factory       a callable (function or class) taking no arguments, or a module
    package.module:attr           the same, imported from an installed package

Models are built on the meta device when they allow it (no memory, no init compute), else on
the CPU; either way the dry run only reads shapes. Every failure is a ``SpecError`` that says
what is wrong and how to fix it.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
import importlib.util
import os
import sys
from typing import Callable

import torch
import torch.nn as nn

from actfx.models import get_model_spec, list_models

_HUBS = ("torchvision", "timm", "transformers")


class SpecError(ValueError):
    """A SPEC that cannot be resolved or built; the message says how to fix it."""


@dataclasses.dataclass(frozen=True)
class ResolvedSpec:
    text: str
    factory: Callable[[], object]
    input_shape: tuple | None = None  # one sample, when the spec knows it (built-in models)
    input_dtype: torch.dtype | None = None  # token ids for language models


def resolve(text: str) -> ResolvedSpec:
    """What to build for ``text``; raises SpecError for unknown names and failed imports."""
    prefix, sep, attr = text.partition(":")
    if not sep:
        names = [s.name for s in list_models()]
        if text not in names:
            close = difflib.get_close_matches(text, names, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise SpecError(f"unknown model {text!r}{hint}; `actfx models` lists the built-in ones, or give "
                            "torchvision:NAME, timm:NAME, transformers:TYPE, file.py:factory or package.module:attr")
        spec = get_model_spec(text)
        return ResolvedSpec(text, spec.factory, spec.input_shape, spec.input_dtype)
    if not prefix or not attr:
        raise SpecError(f"cannot read spec {text!r}: write NAME, hub:NAME (torchvision, timm, transformers), "
                        "path/to/file.py:factory or package.module:attr")
    if prefix in _HUBS:
        return _hub(prefix, attr, text)
    if prefix.endswith(".py") or os.sep in prefix or "/" in prefix:
        return ResolvedSpec(text, _from_file(prefix, attr, text))
    return ResolvedSpec(text, _from_module(prefix, attr, text))


def build(spec: ResolvedSpec) -> nn.Module:
    """The model, on the meta device if its factory allows it, else on the CPU."""
    try:
        with torch.device("meta"):
            model = spec.factory()
    except Exception:  # noqa: BLE001 - any failure on meta: try again for real
        model = spec.factory()
    if not isinstance(model, nn.Module):
        raise SpecError(f"{spec.text} returned {type(model).__name__}, not a torch.nn.Module; "
                        "point the spec at a function or class that returns the model")
    return model


# ---------------------------------------------------------------- the sources


def _import(name: str, hint: str):
    try:
        return importlib.import_module(name)
    except ImportError as err:
        raise SpecError(f"cannot import {name} ({err}); {hint}") from None


def _hub(hub: str, name: str, text: str) -> ResolvedSpec:
    builtin = f" (or use a built-in model: {', '.join(s.name for s in list_models()[:6])}, ...)"
    if hub == "torchvision":
        models = _import("torchvision.models", "install it with `pip install torchvision`" + builtin)
        if name not in models.list_models():
            raise SpecError(f"torchvision has no model {name!r}; see torchvision.models.list_models()")
        return ResolvedSpec(text, lambda: models.get_model(name, weights=None), (3, 224, 224))
    if hub == "timm":
        timm = _import("timm", "install it with `pip install timm`" + builtin)
        if not timm.is_model(name):
            raise SpecError(f"timm has no model {name!r}; see timm.list_models()")
        return ResolvedSpec(text, lambda: timm.create_model(name, pretrained=False))
    transformers = _import("transformers", "install it with `pip install transformers`" + builtin)
    try:
        config = transformers.AutoConfig.for_model(name)
    except ValueError:
        raise SpecError(
            f"transformers:{name} is not a model type transformers knows (gpt2, llama, bert, ...); "
            "hub checkpoints would need a download, which a dry run never does"
        ) from None

    def factory():
        for auto in (transformers.AutoModelForCausalLM, transformers.AutoModel):
            try:
                return auto.from_config(config)
            except ValueError:
                continue
        raise SpecError(f"transformers has no model class for config type {name!r}")

    return ResolvedSpec(text, factory, None, torch.long)


def _from_file(path: str, attr: str, text: str):
    if not os.path.isfile(path):
        raise SpecError(f"no such file {path!r} in spec {text!r}; give the path to a .py file")
    name = f"actfx_spec_{abs(hash(os.path.abspath(path)))}"
    loader = importlib.util.spec_from_file_location(name, path)
    if loader is None or loader.loader is None:
        raise SpecError(f"cannot load {path!r} as Python; the file must end in .py")
    module = importlib.util.module_from_spec(loader)
    sys.modules[name] = module  # dataclasses and pickling look the module up by name
    try:
        loader.loader.exec_module(module)
    except Exception as err:  # noqa: BLE001 - whatever the file raises
        sys.modules.pop(name, None)
        raise SpecError(f"importing {path} failed: {type(err).__name__}: {err}") from err
    return _factory(module, attr, text, where=path)


def _from_module(module_name: str, attr: str, text: str):
    try:
        module = importlib.import_module(module_name)
    except Exception as err:  # noqa: BLE001 - ImportError, or whatever the module raises on import
        raise SpecError(f"cannot import {module_name!r} ({type(err).__name__}: {err}); "
                        "check the module path, or give path/to/file.py:factory") from err
    return _factory(module, attr, text)


def _factory(module, attr: str, text: str, where: str | None = None):
    value = module
    for part in attr.split("."):
        if not hasattr(value, part):
            names = sorted(n for n, v in vars(module).items() if not n.startswith("_") and callable(v)
                           and getattr(v, "__module__", None) == module.__name__)
            listed = f"; it defines {', '.join(names[:8])}" if names else ""
            raise SpecError(f"{where or module.__name__} has no attribute {attr!r} (spec {text!r}){listed}")
        value = getattr(value, part)
    if isinstance(value, nn.Module):
        return lambda: value
    if not callable(value):
        raise SpecError(f"{text} is a {type(value).__name__}; point the spec at a function or class "
                        "that returns a torch.nn.Module")
    return value
