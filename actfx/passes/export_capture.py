"""Capture a whole model with torch.export, for models torch.fx cannot trace.

fx's symbolic tracing fails on much real code (Hugging Face transformers v5 dropped support for
it); ``torch.export(strict=False)`` runs the forward on fake tensors instead and records every
op. ``export_graph`` exports in train mode with batch and sequence dims dynamic, turns the ATen
calls back into the functional calls actfx matches (``aten_to_functional``) and returns a
GraphModule whose forward:

- reads parameters and buffers by the original model's names, so it can run with ``self`` bound
  to the original module tree (or a clone sharing its tensors); buffer updates (BatchNorm
  running statistics, ``num_batches_tracked``) are in-place ops in the graph and land in the
  buffers it reads;
- takes the model's own arguments and returns the model's own output types (tuples, dicts,
  dataclasses, Hugging Face ``ModelOutput``): the pytree codegen is kept, with the specs as
  globals of the generated code rather than attributes of ``self``;
- checks the guards export recorded (shapes it specialised on, ranges) and raises if violated.

What the code reads from ``self`` that the original model lacks (tensor constants export
lifted, ``no_grad`` regions as submodules) is listed in ``exported_call(gm).carried``.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import inspect
import io
import re
import sys
import warnings
from typing import Any

import torch
import torch.nn as nn
import torch.utils._pytree as pytree
from torch.fx import Graph, GraphModule
from torch.fx.graph import _PyTreeCodeGen
from torch.fx.immutable_collections import immutable_dict, immutable_list

from actfx.passes.aten_to_functional import to_functional
from actfx.passes.autocast_regions import inline_autocast_regions
from actfx.passes.autograd_functions import inlined_functions
from actfx.passes.capture import attributes_kept, training_mode
from actfx.passes.export_branches import eager_branches
from actfx.passes.trace_effects import random_draws_refused
from actfx.passes.tensor_hooks import entered_saved_tensor_hooks, registered_hooks

META_KEY = "actfx_export"
CARRIED_PREFIX = "_actfx_export_"
_SPECS_GLOBAL = "_actfx_specs"


@dataclasses.dataclass(frozen=True)
class _Specs:
    """The in/out pytree specs, as one global of the generated code (fx's codegen would try to
    import a bare torch TreeSpec by qualified name)."""

    inputs: Any
    outputs: Any


class _GlobalSpecsCodeGen(_PyTreeCodeGen):
    """fx's pytree codegen, reading the specs from a global instead of ``self._in_spec`` so the
    generated forward runs with ``self`` bound to any module that has the parameters."""

    def additional_globals(self):
        info = self.pytree_info
        return [*super().additional_globals(), (_SPECS_GLOBAL, _Specs(info.in_spec, info.out_spec))]

    def gen_fn_def(self, *args, **kwargs):
        return super().gen_fn_def(*args, **kwargs).replace("self._in_spec", f"{_SPECS_GLOBAL}.inputs")

    def generate_output(self, *args, **kwargs):
        return super().generate_output(*args, **kwargs).replace("self._out_spec", f"{_SPECS_GLOBAL}.outputs")


class _InputGuard:
    """Called first in the graph with the flattened inputs: runs the guards export recorded."""

    __name__ = "export_input_guard"

    def __init__(self, guards: nn.Module | None, model_name: str):
        self.guards, self.model_name = guards, model_name

    def __call__(self, *flat_inputs) -> None:
        if self.guards is None:
            return
        try:
            self.guards(*flat_inputs)
        except AssertionError as err:
            raise RuntimeError(
                f"actfx: these inputs are outside what torch.export captured for {self.model_name} ({err}); "
                "check them with exported_call(gm).bind(args, kwargs) and run the original forward "
                "when it returns None"
            ) from err


def is_input_guard(node) -> bool:
    """Whether ``node`` calls the guard check export_graph puts first (it saves nothing)."""
    return isinstance(getattr(node, "target", None), _InputGuard)


@dataclasses.dataclass(frozen=True)
class _Leaf:
    """What export saw for one flattened input: a tensor's dtype/device/ndim, or nothing."""

    dtype: torch.dtype | None
    device: torch.device | None
    ndim: int | None


@dataclasses.dataclass(frozen=True)
class ExportedCall:
    """How to call an exported graph: which arguments it takes, in which layout, and which
    attributes its code reads from ``self`` that the original model does not have."""

    model_name: str
    signature: inspect.Signature  # of the original model's forward
    positional: tuple  # parameter names export got positionally, in order
    keywords: tuple  # keyword names export got, in order
    in_spec: Any
    leaves: tuple  # _Leaf per flattened input
    guard: _InputGuard
    carried: dict  # flat attribute name -> value, to set on the module the forward runs on

    def bind(self, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        """``(args, kwargs)`` in the layout the exported forward takes, or None when this call
        needs the original forward: other arguments than at export, another structure, dtype,
        device or rank, or shapes outside the guards export recorded (a specialised size)."""
        return self._match(args, kwargs)[0]

    def mismatch(self, args: tuple, kwargs: dict) -> str:
        """Why this call does not fit the exported graph, in a few words ('' when it does)."""
        return self._match(args, kwargs)[1]

    def _match(self, args: tuple, kwargs: dict) -> tuple:
        try:
            values = _named_arguments(self.signature, args, kwargs)
        except TypeError as err:
            return None, f"arguments the forward does not take ({err})"
        if values.keys() != {*self.positional, *self.keywords}:
            return None, (f"other arguments: captured with {[*self.positional, *self.keywords]}, "
                          f"called with {list(values)}")
        args_out = []
        for n in self.positional:
            if self.signature.parameters[n].kind is inspect.Parameter.VAR_POSITIONAL:
                args_out.extend(values[n])
            else:
                args_out.append(values[n])
        call = _plain((tuple(args_out), {k: values[k] for k in self.keywords}))
        flat, spec = pytree.tree_flatten(call)
        if spec != self.in_spec:
            return None, "another structure of nested inputs than at capture"
        for value, leaf in zip(flat, self.leaves):
            if leaf.dtype is not None and not (
                isinstance(value, torch.Tensor) and value.dtype == leaf.dtype and value.device == leaf.device
                and value.dim() == leaf.ndim
            ):
                got = (f"{value.dtype}, {value.device}, {value.dim()} dims" if isinstance(value, torch.Tensor)
                       else type(value).__name__)
                return None, f"an input captured as {leaf.dtype}, {leaf.device}, {leaf.ndim} dims is now {got}"
        try:
            self.guard(*flat)
        except RuntimeError as err:
            cause = err.__cause__ or err  # the guard's own words, not the wrapper's advice
            first = str(cause).splitlines()[0] if str(cause) else type(cause).__name__
            return None, f"a size torch.export specialised: {first}"
        return call, ""


def _plain(value):
    """``value`` with fx's immutable dicts and lists as plain ones: a graph fx runs (``actfx.show``'s
    measurement) hands a captured submodule the containers its nodes hold, which flatten to
    another structure than the plain ones training passes and export captured."""
    if type(value) in (dict, immutable_dict):
        return {k: _plain(v) for k, v in value.items()}
    if type(value) in (list, immutable_list):
        return [_plain(v) for v in value]
    if type(value) is tuple:
        return tuple(_plain(v) for v in value)
    return value


def _named_arguments(signature: inspect.Signature, args: tuple, kwargs: dict) -> dict:
    """Explicitly passed arguments by parameter name, ``**kwargs`` entries spread out."""
    bound = signature.bind(*args, **kwargs)
    values = {}
    for name, value in bound.arguments.items():
        if signature.parameters[name].kind is inspect.Parameter.VAR_KEYWORD:
            values.update(value)
        else:
            values[name] = value
    return values


def _positional_names(signature: inspect.Signature, count: int) -> tuple:
    """The parameters ``count`` positional arguments bind to (``*args`` once, by its name)."""
    names = []
    for name, param in signature.parameters.items():
        if len(names) == count:
            break
        if param.kind is inspect.Parameter.VAR_POSITIONAL:
            names.append(name)
            break
        if param.kind in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD):
            names.append(name)
    return tuple(names)


def split_example_inputs(example_inputs) -> tuple[tuple, dict]:
    """(args, kwargs) from a tuple of positional args, a dict of keyword args or an (args, kwargs) pair."""
    if (isinstance(example_inputs, tuple) and len(example_inputs) == 2
            and isinstance(example_inputs[0], tuple) and isinstance(example_inputs[1], dict)):
        return example_inputs
    if isinstance(example_inputs, tuple):
        return example_inputs, {}
    if isinstance(example_inputs, dict):
        return (), dict(example_inputs)
    hint = " (wrap a single input as (x,))" if isinstance(example_inputs, torch.Tensor) else ""
    raise TypeError(
        "example_inputs must be a tuple of positional arguments, a dict of keyword arguments or an "
        f"(args, kwargs) pair, got {type(example_inputs).__name__}{hint}"
    )


def _dynamic_dims(value):
    """Batch and sequence dims (0 and 1) of every tensor leaf left for export to decide. Inside
    objects other than lists, tuples and dicts (a Hugging Face cache) the tensors stay static: a
    cache export flattens as a registered pytree got a spec mapped into another container, and
    export refused the call ("Node type mismatch; expected list, but got DynamicCache": Gemma-3n's
    and Qwen3-Next's layers, captured one by one, stayed unconverted)."""
    auto = torch.export.Dim.AUTO

    def dims(leaf):
        if isinstance(leaf, torch.Tensor) and leaf.dim() >= 1:
            return {d: auto for d in range(min(leaf.dim(), 2))}
        if type(leaf) in pytree.SUPPORTED_NODES:  # export's spec for it: the list of its children's
            children, _ = pytree.SUPPORTED_NODES[type(leaf)].flatten_fn(leaf)
            return [pytree.tree_map(lambda _: None, child) for child in children]
        return None

    return pytree.tree_map(dims, value, is_leaf=lambda v: not isinstance(v, (list, tuple, dict)))


def _with_explicit_keywords(model: nn.Module, signature: inspect.Signature, bound) -> tuple:
    """(module to export, its forward's signature).

    torch 2.13's non-strict export counts arguments passed through ``**kwargs`` twice when it
    matches them with dynamic shapes; for such calls export a clone (sharing every tensor and
    submodule, so names do not change) whose forward lists them as keyword-only parameters.
    """
    var = [p for p in signature.parameters.values() if p.kind is inspect.Parameter.VAR_KEYWORD]
    if not var or not bound.arguments.get(var[0].name):
        return model, signature
    params = [p for p in signature.parameters.values() if p.kind is not inspect.Parameter.VAR_KEYWORD]
    params += [inspect.Parameter(k, inspect.Parameter.KEYWORD_ONLY) for k in bound.arguments[var[0].name]]
    explicit = signature.replace(parameters=params)
    clone = object.__new__(type(model))
    clone.__dict__.update({k: copy.copy(v) if isinstance(v, (dict, set)) else v for k, v in model.__dict__.items()})
    unbound = type(model).forward

    def forward(*args, **kwargs):
        return unbound(clone, *args, **kwargs)

    forward.__signature__ = explicit
    object.__setattr__(clone, "forward", forward)
    return clone, explicit


def _resolve(root: nn.Module, target: str):
    obj = root
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _on_original(model: nn.Module, target: str) -> bool:
    try:
        _resolve(model, target)
    except AttributeError:
        return False
    return True


def _carry_foreign_attributes(graph: Graph, unlifted: nn.Module, model: nn.Module) -> dict:
    """Point get_attr / call_module targets the original model lacks at flat names; their values."""
    carried: dict = {}
    for node in graph.nodes:
        if node.op not in ("get_attr", "call_module") or _on_original(model, node.target):
            continue
        name = CARRIED_PREFIX + node.target.replace(".", "_")
        carried[name] = _resolve(unlifted, node.target)
        node.target = name
    return carried


def _replace_guards_call(graph: Graph, guard: _InputGuard) -> None:
    for node in list(graph.nodes):
        if node.op == "call_module" and node.target == "_guards_fn":
            with graph.inserting_before(node):
                call = graph.call_function(guard, node.args, node.kwargs)
            call.meta["val"] = None
            node.replace_all_uses_with(call)
            graph.erase_node(node)


# where torch.export's pre-dispatch graph puts a torch.func transform's level changes (vmap's
# _vmap_increment_nesting / _add_batch_dim ...): a graph holding them is not rewritten, since a
# pack between them ran inside the transform and a dropped decrement left vmap's level active
_FUNCTORCH_LEVELS = "torch._functorch.predispatch"


class ExportRefused(RuntimeError):
    """torch.export failed on the model, or would drop part of its backward (a custom
    autograd.Function inlined, a gradient hook): ``actfx.convert`` then converts submodule by
    submodule, as without example_inputs. ``problem``: the message without that advice, for
    callers that follow it themselves."""

    def __init__(self, problem: str, how_it_runs: str = ""):
        super().__init__(f"{problem}; convert without example_inputs to convert submodule by submodule{how_it_runs}")
        self.problem = problem


class HookBlockInForward(RuntimeError):
    """The forward enters ``saved_tensors_hooks`` (``tensor_hooks.entered_saved_tensor_hooks``):
    ``actfx.convert`` then converts submodule by submodule, the blocks running as written."""


def _drop_dtype_assertions(graph: Graph) -> None:
    """Remove ``_assert_tensor_metadata`` nodes. Why: export records one before each cast
    (``h.float()``: the cast itself stays an ``aten.to``), asserting the dtype its input had at
    capture; under the caller's autocast that input is bfloat16, and a Mixtral router's
    ``logits.float()`` raised "Tensor dtype mismatch" where the original ran."""
    for node in list(graph.nodes):
        if node.op == "call_function" and node.target is torch.ops.aten._assert_tensor_metadata.default and not node.users:
            graph.erase_node(node)


def _leaves(graph: Graph) -> tuple:
    out = []
    for node in graph.find_nodes(op="placeholder"):
        val = node.meta.get("val")
        if isinstance(val, torch.Tensor):
            out.append(_Leaf(val.dtype, val.device, val.dim()))
        else:
            out.append(_Leaf(None, None, None))
    return tuple(out)


@contextlib.contextmanager
def _without_partial_graph_print():
    """torch.export prints the partial graph of a failed capture to stderr (hundreds of lines
    for a real model); actfx raises its own one-line error or falls back, so that print is
    dropped. Everything else export writes to stderr (warnings) is passed on."""
    buffer = io.StringIO()
    try:
        with contextlib.redirect_stderr(buffer):
            yield
    except Exception as err:
        text = buffer.getvalue()
        partial = getattr(err, "partial_fx_graph", None)
        sys.stderr.write(text.replace(str(partial) + "\n", "") if partial is not None else text)
        raise
    sys.stderr.write(buffer.getvalue())


def _cache_pytrees_registered(model: nn.Module, err: Exception) -> bool:
    """Whether the export failed on a Hugging Face cache in the output and transformers' own
    pytree rules for its cache classes (the ones its exporter registers) are now in place.
    A causal LM in train mode returns its ``DynamicCache`` unless ``use_cache=False``; export
    refused it and the whole model stayed as fx converted it (attention unconverted: 17-31% of a
    Llama-style model's saved bytes)."""
    if "Cache" not in str(err):
        return False
    try:
        from transformers.exporters.exporter_dynamo import register_cache_pytrees_for_model
    except ImportError:
        return False
    register_cache_pytrees_for_model(model)
    return True


def _dataclass_output_registered(err: Exception) -> bool:
    """Whether the export failed on a plain ``@dataclass`` in the output (a multi-task model's
    result) that is now registered with torch's pytree, as export's message asks. The whole model
    stayed as fx converted it: 5.1x held against 17.4x for the same model returning a tuple."""
    found = re.search(r"Found <class '([\w.]+)'> in output", str(err))
    if found is None:
        return False
    module, _, name = found.group(1).rpartition(".")
    cls = getattr(sys.modules.get(module), name, None)
    if not (isinstance(cls, type) and dataclasses.is_dataclass(cls)) or cls in pytree.SUPPORTED_NODES:
        return False
    pytree.register_dataclass(cls)
    return True


def meta_devices_to_cpu(gm: GraphModule) -> None:
    """Every ``device=meta`` an export on the meta device recorded (``.to(x.device)``,
    ``arange(device=...)``, its metadata asserts) made ``cpu``, in place."""
    meta, cpu = torch.device("meta"), torch.device("cpu")
    swap = lambda v: cpu if isinstance(v, torch.device) and v == meta else v  # noqa: E731
    for node in gm.graph.nodes:
        node.args = pytree.tree_map(swap, node.args)
        node.kwargs = pytree.tree_map(swap, node.kwargs)
    gm.recompile()


def _not_a_view(t: torch.Tensor) -> torch.Tensor:
    """An input that is a view (``ids[:, :16]``) as a tensor of its own with the same strides.
    Why: export guards a view input on its base's sizes (``input_ids._base.size()[1] == 64``),
    and every later call with a tensor that is no view then failed in the guard
    (``'NoneType' object has no attribute 'size'``)."""
    if t._base is None or isinstance(t, torch._subclasses.FakeTensor):
        return t
    # An expanded input (Hugging Face's position ids, ``arange(L)[None].expand(B, -1)``) has
    # overlapping strides no copy can keep (copying into them raised, and the submodule fed
    # them stayed unconverted): it gets contiguous ones.
    expanded = any(stride == 0 and size > 1 for size, stride in zip(t.size(), t.stride()))
    own = torch.empty(t.size(), dtype=t.dtype, device=t.device) if expanded else torch.empty_strided(
        t.size(), t.stride(), dtype=t.dtype, device=t.device)
    with torch.no_grad():
        own.copy_(t)
    return own.requires_grad_(t.requires_grad)


def _export(model, target, args, kwargs, dynamic_shapes):
    """torch.export of ``target`` along the branches eager PyTorch takes (``export_branches``);
    along export's own where the eager branch does not export (a data-dependent test). Each try
    registers a cache or dataclass in the output and exports again if that was what failed, so
    such a failure costs one more export, not a try along each branch first."""

    def attempt():
        try:
            return torch.export.export(target, args, kwargs, strict=False, dynamic_shapes=dynamic_shapes())
        except Exception as err:  # noqa: BLE001 - retried once if it was a cache or a dataclass in the output
            if not (_cache_pytrees_registered(model, err) or _dataclass_output_registered(err)):
                raise
        return torch.export.export(target, args, kwargs, strict=False, dynamic_shapes=dynamic_shapes())

    try:
        with eager_branches() as answer:
            return attempt()
    except Exception:  # noqa: BLE001 - export raises many kinds
        if not answer.changed:
            raise
    return attempt()


def export_graph(model: nn.Module, example_inputs) -> GraphModule:
    """``model``'s train-mode forward as a GraphModule (see the module docstring).

    Raises RuntimeError when torch.export cannot capture the model (data-dependent control
    flow, unsupported output types, ...).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"export_graph expects a torch.nn.Module, got {type(model).__name__}")
    args, kwargs = pytree.tree_map_only(torch.Tensor, _not_a_view, split_example_inputs(example_inputs))
    name = type(model).__name__
    signature = inspect.signature(model.forward)
    try:
        bound = signature.bind(*args, **kwargs)
    except TypeError as err:
        raise TypeError(f"actfx: example_inputs do not fit {name}.forward{signature}: {err}") from None
    target, signature_used = _with_explicit_keywords(model, signature, bound)
    bound_used = signature_used.bind(*args, **kwargs).arguments

    def dynamic_shapes():  # made at each try: a cache registered after a failure is flattened by export
        return {param: _dynamic_dims(value) for param, value in bound_used.items()}

    inlined: list = []
    hooks: list = []
    hook_blocks: list = []
    with training_mode(target, True), torch.enable_grad():  # the training forward, whatever the caller's context
        try:
            handed = [v for v in pytree.tree_leaves((args, kwargs)) if isinstance(v, nn.Module)]
            with inlined_functions(inlined), registered_hooks(hooks), entered_saved_tensor_hooks(hook_blocks), \
                    _without_partial_graph_print(), attributes_kept(model, handed), random_draws_refused():
                ep = _export(model, target, args, kwargs, dynamic_shapes)
        except Exception as err:  # export raises many kinds; all mean "could not capture"
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise ExportRefused(f"actfx: torch.export could not capture {name}: {first}") from err
    if inlined:
        raise ExportRefused(
            f"actfx: torch.export would inline the custom autograd.Function {inlined[0]} of {name} and drop its "
            "backward", " (the Function runs as written)")
    if hook_blocks:
        raise HookBlockInForward(
            f"actfx: {name}'s forward runs a saved-tensor-hooks block ({hook_blocks[0]}: torch.utils.checkpoint without "
            "reentrance, or activation offloading) that torch.export traces through, so a graph it captures would "
            "hold what that block frees")
    if hooks:
        raise ExportRefused(
            f"actfx: {name}'s forward registers a gradient hook ({hooks[0]}) that torch.export would drop",
            " (the forward runs as written, hooks included)")
    unlifted = ep.module()
    graph = unlifted.graph
    levels = [n.target.__name__ for n in graph.nodes if n.op == "call_function"
              and getattr(n.target, "__module__", None) == _FUNCTORCH_LEVELS]
    if levels:  # named by its first level change, not by the decompositions' loader before it
        transform = next((t for t in levels if t != "lazy_load_decompositions"), levels[0])
        raise ExportRefused(
            f"actfx: {name}'s forward runs a torch.func transform ({transform}: vmap, grad or jvp), whose levels the "
            "captured graph holds as separate calls that a rewrite cannot keep paired", " (the forward runs as written)")
    guard = _InputGuard(getattr(unlifted, "_guards_fn", None), name)
    _replace_guards_call(graph, guard)
    inline_autocast_regions(graph, unlifted)
    _drop_dtype_assertions(graph)
    carried = _carry_foreign_attributes(graph, unlifted, model)
    for attr, value in carried.items():
        object.__setattr__(unlifted, attr, value)
    to_functional(graph)
    info = graph._codegen.pytree_info
    graph.set_codegen(_GlobalSpecsCodeGen(info))
    gm = GraphModule(unlifted, graph, f"Exported{name}")
    positional = _positional_names(signature, len(args))
    gm.meta[META_KEY] = ExportedCall(name, signature, positional, tuple(kwargs), info.in_spec, _leaves(graph),
                                     guard, carried)
    return gm


def exported_call(gm: GraphModule) -> ExportedCall:
    """The calling facts ``export_graph`` recorded for ``gm``."""
    try:
        return gm.meta[META_KEY]
    except KeyError:
        raise ValueError("this GraphModule was not made by actfx.passes.export_capture.export_graph") from None


def forward_from_graph(gm: GraphModule):
    """``forward(self, *args, **kwargs)`` compiled from ``gm``'s graph, ``self`` being the module
    that holds the parameters (the original model, or a converted clone) and carried attributes."""
    code = gm.graph.python_code(root_module="self")
    scope = dict(code.globals)
    exec(compile(code.src, f"<actfx export {gm.__class__.__name__}>", "exec"), scope)  # noqa: S102 - fx-generated
    return scope["forward"]


def parameter_dtypes(module: nn.Module) -> tuple:
    """(dtype, device) of each parameter: a graph torch.export captured computes in those (a
    Hugging Face GPT-2 captured in float32 and cast to bfloat16 failed in its first training
    forward: "expect parameter to have scalar type of Float")."""
    return tuple((p.dtype, p.device) for p in module.parameters())


def warn_if_cast(module: nn.Module, captured: tuple) -> bool:
    """True (with a warning, once per model) where ``module``'s parameters are no longer in the
    dtypes and devices its graph was captured with: it then runs its own forward."""
    now = parameter_dtypes(module)
    if now == captured:
        return False
    if not module.__dict__.get("_actfx_warned_cast"):
        module.__dict__["_actfx_warned_cast"] = True
        before, after = next((a, b) for a, b in zip(captured, now) if a != b) if len(now) == len(captured) else (
            "its parameters", "others")
        warnings.warn(f"actfx: {type(module).__mro__[1].__name__}'s parameters moved from {before} to {after} since "
                      "torch.export captured it, and the captured graph computes in the old ones: the model runs its "
                      "own forward (nothing packed); convert it again after the cast", stacklevel=3)
    return True
