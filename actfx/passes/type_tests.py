"""Find the type tests of the model's code that fx answers wrongly and no runtime hook can see.

``type(x) is torch.Tensor``, ``x.__class__ is torch.Tensor`` or an ``isinstance`` bound to another
name at import (``from builtins import isinstance as _isinstance``) are False for fx's Proxy, so
the trace records the other branch and the converted forward computes another function, silently
(a skip connection dropped: outputs 1.28 off). ``type`` and ``is`` cannot be swapped for the trace
as ``isinstance`` is (``capture._isinstance_noted``), so the code that ran during the trace is read
instead: the frames that recorded ops, and the Python functions they call.
"""

from __future__ import annotations

import builtins
import dis
import inspect
import sys
import types

# Modules whose code is PyTorch's, actfx's or the standard library's bookkeeping, not the model's
_OWN = frozenset({"torch", "actfx", "builtins", "typing", "collections", "functools", "contextlib", "dataclasses",
                  "abc", "enum", "warnings", "inspect", "copy"})
_TENSOR_NAMES = frozenset({"Tensor", "Parameter"})
_WINDOW = 8  # instructions between the type read and the comparison that uses it
_CALLEE_DEPTH = 2


def user_frames_seen(seen: dict, root: types.CodeType) -> None:
    """Called while fx records an op: notes the code of every user frame on the stack below the
    trace's own frame (code ``root``), with its globals and ``self``, so that the trace's end can
    read it."""
    frame = sys._getframe(2)
    while frame is not None and frame.f_code is not root:
        code = frame.f_code
        if code not in seen and not _own_module(frame.f_globals.get("__name__", "")):
            seen[code] = (frame.f_globals, frame.f_locals.get("self"))
        frame = frame.f_back


def wrong_type_tests(seen: dict) -> tuple[list[str], list[str]]:
    """``file:line`` of each type test of a tensor in the code noted by ``user_frames_seen`` and
    in the functions it calls (two levels): the calls of an ``isinstance`` bound to another name
    (torch.export answers those right: its fake tensors are tensors), and the exact ones
    (``type(x) is``, ``x.__class__ is``: a fake tensor is a subclass, so export fails them too)."""
    aliased, exact, done = [], [], set()
    todo = [(code, glb, owner, 0) for code, (glb, owner) in seen.items()]
    while todo:
        code, glb, owner, depth = todo.pop()
        if code in done:
            continue
        done.add(code)
        more_aliased, more_exact = _tests_in(code, glb)
        aliased, exact = aliased + more_aliased, exact + more_exact
        todo += [(c, glb, owner, depth) for c in code.co_consts if isinstance(c, types.CodeType)]
        if depth < _CALLEE_DEPTH:
            todo += [(f.__code__, f.__globals__, owner, depth + 1) for f in _called_functions(code, glb, owner)]
    return aliased, exact


def _tests_in(code: types.CodeType, glb: dict) -> tuple[list[str], list[str]]:
    instructions = list(dis.get_instructions(code))
    aliased, exact, line = [], [], code.co_firstlineno
    for i, ins in enumerate(instructions):
        line = ins.starts_line or line
        if ins.opname not in ("IS_OP", "COMPARE_OP", "CONTAINS_OP", "CALL", "CALL_FUNCTION"):
            continue
        window = instructions[max(0, i - _WINDOW):i]
        if not any(w.opname in ("LOAD_ATTR", "LOAD_GLOBAL", "LOAD_METHOD") and w.argval in _TENSOR_NAMES
                   for w in window):
            continue
        where = f"{code.co_filename.rsplit('/', 1)[-1]}:{line}"
        if ins.opname.startswith("CALL"):
            if any(_resolves_to(w, glb, builtins.isinstance) and w.argval != "isinstance" for w in window):
                aliased.append(where)
        elif any(_resolves_to(w, glb, builtins.type) or (w.opname == "LOAD_ATTR" and w.argval == "__class__")
                 for w in window):
            exact.append(where)
    return aliased, exact


def _resolves_to(ins, glb: dict, target) -> bool:
    if ins.opname not in ("LOAD_GLOBAL", "LOAD_NAME"):
        return False
    name = ins.argval
    return glb.get(name, getattr(builtins, name, None) if name not in glb else None) is target


def _called_functions(code: types.CodeType, glb: dict, owner):
    """The plain Python functions of user modules that ``code`` reads as globals or as attributes
    of ``self`` (``owner``: methods, and functions kept on the module)."""
    previous = None
    for ins in dis.get_instructions(code):
        value = None
        if ins.opname == "LOAD_GLOBAL":
            value = glb.get(ins.argval)
        elif ins.opname in ("LOAD_ATTR", "LOAD_METHOD") and owner is not None and previous is not None \
                and previous.opname == "LOAD_FAST" and previous.argval == "self":
            value = inspect.getattr_static(owner, ins.argval, None)
            value = getattr(value, "__func__", value)  # staticmethod / classmethod
        if inspect.isfunction(value) and not _own_module(value.__module__ or ""):
            yield value
        previous = ins


def _own_module(name: str) -> bool:
    return name.split(".")[0] in _OWN
