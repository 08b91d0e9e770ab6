"""``actfx.compile`` and ``actfx.backend``: compressed saved activations inside torch.compile.

Why: PyTorch's own compiler is the strongest alternative (fused kernels, recompute chosen by its
min-cut partitioner under ``activation_memory_budget``). So compression lives inside it: the
partitioner decides what to recompute, ``actfx/passes/pack_saved.py`` packs what it saves, and
Inductor fuses each pack into the kernel producing the value and each unpack into the backward
kernel reading it. The hook is Inductor's ``custom_partitioner_fn``, set per compilation (no
global state): two compiled models in one process keep their own settings.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import pathlib
import types
import warnings

import torch
import torch.nn as nn
from torch._functorch import config as functorch_config
from torch._functorch.partitioners import min_cut_rematerialization_partition
from torch._inductor import config as inductor_config
from torch._inductor.custom_graph_pass import CustomPartitionerFn, get_hash_for_files

from actfx.config import DEFAULT_OP_BITS, Config, check_bits
from actfx.kernels.seed_stream import SeedStream, calls_with
from actfx.convert import _clone
from actfx.copies import COMPILE_ARGS, SOURCE, compiled_class
from actfx.outputs import grad_leaves
from actfx.passes.attention_kernel import choose_attention_kernels
from actfx.passes.attention_pattern import KeepMathAttention
from actfx.passes.parameter_casts import recompute_parameter_computations
from actfx.passes.graph_memory import partition_memory, step_peak
from actfx.passes.pack_saved import SYMBOLIC_SIZES, kept_as_is, pack_saved
from actfx.passes.saved_plan import GraphPlan, Storage

_SOURCES = ("compiled.py", "rules.py", "kernels/graph_pack.py", "passes/pack_saved.py", "passes/noise_degree.py",
            "passes/linearize.py", "passes/hoist.py", "passes/rematerialize.py", "passes/saved_pair.py",
            "passes/graph_emit.py", "passes/index_range.py", "passes/stored_layout.py", "kernels/seed_stream.py",
            "kernels/extern_pack.py", "kernels/lowered.py", "passes/graph_memory.py", "passes/decorrelate.py",
            "passes/aten_to_functional.py", "passes/forward_cse.py", "passes/parameter_casts.py",
            "passes/norm_decompositions.py")


def joint_graph_patches(gm, config: Config) -> dict:
    """Inductor settings for the joint graph of ``gm``, shared by actfx.compile and its estimates
    (``compiled_estimate``), so both partition the same graph. SDPA calls are pointed at the
    attention kernel that holds less (``choose_attention_kernels``), and attention written by hand
    keeps its math (``KeepMathAttention``, unless the user set a pass of their own). Uniform-value
    constant folding is off: on meta tensors it has no values to read (it emptied the graph), and
    with it on only where values exist a Hugging Face Granite (constant multipliers) partitioned
    one way for the plan and another under actfx.compile, which then held 8.7% more than planned."""
    patches = {"joint_graph_constant_folding": False}
    attention_bits = config.bits_for("attention", None)
    if choose_attention_kernels(gm, attention_bits, config.min_numel) and inductor_config.joint_custom_pre_pass is None:
        patches["joint_custom_pre_pass"] = KeepMathAttention(attention_bits, config.min_numel)  # attention written by hand
    return patches


@dataclasses.dataclass
class CompiledRecord:
    """What the partitioner pass decided, one GraphPlan per compiled graph (newest last)."""

    config: Config
    memory_budget: float | None
    plans: list[GraphPlan] = dataclasses.field(default_factory=list)
    probe: object = None  # calibrating for a plan: backward reads saved values through it
    training_calls: int = 0  # calls of an actfx.compile model with grad enabled (not counted for backend())
    seeds: SeedStream = dataclasses.field(default_factory=SeedStream)  # the packs' rounding seeds
    warned_kinds: bool = False  # said once that an op_bits kind matches no op
    warned_shapes: bool = False  # said once that a new input shape compiled nothing (dynamo's recompile limit)
    plan_ops: frozenset = frozenset()  # the sites a plan applied here packed where it was made (its ``ops``)
    warned_plan: bool = False  # said once that this model packs values the plan did not see

    @property
    def bytes_after(self) -> int:
        """Bytes kept for backward over every compiled graph, parameters excluded."""
        return sum(p.bytes_after for p in self.plans)

    @property
    def step_bytes(self) -> int:
        """The training step's worst point beyond parameters and inputs (``graph_memory``)."""
        return step_peak([(p.memory, p.bytes_after) for p in self.plans if p.memory is not None])


def _warn_of_unknown_kinds(record: CompiledRecord) -> None:
    """Once per model: a kind the user set in op_bits that no op of the graphs compiled so far
    answers to (misspelt, or not in this model), which would otherwise change nothing silently."""
    if record.warned_kinds:
        return
    seen = frozenset().union(*(plan.kinds for plan in record.plans))
    unknown = sorted(set(record.config.user_op_bits) - seen - set(DEFAULT_OP_BITS))
    if unknown:
        record.warned_kinds = True
        warnings.warn(f"actfx.compile: Config.op_bits names {unknown[0]!r}, which is the kind of no op in the graphs "
                      f"compiled so far; spell kinds as actfx.show lists them or as ATen names the op "
                      f"(conv, linear, layer_norm, gelu; convolution, addmm, native_layer_norm)", stacklevel=3)


def _warn_of_values_not_planned(record: CompiledRecord, plan: GraphPlan) -> None:
    """Once per model: the plan applied here did not see some of the values this model packs (it
    was made for another model, one layer deeper, say): they take the default width and the
    plan's bytes do not hold."""
    unseen = sorted({v.site for v in plan.saved if v.storage is Storage.PACKED} - record.plan_ops)
    if record.plan_ops and unseen and not record.warned_plan:
        record.warned_plan = True
        warnings.warn(f"actfx.compile: this model packs {len(unseen)} value(s) the plan did not see (e.g. "
                      f"{unseen[0]!r}), at the default width: the plan was made for another model or input shape; "
                      "plan this one with actfx.plan(model, inputs, path='compile')", stacklevel=3)


def _check_budget(memory_budget) -> float | None:
    if memory_budget is None:
        return None
    if isinstance(memory_budget, bool) or not isinstance(memory_budget, (int, float)) or not 0 <= memory_budget <= 1:
        raise ValueError(f"memory_budget must be a number in [0, 1] (the share of activation memory the "
                         f"partitioner may keep) or None, got {memory_budget!r}")
    return float(memory_budget)


def _resolve_config(bits, config) -> Config:
    if config is None:
        config = Config(bits=check_bits(2 if bits is None else bits))
    if not isinstance(config, Config):
        raise TypeError(f"config must be an actfx.Config, got {type(config).__name__}")
    if bits is not None and bits != config.bits:
        raise ValueError(f"bits={bits} disagrees with config=Config(bits={config.bits}); pass the width in one place")
    return config


def _layout(example_inputs) -> dict:
    """On CPU, keep convolutions in the layout they were written in. Inductor's layout
    optimisation converts every 3x3 weight (and the input) to channels-last in forward, and
    backward reads those copies, so they are held between the passes: on ResNet-50 batch 8,
    50 MB of weight copies next to 40 MB of packed activations. Without it the step is also
    faster here (packs read their groups contiguously): 3.0 s vs 4.0 s, while plain
    torch.compile's step is the same either way (1.58 vs 1.56 s). On CUDA, where channels-last
    convolutions use tensor cores, PyTorch's default stays."""
    tensors = [t for t in example_inputs if isinstance(t, torch.Tensor)]
    return {"layout_optimization": False} if tensors and all(t.device.type == "cpu" for t in tensors) else {}


def _has_sparse_values(gm) -> bool:
    return any(isinstance(v := n.meta.get("val"), torch.Tensor) and v.layout != torch.strided for n in gm.graph.nodes)


def _warn_symbolic_sizes(plan) -> None:
    """Values with symbolic sizes (``dynamic=True``, or sizes dynamo marked dynamic) stay exact:
    say so, or such a model trains holding what torch.compile holds without a word."""
    kept = [v for v in plan.saved if v.reason == SYMBOLIC_SIZES]
    if kept:
        warnings.warn(f"actfx.compile: {len(kept)} saved value(s) with symbolic sizes (dynamic shapes) stay exact "
                      f"({sum(v.bytes_after for v in kept)} bytes at these shapes); compile with dynamic=False "
                      f"(actfx.compile's default) so that each new shape compiles a packed graph", stacklevel=2)


class _Partitioner(CustomPartitionerFn):
    """min-cut partitioning (under the memory budget), then pack_saved on the pair."""

    def __init__(self, record: CompiledRecord):
        self.record = record

    def __call__(self, gm, joint_inputs, **kwargs):
        recompute_parameter_computations(gm, kwargs.get("static_lifetime_input_indices"))
        fwd, bwd = self._partition(gm, joint_inputs, kwargs)
        if _has_sparse_values(gm):
            # Inductor re-derives the fake value of each op whose inputs the pass changed, and
            # cannot read a sparse one (nn.Embedding(sparse=True): the backward compile failed)
            warnings.warn("actfx.compile: a graph with sparse tensors (nn.Embedding(sparse=True)) is compiled as "
                          "torch.compile compiles it, nothing packed; use a dense embedding to pack it", stacklevel=2)
            return fwd, bwd
        settings = {"num_fwd_outputs": kwargs["num_fwd_outputs"], "config": self.record.config,
                    "static_indices": kwargs.get("static_lifetime_input_indices")}
        plan = pack_saved(fwd, bwd, probe=self.record.probe, **settings)
        # Never hold more than torch.compile: values computed in forward for backward that end up
        # kept exact can outweigh what the packs free (a logcumsumexp block: 75 KB against 66 KB).
        # Such a pair is partitioned again (the pass changed it in place) and packed without
        # hoisting, or, where that still holds more, left as the partitioner made it.
        if self.record.probe is None and plan.bytes_after > plan.bytes_before:
            fwd, bwd = self._partition(gm, joint_inputs, kwargs)
            plan = pack_saved(fwd, bwd, hoisting=False, **settings)
            if plan.bytes_after > plan.bytes_before:
                fwd, bwd = self._partition(gm, joint_inputs, kwargs)
                plan = kept_as_is(fwd, bwd, reason="packing would hold more than torch.compile", **settings)
        plan.memory = partition_memory(fwd, bwd, kwargs["num_fwd_outputs"])
        _warn_symbolic_sizes(plan)
        self.record.plans.append(plan)
        _warn_of_unknown_kinds(self.record)
        _warn_of_values_not_planned(self.record, plan)
        return fwd, bwd

    def _partition(self, gm, joint_inputs, kwargs):
        """min-cut partitioning of the joint graph, under the memory budget if one is set."""
        budget = self.record.memory_budget
        patch = functorch_config.patch(activation_memory_budget=budget) if budget is not None else contextlib.nullcontext()
        with patch:
            return min_cut_rematerialization_partition(gm, joint_inputs, **kwargs)

    def uuid(self):
        here = pathlib.Path(__file__).parent
        return get_hash_for_files(tuple(str(here / name) for name in _SOURCES),
                                  repr((self.record.config, self.record.memory_budget))).hex()


class Backend:
    """A torch.compile backend: Inductor with actfx's partitioner pass. Keeps a CompiledRecord."""

    def __init__(self, config: Config, memory_budget: float | None):
        self.record = CompiledRecord(config, memory_budget)

    def __call__(self, gm, example_inputs, *, mode: str | None = None, options: dict | None = None):
        from torch._inductor.compile_fx import compile_fx

        from actfx.passes.norm_decompositions import CompiledDecompositions

        # The autograd cache would skip the partitioner (and so the record) on a hit; Inductor's
        # own code cache still applies to the packed graphs.
        # config_patches (not a surrounding patch): they also hold when backward compiles, later.
        patches = {**inductor_options(mode, options, example_inputs), "custom_partitioner_fn": _Partitioner(self.record),
                   **_layout(example_inputs), **joint_graph_patches(gm, self.record.config)}
        first = len(self.record.plans)
        with functorch_config.patch(enable_autograd_cache=False):
            compiled = compile_fx(gm, example_inputs, config_patches=patches, inner_compile=_backward_in_graph_order,
                                  decompositions=CompiledDecompositions(self.record.config.group_size))
        made = self.record.plans[first:]  # this graph's plans (none in eval mode)

        def note_run():
            """Mark them with the training call that ran them last: ``actfx.show`` counts the
            graphs a step runs, not those a recompilation replaced."""
            for plan in made:
                plan.last_call = self.record.training_calls

        return calls_with(compiled, self.record.seeds, before=note_run if made else None)


def _backward_in_graph_order(gm, example_inputs, **kwargs):
    """Inductor's compile, with backward graphs kept in their order (``pack_saved`` puts each
    unpack right before its first reader). Inductor's reordering for peak memory sizes a read by
    the loop ranges of its index, so an unpack's packed bytes, lo and step looked as large as the
    unpacked table: it ran every unpack at the start of backward, where their outputs all lived
    at once (gpt_tiny at batch 32: backward peak 31 -> 53 MiB)."""
    from torch._inductor.compile_fx import compile_fx_inner

    if not kwargs.get("is_backward"):
        return compile_fx_inner(gm, example_inputs, **kwargs)
    with inductor_config.patch(reorder_for_peak_memory=False):
        return compile_fx_inner(gm, example_inputs, **kwargs)


def inductor_options(mode: str | None, options: dict | None, example_inputs) -> dict:
    """Inductor settings for torch.compile's ``mode`` and ``options`` (which it hands a backend
    as keywords), checked as Inductor checks them. CUDA graphs are left out: a graph replayed
    would replay its packs' rounding seeds, the same noise every step."""
    from torch._inductor import list_mode_options

    chosen = {**(list_mode_options(mode) if mode else {}), **(options or {})}
    known = inductor_config.get_config_copy()
    unknown = [key for key in chosen if key.replace("-", "_") not in known]
    if unknown:
        raise ValueError(f"actfx.compile: {unknown[0]!r} is not an Inductor option (torch.compile's options=); "
                         "see torch._inductor.list_options() for the names")
    chosen = {key.replace("-", "_"): value for key, value in chosen.items()}
    if chosen.pop("triton.cudagraphs", False) and any(
            isinstance(t, torch.Tensor) and t.is_cuda for t in example_inputs):
        warnings.warn("actfx.compile: compiled without CUDA graphs (mode='reduce-overhead'): a replayed graph would "
                      "round its packs with the same noise every step", stacklevel=2)
    return chosen


def own_cache_entry(fn):
    """``fn`` called through a code object of its own, to hand to torch.compile. Dynamo keeps
    compiled code per code object and compares backends: every actfx.compile brings a backend of
    its own, so each model added an entry on its class's ``forward``, and past dynamo's
    ``recompile_limit`` (8) the next model of that class ran eagerly with nothing packed (its
    record empty, only dynamo's log line saying so). The entry is this call's, not the class's."""

    def call(*args, **kwargs):
        return fn(*args, **kwargs)

    code = call.__code__.replace()  # a new code object: dynamo's cache lives on it
    fresh = types.FunctionType(code, call.__globals__, call.__name__, call.__defaults__, call.__closure__)
    return functools.update_wrapper(fresh, fn)


def backend(bits: int | None = None, *, memory_budget: float | None = None, config: Config | None = None) -> Backend:
    """``torch.compile(model, backend=actfx.backend(bits=2))``: see the module docstring. bits
    defaults to 2 (or config.bits)."""
    return Backend(_resolve_config(bits, config), _check_budget(memory_budget))


def compile(model: nn.Module, bits: int | None = None, *, memory_budget: float | None = None, config: Config | None = None,
            plan=None, **compile_kwargs) -> nn.Module:
    """A compiled copy of ``model`` whose saved activations are packed (same Parameters, buffers,
    submodules and state_dict keys; ``model`` itself is left as it was).

    memory_budget: torch.compile's ``activation_memory_budget`` for the partitioner (None keeps
    PyTorch's default); ``plan``: an ``actfx.plan(..., path="compile")`` plan giving each saved
    value its width (it replaces bits and config); compile_kwargs go to ``torch.compile``
    (``dynamic``, ``fullgraph``, ...); ``dynamic`` defaults to False here: each new input shape
    compiles a graph of its own (packed), up to dynamo's ``recompile_limit``; ``dynamic=True`` or
    None (torch.compile's default) compile symbolic sizes, whose values stay exact.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"actfx.compile expects a torch.nn.Module, got {type(model).__name__}")
    if compiled_record(model) is not None:
        raise TypeError("actfx.compile: this model was compiled by actfx already; to change its settings, call "
                        "actfx.compile on the model it was made from (they share their parameters)")
    if isinstance(model, torch._dynamo.eval_frame.OptimizedModule):
        model = model._orig_mod  # torch.compile(model): compiled here instead, with actfx's backend
    if "backend" in compile_kwargs:
        raise TypeError("actfx.compile chooses the backend; use torch.compile(model, backend=actfx.backend(...)) "
                        "to combine it with other options")
    arguments = dict(bits=bits, memory_budget=memory_budget, config=config, plan=plan, **compile_kwargs)
    if plan is not None:
        from actfx.planner.plan import check_plan_paths, plan_config

        config = plan_config(plan, "compile", bits=bits, config=config)
        check_plan_paths(config.site_bits, model)
        bits = None
        memory_budget = plan.memory_budget if memory_budget is None else memory_budget
    inductor_options(compile_kwargs.get("mode"), compile_kwargs.get("options"), ())  # a misspelt option: now
    chosen = backend(bits, memory_budget=memory_budget, config=config)
    chosen.record.plan_ops = frozenset(plan.ops) if plan is not None else frozenset()
    chosen.record.config.check_paths(model)
    # Static shapes unless asked otherwise: under torch.compile's default a second input shape (an
    # epoch's smaller last batch) recompiles with a symbolic batch, whose values stay exact, and
    # every later step ran that graph (held 3.2x more for the rest of training, silently).
    compile_kwargs.setdefault("dynamic", False)
    compiled = _clone(model, compiled_class(type(model)), shared=("_buffers",))  # copies and pickles compile anew
    object.__setattr__(compiled, SOURCE, model)  # its training flag (actfx/copies.py)
    object.__setattr__(compiled, COMPILE_ARGS, arguments)
    # The copy's own forward, compiled (an instance attribute over the class's): hooks and
    # train()/eval() work as on any module, and built-in containers compile too.
    forward = own_cache_entry(compiled.forward)
    compiled_forward = torch.compile(forward, backend=chosen, **compile_kwargs)
    if compile_kwargs["dynamic"] is False:
        compiled_forward = _static_inputs(compiled_forward)
    object.__setattr__(compiled, "forward", _noting_training_calls(compiled_forward, chosen.record, type(model).__name__,
                                                                   compile_kwargs["dynamic"] is False))
    object.__setattr__(compiled, "_actfx_compiled", chosen.record)
    return compiled


_PROPAGATED = "_dynamo_propagated_dynamic_indices"


def _static_inputs(compiled_forward):
    """``compiled_forward`` called with its tensor inputs' propagated dynamic marks dropped. Why: a
    plain torch.compile that recompiled for a second shape marks the dims of the tensors it saw
    (``_dynamo_propagated_dynamic_indices``); torch 2.14 honours the mark under ``dynamic=False``,
    so an actfx.compile model later called on the same tensor compiled symbolic sizes and kept
    every value exact. Marks the user set (``torch._dynamo.mark_dynamic``) stay."""

    @functools.wraps(compiled_forward)
    def forward(*args, **kwargs):
        for value in (*args, *kwargs.values()):
            if isinstance(value, torch.Tensor) and _PROPAGATED in value.__dict__:
                delattr(value, _PROPAGATED)
        return compiled_forward(*args, **kwargs)

    return forward


def _noting_training_calls(compiled_forward, record: CompiledRecord, name: str, static: bool):
    """``compiled_forward``, counting calls with grad enabled, and warning once when such a call
    compiled nothing for training. Why: where dynamo gives up on a forward (``nn.LSTM``/``nn.GRU``,
    which it does not trace, inside one expression), torch.compile runs it eagerly without a
    word, and a model meant to hold 2-bit activations held all of them in full precision."""

    shapes_seen: set = set()

    @functools.wraps(compiled_forward)
    def forward(*args, **kwargs):
        graphs = len(record.plans)
        out = compiled_forward(*args, **kwargs)
        if torch.is_grad_enabled():
            record.training_calls += 1
            new_shapes = False
            if static and not record.warned_shapes:  # read only until the warning was given
                shapes = tuple(tuple(t.shape) for t in torch.utils._pytree.tree_leaves((args, kwargs))
                               if isinstance(t, torch.Tensor))
                new_shapes = shapes not in shapes_seen
                shapes_seen.add(shapes)
            if not record.plans and record.training_calls == 1 and grad_leaves(out):
                warnings.warn(f"actfx.compile: torch.compile captured no graph of {name}'s forward for training, "
                              "so it ran eagerly and nothing is packed (dynamo skipped it: run with "
                              "TORCH_LOGS=graph_breaks to see why; nn.LSTM/GRU/RNN are not traced); "
                              "actfx.convert(model) packs what it can of such a model", stacklevel=4)
            elif new_shapes and record.plans and len(record.plans) == graphs and grad_leaves(out):
                # static shapes: a new shape compiles graphs of its own, unless dynamo gave up
                record.warned_shapes = True
                warnings.warn(f"actfx.compile: a training call of {name} with new input shapes {list(shapes)} compiled "
                              "no graph, so it ran eagerly and nothing is packed (past dynamo's recompile_limit, "
                              f"{torch._dynamo.config.recompile_limit} shapes); pad inputs to a few shapes, raise "
                              "torch._dynamo.config.recompile_limit, or compile with dynamic=True", stacklevel=4)
        return out

    # An outer torch.compile (torch.compile(actfx.compile(model))) would trace through to the
    # model's own code and compile it with its own backend, nothing packed: it calls this instead.
    return torch.compiler.disable(forward)


def compiled_record(model) -> CompiledRecord | None:
    """The record of a model returned by actfx.compile (or any module holding one), of
    ``torch.compile(model, backend=actfx.backend())``'s module, or of that backend itself."""
    if isinstance(model, Backend):
        return model.record
    record = getattr(model, "_actfx_compiled", None)
    if isinstance(record, CompiledRecord):
        return record
    backend = _backend_of(model)
    return backend.record if backend is not None else None


def _backend_of(module) -> Backend | None:
    """The actfx Backend a torch.compile'd module runs, through the wrappers dynamo puts around a
    backend (each keeps the one it wraps); None for any other module."""
    wrapper, seen = getattr(getattr(module, "dynamo_ctx", None), "callback", None), set()
    while wrapper is not None and id(wrapper) not in seen:
        if isinstance(wrapper, Backend):
            return wrapper
        seen.add(id(wrapper))
        inner = (getattr(wrapper, name, None) for name in ("_torchdynamo_orig_backend", "_inner_convert", "compiler_fn"))
        wrapper = next((w for w in inner if w is not None and id(w) not in seen), None)
    return None
