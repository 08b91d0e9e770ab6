"""How converted and compiled models copy and pickle.

Why: both are made at run time. A converted model's class is created at conversion, so pickle
(``torch.save(model)``) cannot find it by name; a compiled model's forward is an instance
attribute bound to that very object, so a ``deepcopy`` (an EMA or teacher copy) kept running the
original's parameters, silently. Each pickles as the original module plus how it was converted
or compiled, and is converted or compiled again when loaded; a compiled model's copies are
compiled anew around a copy of the original.
"""

from __future__ import annotations

import copy
import warnings

import torch.nn as nn

COMPILE_ARGS = "_actfx_compile_args"  # instance attribute: actfx.compile's keyword arguments


def reduce_converted(self, protocol):
    """A converted model pickles as its original module and the record of how it was converted
    (a torch.export capture happens again at the first training call). A converted submodule
    pickled alone has no such record: it loads unconverted, with a warning."""
    from actfx.breakdown import original_of

    original = original_of(self)
    record = getattr(self, "_actfx_record", None)
    if record is None:
        warnings.warn(f"actfx: a converted {type(original).__name__} pickled apart from its model loads "
                      "unconverted; pickle the whole converted model, or convert again after loading",
                      stacklevel=2)
        return original.__reduce_ex__(protocol)
    return _convert_again, (original, record.config, record.leaf_modules)


def copied(self, memo=None):
    """``copy.copy`` / ``copy.deepcopy`` of a converted model as of any object (same class), not
    through the pickling reduction; but a deep copy of a model that captures at its first training
    call is converted again from a deep copy of the original: that capture lives in the class's
    forward, so a copy of the object shared it (the copy's capture went into the original's
    record, and ``actfx.show`` of the copy listed nothing converted)."""
    record = getattr(self, "_actfx_record", None)
    if memo is not None and record is not None and record.first_call_capture:
        from actfx.breakdown import original_of

        return _convert_again(copy.deepcopy(original_of(self), memo), record.config, record.leaf_modules)
    # nn.Module's own state, not the class's __getstate__: a parametrized module's (weight_norm)
    # raises to forbid pickling, and copies of a converted one (actfx.show, the first-call
    # capture) failed although PyTorch copies the module itself fine
    new = type(self).__new__(type(self))
    if memo is not None:
        memo[id(self)] = new
    state = nn.Module.__getstate__(self)
    new.__setstate__(state if memo is None else copy.deepcopy(state, memo))
    return new


def _convert_again(original: nn.Module, config, leaf_modules: tuple) -> nn.Module:
    from actfx.convert import convert

    return convert(original, config=config, leaf_modules=leaf_modules)


def uncompiled(self) -> nn.Module:
    """The module ``actfx.compile`` was given, as a view sharing this compiled one's state."""
    from actfx.convert import _clone

    view = _clone(self, type(self).__bases__[0])
    for name in ("forward", "_actfx_compiled", COMPILE_ARGS, SOURCE):
        view.__dict__.pop(name, None)
    view.training = self.training
    return view


def _compile_again(model: nn.Module, arguments: dict) -> nn.Module:
    from actfx.compiled import compile

    return compile(model, **arguments)


def copy_compiled(self):
    return _compile_again(uncompiled(self), getattr(self, COMPILE_ARGS))


def deepcopy_compiled(self, memo):
    return _compile_again(copy.deepcopy(uncompiled(self), memo), copy.deepcopy(getattr(self, COMPILE_ARGS), memo))


def reduce_compiled(self, protocol):
    return _compile_again, (uncompiled(self), getattr(self, COMPILE_ARGS))


SOURCE = "_actfx_source"  # the module actfx.compile was given, on its compiled copy


def _training(self) -> bool:
    return self.__dict__[SOURCE].training


def _set_training(self, mode: bool) -> None:
    self.__dict__[SOURCE].training = mode


def compiled_class(base: type) -> type:
    """The class of ``actfx.compile``'s result: ``base`` with the copies above, and the training
    flag of the module it was made from (``model.eval()`` reaches the compiled copy's root too,
    as it reaches ``torch.compile(model)``; the copy's root ran its training branches before)."""
    attrs = {"__module__": base.__module__, "__qualname__": f"ActfxCompiled{base.__qualname__}",
             "__copy__": copy_compiled, "__deepcopy__": deepcopy_compiled, "__reduce_ex__": reduce_compiled,
             "training": property(_training, _set_training)}
    return type(f"ActfxCompiled{base.__name__}", (base,), attrs)
