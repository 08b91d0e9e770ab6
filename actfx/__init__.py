"""actfx: train with activations saved for backward in 1-8 bits.

    model = actfx.convert(model, bits=2)   # same parameters, same state_dict, same outputs
    actfx.show(model)                      # what is saved, before -> after
    model = actfx.compile(model, bits=2)   # inside torch.compile: packs what the partitioner saves
    plan = actfx.plan(model, x, budget="6GiB"); model = actfx.convert(model, plan=plan)
"""

from actfx.config import Config
from actfx.convert import convert, is_converted
from actfx.format import PackedTensor, pack
from actfx.planner import BudgetError, Plan, plan
from actfx.show import show

__version__ = "0.1.0"


def __getattr__(name: str):
    """``actfx.compile`` and ``actfx.backend`` import Inductor: only when first used."""
    if name in ("compile", "backend"):
        from actfx import compiled

        return getattr(compiled, name)
    raise AttributeError(f"module 'actfx' has no attribute {name!r}")


__all__ = ["BudgetError", "Config", "PackedTensor", "Plan", "backend", "compile", "convert", "is_converted", "pack",
           "plan", "show", "__version__"]
