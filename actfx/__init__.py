"""actfx: train with activations saved for backward in 1-8 bits.

    model = actfx.convert(model, bits=2)   # same parameters, same state_dict, same outputs
    actfx.show(model)                      # what is saved, before -> after
"""

from actfx.config import Config
from actfx.convert import convert, is_converted
from actfx.format import PackedTensor, pack
from actfx.show import show

__version__ = "0.1.0"

__all__ = ["Config", "PackedTensor", "convert", "is_converted", "pack", "show", "__version__"]
