"""Built-in reference models by name, so the CLI and benchmarks need nothing beyond torch.

The table maps names to factories; nothing is constructed until `build_model` is called.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from .cifar_resnet import resnet20, resnet56
from .densenet import densenet121
from .gpt import gpt2, gpt_tiny
from .llama import llama_small, llama_tiny
from .mobilenet import mobilenet_v2
from .perceptron import mlp
from .resnet import resnet18, resnet50, resnet152
from .unet import unet_small
from .vgg import vgg11_bn, vgg16_bn
from .swin import swin_t, swin_tiny
from .vit import vit_b_16, vit_tiny

__all__ = ["ModelSpec", "list_models", "get_model_spec", "build_model"]


@dataclass(frozen=True)
class ModelSpec:
    """What a caller needs to build a model and feed it: `input_shape` excludes the batch dim."""

    name: str
    factory: Callable[[], nn.Module]
    input_shape: tuple[int, ...]
    input_dtype: torch.dtype
    vocab_size: int | None
    description: str

    def __post_init__(self) -> None:
        if self.input_dtype not in (torch.float32, torch.long):
            raise ValueError(f"{self.name}: input_dtype must be torch.float32 or torch.long, got {self.input_dtype}")
        if (self.input_dtype == torch.long) != (self.vocab_size is not None):
            raise ValueError(f"{self.name}: vocab_size must be given exactly when inputs are token ids")
        if not self.input_shape or any(d <= 0 for d in self.input_shape):
            raise ValueError(f"{self.name}: input_shape must be non-empty and positive, got {self.input_shape}")

    def example_input(
        self, batch_size: int = 1, *, device: torch.device | str | None = None, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """A random batch of the default shape: token ids below `vocab_size`, or N(0, 1) images."""
        shape = (batch_size, *self.input_shape)
        if self.vocab_size is not None:
            return torch.randint(self.vocab_size, shape, generator=generator, device=device)
        return torch.randn(shape, generator=generator, device=device)


def _image(name: str, factory: Callable[[], nn.Module], size: int, description: str) -> ModelSpec:
    return ModelSpec(name, factory, (3, size, size), torch.float32, None, description)


def _tokens(name: str, factory: Callable[[], nn.Module], seq_len: int, vocab: int, description: str) -> ModelSpec:
    return ModelSpec(name, factory, (seq_len,), torch.long, vocab, description)


_SPECS: tuple[ModelSpec, ...] = (
    _image("resnet18", resnet18, 224, "ResNet-18, ImageNet, basic blocks (11.7M)"),
    _image("resnet50", resnet50, 224, "ResNet-50, ImageNet, bottleneck blocks (25.6M)"),
    _image("resnet152", resnet152, 224, "ResNet-152, ImageNet, bottleneck blocks (60.2M)"),
    _image("resnet20", resnet20, 32, "ResNet-20, CIFAR, option-A shortcuts (0.27M)"),
    _image("resnet56", resnet56, 32, "ResNet-56, CIFAR, option-A shortcuts (0.85M)"),
    _image("mobilenet_v2", mobilenet_v2, 224, "MobileNetV2, ImageNet, inverted residuals (3.5M)"),
    _image("vgg11_bn", vgg11_bn, 224, "VGG-11 with batch norm, ImageNet (132.9M)"),
    _image("vgg16_bn", vgg16_bn, 224, "VGG-16 with batch norm, ImageNet (138.4M)"),
    _image("densenet121", densenet121, 224, "DenseNet-121, ImageNet, growth 32 (8.0M)"),
    _image("vit_b_16", vit_b_16, 224, "ViT-B/16, ImageNet, 224px only (86.6M)"),
    _image("vit_tiny", vit_tiny, 32, "ViT, 32px, 4x4 patches, 4 layers of 128, for tests (0.8M)"),
    _image("swin_t", swin_t, 224, "Swin-T, ImageNet, shifted windows of 7, 224px only (28.3M)"),
    _image("swin_tiny", swin_tiny, 32, "Swin, 32px, 2x2 patches, windows of 4, 2 stages, for tests (0.1M)"),
    _tokens("gpt2", gpt2, 1024, 50257, "GPT-2 small, 12 layers of 768, tied head (124M)"),
    _tokens("gpt_tiny", gpt_tiny, 128, 256, "GPT, 2 layers of 128, byte vocabulary, for tests (0.4M)"),
    _tokens("llama_small", llama_small, 1024, 32000, "LLaMA-style, 8 layers of 512, 32k vocabulary (60M)"),
    _tokens("llama_tiny", llama_tiny, 128, 256, "LLaMA-style, 2 layers of 128, byte vocabulary, for tests (0.5M)"),
    _image("unet_small", unet_small, 128, "U-Net, 3 levels, 32-256 channels, 2-class segmentation (1.9M)"),
    ModelSpec("mlp", mlp, (1, 28, 28), torch.float32, None, "MLP 784-1024-1024-10 on flattened 28x28 (1.9M)"),
)

# A read-only view built once from an immutable tuple: no state that callers can change.
_BY_NAME = {spec.name: spec for spec in _SPECS}


def list_models() -> list[ModelSpec]:
    """All built-in models, in a stable order (ImageNet CNNs, CIFAR, transformers, others)."""
    return list(_SPECS)


def get_model_spec(name: str) -> ModelSpec:
    """The spec for `name`; an unknown name raises ValueError naming the closest match."""
    try:
        return _BY_NAME[name]
    except KeyError:
        pass
    close = difflib.get_close_matches(name, _BY_NAME, n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    raise ValueError(f"unknown model {name!r}.{hint} Available: {', '.join(_BY_NAME)}")


def build_model(name: str) -> nn.Module:
    """A freshly initialised model (deterministic under torch.manual_seed), in training mode."""
    return get_model_spec(name).factory()
