"""Reference models shipped with actfx, written in plain torch.nn and traceable by torch.fx.

Importing this package defines classes only; models are built on demand by `build_model`.
"""

from .cifar_resnet import CifarResNet, resnet20, resnet56
from .densenet import DenseNet, densenet121
from .gpt import GPT, GPTConfig, gpt2, gpt_tiny
from .llama import Llama, LlamaConfig, llama_small, llama_tiny
from .perceptron import MLP, mlp
from .mobilenet import MobileNetV2, mobilenet_v2
from .registry import ModelSpec, build_model, get_model_spec, list_models
from .resnet import ResNet, resnet18, resnet50, resnet152
from .swin import SwinTransformer, swin_t, swin_tiny
from .unet import UNet, unet_small
from .vgg import VGG, vgg11_bn, vgg16_bn
from .vit import VisionTransformer, vit_b_16, vit_tiny

__all__ = [
    "ModelSpec",
    "build_model",
    "get_model_spec",
    "list_models",
    "ResNet",
    "resnet18",
    "resnet50",
    "resnet152",
    "CifarResNet",
    "resnet20",
    "resnet56",
    "MobileNetV2",
    "mobilenet_v2",
    "VGG",
    "vgg11_bn",
    "vgg16_bn",
    "DenseNet",
    "densenet121",
    "VisionTransformer",
    "vit_b_16",
    "vit_tiny",
    "SwinTransformer",
    "swin_t",
    "swin_tiny",
    "GPT",
    "GPTConfig",
    "gpt2",
    "gpt_tiny",
    "Llama",
    "LlamaConfig",
    "llama_small",
    "llama_tiny",
    "UNet",
    "unet_small",
    "MLP",
    "mlp",
]
