"""Tests for actfx/models: sizes, names, shapes, fx traceability and the registry.

Large models are built on the meta device (no memory, no init cost) for counting, naming and
tracing; numerical checks run on the small variants and on small images.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.fx as fx
from torch import nn

from actfx.models import (
    ModelSpec,
    build_model,
    get_model_spec,
    gpt_tiny,
    list_models,
    llama_tiny,
    resnet56,
    unet_small,
    vit_tiny,
)
from actfx.models.cifar_resnet import ZeroPadShortcut
from actfx.models.llama import RMSNorm, apply_rotary, rotary_tables

# torchvision's counts where it has the model; the CIFAR ResNets as in He et al. (option A);
# GPT-2 small as released (tied head counted once); the rest pin this package's own configs.
EXPECTED_PARAMS = {
    "resnet18": 11_689_512,
    "resnet50": 25_557_032,
    "resnet152": 60_192_808,
    "resnet20": 269_722,
    "resnet56": 853_018,
    "mobilenet_v2": 3_504_872,
    "vgg11_bn": 132_868_840,
    "vgg16_bn": 138_365_992,
    "densenet121": 7_978_856,
    "vit_b_16": 86_567_656,
    "vit_tiny": 809_354,
    "swin_t": 28_288_354,  # the paper reports 28M
    "swin_tiny": 135_670,
    "gpt2": 124_439_808,
    "gpt_tiny": 445_952,
    "llama_small": 60_039_680,
    "llama_tiny": 467_584,
    "unet_small": 1_927_042,
    "mlp": 1_863_690,
}

# Built for real and compared numerically; the others share these models' code and are only
# counted, traced and run on meta, which keeps the file fast on a 2-core CPU.
SMALL_INPUTS = {
    "resnet18": (2, 3, 64, 64),
    "resnet50": (2, 3, 64, 64),
    "resnet20": (2, 3, 32, 32),
    "resnet56": (2, 3, 32, 32),
    "mobilenet_v2": (2, 3, 64, 64),
    "vgg11_bn": (2, 3, 32, 32),
    "densenet121": (2, 3, 64, 64),
    "vit_tiny": (2, 3, 32, 32),
    "swin_tiny": (2, 3, 32, 32),
    "gpt_tiny": (2, 16),
    "llama_tiny": (2, 16),
    "unet_small": (2, 3, 60, 44),  # not a multiple of 8: the decoder must resize to its skips
    "mlp": (2, 1, 28, 28),
}

EXPECTED_OUTPUTS = {
    "resnet18": (2, 1000),
    "resnet50": (2, 1000),
    "resnet20": (2, 10),
    "resnet56": (2, 10),
    "mobilenet_v2": (2, 1000),
    "vgg11_bn": (2, 1000),
    "densenet121": (2, 1000),
    "vit_tiny": (2, 10),
    "swin_tiny": (2, 10),
    "gpt_tiny": (2, 16, 256),
    "llama_tiny": (2, 16, 256),
    "unet_small": (2, 2, 60, 44),
    "mlp": (2, 10),
}


def _meta_model(name: str) -> nn.Module:
    with torch.device("meta"):
        return build_model(name)


def _real_model(name: str) -> nn.Module:
    torch.manual_seed(0)
    model = build_model(name).eval()
    if name == "vit_tiny":
        # ViT's head starts at zero (ViT paper recipe); give it weights so outputs say something.
        nn.init.normal_(model.heads.head.weight, std=0.02)
    return model


def _input(name: str, shape: tuple[int, ...]) -> torch.Tensor:
    spec = get_model_spec(name)
    gen = torch.Generator().manual_seed(1)
    if spec.vocab_size is not None:
        return torch.randint(spec.vocab_size, shape, generator=gen)
    return torch.randn(shape, generator=gen)


def _count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())  # shared (tied) parameters counted once


# ---------------------------------------------------------------------------------- sizes, names


@pytest.mark.parametrize("name", sorted(EXPECTED_PARAMS))
def test_parameter_count(name):
    assert _count(_meta_model(name)) == EXPECTED_PARAMS[name]


FAMILIAR_KEYS = {
    "resnet50": ["conv1.weight", "bn1.running_mean", "layer1.0.conv1.weight", "layer2.0.downsample.0.weight", "fc.bias"],
    "resnet56": ["conv1.weight", "layer3.8.bn2.weight", "fc.weight"],
    "mobilenet_v2": ["features.0.0.weight", "features.1.conv.0.0.weight", "features.18.1.weight", "classifier.1.weight"],
    "vgg16_bn": ["features.0.weight", "features.1.running_var", "classifier.6.weight"],
    "densenet121": [
        "features.conv0.weight",
        "features.denseblock1.denselayer1.conv1.weight",
        "features.transition3.conv.weight",
        "features.norm5.weight",
        "classifier.weight",
    ],
    "vit_b_16": [
        "conv_proj.weight",
        "class_token",
        "encoder.pos_embedding",
        "encoder.layers.encoder_layer_11.self_attention.qkv.weight",
        "encoder.ln.weight",
        "heads.head.weight",
    ],
    "gpt2": ["wte.weight", "wpe.weight", "h.11.attn.c_attn.weight", "h.0.mlp.c_fc.bias", "ln_f.weight"],
    "llama_small": ["embed_tokens.weight", "layers.7.self_attn.q_proj.weight", "layers.0.mlp.gate_proj.weight", "lm_head.weight"],
}


@pytest.mark.parametrize(("name", "keys"), sorted(FAMILIAR_KEYS.items()))
def test_familiar_submodule_names(name, keys):
    state = _meta_model(name).state_dict()
    missing = [k for k in keys if k not in state]
    assert not missing, f"{name} lacks {missing}"


def test_gpt_head_is_tied_and_llama_head_is_not():
    gpt = _meta_model("gpt2")
    assert gpt.lm_head.weight is gpt.wte.weight
    llama = _meta_model("llama_small")
    assert llama.lm_head.weight is not llama.embed_tokens.weight
    assert not any(isinstance(m, nn.Linear) and m.bias is not None for m in llama.modules())


def test_llama_rotary_tables_stay_out_of_state_dict():
    assert not any("rope" in k for k in _meta_model("llama_tiny").state_dict())


def test_cifar_shortcuts_are_parameter_free():
    model = resnet56()
    shortcuts = [m.downsample for m in model.modules() if getattr(m, "downsample", None) is not None]
    assert len(shortcuts) == 2  # entering stages 2 and 3
    assert all(isinstance(s, ZeroPadShortcut) and not list(s.parameters()) for s in shortcuts)


def test_zero_pad_shortcut_subsamples_and_pads():
    x = torch.arange(2 * 2 * 4 * 4, dtype=torch.float32).reshape(2, 2, 4, 4)
    out = ZeroPadShortcut(2, 5)(x)
    assert out.shape == (2, 5, 2, 2)
    torch.testing.assert_close(out[:, :2], x[:, :, ::2, ::2], rtol=0, atol=0)
    assert not out[:, 2:].any()


# ------------------------------------------------------------------------------- forward, tracing


@pytest.mark.parametrize("spec", list_models(), ids=lambda s: s.name)
def test_every_model_traces_and_runs_on_meta_at_default_shape(spec):
    traced = fx.symbolic_trace(_meta_model(spec.name))
    x = spec.example_input(2, device="meta")
    out = traced(x)
    assert out.device.type == "meta"
    assert out.shape[0] == 2


@pytest.mark.parametrize("name", sorted(SMALL_INPUTS))
def test_forward_shape_and_traced_module_matches(name):
    model = _real_model(name)
    x = _input(name, SMALL_INPUTS[name])
    with torch.no_grad():
        expected = model(x)
        traced = fx.symbolic_trace(model)(x)
    assert expected.shape == EXPECTED_OUTPUTS[name]
    assert expected.dtype == torch.float32 and torch.isfinite(expected).all()
    assert expected.std() > 0  # a constant output would make the comparison below vacuous
    # The traced graph runs the same kernels in the same order, so results are bit-identical.
    torch.testing.assert_close(traced, expected, rtol=0, atol=0)


@pytest.mark.parametrize("factory", [gpt_tiny, llama_tiny], ids=["gpt_tiny", "llama_tiny"])
@pytest.mark.parametrize("seq_len", [1, 7, 37, 128])
def test_one_trace_serves_every_sequence_length(factory, seq_len):
    torch.manual_seed(0)
    model = factory().eval()
    traced = fx.symbolic_trace(model)
    x = torch.randint(256, (3, seq_len), generator=torch.Generator().manual_seed(seq_len))
    with torch.no_grad():
        torch.testing.assert_close(traced(x), model(x), rtol=0, atol=0)


@pytest.mark.parametrize("factory", [gpt_tiny, llama_tiny], ids=["gpt_tiny", "llama_tiny"])
def test_language_models_are_causal(factory):
    torch.manual_seed(0)
    model = factory().eval()
    x = torch.randint(256, (2, 20), generator=torch.Generator().manual_seed(0))
    y = x.clone()
    y[:, 12] = (y[:, 12] + 1) % 256
    with torch.no_grad():
        a, b = model(x), model(y)
    torch.testing.assert_close(a[:, :12], b[:, :12], rtol=0, atol=0)  # the past cannot see the change
    assert not torch.allclose(a[:, 12:], b[:, 12:])


def test_traced_dropout_follows_train_and_eval():
    torch.manual_seed(0)
    traced = fx.symbolic_trace(gpt_tiny(dropout=0.5))
    x = torch.randint(256, (2, 8))
    with torch.no_grad():
        traced.train()
        assert not torch.equal(traced(x), traced(x))
        traced.eval()
        torch.testing.assert_close(traced(x), traced(x), rtol=0, atol=0)


def test_rotary_scores_depend_only_on_relative_position():
    cos, sin = rotary_tables(head_dim=16, max_seq_len=64, theta=10000.0)
    q, k = torch.randn(2, 16, generator=torch.Generator().manual_seed(0)).unbind(0)

    def score(m: int, n: int) -> torch.Tensor:
        return (apply_rotary(q, cos[m], sin[m]) * apply_rotary(k, cos[n], sin[n])).sum()

    # Float32 sin/cos of angles up to ~60 rad carry ~1e-5 error; scores are O(10).
    for shift in (1, 5, 40):
        torch.testing.assert_close(score(3 + shift, 1 + shift), score(3, 1), rtol=1e-4, atol=1e-4)


def test_rmsnorm_gives_unit_root_mean_square():
    x = torch.randn(4, 32, generator=torch.Generator().manual_seed(0)) * 7.0
    out = RMSNorm(32, eps=0.0)(x)
    torch.testing.assert_close(out.pow(2).mean(-1), torch.ones(4), rtol=1e-5, atol=1e-5)


def test_unet_keeps_spatial_size():
    with torch.no_grad():
        out = unet_small().eval()(torch.randn(1, 3, 37, 53))
    assert out.shape == (1, 2, 37, 53)


@pytest.mark.parametrize("factory", [resnet56, vit_tiny, gpt_tiny, llama_tiny], ids=lambda f: f.__name__)
def test_init_is_deterministic_under_manual_seed(factory):
    torch.manual_seed(123)
    a = factory().state_dict()
    torch.manual_seed(123)
    b = factory().state_dict()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)


# ------------------------------------------------------------------------------------- registry


def test_registry_lists_every_name_once():
    names = [spec.name for spec in list_models()]
    assert sorted(names) == sorted(EXPECTED_PARAMS)
    assert len(set(names)) == len(names)


def test_spec_fields():
    assert get_model_spec("resnet50").input_shape == (3, 224, 224)
    assert get_model_spec("resnet56").input_shape == (3, 32, 32)
    gpt = get_model_spec("gpt2")
    assert gpt.input_dtype == torch.long and gpt.vocab_size == 50257 and gpt.input_shape == (1024,)
    assert all(spec.description and "\n" not in spec.description for spec in list_models())


def test_example_input_matches_spec():
    tokens = get_model_spec("llama_tiny").example_input(3)
    assert tokens.shape == (3, 128) and tokens.dtype == torch.long
    assert 0 <= tokens.min() and tokens.max() < 256
    images = get_model_spec("mlp").example_input(2)
    assert images.shape == (2, 1, 28, 28) and images.dtype == torch.float32


def test_build_model_returns_fresh_modules():
    a, b = build_model("resnet20"), build_model("resnet20")
    assert isinstance(a, nn.Module) and a is not b
    assert a.conv1.weight.data_ptr() != b.conv1.weight.data_ptr()


def test_unknown_name_suggests_closest_and_lists_all():
    with pytest.raises(ValueError, match="Did you mean 'mobilenet_v2'") as err:
        get_model_spec("mobilenetv2")
    assert all(name in str(err.value) for name in EXPECTED_PARAMS)
    with pytest.raises(ValueError, match="unknown model"):
        build_model("alexnet")


def test_model_spec_rejects_inconsistent_fields():
    with pytest.raises(ValueError, match="vocab_size"):
        ModelSpec("x", gpt_tiny, (16,), torch.long, None, "token model without a vocabulary")
    with pytest.raises(ValueError, match="input_dtype"):
        ModelSpec("x", resnet56, (3, 32, 32), torch.float16, None, "unsupported dtype")
    with pytest.raises(ValueError, match="input_shape"):
        ModelSpec("x", resnet56, (3, 0, 32), torch.float32, None, "empty image")


def test_import_builds_no_model():
    code = (
        "import torch.nn as nn\n"
        "built = []\n"
        "orig = nn.Module.__init__\n"
        "def spy(self, *a, **k):\n"
        "    built.append(type(self).__name__)\n"
        "    orig(self, *a, **k)\n"
        "nn.Module.__init__ = spy\n"
        "import actfx.models\n"
        "assert not built, built\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[1])
