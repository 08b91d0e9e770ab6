"""What a user would run instead of plain PyTorch, each as "prepare the model, wrap the forward".

* plain: the model as built.
* actfx1/2/4/8: ``actfx.convert(model, bits=b)``.
* checkpoint: ``torch.utils.checkpoint`` around every residual / transformer block, found
  generically (`find_blocks`), so no model needs its own recipe.
* save_on_cpu: ``torch.autograd.graph.save_on_cpu`` around the forward. On a CPU run the saved
  tensors already live in host memory, so it holds what plain holds; it matters on a GPU.
* compile, compile_budget0.3: ``torch.compile`` (Inductor), the second with the partitioner's
  ``activation_memory_budget=0.3``.
* actfx_compile2, actfx_compile2_budget0.3: ``actfx.compile(model, bits=2[, memory_budget=0.3])``.
Compiled strategies compile on their first step; the benchmarks report that step separately.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

import actfx


class Checkpointed(nn.Module):
    """Runs ``block`` under non-reentrant checkpointing: only its inputs stay alive for backward."""

    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        self.block = block

    def forward(self, *args, **kwargs):
        return checkpoint(self.block, *args, use_reentrant=False, **kwargs)


def find_blocks(model: nn.Module) -> list[str]:
    """Paths of the blocks to checkpoint: entries of a Sequential / ModuleList that are composite
    modules (a ResNet's ``layer2[3]``, a transformer's ``h[5]``), when a container holds two or
    more of them. Blocks inside a chosen block are not descended into."""
    found: list[str] = []
    for path, module in model.named_modules():
        if any(path.startswith(p + ".") for p in found):
            continue
        if not isinstance(module, (nn.Sequential, nn.ModuleList)):
            continue
        composite = [name for name, child in module.named_children() if any(True for _ in child.children())]
        if len(composite) >= 2:
            found.extend(f"{path}.{name}" if path else name for name in composite)
    return found


def checkpoint_blocks(model: nn.Module) -> list[str]:
    """Wrap every block of `model` in `Checkpointed`, in place; returns the wrapped paths.

    In place because the benchmark builds a fresh model for each strategy in its own process.
    """
    paths = find_blocks(model)
    if not paths:
        raise ValueError(f"{type(model).__name__}: no repeated residual / transformer blocks to checkpoint")
    for path in paths:
        parent_path, _, name = path.rpartition(".")
        parent = model.get_submodule(parent_path) if parent_path else model
        parent._modules[name] = Checkpointed(parent._modules[name])
    return paths


@dataclasses.dataclass(frozen=True)
class Strategy:
    name: str
    description: str
    prepare: Callable[[nn.Module], nn.Module]
    forward_context: Callable[[torch.device], contextlib.AbstractContextManager] = (
        lambda device: contextlib.nullcontext()
    )


def _actfx(bits: int) -> Strategy:
    return Strategy(f"actfx{bits}", f"actfx.convert(model, bits={bits})",
                    lambda model: actfx.convert(model, bits=bits))


def _budget_backend(budget: float):
    """Inductor with the partitioner's activation_memory_budget set for this compilation only."""
    from torch._functorch import config as functorch_config
    from torch._inductor.compile_fx import compile_fx

    def backend(gm, example_inputs):
        with functorch_config.patch(activation_memory_budget=budget):
            return compile_fx(gm, example_inputs)

    return backend


def _compile(budget: float | None) -> Strategy:
    name = "compile" if budget is None else f"compile_budget{budget}"
    backend = "inductor" if budget is None else _budget_backend(budget)
    return Strategy(name, f"torch.compile{'' if budget is None else f', activation_memory_budget={budget}'}",
                    lambda model: torch.compile(model, backend=backend))


def _actfx_compile(bits: int, budget: float | None) -> Strategy:
    name = f"actfx_compile{bits}" + ("" if budget is None else f"_budget{budget}")
    return Strategy(name, f"actfx.compile(model, bits={bits}, memory_budget={budget})",
                    lambda model: actfx.compile(model, bits=bits, memory_budget=budget))


def _prepare_checkpoint(model: nn.Module) -> nn.Module:
    checkpoint_blocks(model)
    return model


def _save_on_cpu(device: torch.device) -> contextlib.AbstractContextManager:
    return torch.autograd.graph.save_on_cpu(pin_memory=device.type == "cuda")


STRATEGIES: dict[str, Strategy] = {
    s.name: s
    for s in (
        Strategy("plain", "plain PyTorch", lambda model: model),
        _actfx(1),
        _actfx(2),
        _actfx(4),
        _actfx(8),
        Strategy("checkpoint", "torch.utils.checkpoint per block", _prepare_checkpoint),
        Strategy("save_on_cpu", "torch.autograd.graph.save_on_cpu", lambda model: model, _save_on_cpu),
        _compile(None),
        _compile(0.3),
        _actfx_compile(2, None),
        _actfx_compile(2, 0.3),
    )
}


def get_strategy(name: str) -> Strategy:
    try:
        return STRATEGIES[name]
    except KeyError:
        raise ValueError(f"unknown strategy {name!r}; choose from {', '.join(STRATEGIES)}") from None


def training_loss(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Cross-entropy over the last dim: class logits [b, c] or next-token logits [b, s, v]."""
    return F.cross_entropy(output.flatten(0, -2).float(), target.flatten())


class WithLoss(nn.Module):
    """The model and its training loss as one module, as a model that computes its own loss (a
    Hugging Face model given labels) is: every strategy then applies to the loss too. For a
    language model the loss's saved log-probabilities are the largest single tensor."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return training_loss(self.model(x), target)
