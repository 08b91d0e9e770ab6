"""Measure what each fx node saves for backward, on fake tensors: no memory, no GPU, no compute.

Prefer measuring over listing: instead of a table of what each op is supposed to save, the
module runs once under ``FakeTensorMode`` with ``saved_tensors_hooks`` installed, and every
tensor autograd keeps is charged to the fx node executing at that moment (an ``fx.Interpreter``
walks the graph). An op nobody listed is measured all the same.

Storages are counted once, by the first node that saves them; a later node saving the same
storage records whose it is ("shared with"). Storages of parameters and buffers are counted
apart (they are alive anyway). Each node's result goes to ``node.meta["actfx_saved"]``.

One pass measures an original model (traced here in train mode, as ``convert`` traces it) and a
converted one (its rewritten graphs, from the conversion record), so the two compare like with like.
The model is never modified: parameters and buffers are swapped for fake twins with
``torch.func.functional_call``, host-side attributes the graph reads are copied before use, and
the train/eval flags, set to train for the run, are put back.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import inspect
import logging
import operator
import weakref

import torch
import torch.nn as nn
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
from torch.fx import Graph, GraphModule, Interpreter, Node

from actfx.passes.capture import copy_graph, has_hooks, module_view, trace, training_mode
from actfx.passes.graph_runner import RUNNER
from actfx.passes.outline_recompute import BLOCK_PATH
from actfx.passes.state_call import call_with_state
from actfx.variants.common import unconverted_class
from actfx.variants.packing import pack_value

META_KEY = "actfx_saved"
CALLS = ("call_module", "call_function", "call_method")


@dataclasses.dataclass
class SavedTensor:
    """One tensor a node's backward keeps."""

    shape: tuple
    dtype: torch.dtype
    nbytes: int  # of its whole storage
    parameter: bool  # the storage belongs to a parameter or buffer
    shared_with: str | None = None  # the node that saved this storage first, when another one did
    counted: bool = True  # False when the storage was already counted (here or by another node)


@dataclasses.dataclass
class NodeSaved:
    """What one node (or one module run as a whole) keeps for backward."""

    name: str
    graph_path: str  # the module whose graph holds the node ("" for the root)
    op: str
    target: str
    module_path: str | None
    tensors: list = dataclasses.field(default_factory=list)  # SavedTensor
    output_bytes: int = 0  # its largest output tensor (for workspace estimates)
    packed_numel: int = 0  # a pack node of a rewritten graph: how many values it packed and backward holds (0: none)
    packed_storage: int = 0  # ... and the bytes of the storage they live in (what keeping them exact holds)
    packed_itemsize: int = 0
    node: Node | None = dataclasses.field(default=None, repr=False, compare=False)  # None: a whole module

    @property
    def label(self) -> str:
        return f"{self.graph_path}:{self.name}" if self.graph_path else self.name

    @property
    def activation_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors if t.counted and not t.parameter)

    @property
    def parameter_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors if t.counted and t.parameter)

    @property
    def shared_with(self) -> list[str]:
        """Nodes that first saved activation storages this node also keeps."""
        return sorted({t.shared_with for t in self.tensors if t.shared_with and not t.parameter})


@dataclasses.dataclass
class Measurement:
    """Everything one fake forward kept for backward, node by node."""

    nodes: list  # NodeSaved, in execution order
    output_bytes: int  # the model's outputs (held by the caller until the loss is computed)
    graphs: dict = dataclasses.field(default_factory=dict, repr=False)  # module path -> Graph it ran
    on_real_tensors: bool = False  # the forward reads tensor values, so it ran for real (random inputs)

    @property
    def activation_bytes(self) -> int:
        return sum(n.activation_bytes for n in self.nodes)

    @property
    def parameter_bytes(self) -> int:
        return sum(n.parameter_bytes for n in self.nodes)

    @property
    def largest_output_bytes(self) -> int:
        return max((n.output_bytes for n in self.nodes), default=0)

    @property
    def count(self) -> int:
        return sum(1 for n in self.nodes for t in n.tensors if t.counted)


# ---------------------------------------------------------------- recording


class _Held:
    """What the pack hook hands autograd: alive exactly as long as a graph keeps the tensor."""

    __slots__ = ("tensor", "__weakref__")

    def __init__(self, tensor):
        self.tensor = tensor


class _Recorder:
    """The saved-tensor hooks: note each saved tensor against the node now running; ``finish``
    then keeps those a graph still holds (a graph built and dropped inside forward, like a
    module's throwaway replay, holds nothing) and counts each storage once, for its first saver."""

    def __init__(self, parameter_storages: set):
        self.parameter_storages = parameter_storages
        self.saved: list = []  # (entry, weakref to the _Held, storage key, SavedTensor)
        self.storages: list = []  # every storage seen, kept so no key is reused by a later one
        self.nodes: list[NodeSaved] = []
        self.packs: list = []  # (pack node's entry, storage key of its codes)
        self.current: NodeSaved | None = None
        self.graphs_running = 0  # blocks run node by node inside a root that runs whole (charged by node)

    @contextlib.contextmanager
    def node_by_node(self):
        """While a block's graph runs inside a root that runs whole: no module charging."""
        self.graphs_running += 1
        try:
            yield
        finally:
            self.graphs_running -= 1

    def mark(self) -> tuple:
        return len(self.nodes), len(self.saved), self.current

    def rollback(self, mark: tuple) -> None:
        """Forget what was recorded since ``mark`` (a block's graph that failed part way)."""
        nodes, saved, self.current = mark
        del self.nodes[nodes:], self.saved[saved:]

    @contextlib.contextmanager
    def running(self, entry: NodeSaved):
        outer, self.current = self.current, entry
        self.nodes.append(entry)
        try:
            yield entry
        finally:
            self.current = outer

    def pack(self, t: torch.Tensor) -> _Held:
        entry = self.current
        if entry is None:  # saved outside any node (a forward hook, say): still counted
            entry = NodeSaved("<outside graph>", "", "", "", None)
            self.nodes.append(entry)
            self.current = entry
        storage = t.untyped_storage()
        key = storage._cdata  # one per storage, fake or real, while it is alive
        held = _Held(t)
        saved = SavedTensor(tuple(t.shape), t.dtype, storage.nbytes(), key in self.parameter_storages)
        self.saved.append((entry, weakref.ref(held), key, saved))
        self.storages.append(storage)
        return held

    @staticmethod
    def unpack(held: _Held) -> torch.Tensor:
        return held.tensor

    def note_pack(self, entry: NodeSaved, codes: torch.Tensor) -> None:
        self.packs.append((entry, codes.untyped_storage()._cdata))
        self.storages.append(codes.untyped_storage())

    def finish(self) -> None:
        """Call while the forward's outputs are alive. A pack no backward holds (the factor of a
        product whose partner needs no gradient: RoPE's q beside cos) is no pack: its width
        changes nothing (a Llama plan counted 8 such packs of q and k as 105 KB of its 2 KB)."""
        owners: dict = {}
        for entry, held, key, saved in self.saved:
            if held() is None:
                continue
            if key in owners:
                saved.counted = False
                if owners[key] is not entry:
                    saved.shared_with = owners[key].label
            else:
                owners[key] = entry
            entry.tensors.append(saved)
        self.saved.clear()
        for entry, key in self.packs:
            if key not in owners:
                entry.packed_numel = entry.packed_storage = entry.packed_itemsize = 0
        self.packs.clear()

    def note_outputs(self, entry: NodeSaved, value) -> None:
        entry.output_bytes = max(entry.output_bytes, _largest_tensor_bytes(value))


def _largest_tensor_bytes(value) -> int:
    sizes = [t.untyped_storage().nbytes() for t in torch.utils._pytree.tree_leaves(value)
             if isinstance(t, torch.Tensor)]
    return max(sizes, default=0)


def target_name(node: Node, root: nn.Module) -> str:
    """A readable op name: the module's class for call_module, else the function or method name."""
    if node.op == "call_module":
        try:
            return type(root.get_submodule(node.target)).__name__
        except AttributeError:
            return str(node.target)
    return getattr(node.target, "__name__", str(node.target))


def module_path(node: Node, graph_path: str) -> str | None:
    """The innermost module the node ran in, from the model's root."""
    if node.op == "call_module":
        inner = node.meta.get(BLOCK_PATH, node.target)  # an outlined block is named by its module
    else:
        stack = node.meta.get("nn_module_stack")
        inner = next(reversed(stack.values()))[0] if stack else ""
    if inner and graph_path:
        return f"{graph_path}.{inner}"
    return inner or graph_path or None


# ---------------------------------------------------------------- running


class _Attributing(Interpreter):
    """Runs ``graph`` over ``root``, charging saved tensors to the node being run.

    Calls into a converted submodule with its own rewritten graph in ``graphs`` are interpreted
    too (so their nodes are charged separately); other modules run as they are, as one node.
    """

    def __init__(self, root: nn.Module, graph: Graph, path: str, recorder: _Recorder, graphs: dict,
                 twin):
        super().__init__(root, garbage_collect_values=True, graph=graph)
        self.path, self.recorder, self.graphs, self.twin = path, recorder, graphs, twin

    def run_node(self, n: Node):
        if n.op == "get_attr" and CARRIED in n.meta:
            return self._as_state(n.meta[CARRIED])
        if n.op not in CALLS:
            return super().run_node(n)
        entry = NodeSaved(n.name, self.path, n.op, target_name(n, self.module), module_path(n, self.path), node=n)
        n.meta[META_KEY] = entry
        with self.recorder.running(entry):
            result = super().run_node(n)
        self.recorder.note_outputs(entry, result)
        if n.target is pack_value and result[0] is not None:
            value = self.env[n.args[0]]
            entry.packed_numel, entry.packed_itemsize = value.numel(), value.element_size()
            entry.packed_storage = value.untyped_storage().nbytes()
            self.recorder.note_pack(entry, result[0])
        return result

    def call_module(self, target, args, kwargs):
        sub = self.fetch_attr(target)
        path = f"{self.path}.{target}" if self.path else target
        graph = self.graphs.get(path)
        if graph is not None:
            def run(*args, **kwargs):
                # by keyword too (nn.TransformerEncoder called with mask=): matched to placeholders by name
                values = _placeholder_values(graph, sub, args, kwargs)
                return _Attributing(sub, graph, path, self.recorder, self.graphs, self.twin).run(*values)

            return _through_hooks(sub, run, args, kwargs) if has_hooks(sub) else run(*args, **kwargs)
        return sub(*args, **kwargs)

    def fetch_attr(self, target: str):
        return self._as_state(super().fetch_attr(target))

    def _as_state(self, value):
        if isinstance(value, torch.Tensor):
            value = value if isinstance(value, FakeTensor) else self.twin(value)
            # Model state either way: a tensor constant fx folded (a buffer's view, a table
            # index) is kept by the model, not by autograd, like a parameter.
            self.recorder.parameter_storages.add(value.untyped_storage()._cdata)
            return value
        if isinstance(value, nn.Module):
            return value
        return copy.copy(value)  # host-side state (a seed counter): the dry run must not touch it


def _training_graphs(module: nn.Module, like: nn.Module | None = None) -> dict[str, Graph]:
    """Graph to interpret per module path: a converted model's rewritten training graphs, or
    the original's, traced by ``trace_like``."""
    record = getattr(module, "_actfx_record", None)
    if record is not None:
        return {path: graphs[True] for path, graphs in record.graphs.items()}
    return trace_like(module, like)


def trace_like(module: nn.Module, like: nn.Module | None = None) -> dict[str, Graph]:
    """Training graphs of an unconverted ``module``, traced the way ``convert`` traced ``like``
    (the module paths that got graphs of their own get them here too; the rest is inlined), or
    at the root. A module that does not trace gets no graph (it runs whole)."""
    like_record = getattr(like, "_actfx_record", None)
    paths = list(like_record.graphs) if like_record is not None else [""]
    captured = like_record.captured if like_record is not None else {}
    graphs = {}
    for path in paths:
        root = module.get_submodule(path) if path else module
        if path in captured:  # captured by torch.export: the graph as it was before the rewrite
            carrier = like.get_submodule(path) if path else like
            graphs[path] = _with_carried(root, carrier, copy_graph(captured[path]))
            continue
        inner = frozenset(q[len(path) + 1:] if path else q for q in paths
                          if q != path and (not path or q.startswith(path + ".")))
        try:
            graphs[path] = trace(root, (), inner, concrete_args=_fixed_like(root, like_record, path))[True].graph
        except Exception:  # noqa: BLE001 - fx raises many kinds; any of them means "run it whole"
            continue
    return graphs


CARRIED = "actfx_carried"  # node.meta: a constant export lifted, kept by the converted model only


def _with_carried(root: nn.Module, carrier: nn.Module, graph: Graph) -> Graph:
    """``graph`` owned by ``root``; the constants export lifted out of the forward (rotary
    frequencies, masks) live on the converted model (``carrier``) only, so their get_attr nodes
    take the value along (the original has no such attribute: measuring it failed)."""
    attrs = {}
    for node in graph.find_nodes(op="get_attr"):
        read = operator.attrgetter(node.target)
        try:
            attrs[node.target] = read(root)
        except AttributeError:
            attrs[node.target] = node.meta[CARRIED] = read(carrier)
    return GraphModule(attrs, graph).graph


def _fixed_like(root: nn.Module, like_record, path: str) -> dict | None:
    """The forward arguments the converted graph at ``path`` was traced without (optional inputs
    left None, flags at their defaults), at those values: traced with them, the original's graph
    wanted inputs the recorded call did not give (``show`` after ``model(x)`` with ``mask=None``)."""
    converted = like_record.graphs.get(path) if like_record is not None else None
    if not converted:
        return None
    taken = {n.target for n in next(iter(converted.values())).nodes if n.op == "placeholder"}
    try:
        params = list(inspect.signature(type(root).forward).parameters.values())[1:]
    except (TypeError, ValueError):
        return None
    fixed = {p.name: p.default for p in params if p.name not in taken and p.default is not p.empty
             and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}
    return fixed or None


class _RealCopies:
    """Real stand-ins: detached copies of real tensors (the model's buffers stay untouched),
    random values for meta or fake ones, made once each, in ``dtype`` when floating."""

    def __init__(self, dtype: torch.dtype | None):
        self.dtype, self.made = dtype, {}

    def __call__(self, t: torch.Tensor) -> torch.Tensor:
        if id(t) not in self.made:
            dtype = self.dtype if self.dtype is not None and t.is_floating_point() else t.dtype
            with torch.no_grad():
                if t.is_meta or isinstance(t, FakeTensor):
                    real = torch.randn(t.shape, dtype=dtype) if dtype.is_floating_point else torch.zeros(t.shape, dtype=dtype)
                else:
                    real = t.detach().to(dtype=dtype, copy=True)
            if t.requires_grad:
                real.requires_grad_(True)
            self.made[id(t)] = (t, real)
        return self.made[id(t)][1]


class _Twins:
    """Fake CPU stand-ins for real, meta or fake tensors, made once each, in ``dtype`` when floating.

    Built from a meta tensor of the same layout, so nothing is allocated or copied.
    """

    def __init__(self, mode: FakeTensorMode, dtype: torch.dtype | None):
        self.mode, self.dtype, self.made = mode, dtype, {}

    def __call__(self, t: torch.Tensor) -> torch.Tensor:
        if id(t) not in self.made:
            dtype = self.dtype if self.dtype is not None and t.is_floating_point() else t.dtype
            stride = tuple(t.stride()) if dtype == t.dtype else None
            with torch.no_grad():
                meta = (torch.empty_strided(tuple(t.shape), stride, dtype=dtype, device="meta") if stride
                        else torch.empty(tuple(t.shape), dtype=dtype, device="meta"))
            fake = self.mode.fake_tensor_converter.from_meta_and_device(self.mode, meta, torch.device("cpu"))
            if t.requires_grad:
                fake.requires_grad_(True)
            self.made[id(t)] = (t, fake)  # t stays alive so its id is not reused
        return self.made[id(t)][1]


def measure(module: nn.Module, inputs, *, mode: FakeTensorMode | None = None,
            dtype: torch.dtype | None = None, like: nn.Module | None = None) -> Measurement:
    """Run ``module`` (original or converted) forward on fake tensors in train mode with grad
    enabled, and return what backward would keep, node by node.

    ``inputs``: a tensor, a tuple of positional inputs, a dict of keyword inputs or an
    ``(args, kwargs)`` pair, as ``actfx.convert``'s ``example_inputs``; real, meta or fake
    tensors (only their shapes and dtypes matter; fake ones must come from ``mode``). ``dtype`` stands in for
    ``module.to(dtype)``: floating parameters, buffers and inputs are taken in that dtype.
    ``like``: the converted version of ``module``; the original is then traced in the same
    pieces, so the two measurements line up node for node (``actfx.breakdown``).
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"measure expects a torch.nn.Module, got {type(module).__name__}")
    if isinstance(inputs, torch.Tensor):
        inputs = (inputs,)
    inputs = call_arguments(inputs)
    try:
        with _quiet_fake_kernel_log():
            return _measure(module, inputs, mode or FakeTensorMode(allow_non_fake_inputs=True), dtype, like)
    except Exception as err:  # noqa: BLE001 - measured for real where the forward can run so
        if mode is not None or _has_meta_state(module):
            raise
        fake_error = err
    # Python control flow reads tensor values, which fake tensors do not have, or an op has no
    # fake kernel for these inputs (a custom op, float32 ``_grouped_mm``): run it for real, on
    # copies of the state (the model is not modified) and random inputs of the same shapes.
    # Where that fails too, the fake error is the one to show, unless it only said that values were read.
    try:
        return _measure(module, inputs, None, dtype, like)
    except Exception:  # noqa: BLE001
        if type(fake_error).__name__ in DATA_DEPENDENT:
            raise
        raise fake_error from None


@contextlib.contextmanager
def _quiet_fake_kernel_log():
    """Fake-tensor dispatch logs a failing meta kernel's traceback at ERROR before raising;
    ``measure`` handles that error, so the log is noise in the user's output."""
    logger = logging.getLogger("torch._subclasses.fake_tensor")
    silence = logging.Filter()
    silence.filter = lambda record: not record.getMessage().startswith("failed while attempting to run meta")
    logger.addFilter(silence)
    try:
        yield
    finally:
        logger.removeFilter(silence)


# What fake-tensor tracing raises where Python control flow reads a tensor's value.
DATA_DEPENDENT = ("DataDependentOutputException", "GuardOnDataDependentSymNode", "DynamicOutputShapeException")


def _has_meta_state(module: nn.Module) -> bool:
    return any(t.is_meta for t in [*module.parameters(), *module.buffers()])


def _measure(module, inputs, mode, dtype, like) -> Measurement:
    """One measured forward: on fake tensors from ``mode``, or on real copies when it is None."""
    twin = _Twins(mode, dtype) if mode is not None else _RealCopies(dtype)
    context = mode if mode is not None else contextlib.nullcontext()
    graphs = _training_graphs(module, like)  # traced outside the fake mode
    state = {name: twin(t) for name, t in [*module.named_parameters(), *module.named_buffers()]}
    args, kwargs = torch.utils._pytree.tree_map_only(
        torch.Tensor, lambda x: x if isinstance(x, FakeTensor) else twin(x), inputs)
    if dtype is not None:
        with context:
            args, kwargs = torch.utils._pytree.tree_map_only(
                torch.Tensor, lambda x: x.to(dtype) if x.is_floating_point() else x, (args, kwargs))
    recorder = _Recorder({t.untyped_storage()._cdata for t in state.values()})
    record = getattr(module, "_actfx_record", None) or getattr(like, "_actfx_record", None)
    runner = _Runner(module, graphs, getattr(record, "calls", {}), recorder, twin)
    with training_mode(module, True), context, torch.enable_grad(), \
            torch.autograd.graph.saved_tensors_hooks(recorder.pack, recorder.unpack):
        out = call_with_state(runner, {f"model.{k}": v for k, v in state.items()}, tuple(args), kwargs)
        recorder.finish()
    return Measurement(recorder.nodes, _total_tensor_bytes(out), graphs, on_real_tensors=mode is None)


def _total_tensor_bytes(value) -> int:
    seen = {}
    for t in torch.utils._pytree.tree_leaves(value):
        if isinstance(t, torch.Tensor):
            seen[t.untyped_storage()._cdata] = t.untyped_storage().nbytes()
    return sum(seen.values())


class _Runner(nn.Module):
    """Holds the model as a child so ``functional_call`` can swap in fake parameters, then runs
    it through the interpreter, or whole when its root has no graph (charging each module, and
    each node of the converted modules inside)."""

    def __init__(self, model: nn.Module, graphs: dict, calls: dict, recorder: _Recorder, twin):
        super().__init__()
        self.model = model
        self.graphs, self.calls, self.recorder, self.twin = graphs, calls, recorder, twin

    def forward(self, *args, **kwargs):
        if "" in self.graphs:
            values = _placeholder_values(self.graphs[""], self.model, args, kwargs)
            return _Attributing(self.model, self.graphs[""], "", self.recorder, self.graphs, self.twin).run(*values)
        converted = getattr(self.model, "_actfx_record", None) is not None
        # the original has no graphs to choose from: it runs those traced like the converted ones
        view = self.model if converted else _interpreted_view(self.model, self.graphs, self.calls, self.recorder,
                                                              self.twin)
        self.paths = {id(m): name for name, m in self.model.named_modules()}
        with _per_module(view, self.recorder):
            token = RUNNER.set(self._run_graph) if converted else None
            try:
                return view(*args, **kwargs)
            finally:
                if token is not None:
                    RUNNER.reset(token)

    def _run_graph(self, module: nn.Module, graph: Graph, generated, args: tuple, kwargs: dict):
        """A converted block runs the graph its forward chose, node by node (``graph_runner``)."""
        path = self.paths.get(id(module))
        if path is None:
            return generated(module, *args, **kwargs)
        signature = inspect.signature(generated)
        bound = signature.bind(module, *args, **kwargs)
        bound.apply_defaults()
        values = []
        for name, value in list(bound.arguments.items())[1:]:
            if signature.parameters[name].kind is inspect.Parameter.VAR_POSITIONAL:
                values.extend(value)
            else:
                values.append(value)
        with self.recorder.node_by_node():
            return _Attributing(module, graph, path, self.recorder, self.graphs, self.twin).run(*values)


def _interpreted_view(model: nn.Module, graphs: dict, calls: dict, recorder: _Recorder, twin) -> nn.Module:
    """``model`` (an original) with each outermost submodule that has a graph in ``graphs`` run
    by the interpreter, node by node, as the converted model's blocks run theirs. The view copies
    the modules on the way (their dicts of children and state too), so the model itself is not
    modified."""
    outermost = [path for path in graphs if not any(path.startswith(q + ".") for q in graphs if q != path)]
    copies: dict[str, nn.Module] = {}

    def copied(path: str) -> nn.Module:
        if path not in copies:
            parent, _, name = path.rpartition(".")
            source = model if not path else copied(parent).get_submodule(name)
            view = module_view(source)
            view.__dict__.update(_modules=dict(source._modules), _parameters=dict(source._parameters),
                                 _buffers=dict(source._buffers))
            copies[path] = view
            if path:
                copied(parent)._modules[name] = view
        return copies[path]

    for path in outermost:
        try:
            original = model.get_submodule(path)
        except AttributeError:
            continue
        run = _interpreting_forward(original, graphs[path], path, recorder, graphs, twin, calls.get(path))
        copied(path).__class__ = type(type(original).__name__, (type(original),), {"forward": run})  # shown by that name
    return copied("") if copies else model


def _interpreting_forward(original: nn.Module, graph: Graph, path: str, recorder: _Recorder, graphs: dict, twin,
                          call):
    """The forward of an interpreted original block; ``call``: its ExportedCall where torch.export
    captured it (its graph takes the call's flattened inputs), else None (fx: by name). A call its
    graph does not take (it was traced for another pattern of inputs) runs the block's own forward,
    charged as one module."""
    def forward(self, *args, **kwargs):
        bound = call.bind(args, kwargs) if call is not None else None
        mark = recorder.mark()
        try:
            values = (_placeholder_values(graph, original, args, kwargs) if call is None
                      else torch.utils._pytree.tree_leaves(bound) if bound is not None else None)
            if values is not None:
                with recorder.node_by_node():
                    return _Attributing(self, graph, path, recorder, graphs, twin).run(*values)
        except Exception:  # noqa: BLE001 - measured as one module instead
            recorder.rollback(mark)
        return type(original).forward(self, *args, **kwargs)
    return forward


def call_arguments(inputs) -> tuple[tuple, dict]:
    """(args, kwargs) from a tuple of positional inputs, a dict of keyword inputs or an
    ``(args, kwargs)`` pair (``actfx.convert``'s forms of ``example_inputs``)."""
    if (isinstance(inputs, tuple) and len(inputs) == 2 and isinstance(inputs[0], tuple)
            and isinstance(inputs[1], dict)):
        return inputs
    if isinstance(inputs, dict):
        return (), dict(inputs)
    return tuple(inputs), {}


_MISSING = object()


def _through_hooks(module: nn.Module, run, args, kwargs):
    """``run`` (the module's graph) called as the module is, through its forward hooks and
    pre-hooks: what their own ops save is counted against the module's row. Run as the graph
    alone, a model whose hooks rescale outputs was shown at 15.1x where it held 2.08x less."""
    had = module.__dict__.get("forward", _MISSING)
    module.forward = run
    try:
        return module(*args, **kwargs)
    finally:
        if had is _MISSING:
            del module.forward
        else:
            module.forward = had


def _placeholder_values(graph: Graph, model: nn.Module, args: tuple, kwargs: dict) -> tuple:
    """A root graph's inputs for a call with keywords: fx and torch.export name each placeholder
    after the forward parameter it stands for, so values are matched by name (defaults fill the
    rest, as the interpreter would)."""
    if not kwargs:
        return args
    base = unconverted_class(model)
    signature = inspect.signature(base.forward)
    try:
        bound = signature.bind(None, *args, **kwargs)  # None stands for self
    except TypeError as err:
        raise TypeError(f"actfx: example inputs do not fit {base.__name__}.forward: {err}; pass them "
                        "as a tuple of positional inputs, a dict of keyword inputs or an (args, kwargs) pair") from None
    named = {}
    for name, value in list(bound.arguments.items())[1:]:
        if signature.parameters[name].kind is inspect.Parameter.VAR_KEYWORD:
            named.update(value)
        else:
            named[name] = value
    values = []
    for node in graph.nodes:
        if node.op != "placeholder":
            continue
        name = str(node.target).lstrip("*")
        if name in named:
            values.append(named.pop(name))
        elif node.args:
            values.append(node.args[0])
        else:
            raise TypeError(f"actfx: no example input for {base.__name__}.forward's input {name!r}; "
                            "pass it by name or position")
    if any(isinstance(v, torch.Tensor) for v in named.values()):
        raise TypeError(f"actfx: the traced {base.__name__}.forward does not take {sorted(k for k, v in named.items() if isinstance(v, torch.Tensor))} "
                        "(captured without them); pass the inputs the model was converted with")
    return tuple(values)


@contextlib.contextmanager
def _per_module(model: nn.Module, recorder: _Recorder):
    """While a model without a graph runs, charge what is saved to the innermost module running.

    Uses the global module hooks for the duration of the run only (instance hooks would write
    into the user's modules); calls of modules outside ``model`` are ignored, and so is
    everything inside a block whose graph runs node by node (its nodes are charged).
    """
    paths = {id(m): name for name, m in model.named_modules()}
    entries: dict[str, NodeSaved] = {}
    stack: list = []

    def enter(module, args):
        path = paths.get(id(module))
        if path is None or recorder.graphs_running:
            stack.append(None)
            return
        entry = entries.get(path)
        if entry is None:
            entry = entries[path] = NodeSaved(path or "<root>", "", "call_module", type(module).__name__, path or None)
            recorder.nodes.append(entry)
        stack.append((entry, recorder.current))
        recorder.current = entry

    def leave(module, args, output):
        top = stack.pop()
        if top is not None:
            entry, recorder.current = top
            recorder.note_outputs(entry, output)

    pre = nn.modules.module.register_module_forward_pre_hook(enter)
    post = nn.modules.module.register_module_forward_hook(leave, always_call=True)
    try:
        yield
    finally:
        pre.remove()
        post.remove()
