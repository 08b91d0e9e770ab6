"""actfx/specs.py: every kind of SPEC resolves to a model, or fails with a message that says how to fix it."""

from __future__ import annotations

import sys
import types

import pytest
import torch
import torch.nn as nn

from actfx.specs import SpecError, build, resolve


def test_builtin_names_carry_their_input():
    spec = resolve("gpt_tiny")
    assert spec.input_shape == (128,) and spec.input_dtype == torch.long
    model = build(spec)
    assert all(p.is_meta for p in model.parameters())  # built without memory or init compute


def test_module_and_file_specs(tmp_path):
    assert isinstance(build(resolve("actfx.models:resnet20")), nn.Module)
    path = tmp_path / "zoo.py"
    path.write_text("import torch.nn as nn\nnet = nn.Linear(3, 4)\ndef make():\n    return nn.Linear(2, 2)\n")
    assert isinstance(build(resolve(f"{path}:make")), nn.Linear)
    assert build(resolve(f"{path}:net")).in_features == 3  # a module object is used as it is


def test_a_factory_that_needs_real_tensors_is_built_on_the_cpu(tmp_path):
    path = tmp_path / "needs_data.py"
    path.write_text("import torch, torch.nn as nn\n"
                    "def make():\n    m = nn.Linear(2, 2)\n    assert m.weight.sum().item() == m.weight.sum().item()\n"
                    "    return m\n")
    model = build(resolve(f"{path}:make"))
    assert not model.weight.is_meta


@pytest.mark.parametrize("text, message", [
    ("resnt50", "did you mean 'resnet50'"),
    ("resnet50:", "cannot read spec"),
    ("actfx.models:not_a_model", "has no attribute"),
    ("actfx.models.registry:__name__", "is a str"),
    ("no_such_package.sub:net", "cannot import 'no_such_package.sub'"),
    ("elsewhere/net.py:Net", "no such file"),
])
def test_bad_specs(text, message):
    with pytest.raises(SpecError, match=message.replace("(", r"\(").replace(")", r"\)")):
        resolve(text)


@pytest.mark.parametrize("hub", ["torchvision", "timm"])
def test_a_missing_hub_says_how_to_install_it(hub, monkeypatch):
    monkeypatch.setitem(sys.modules, hub, None)  # as if not installed
    monkeypatch.setitem(sys.modules, f"{hub}.models", None)
    with pytest.raises(SpecError, match=f"pip install {hub}"):
        resolve(f"{hub}:resnet50")


def test_a_factory_returning_something_else():
    module = types.ModuleType("actfx_test_zoo")
    module.make = lambda: "not a model"
    sys.modules[module.__name__] = module
    try:
        with pytest.raises(SpecError, match="not a torch.nn.Module"):
            build(resolve("actfx_test_zoo:make"))
    finally:
        del sys.modules[module.__name__]


def test_hub_specs_build_with_random_weights(monkeypatch):
    """A stand-in for timm: the spec asks for the model by name, never for pretrained weights."""
    calls = []
    timm = types.ModuleType("timm")
    timm.is_model = lambda name: name == "tiny_net"
    timm.create_model = lambda name, pretrained: calls.append((name, pretrained)) or nn.Linear(4, 4)
    monkeypatch.setitem(sys.modules, "timm", timm)
    assert isinstance(build(resolve("timm:tiny_net")), nn.Linear)
    assert calls and all(pretrained is False for _, pretrained in calls)
    with pytest.raises(SpecError, match="timm has no model 'nope'"):
        resolve("timm:nope")


def test_transformers_model_types_need_no_download():
    transformers = pytest.importorskip("transformers")
    spec = resolve("transformers:gpt2")
    assert spec.input_dtype == torch.long
    with pytest.raises(SpecError, match="never does"):
        resolve("transformers:some-org/some-checkpoint")
    assert transformers is not None
