"""Capture a module's forward as an fx graph, in train and in eval mode.

fx bakes Python-level reads of ``self.training`` into the graph (``F.dropout(x, p, self.training)``
becomes a constant), so the module is traced once per mode; when the two graphs differ the
converted forward picks the right one at run time. The user's modules are put back in the
mode they were in.
"""

from __future__ import annotations

import builtins
import contextlib
import operator
import sys
import warnings

import torch
import torch.nn as nn
import torch.utils._pytree as pytree
from torch.fx import Graph, GraphModule, Node, Proxy, Tracer
from torch.nn.utils import parametrize

from actfx.passes.autograd_functions import functions_as_calls
from actfx.passes.hf_outputs import RECORDING_FLAG, is_recording_hook
from actfx.passes.trace_effects import (TraceEffect, containers_kept, parameter_writes_refused, parameters_kept,
                                         random_draws_refused, restore_containers, restore_parameters)
from actfx.passes.traced_sizes import traced_sizes
from actfx.passes.traced_through import TRACED_THROUGH
from actfx.passes.type_tests import user_frames_seen, wrong_type_tests


# node.meta key of a module call a non-reentrant checkpoint made in the traced forward
CHECKPOINTED = "actfx_checkpointed"


# Callers whose isinstance checks of a traced value are PyTorch's or actfx's own bookkeeping
# (fx's arguments, nn.Module.__setattr__), except torch.jit.isinstance, which user code calls
_OWN_CHECKS = ("torch.", "actfx.")
_USER_CHECKS = ("torch._jit_internal",)
_isinstance = isinstance


@contextlib.contextmanager
def _isinstance_noted(tracer):
    """While fx traces: ``isinstance(x, torch.Tensor)`` (or ``torch.jit.isinstance``) of a traced
    value in the model's code is noted in ``tracer.type_checks``. A Proxy is no tensor, so fx
    records the other branch and the converted forward computes another function, silently
    (monai's BasicUNet: a crash; the same code with matching shapes: outputs 1.28 off). Python
    code looks ``isinstance`` up in builtins, so it is swapped there for the trace, as fx swaps
    the functions it wraps."""

    def noting(obj, classes):
        result = _isinstance(obj, classes)
        if result or type(obj) is not Proxy:
            return result
        caller = sys._getframe(1)
        name = caller.f_globals.get("__name__", "")
        if not (name in _USER_CHECKS or not name.startswith(_OWN_CHECKS)):
            return result  # fx's and PyTorch's own checks see the Proxy as the Proxy it is
        known = _known_type(obj, tracer)
        if known is not None:
            return issubclass(known, classes)
        if _could_be_tensor(classes) or _could_be_tuple(obj, classes, tracer):
            tracer.type_checks.append(f"{caller.f_code.co_filename.rsplit('/', 1)[-1]}:{caller.f_lineno}")
        return result

    previous, builtins.isinstance = builtins.isinstance, noting
    try:
        yield
    finally:
        builtins.isinstance = previous


def _structure(module):
    """The types of what a torch.nn module fx keeps as a call returns (nested tuples for tuples),
    where they are fixed; None where they are not known."""
    if isinstance(module, nn.LSTM):
        return (torch.Tensor, (torch.Tensor, torch.Tensor))
    if isinstance(module, (nn.GRU, nn.RNN, nn.LSTMCell)):
        return (torch.Tensor, torch.Tensor)
    if getattr(module, "return_indices", False) is True:  # max pooling, fractional too
        return (torch.Tensor, torch.Tensor)
    if type(module).__module__ in _TENSOR_MODULE_FILES and not isinstance(module, (nn.MultiheadAttention, nn.Identity)):
        return torch.Tensor  # (an Identity returns whatever it is given)
    return None


# torch.nn's files of modules that return one tensor (not containers, not DDP, not transformers' stacks)
_TENSOR_MODULE_FILES = frozenset(f"torch.nn.modules.{name}" for name in (
    "conv", "linear", "activation", "batchnorm", "normalization", "instancenorm", "dropout", "padding",
    "pixelshuffle", "upsampling", "flatten", "sparse", "distance", "fold", "channelshuffle", "pooling"))


def _module_output(obj: Proxy, tracer):
    """(module, getitem positions) when ``obj`` is a module call's output or an element of it."""
    node, positions = obj.node, []
    while node.op == "call_function" and node.target is operator.getitem and len(node.args) == 2:
        positions.append(node.args[1])
        node = node.args[0]
    if node.op != "call_module":
        return None, positions
    try:
        return tracer.root.get_submodule(node.target), positions[::-1]
    except AttributeError:
        return None, positions


def _known_type(obj: Proxy, tracer):
    """The type at run time of a torch.nn module's output (or an element of it) that fx keeps as
    a Proxy, where it is fixed (an LSTM's (out, (h, c)): ``isinstance(state, tuple)`` is answered
    True for (h, c)); None otherwise."""
    module, positions = _module_output(obj, tracer)
    structure = _structure(module) if module is not None else None
    for i in positions:
        if not (_isinstance(structure, tuple) and _isinstance(i, int) and -len(structure) <= i < len(structure)):
            return None
        structure = structure[i]
    return tuple if _isinstance(structure, tuple) else structure


def _could_be_tuple(obj: Proxy, classes, tracer) -> bool:
    """``isinstance(out, tuple)`` of the output of a module fx keeps as a call whose type is not
    known (hooked, declared a leaf): a Proxy is no tuple, and ``out[0] if isinstance(out, tuple)
    else out`` took the other branch, silently (an LSTM's (h, c) for h: outputs 0.02 off)."""
    classes = classes if _isinstance(classes, tuple) else (classes,)
    module, _ = _module_output(obj, tracer)
    return module is not None and any(_isinstance(c, type) and issubclass(c, (tuple, list)) for c in classes)


def _could_be_tensor(classes) -> bool:
    classes = classes if _isinstance(classes, tuple) else (classes,)
    return any(_isinstance(c, type) and (issubclass(torch.Tensor, c) and c is not object or issubclass(c, torch.Tensor))
               for c in classes)


class RunsOwnForward(RuntimeError):
    """Neither fx nor torch.export may capture this forward: the module runs it as written, with
    its submodules converted. ``fix``: how to have it converted whole."""

    fix = ""


class TypeTestError(RunsOwnForward):
    """The forward tests a value's exact type (``type(x) is torch.Tensor``): fx's Proxy and
    torch.export's fake tensors both fail it, so neither may capture that forward."""

    fix = "write the test as isinstance(x, torch.Tensor) to convert it whole"


class HooksReadBackError(RunsOwnForward):
    """A forward hook writes into the model's own state (a dict or object the model holds, or
    the model itself), which the forward may read back: timm's ``features_only`` through hooks,
    a perceptual loss over the features its hooks stored. fx does not run hooks while tracing,
    and torch.export runs them once, at capture, so neither may capture that forward."""

    fix = "have the forward read its submodules' outputs directly (not what hooks stored) to convert it whole"


class CheckpointedOpsError(RunsOwnForward):
    """The forward runs ops outside modules inside a non-reentrant ``torch.utils.checkpoint``:
    fx and torch.export trace through the checkpoint, and a rewrite would hold those ops' values
    (and each module's exact input) where the checkpoint held only its inputs (a checkpointed
    ``b(gelu(a(x)))``: 16 KB in PyTorch, 43 KB converted)."""

    fix = ("checkpoint a module rather than a function (a module a checkpoint calls is rerun in backward), "
           "or name the block in actfx.Config(recompute_modules=[...]), to convert it whole")


# torch.nn modules that are one functional call with a variant, traced into (as a leaf, what the
# module saved stayed exact next to packs of the same inputs: nn.Bilinear held 5% more than PyTorch)
_TRACED_INTO = (nn.Bilinear, nn.LocalResponseNorm)


class _ActfxTracer(Tracer):
    def __init__(self, leaf_types: tuple, leaf_paths: frozenset):
        super().__init__()
        self.leaf_types, self.leaf_paths = leaf_types, leaf_paths
        self.type_checks: list[str] = []
        self._user_code: dict = {}  # code -> (globals, self) of the frames that recorded ops

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if has_hooks(m) or self._checkpointing():
            return True  # a module a non-reentrant checkpoint calls stays a call: it is rerun (see create_node)
        if parametrize.is_parametrized(m) or type(m) in _TRACED_INTO:
            return False  # traced into: its ops (F.linear on the computed weight) have variants
        if (self.leaf_types and isinstance(m, self.leaf_types)) or qualname in self.leaf_paths:
            return True
        return super().is_leaf_module(m, qualname)

    def trace(self, root, concrete_args=None):
        self.grad_mode_changed, self._grad_at_start = False, torch.is_grad_enabled()
        self.autocast_changed, self._autocast_at_start = False, autocast_state()
        self.hooks_changed, self._hooks_at_start = False, _saved_tensors_hooks()
        self.type_checks, self._user_code = [], {}
        bound: list = []
        if isinstance(root, nn.Module) and hooks_write_model_state(root):
            raise HooksReadBackError("a forward hook stores into the model's own state, which its forward may "
                                     "read back, and fx does not run hooks while tracing")
        with functions_as_calls(self, bound), _isinstance_noted(self), traced_sizes():
            graph = super().trace(root, concrete_args)
        if bound:
            raise RuntimeError(f"the custom autograd.Function {bound[0].__qualname__} runs through an apply bound before "
                               "conversion (as `f = Function.apply`), which fx traces into, dropping its backward")
        aliased, exact = wrong_type_tests(self._user_code)
        if exact:
            raise TypeTestError(f"an exact type test of a traced value at {exact[0]}, which fx and torch.export "
                                "answer as for no plain tensor (the branch would be wrong)")
        if self.type_checks or aliased:
            raise RuntimeError(f"isinstance of a traced value at {(self.type_checks + aliased)[0]}, which fx answers "
                               "as for no tensor (the branch would be wrong)")
        if self.grad_mode_changed:
            raise RuntimeError("the forward changes grad mode (torch.no_grad, enable_grad or set_grad_enabled), "
                               "which an fx graph cannot record: it would compute that block with gradients")
        if self.autocast_changed:
            raise RuntimeError("the forward enters or leaves torch.autocast, which an fx graph cannot record: "
                               "it would compute that block in the caller's precision")
        _check_values_traced(graph, self.root)
        return graph

    def create_proxy(self, kind, target, args, kwargs, *rest, **options):
        """A call to a function in ``TRACED_THROUGH`` is traced through its ops."""
        if kind == "call_function" and target in TRACED_THROUGH:
            return TRACED_THROUGH[target](*args, **kwargs)
        user_frames_seen(self._user_code, _ActfxTracer.trace.__code__)
        return super().create_proxy(kind, target, args, kwargs, *rest, **options)

    def create_node(self, kind, target, *args, **kwargs):
        """Notes an op recorded under another grad mode or autocast state than the trace began
        in. fx runs ``with torch.no_grad():`` or ``with torch.autocast(...):`` at trace time and
        records nothing: such a target then took part in backward (8-bit gradient 0.80 of its
        norm off, silently), and an autocast block ran in fp32 (outputs 0.02 off a bf16 model's).
        A module called inside a non-reentrant ``torch.utils.checkpoint`` (whose saved-tensor
        hooks fx runs through and does not record) is marked ``CHECKPOINTED``: the rewrite reruns
        it in backward from its exact inputs, as the checkpoint did; other ops there are noted."""
        self.grad_mode_changed |= torch.is_grad_enabled() != self._grad_at_start
        self.autocast_changed |= autocast_state() != self._autocast_at_start
        checkpointing = self._checkpointing()
        checkpointed = checkpointing and kind == "call_module"
        self.hooks_changed |= checkpointing and not checkpointed and kind not in ("get_attr", "placeholder")
        node = super().create_node(kind, target, *args, **kwargs)
        if checkpointed:
            node.meta[CHECKPOINTED] = True
        return node

    def _checkpointing(self) -> bool:
        return _saved_tensors_hooks() != self._hooks_at_start


def _check_values_traced(graph: Graph, root: nn.Module) -> None:
    """Refuse a graph fx traced wrong because the forward reads values its Python stored
    elsewhere: what a forward hook collects (timm's ``features_only`` through hooks, a
    perceptual loss over stored features) or an earlier call left. fx does not run a hooked
    module's hooks while tracing, so such a forward returned nothing (timm ``pit_ti_224``'s
    features: ``[]``), or kept an earlier call's activations as constants of the graph."""
    outputs = [a for a in pytree.tree_leaves(graph.output_node().args) if isinstance(a, Node)]
    if not outputs:
        raise RuntimeError("the forward returns nothing fx traced from its inputs (values a hook or an earlier "
                           "call stored?)")
    for node in graph.find_nodes(op="get_attr"):
        value = getattr(root, node.target, None) if "." not in node.target else None
        if isinstance(value, torch.Tensor) and value.grad_fn is not None:
            raise RuntimeError(f"the forward reads a tensor an earlier call computed ({node.target}, with a "
                               "gradient history), not traced from its inputs")


def _saved_tensors_hooks():
    """The innermost saved-tensor hooks in force (``torch.utils.checkpoint``'s, inside a block it
    checkpoints without reentrance), or None."""
    return torch._C._autograd._top_saved_tensors_default_hooks(False)


def autocast_state() -> tuple:
    """Autocast's settings and how many ``torch.autocast`` blocks are open: a block that changes
    nothing at trace time (``enabled=False`` with autocast off, EfficientViT's and RoPE code's
    fp32 attention) still changes what the forward computes under the caller's autocast, and fx
    records none (the converted forward ran that block in bf16: 0.004 off)."""
    nesting = torch.autocast_increment_nesting() - 1
    torch.autocast_decrement_nesting()
    return nesting, *((torch.is_autocast_enabled(device), torch.get_autocast_dtype(device)) for device in ("cpu", "cuda"))


def hooks_write_model_state(module: nn.Module) -> bool:
    """Whether a forward hook or pre-hook in ``module``'s tree is bound to, or closes over, a
    module of the tree or an object one of them holds (``self.features = {}``; timm's
    ``FeatureHooks``): what it stores there the forward may read back. Hooks bound to outside
    objects (a logging dict of the training script) and hooks that only return a new output do
    not count, nor a module's own method hooked on it."""
    modules = [m for _, m in module.named_modules()]
    held = {id(m) for m in modules}
    held.update(id(v) for m in modules for k, v in m.__dict__.items()
                if not k.startswith("_") and not isinstance(v, (torch.Tensor, nn.Module, bool, int, float, str, type(None))))
    return any(id(obj) in held for hook in _user_forward_hooks(modules) for obj in _referenced(hook))


def stateful_hooks_inside(module: nn.Module) -> bool:
    """Whether a forward hook or pre-hook on a submodule of ``module`` is bound to, or closes
    over, anything but plain values: torch.export runs such a hook once, at capture, on fake
    tensors, and never again (timm xception41's ``features_only`` hooks stored export's fake
    tensors where its forward read them: "backward() through example input")."""
    submodules = [m for name, m in module.named_modules() if name]
    return any(not isinstance(obj, (bool, int, float, str, type(None)))
               for hook in _user_forward_hooks(submodules) for obj in _referenced(hook))


def _user_forward_hooks(modules):
    """The forward hooks and pre-hooks of ``modules``, but Hugging Face's output recording and a
    module's own method hooked on it (a lazy module's initialiser)."""
    for m in modules:
        for hook in (*m._forward_hooks.values(), *m._forward_pre_hooks.values()):
            if not is_recording_hook(hook) and getattr(hook, "__self__", None) is not m:
                yield hook


def _referenced(hook, depth: int = 2) -> list:
    """The objects a hook is bound to or closes over (through partials and bound methods)."""
    found = []
    if depth < 0:
        return found
    bound = getattr(hook, "__self__", None)
    if bound is not None:
        found.append(bound)
    if hasattr(hook, "func") and hasattr(hook, "args"):  # functools.partial
        found += [*hook.args, *(hook.keywords or {}).values()]
        found += _referenced(hook.func, depth - 1)
    function = getattr(hook, "__func__", hook)
    for cell in getattr(function, "__closure__", None) or ():
        try:
            found.append(cell.cell_contents)
        except ValueError:  # an empty cell
            continue
    return found


def has_hooks(module: nn.Module) -> bool:
    """True if the module has its own forward or backward hooks. fx traces a module's forward
    without running its hooks, so inlining it (or replacing it with a variant) would drop them:
    a hook that rescaled an output changed the converted forward silently. Such modules stay
    calls in their parent's graph and are converted as units that keep their hooks."""
    return bool(module._forward_hooks or module._forward_pre_hooks or module._backward_hooks
                or module._backward_pre_hooks)


def uncalled_submodules(module: nn.Module, graphs) -> tuple[str, ...]:
    """Paths of the submodules none of ``graphs`` calls as a module (the trace inlined them, a
    variant replaced them, or torch.export captured them): hooks registered on them after
    conversion would never run."""
    called = {n.target for g in graphs for n in g.nodes if n.op == "call_module"}
    return tuple(name for name, _ in module.named_modules()
                 if name and not any(name == c or name.startswith(c + ".") for c in called))


SUBMODULES_CACHE = "_actfx_uncalled_submodules"  # instance attribute: (paths, their modules)
_HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")


def _hook_keys(sub: nn.Module) -> tuple:
    return tuple(tuple(getattr(sub, name)) for name in _HOOK_DICTS)


def _submodules(module: nn.Module, paths: tuple[str, ...]) -> list:
    """``paths``' submodules, looked up once per instance: the check runs at every call."""
    cached = module.__dict__.get(SUBMODULES_CACHE)
    if cached is None or cached[0] is not paths:
        cached = module.__dict__[SUBMODULES_CACHE] = (paths, [module.get_submodule(p) for p in paths])
    return cached[1]


def hooks_now(module: nn.Module, paths: tuple[str, ...]) -> tuple:
    """Which hooks ``paths``' submodules have (their handles' ids; None for none): what a
    captured graph ran."""
    return tuple(_hook_keys(sub) if has_hooks(sub) else None for sub in _submodules(module, paths))


def changed_hooks(module: nn.Module, paths: tuple[str, ...], captured: tuple | None) -> str | None:
    """The first of ``paths`` whose hooks differ from ``captured`` (``hooks_now`` when the graph
    was captured; None: no hooks on any then), or None. torch.export runs a module's hooks into its
    graph and fx keeps hooked modules as calls, so only hooks added or removed since matter.
    About 35 us a call for ResNet-50's 150 submodules."""
    for i, sub in enumerate(_submodules(module, paths)):
        expected = captured[i] if captured is not None else None
        if expected is None:
            if sub._forward_hooks or sub._forward_pre_hooks or sub._backward_hooks or sub._backward_pre_hooks:
                return paths[i]
        elif _hook_keys(sub) != expected:
            return paths[i]
    return None


def warn_hooks_changed(module: nn.Module, path: str) -> None:
    warnings.warn(f"actfx: the hooks of {path} in {type(module).__name__} changed after conversion, and the "
                  "converted graph would not run them as they are now; this module runs its own forward, "
                  "unconverted, while they differ (register hooks before actfx.convert to keep packing)",
                  stacklevel=3)


@contextlib.contextmanager
def training_mode(module: nn.Module, training: bool):
    """Run with every submodule in ``training`` mode, then restore each module's own flag."""
    saved = {m: m.training for m in module.modules()}
    try:
        module.train(training)
        yield
    finally:
        for m, flag in saved.items():
            m.training = flag


@contextlib.contextmanager
def buffers_restored(module: nn.Module):
    """Run, then put every buffer back as it was (calibration forwards must not move
    BatchNorm's running statistics)."""
    saved = [b.detach().clone() for b in module.buffers()]
    try:
        yield
    finally:
        with torch.no_grad():
            for b, value in zip(module.buffers(), saved):
                b.copy_(value)


_MISSING = object()
_CONTAINERS = ("_parameters", "_buffers", "_modules")


def _attributes(module: nn.Module) -> dict:
    state = {key: value for key, value in module.__dict__.items() if key not in _CONTAINERS}
    for container in _CONTAINERS:
        state.update({(container, name): value for name, value in module.__dict__[container].items()})
    return state


def _hook_tables(module: nn.Module) -> dict:
    """Copies of the module's hook tables (``_forward_hooks``, ``_forward_hooks_with_kwargs``, ...)."""
    return {name: list(value.items()) for name, value in module.__dict__.items()
            if "hooks" in name and isinstance(value, dict)}


def _equal_plain_values(a, b) -> bool:
    """Equal non-tensor values (torch.export swaps a LayerNorm's ``normalized_shape`` tuple
    for an equal one while it runs)."""
    if type(a) is not type(b) or isinstance(a, (torch.Tensor, nn.Module)) or a is _MISSING:
        return False
    try:
        return bool(a == b)
    except Exception:  # noqa: BLE001 - values whose == raises or is ambiguous are not equal
        return False


@contextlib.contextmanager
def attributes_kept(module: nn.Module, others=(), training: bool = True):
    """Run a capture (fx trace or torch.export), then put every module's attributes back as
    they were, and raise if the forward assigned any. Why: neither capture records a Python
    attribute assignment (``self.features = h`` for a perceptual loss, ``self.calls += 1``),
    so the captured forward would skip it, silently; and the capture's own run left fx proxies
    or fake tensors in the user's model. The fx tracer's lifted constants (``_tensor_constant``)
    are neither assignments nor removed. ``others``: modules outside ``module``'s tree that the
    forward is handed (x-transformers passes its ALiBi module to each attention layer, which
    caches a table in it: export left a fake tensor there, and every later call read it).
    Traced values stored into a list or dict attribute are taken out again, and refused in a
    ``training`` capture (auxiliary losses the graph would not store); in eval mode they are a
    cache filled once (timm LeViT's attention biases), which the graph recomputes."""
    trees = [module, *others]
    saved = {m: _attributes(m) for root in trees for m in root.modules()}
    hooks = {m: _hook_tables(m) for m in saved}
    assigned = []
    # fx runs Python on real buffers: ``self.step += 1`` happened once, and the graph kept the
    # value it read as a constant (the step then never moved); so buffers changed in place are
    # put back and refused too (torch.export records such updates)
    buffers = {(i, name): (b, b._version, b.detach().clone())
               for i, root in enumerate(trees) for name, b in root.named_buffers()}
    containers, parameters = containers_kept(saved), parameters_kept(trees)
    try:
        yield
    finally:
        filled, moved = restore_containers(containers), restore_parameters(parameters)
        with torch.no_grad():
            for (i, name), (b, version, value) in buffers.items():
                if b._version != version:
                    b.copy_(value)
                    assigned.append((trees[i], f"buffer {name}"))
        for m, before in hooks.items():
            for name, table in before.items():
                live = m.__dict__[name]
                added = [(key, hook) for key, hook in live.items() if (key, hook) not in table]
                if any(not is_recording_hook(hook) for _, hook in added) or len(live) < len(table):
                    live.clear()
                    live.update(table)
                    assigned.append((m, f"hook {name}"))
        for m, before in saved.items():
            now = _attributes(m)
            for key in set(before) | set(now):
                old, new = before.get(key, _MISSING), now.get(key, _MISSING)
                if old is new or _equal_plain_values(old, new):
                    continue
                name = key[1] if isinstance(key, tuple) else key
                if name.startswith("_tensor_constant") or key == "training":
                    continue  # fx's lifted constants: later retraces' graphs read them from here
                if name == RECORDING_FLAG:
                    continue  # transformers' output recording, installed as its first call does
                assigned.append((m, name))
                target = m.__dict__[key[0]] if isinstance(key, tuple) else m.__dict__
                if old is _MISSING:
                    target.pop(name, None)
                else:
                    target[name] = old
    if moved:
        raise TraceEffect(f"the forward changes the parameter {moved[0]!r} outside the traced ops (a momentum "
                          "update), which a captured graph does not record; capturing ran it once (a replaced .data "
                          "was put back); keep such updates out of forward, in the training step")
    if filled and training:  # in eval mode, a cache filled once (timm LeViT's attention biases)
        m, name = filled[0]
        raise TraceEffect(f"the forward stores traced values in the attribute {name!r} of a {type(m).__name__} "
                          "(a list of auxiliary losses, say), which a captured graph "
                          "does not record; return them from forward instead")
    if assigned:
        m, name = assigned[0]
        if name.startswith("hook "):
            raise RuntimeError(f"the forward registers a hook ({name[5:]}) on a {type(m).__name__} while it runs, "
                               "which a captured graph does not record")
        if name.startswith("buffer "):
            raise RuntimeError(f"the forward updates the {name[7:]!r} buffer of a {type(m).__name__} in place "
                               "outside the traced ops, which an fx graph cannot record")
        raise RuntimeError(f"the forward assigns the attribute {name!r} of a {type(m).__name__}, which a captured "
                           "graph cannot record (register a buffer and update it in place, or return the value)")


def split_leaf_modules(leaf_modules, path: str) -> tuple[tuple, frozenset]:
    """Leaf declarations (module types or dotted paths from the model root) relative to ``path``."""
    types, paths = [], set()
    for item in leaf_modules:
        if isinstance(item, type) and issubclass(item, nn.Module):
            types.append(item)
        elif isinstance(item, str):
            if path and item.startswith(path + "."):
                paths.add(item[len(path) + 1 :])
            elif not path:
                paths.add(item)
        else:
            raise TypeError(
                f"leaf_modules entries must be nn.Module subclasses or module paths (str), got {item!r}"
            )
    return tuple(types), frozenset(paths)


def trace(module: nn.Module, leaf_types: tuple = (), leaf_paths: frozenset = frozenset(),
          concrete_args: dict | None = None) -> dict[bool, GraphModule]:
    """{training flag: GraphModule}; one entry serves both modes when the graphs agree.
    ``concrete_args``: forward arguments fixed to a value (None) while tracing.

    Raises whatever fx raises when the forward cannot be traced.
    """
    graphs = {}
    for training in (True, False):
        with training_mode(module, training), attributes_kept(module, training=training), random_draws_refused(), \
                parameter_writes_refused((module,)):
            tracer = _ActfxTracer(leaf_types, leaf_paths)
            graph = tracer.trace(module, concrete_args=concrete_args)
            graphs[training] = GraphModule(tracer.root, graph, type(module).__name__)
        if training and tracer.hooks_changed:
            raise CheckpointedOpsError("ops outside modules run inside torch.utils.checkpoint without reentrance (or "
                                       "another saved-tensor-hooks block), which fx and torch.export trace through")
    if graphs[True].code == graphs[False].code:
        return {True: graphs[True]}
    return graphs


def module_view(module: nn.Module) -> nn.Module:
    """A shallow copy of ``module`` (same class, its ``__dict__`` copied: children, parameters
    and buffers shared). Not ``copy.copy``: a parametrized module (``weight_norm``, Hugging Face
    Encodec's and vocoders' convolutions) refuses to be copied that way."""
    view = object.__new__(type(module))
    view.__dict__.update(module.__dict__)
    return view


def copy_graph(graph: Graph) -> Graph:
    """A copy of ``graph`` (nodes, their meta, output, code generator) that passes may change
    without touching the original."""
    copied = Graph()
    copied.output(copied.graph_copy(graph, {}))
    copied.set_codegen(graph._codegen)
    return copied


def under_function_transform(module: nn.Module) -> bool:
    """True inside ``torch.func.grad`` / ``vmap`` / ``jvp`` (per-sample gradients, functional
    training loops): actfx's autograd Functions cannot run under those transforms, so the model's
    own forward runs there, unconverted (said once per place)."""
    if torch.compiler.is_compiling() or torch._C._functorch.peek_interpreter_stack() is None:
        return False
    warnings.warn(f"actfx: {type(module).__name__} runs unconverted inside torch.func transforms (grad, vmap, "
                  "jvp): nothing is packed there; call the model outside them to pack its activations", stacklevel=3)
    return True
