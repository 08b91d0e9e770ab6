"""``actfx.convert``: the same model, saving compressed activations for backward.

The result is a new module object of a subclass of the model's own class that shares every
Parameter, buffer and submodule with the original (an optimizer built before conversion keeps
working; state_dict keys are identical, in the same order) and whose forward runs the rewritten
fx graph. The original model is left untouched and keeps working.

A model fx cannot trace as a whole is converted as far as it can be: its largest traceable
submodules are converted (recursively), supported leaf modules that do not trace are wrapped
directly, and whatever stays unconverted is recorded with the reason (``actfx.show`` prints it).
"""

from __future__ import annotations

import dataclasses
import inspect
import warnings
import zlib

import torch
import torch.nn as nn
from torch.fx import Graph, GraphModule

from actfx.config import Config, check_bits, check_group_size, check_module_paths
from actfx.copies import copied, reduce_converted
from actfx.first_call import capture_at_first_call, not_recomputed, opaque_calls, warn_uncaptured_call
from actfx.passes.capture import (
    RunsOwnForward, autocast_state, changed_hooks, copy_graph, has_hooks, hooks_now, split_leaf_modules, trace,
    uncalled_submodules, under_function_transform, warn_hooks_changed,
)
from actfx.passes.baked_values import BAKED, baked_values, changed_value
from actfx.passes.export_capture import exported_call, parameter_dtypes, warn_if_cast
from actfx.passes.graph_runner import runnable
from actfx.passes.outline_recompute import outline_recomputed
from actfx.passes.hf_outputs import share_recording
from actfx.passes.rewrite import SEED_BUFFER, SEED_STATE, SELF_ATTR, Decision, rewrite_graph
from actfx.passes.sites import find_site
from actfx.variants.packing import SeedState


@dataclasses.dataclass
class Unconverted:
    path: str
    what: str  # the op or module type
    reason: str


@dataclasses.dataclass
class ConversionRecord:
    """What conversion did, kept on the converted model as ``_actfx_record`` for show()."""

    config: Config
    decisions: list[Decision] = dataclasses.field(default_factory=list)
    uncovered: list[Unconverted] = dataclasses.field(default_factory=list)
    # ops left as they are because they compute from parameters alone (a weight standardisation)
    parameter_ops: list[Unconverted] = dataclasses.field(default_factory=list)
    graphs: dict = dataclasses.field(default_factory=dict)  # path -> {training: rewritten fx Graph}
    # path -> the graph torch.export captured, before the rewrite (show()'s "before" per op)
    captured: dict = dataclasses.field(default_factory=dict)
    # path -> [(rewritten fx Graph, the forward compiled from it)]: the planner's calibration runs
    # them with a probe in place of pack_value (``actfx.planner.probe_sensitivity``)
    forwards: dict = dataclasses.field(default_factory=dict)
    # path -> the ExportedCall of a module torch.export captured: lays a call out as its graph's inputs
    calls: dict = dataclasses.field(default_factory=dict)
    # torch.export captures the root at its first training call: until then the ops are unknown
    capture_pending: bool = False
    # some module captures at its first training call: its forward holds that capture (copies convert again)
    first_call_capture: bool = False
    # (shape, dtype) of each positional input of the last training call, for show() without inputs
    last_training_inputs: tuple | None = None
    # module classes torch.export could not capture at a first call: not tried again in this model
    export_refused: set = dataclasses.field(default_factory=set)
    leaf_modules: tuple = ()  # as convert() was given them (pickling converts again with them)
    plan_ops: tuple = ()  # the ops of the plan applied, if any (checked where the capture waits for a call)


def is_converted(module: nn.Module) -> bool:
    return getattr(type(module), "_actfx_converted", False)


def convert(model, bits: int | None = None, *, group_size: int | None = None, config: Config | None = None,
            leaf_modules=(), example_inputs=None, plan=None) -> nn.Module:
    """Return ``model`` converted to save compressed activations; see the module docstring.

    ``plan``: an ``actfx.Plan`` (``actfx.plan``) giving each op its width; it replaces bits,
    group_size and config.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"actfx.convert expects a torch.nn.Module, got {type(model).__name__}")
    if isinstance(model, torch.jit.ScriptModule):
        raise TypeError("actfx.convert cannot convert a TorchScript module (torch.jit.script / trace): it runs its "
                        "own compiled graph; convert the nn.Module itself (before scripting it)")
    if isinstance(model, torch._dynamo.eval_frame.OptimizedModule):
        # converted, it ran and packed nothing, with only a note that fx could not trace it
        raise TypeError("actfx.convert got a torch.compile'd model, whose compiled code would pack nothing; "
                        "use actfx.compile(model) (packing inside the compiled graph) or "
                        "torch.compile(actfx.convert(model))")
    if plan is not None:
        from actfx.planner.plan import check_plan_paths, plan_config

        config = plan_config(plan, "eager", bits=bits, group_size=group_size, config=config)
        check_plan_paths(config.site_bits, model)
        converted = convert(model, config=config, leaf_modules=leaf_modules, example_inputs=example_inputs)
        _check_plan_fits(plan, converted._actfx_record)
        return converted
    if config is None:
        config = Config(bits=check_bits(2 if bits is None else bits),
                        group_size=check_group_size(256 if group_size is None else group_size))
    elif not isinstance(config, Config):
        raise TypeError(f"config must be an actfx.Config, got {type(config).__name__}")
    elif (bits is not None and bits != config.bits) or (group_size is not None and group_size != config.group_size):
        raise ValueError(f"bits={bits}, group_size={group_size} disagree with config=Config(bits={config.bits}, "
                         f"group_size={config.group_size}); pass the widths in one place")
    if is_converted(model):
        if model._actfx_record.config != config:
            raise ValueError(
                "this model is already converted with a different config; convert the original model "
                "instead (actfx.convert never modifies it)"
            )
        return model
    if not isinstance(leaf_modules, (tuple, list, set, frozenset)):
        leaf_modules = (leaf_modules,)
    _, leaf_paths = split_leaf_modules(leaf_modules, "")  # validate early
    # a misspelt leaf path matched nothing, and fx traced into that module silently
    check_module_paths(model, (("leaf_modules", sorted(leaf_paths)),))
    config.check_paths(model)
    record = ConversionRecord(config, leaf_modules=tuple(leaf_modules))
    if example_inputs is not None:
        from actfx.passes.export_capture import ExportRefused, HookBlockInForward

        try:
            result = _convert_exported(model, example_inputs, config, record)
        except HookBlockInForward as err:
            warnings.warn(f"{err}; converting it submodule by submodule instead, as without example_inputs "
                          "(checkpointed blocks stay checkpointed)", stacklevel=2)
            record = ConversionRecord(config, leaf_modules=tuple(leaf_modules))
        except ExportRefused as err:
            # A model plain PyTorch trains is never refused (Hugging Face LED, ProphetNet, SEW-D:
            # data-dependent shapes, a custom autograd.Function): what fx traces is converted
            warnings.warn(f"{err.problem}; converted submodule by submodule instead, as without example_inputs "
                          "(actfx.show lists what is covered)", stacklevel=2)
            record = ConversionRecord(config, leaf_modules=tuple(leaf_modules))
            record.export_refused.add(type(model))  # the first training call would fail the same way
        else:
            result._actfx_record = record
            _note_baked_values(result)  # export, like fx, ran the Python once: its values are the graph's
            return result
    result = _convert(model, "", config, tuple(leaf_modules), record)
    if not is_converted(result) and type(model) in record.export_refused:
        result = _attach_seed(_clone(result, _converted_class(type(model), {True: type(model).forward})), "", model)
    elif not is_converted(result):
        # Nothing at the root traced: keep its own forward, with converted children, until the
        # first training call lets torch.export capture the whole model with real inputs.
        forward = capture_at_first_call(model, config, record, _exported_forward)
        result = _attach_seed(_clone(result, _converted_class(type(model), {True: forward})), "", model)
        record.capture_pending = True
    elif opaque_calls(record.graphs.get("", {}).get(True)):
        # fx kept calls of wrapped Python functions (torch.fx.wrap) whole: export sees inside them.
        forward = capture_at_first_call(model, config, record, _exported_forward, fallback=type(result).forward)
        result = _clone(result, _converted_class(type(model), {True: forward}))
        record.capture_pending = True
    result._actfx_record = record
    _note_baked_values(result)
    _warn_if_root_untraced(model, record)
    _warn_of_settings_matching_nothing(record)
    return result


def _note_baked_values(result: nn.Module) -> None:
    """What each converted module's graphs were traced with, noted once the tree is final
    (converted units replace the originals in their parents' slots first)."""
    for module in result.modules():
        if is_converted(module):
            object.__setattr__(module, BAKED, baked_values(module))


def _warn_of_settings_matching_nothing(record: ConversionRecord) -> None:
    """Config.op_bits kinds and site_bits keys no op of the model has: they change nothing."""
    if record.capture_pending:
        return  # the kinds are known after the first training call
    unknown = record.config.unknown_kinds(d.kind for d in record.decisions)
    if unknown:
        kinds = ", ".join(sorted({d.kind for d in record.decisions}))
        warnings.warn(f"actfx: Config.op_bits names {unknown[0]!r}, which is the kind of no op of this model "
                      f"(its kinds: {kinds}); spell kinds as actfx.show lists them", stacklevel=3)
    keys = {d.key for d in record.decisions if d.key}
    unmatched = [key for key in record.config.site_bits if key not in keys]
    if unmatched:
        warnings.warn(f"actfx: Config.site_bits key {unmatched[0]!r} matches no op of this model, so it changes "
                      f"nothing; its ops' keys: {', '.join(sorted(keys)[:12])}{', ...' if len(keys) > 12 else ''}",
                      stacklevel=3)


def _check_plan_fits(plan, record: ConversionRecord) -> None:
    """A plan names ops by module path and kind; one made for another model would silently apply
    the default widths, so refuse it."""
    from actfx.planner.plan import check_plan_fits

    record.plan_ops = plan.ops
    if not record.capture_pending:  # else the ops are known at the first training call's capture (checked there)
        check_plan_fits(plan.config().site_bits, record.decisions, plan.ops)


def _warn_if_root_untraced(model: nn.Module, record: ConversionRecord) -> None:
    root = next((u for u in record.uncovered if u.path == "<root>" and u.reason.startswith("fx could not trace")), None)
    if root is None:
        return
    converted = record.decisions
    if type(model) in record.export_refused:
        warnings.warn(f"actfx.convert: {type(model).__name__} does not trace as a whole ({root.reason}); converted "
                      f"{len(converted)} op(s) inside its traceable submodules", stacklevel=3)
        return
    warnings.warn(
        f"actfx.convert: {type(model).__name__} does not trace as a whole ({root.reason}); converted "
        f"{len(converted)} op(s) inside its traceable submodules so far; its first training call captures "
        f"the whole model with torch.export (pass example_inputs=(...) to do it now); actfx.show(model, inputs) "
        f"lists what is covered.",
        stacklevel=3)


def _convert(module: nn.Module, path: str, config: Config, leaf_modules: tuple,
             record: ConversionRecord) -> nn.Module:
    leaf_types, leaf_paths = split_leaf_modules(leaf_modules, path)
    # modules to recompute stay calls in the graph (the rewrite wraps each call), not converted apart
    traced_leaves = leaf_paths | split_leaf_modules(config.recompute_modules, path)[1]
    try:
        graphs = trace(module, leaf_types, traced_leaves)
    except Exception as err:  # fx raises many kinds; any of them means "does not trace"
        return _convert_children(module, path, config, leaf_modules, record, err)
    new = _from_graphs(module, graphs, path, config, record,
                       without_optional=_trace_without_optional(module, graphs, leaf_types, traced_leaves),
                       retrace=lambda concrete: trace(module, leaf_types, traced_leaves, concrete_args=concrete))
    # Declared leaves (and hooked modules, and torch.nn's transformer stacks) stay as calls in this
    # graph; convert them as units of their own, which report what they leave uncovered themselves.
    for child_path in _declared_leaf_children(module, leaf_types, leaf_paths):
        full_path = f"{path}.{child_path}" if path else child_path
        record.uncovered[:] = [u for u in record.uncovered if not (u.path == full_path and u.reason == _MODULE_RUNS_AS_IS)]
        _replace(new, child_path, _convert(module.get_submodule(child_path), full_path, config, leaf_modules, record))
    return new


# torch.nn's stacks fx keeps as calls (it does not trace into torch.nn), whose layers have variants
_NN_STACKS = (nn.TransformerEncoder, nn.TransformerDecoder, nn.Transformer)


def _declared_leaf_children(module, leaf_types, leaf_paths):
    out = []
    for name, sub in module.named_modules():
        if not name or any(name.startswith(p + ".") for p in out):
            continue
        if name in leaf_paths or (leaf_types and isinstance(sub, leaf_types)) or has_hooks(sub) or \
                type(sub) in _NN_STACKS:
            if find_site_type(sub) is None:
                out.append(name)
    return out


def _device_of(module: nn.Module) -> torch.device:
    for t in module.parameters():
        return t.device
    for t in module.buffers():
        return t.device
    return torch.device("cpu")


def _leaf_graph(module: nn.Module) -> GraphModule:
    """``input -> module(input)`` as a graph, the module reachable as ``SELF_ATTR``."""
    holder = nn.Module()
    holder.add_module(SELF_ATTR, module)
    graph = Graph()
    graph.output(graph.call_module(SELF_ATTR, (graph.placeholder("input"),)))
    return GraphModule(holder, graph)


def find_site_type(module: nn.Module):
    """A site for calling ``module`` on one input, or None: used for leaves converted as a whole."""
    call = next(n for n in _leaf_graph(module).graph.nodes if n.op == "call_module")
    return find_site(call, {SELF_ATTR: module})


def _convert_children(module, path, config, leaf_modules, record, err):
    if isinstance(module, torch.jit.ScriptModule):
        # TorchScript runs its own compiled graph: nothing to trace, export or clone
        record.uncovered.append(Unconverted(path or "<root>", type(module).__name__,
                                            "a TorchScript module: runs as it is"))
        return module
    if find_site_type(module) is not None and _takes_one_input(module):
        return _convert_leaf(module, path, config, record)
    reason = f"fx could not trace it ({type(err).__name__}: {str(err).splitlines()[0][:160] if str(err) else ''})"
    if isinstance(err, RunsOwnForward):
        record.export_refused.add(type(module))  # export would capture the same wrong thing
        reason += f"; it runs its own forward, with its submodules converted; {err.fix}"
    record.uncovered.append(Unconverted(path or "<root>", type(module).__name__, reason))
    new = None
    for name, child in module.named_children():
        child_path = f"{path}.{name}" if path else name
        converted = _convert(child, child_path, config, leaf_modules, record)
        if converted is not child:
            if new is None:
                new = _clone(module, type(module))
            new._modules[name] = converted
    new = new if new is not None else module
    unrecomputed = not_recomputed(config, path)
    if type(module) in record.export_refused and unrecomputed:
        warnings.warn(f"actfx: neither fx nor torch.export captures {type(module).__name__} ({path}): it runs its own "
                      f"forward{unrecomputed}", stacklevel=4)
    if not path or not _has_own_forward(module) or type(module) in record.export_refused:
        return new  # the root is captured by convert(); containers are never called
    # When the whole model cannot be captured either (a custom autograd.Function elsewhere,
    # data-dependent control flow), torch.export captures this module at its first call.
    forward = capture_at_first_call(module, config, record, _exported_forward, path=path)
    return _attach_seed(_clone(new, _converted_class(type(module), {True: forward})), path, module)


def _has_own_forward(module: nn.Module) -> bool:
    return type(module).forward is not nn.Module.forward and not isinstance(module, (nn.ModuleList, nn.ModuleDict))


def _takes_one_input(module: nn.Module) -> bool:
    """Whether ``module`` can be called with one positional input, as ``_leaf_graph`` calls it
    (nn.MultiheadAttention needs query, key and value)."""
    try:
        parameters = inspect.signature(module.forward).parameters.values()
    except (TypeError, ValueError):
        return False
    required = [p for p in parameters if p.default is inspect.Parameter.empty
                and p.kind in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)]
    return len(required) <= 1


def _convert_leaf(module, path, config, record):
    """A supported module whose own forward does not trace: emit its variant directly. Its graph
    takes the one input; a call passing more (nn.TransformerEncoder calls its layers with
    ``src_mask=``, ``is_causal=``) runs the graph where the rest sit at their defaults and the
    module's own forward otherwise (it had failed: unexpected keyword argument)."""
    new = _from_graphs(module, {True: _leaf_graph(module)}, path, config, record, self_attr=True)
    cls, base = type(new), type(module)
    graph_forward, signature = cls.forward, inspect.signature(base.forward)

    def forward(self, *args, **kwargs):
        if len(args) == 1 and not kwargs:
            return graph_forward(self, *args)
        try:
            bound = signature.bind(self, *args, **kwargs)
        except TypeError:
            return base.forward(self, *args, **kwargs)  # its own error
        rest = list(bound.arguments.items())[2:]
        if len(bound.arguments) >= 2 and all(
                name in signature.parameters and _at_default(value, signature.parameters[name].default)
                for name, value in rest):
            return graph_forward(self, list(bound.arguments.values())[1])
        return base.forward(self, *args, **kwargs)

    cls.forward = forward
    return new


def _convert_exported(model, example_inputs, config, record, prepare=None) -> nn.Module:
    """Whole-model capture with torch.export (for models fx cannot trace, e.g. transformers v5).

    Training steps run the rewritten exported graph; eval mode, no_grad, and calls whose
    arguments differ from what export saw run the model's own forward (nothing to save there,
    or nothing captured for it).
    """
    train_forward, call = _exported_forward(model, example_inputs, config, record, prepare=prepare)
    base_forward = type(model).forward
    inlined = uncalled_submodules(model, ())
    hooks = hooks_now(model, inlined)  # export ran them into the graph
    dtypes = parameter_dtypes(model)
    state = autocast_state()  # the graph holds the casts this state made
    other_states = []  # a first-call capture for calls under another autocast state, made at the first

    def forward(self, *args, **kwargs):
        hooked = changed_hooks(self, inlined, hooks)
        if hooked is not None:
            warn_hooks_changed(self, hooked)
        elif not warn_if_cast(self, dtypes) and not under_function_transform(self) and self.training \
                and torch.is_grad_enabled():
            if autocast_state() != state:
                if not other_states:
                    other_states.append(capture_at_first_call(model, config, record, _exported_forward,
                                                              fallback=base_forward))
                return other_states[0](self, *args, **kwargs)
            bound = call.bind(args, kwargs)
            if bound is not None:
                return train_forward(self, *bound[0], **bound[1])
            warn_uncaptured_call(self, call, args, kwargs)
        return base_forward(self, *args, **kwargs)

    new = _attach_seed(_clone(model, _converted_class(type(model), {True: forward})), "", model)
    for name, value in call.carried.items():
        object.__setattr__(new, name, value)
    return new


def _exported_forward(model, example_inputs, config, record, path: str = "", prepare=None):
    """(rewritten training forward, ExportedCall) of ``model`` (the module at ``path``) captured
    by torch.export, after ``prepare(gm)`` if given; the decisions and graph go into ``record``."""
    from actfx.passes.export_capture import export_graph, exported_call, is_input_guard

    gm = export_graph(model, example_inputs)
    if prepare is not None:
        prepare(gm)
    record.captured[path] = copy_graph(gm.graph)  # the rewrite changes gm's graph in place
    _outline_recomputed(gm, config, path)
    graph, decisions, uncovered = rewrite_graph(gm, config, path)
    graph.set_codegen(gm.graph._codegen)
    record.decisions.extend(decisions)
    _record_uncovered(record, [(node, why) for node, why in uncovered if not is_input_guard(node)], gm, path)
    record.graphs[path] = {True: graph}
    forward = _compile_forward(graph, f"{path or 'model'}:export")
    record.forwards[path] = [(graph, forward)]
    record.calls[path] = exported_call(gm)
    return forward, record.calls[path]


def _outline_recomputed(gm: GraphModule, config: Config, path: str) -> None:
    """The blocks ``config.recompute_modules`` names, outlined from the flat captured graph (the
    forward runs on the converted model, which carries them); a warning for each left inline."""
    outlined, refused = outline_recomputed(gm, config.recompute_modules, path)
    exported_call(gm).carried.update(outlined)
    for block, why in refused.items():
        warnings.warn(f"actfx: Config.recompute_modules names {block}, which torch.export captured as loose ops that "
                      f"cannot be rerun as one block: {why}; its ops are converted one by one", stacklevel=4)


def convert_on_meta(model: nn.Module, config: Config, example_inputs) -> nn.Module:
    """``model``, built on the meta device, captured whole by torch.export from meta
    ``example_inputs`` for a dry run (``actfx report``): its graph's devices are moved to the CPU
    that the dry run's fake tensors stand on. Why: a model fx cannot trace is otherwise captured
    at its first training call, which a dry run never makes, so the report counted fx's part
    alone (a Llama config: 4.0x against about 11x)."""
    from actfx.passes.export_capture import meta_devices_to_cpu

    record = ConversionRecord(config)
    result = _convert_exported(model, example_inputs, config, record, prepare=meta_devices_to_cpu)
    result._actfx_record = record
    return result


def _attach_seed(new: nn.Module, path: str, original: nn.Module) -> nn.Module:
    state = SeedState(salt=zlib.crc32(path.encode()))
    object.__setattr__(new, SEED_STATE, state)
    # as register_buffer(persistent=False) does, without its hasattr check: a wrapper that hands
    # unknown attributes to its inner model (peft's PeftModel and LoraModel) "has" the inner
    # converted model's seed already, and register_buffer refused the wrapper's own
    new._buffers[SEED_BUFFER] = state.initial_buffer().to(_device_of(original))
    new._non_persistent_buffers_set.add(SEED_BUFFER)
    return new


def _trace_without_optional(module, graphs, leaf_types, leaf_paths) -> dict | None:
    """The graphs traced with every optional (None-default) input left None and every flag at
    its default (``is_causal=False``: fx cannot branch on a traced bool), which is how most calls
    leave them (Hugging Face and timm modules); None when there are none or that fails."""
    optional = _optional_inputs(type(module), [gm.graph for gm in graphs.values()])
    if not optional or _has_var_arguments(type(module)):
        return None
    fixed = _constant_defaults(type(module), [gm.graph for gm in graphs.values()])
    try:
        return trace(module, leaf_types, leaf_paths, concrete_args={**dict.fromkeys(optional), **fixed})
    except Exception:  # noqa: BLE001 - fx raises many kinds; the general graphs still serve
        return None


def _constant_defaults(base: type, graphs) -> dict:
    """Graph inputs whose default in ``base.forward`` is a Python constant (a flag, a size)."""
    return {name: default for name, default in _input_defaults(base, graphs).items()
            if isinstance(default, (bool, int, float, str))}


def _at_default(value, default) -> bool:
    return type(value) is type(default) and value == default


def _has_var_arguments(base: type) -> bool:
    try:
        params = inspect.signature(base.forward).parameters.values()
    except (TypeError, ValueError):
        return True
    return any(p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) for p in params)


def _rewrite_all(graphs, path, config, record) -> tuple[dict, dict]:
    """(forwards, rewritten graphs) per training flag; decisions go into ``record`` if given."""
    forwards, rewritten = {}, {}
    for training, gm in graphs.items():
        graph, decisions, uncovered = rewrite_graph(gm, config, path)
        if record is not None and (training or len(graphs) == 1):
            record.decisions.extend(decisions)
            _record_uncovered(record, uncovered, gm, path)
        forwards[training] = _compile_forward(graph, f"{path or 'model'}:{'train' if training else 'eval'}")
        rewritten[training] = graph
    return forwards, rewritten


def _from_graphs(module, graphs, path, config, record, self_attr=False, without_optional=None,
                 retrace=None) -> nn.Module:
    def forwards_for(concrete: dict) -> dict | None:
        """Forwards for a call leaving ``concrete``'s inputs at those values (some optional inputs
        None, others given), traced and rewritten at its first such call; None if fx fails."""
        try:
            traced = retrace(concrete)
        except Exception:  # noqa: BLE001 - fx raises many kinds; the module's own forward serves
            return None
        made, made_graphs = _rewrite_all(traced, path, config, None)
        record.forwards[path] = record.forwards.get(path, []) + [(made_graphs[t], made[t]) for t in made]
        return made

    lazy = forwards_for if retrace is not None else None
    # a call no fx graph takes is captured by torch.export at its first training call
    unserved = capture_at_first_call(module, config, record, _exported_forward, path=path) if path else None
    if without_optional is not None:
        # The record describes the graphs calls mostly take: optional inputs left None.
        forwards, rewritten = _rewrite_all(without_optional, path, config, record)
        general, general_graphs = _rewrite_all(graphs, path, config, None)
        optional = _optional_inputs(type(module), [gm.graph for gm in graphs.values()])
        fixed = _constant_defaults(type(module), [gm.graph for gm in graphs.values()])
        uncalled = uncalled_submodules(module, [*rewritten.values(), *general_graphs.values()])
        cls = _converted_class(type(module), general, optional, forwards, fixed, lazy, unserved, uncalled)
    else:
        forwards, rewritten = _rewrite_all(graphs, path, config, record)
        cls = _converted_class(type(module), forwards, _optional_inputs(type(module), rewritten.values()),
                               fixed=_constant_defaults(type(module), rewritten.values()), forwards_for=lazy,
                               unserved=unserved, uncalled=uncalled_submodules(module, rewritten.values()))
    record.graphs[path] = rewritten
    record.forwards[path] = [(rewritten[t], forwards[t]) for t in forwards]
    if without_optional is not None:
        record.forwards[path] += [(general_graphs[t], general[t]) for t in general]
    new = _attach_seed(_clone(module, cls), path, module)
    if self_attr:
        object.__setattr__(new, SELF_ATTR, new)
    # Tensor constants fx lifted from the forward live on the traced module.
    for name, value in vars(next(iter(graphs.values()))).items():
        if name.startswith("_tensor_constant"):
            object.__setattr__(new, name, value)
    return new


_MODULE_RUNS_AS_IS = "no compressed-save variant for this module: runs as is"


def _uncovered_node(node, gm, path, why: str | None = None) -> Unconverted:
    """``why``: the rewrite's reason for leaving it (a computation of parameters alone), if not
    a missing variant."""
    where = path
    if node.op == "call_module":
        what = type(gm.get_submodule(node.target)).__name__
        where = f"{path}.{node.target}" if path else node.target
        reason = why or _MODULE_RUNS_AS_IS
    else:
        what = getattr(node.target, "__name__", str(node.target))
        reason = why or "no compressed-save variant for this op: runs as is"
    return Unconverted(where or "<root>", what, reason)


def _record_uncovered(record: ConversionRecord, left: list, gm, path: str) -> None:
    """The rewrite's (node, reason) pairs into ``record``: computations of parameters apart."""
    for node, why in left:
        entry = _uncovered_node(node, gm, path, why)
        (record.uncovered if why is None else record.parameter_ops).append(entry)


def _compile_forward(graph: Graph, name: str):
    code = graph.python_code(root_module="self")
    scope = dict(code.globals)
    exec(compile(code.src, f"<actfx {name}>", "exec"), scope)  # noqa: S102 - fx-generated source
    forward = scope["forward"]
    forward.__actfx_source__ = code.src
    return runnable(graph, forward)


def _remember_inputs(module: nn.Module, signature, args: tuple, kwargs: dict) -> None:
    """Shapes of a training call's tensor inputs, by position, on the root's record (cheap: no
    data). A call with keyword arguments is bound to the forward's ``signature``; where that does
    not give tensors by position alone, the call is not kept (``show`` reran the model without
    its keyword inputs and crashed)."""
    if torch.compiler.is_compiling():
        return
    record = module.__dict__.get("_actfx_record")
    if record is None or not torch.is_grad_enabled():
        return
    if kwargs:
        try:
            bound = signature.bind(module, *args, **kwargs) if signature is not None else None
        except TypeError:
            bound = None
        args = bound.args[1:] if bound is not None and not bound.kwargs else None
    if args is not None and all(isinstance(a, torch.Tensor) for a in args):
        record.last_training_inputs = tuple((tuple(a.shape), a.dtype) for a in args)


def _forward_signature(base: type):
    """``base.forward``'s signature, read once per converted class (calls bind to it), or None."""
    try:
        return inspect.signature(base.forward)
    except (TypeError, ValueError):
        return None


def _none_inside(args: tuple, kwargs: dict) -> str | None:
    """Which input is a list, tuple or dict holding a None (diffusers' ``added_cond_kwargs``), or
    None: fx traced such an input as tensors all through, so its graph may not fit the call."""
    def holds_none(value, depth=0) -> bool:
        if isinstance(value, dict):
            value = list(value.values())
        if not isinstance(value, (list, tuple)) or depth > 4:
            return False
        return any(v is None or holds_none(v, depth + 1) for v in value)

    for where, value in [*((f"#{i}", a) for i, a in enumerate(args)), *kwargs.items()]:
        if holds_none(value):
            return where
    return None


def _pattern_forwards(patterns: dict, forwards_for, left: list, bound, fixed: dict) -> dict | None:
    """The forwards for a call leaving ``left`` None with these flag values: traced at the first
    such call (``forwards_for``), then reused. Such calls ran the module's own forward, unconverted
    (a block called with a mask but no position bias)."""
    if forwards_for is None:
        return None
    flags = tuple((name, bound.arguments.get(name, default)) for name, default in fixed.items())
    if not all(isinstance(value, (bool, int, float, str)) for _, value in flags):
        return None  # a flag given as a tensor: fx could not take it as a constant
    key = (tuple(left), flags)
    if key not in patterns:
        patterns[key] = forwards_for({**dict.fromkeys(left), **dict(flags)})
    return patterns[key]


def _input_defaults(base: type, graphs) -> dict:
    """Graph input name -> its default in ``base.forward``, for the inputs that have one."""
    try:
        params = inspect.signature(base.forward).parameters
    except (TypeError, ValueError):
        return {}
    names = {n.target for g in graphs for n in g.nodes if n.op == "placeholder"}
    return {name: p.default for name, p in params.items() if name in names and p.default is not p.empty}


def _optional_inputs(base: type, graphs) -> tuple:
    """Graph inputs whose default in ``base.forward`` is None. fx traced them as tensors, so a
    call that leaves one None (Hugging Face modules do) must run the module's own forward."""
    return tuple(name for name, default in _input_defaults(base, graphs).items() if default is None)


def _converted_class(base: type, forwards: dict, optional: tuple = (), without_optional: dict | None = None,
                     fixed: dict | None = None, forwards_for=None, unserved=None, uncalled: tuple = ()) -> type:
    """``forwards``: {training: forward} of the rewritten graphs. ``optional``: inputs those
    graphs took as tensors though their default is None; a call leaving any None runs
    ``without_optional`` (graphs traced with all of them None and the ``fixed`` inputs at their
    defaults) when every one is None, the fixed ones are at their defaults and that exists, else
    a graph fx traces for that call (``forwards_for``), else ``unserved`` (a forward capturing
    such calls with torch.export), else the module's own forward. The module's own forward
    also runs while a submodule the graphs do not call (``uncalled``) has hooks (fx kept the
    modules hooked at conversion as calls)."""
    fixed = fixed or {}
    train_fwd = forwards.get(True, next(iter(forwards.values())))
    eval_fwd = forwards.get(False, train_fwd)
    signature = _forward_signature(base)
    if without_optional is not None:
        none_train = without_optional.get(True, next(iter(without_optional.values())))
        none_eval = without_optional.get(False, none_train)

    patterns: dict = {}  # (inputs left None, flags) -> forwards traced for such calls, or None
    var_arguments = bool(optional) and _has_var_arguments(base)
    if var_arguments:
        forwards_for = None  # *args / **kwargs: the call cannot be passed by position

    def forward(self, *args, **kwargs):
        hooked = changed_hooks(self, uncalled, None)  # fx kept modules hooked then as calls
        if hooked is not None:
            warn_hooks_changed(self, hooked)
            return base.forward(self, *args, **kwargs)
        changed = changed_value(self.__dict__.get(BAKED, ()))
        if changed is not None:
            warnings.warn(f"actfx: {changed} of {base.__name__} changed since conversion, and the converted graph "
                          "computes with its value then: the model runs its own forward (nothing packed); keep a "
                          "value that changes in training in a buffer, or convert again", stacklevel=2)
            return base.forward(self, *args, **kwargs)
        if under_function_transform(self):
            return base.forward(self, *args, **kwargs)
        holder = _none_inside(args, kwargs)
        if holder is not None:
            if unserved is not None:
                return unserved(self, *args, **kwargs)
            if not (self.training and torch.is_grad_enabled()):
                return base.forward(self, *args, **kwargs)  # nothing would be packed anyway
            warnings.warn(f"actfx: {base.__name__} ran unconverted (nothing packed): its input {holder} holds None "
                          "inside, and fx traced it as tensors (a test like `d.get(k) is not None` took one branch "
                          "for good); convert it with example_inputs= shaped like this call to capture it with "
                          "torch.export", stacklevel=2)
            return base.forward(self, *args, **kwargs)
        if optional:
            bound = signature.bind(self, *args, **kwargs)
            left = [name for name in optional if bound.arguments.get(name) is None]
            at_defaults = all(_at_default(bound.arguments.get(name, default), default)
                              for name, default in fixed.items())
            if left and without_optional is not None and len(left) == len(optional) and at_defaults:
                bound.apply_defaults()
                flat = list(bound.arguments.values())[1:]  # fx named the fixed inputs anew: pass by position
                if self.training:
                    _remember_inputs(self, signature, args, kwargs)
                    return none_train(self, *flat)
                return none_eval(self, *flat)
            if left:
                chosen = _pattern_forwards(patterns, forwards_for, left, bound, fixed)
                if chosen is not None:
                    bound.apply_defaults()
                    flat = list(bound.arguments.values())[1:]
                    return chosen.get(self.training, next(iter(chosen.values())))(self, *flat)
                if unserved is not None:
                    return unserved(self, *args, **kwargs)
                why = "its forward takes *args or **kwargs" if var_arguments else "fx could not trace such a call"
                warnings.warn(f"actfx: {base.__name__} ran unconverted (nothing packed): no converted graph takes "
                              f"a call with {', '.join(left)} None ({why}); convert it with example_inputs= "
                              "shaped like this call to capture it with torch.export", stacklevel=2)
                return base.forward(self, *args, **kwargs)
        if self.training:
            if without_optional is None:  # else the record describes the other graphs: not this call
                _remember_inputs(self, signature, args, kwargs)
            return train_fwd(self, *args, **kwargs)
        return eval_fwd(self, *args, **kwargs)

    attrs = {"forward": forward, "_actfx_converted": True, "__module__": base.__module__,
             "__qualname__": f"Actfx{base.__qualname__}", "__reduce_ex__": reduce_converted,
             "__copy__": copied, "__deepcopy__": copied}
    return type(f"Actfx{base.__name__}", (base,), attrs)


# nn.Module's own dicts and sets a clone gets fresh (not its hooks' or its Parameters')
_MODULE_CONTAINERS = frozenset({"_buffers", "_non_persistent_buffers_set", "_modules"})


def _clone(module: nn.Module, cls: type, shared: tuple = ()) -> nn.Module:
    """A new module of class ``cls`` sharing the original's Parameters, buffers and children.

    nn.Module's own container dicts are fresh so later changes to one object's module tree do
    not leak into the other; the tensors and submodules inside are the very same objects. The
    model's own dicts and sets are shared: a forward hook writing the features it collects into
    the original's dict (its closure holds the original) wrote where the clone's forward never
    read. The hook dicts are
    shared: a handle removes its hook from the dict it was registered in, and a clone holding a
    copy kept running a hook the user had removed from the original (a forward hook scaling an
    output by 10, silently), and a lazy module's one-shot initialising hook ran again and failed.
    So is the Parameter dict: a Parameter assigned on the original after conversion (tying a
    weight) was not read by the clone, and an optimizer built then trained a weight it never used.
    ``shared``: further dicts both keep (actfx.compile's copy shares the buffers: a buffer its
    root's forward rebinds, ``self.steps = self.steps + 1``, reached the copy only, and a
    checkpoint of the original lost it).
    """
    new = object.__new__(cls)
    share_recording(module, new)
    state = dict(module.__dict__)
    for key, value in list(state.items()):
        if key in _MODULE_CONTAINERS and key not in shared:
            state[key] = type(value)(value)
    new.__dict__.update(state)
    new.__dict__.pop("_actfx_record", None)
    return new


def _replace(root: nn.Module, path: str, new_child: nn.Module) -> None:
    parent_path, _, name = path.rpartition(".")
    parent = root.get_submodule(parent_path) if parent_path else root
    if parent is not root and not is_converted(parent):
        # Never write into the user's own submodules: clone the chain of parents first.
        clone = _clone(parent, type(parent))
        _replace(root, parent_path, clone)
        parent = clone
    parent._modules[name] = new_child
