"""How much each packed value's rounding noise adds to the gradient's variance, per bit width.

The estimate is measured, in one calibration forward on real inputs (nothing is stored in the
model, and training steps after planning never sync with the host):

    Var_p(b) = E || g(noise on pack p at b bits) - g ||^2

``g`` is the exact parameter gradient; ``g(noise on p)`` the gradient when backward reads pack
``p`` through stochastic rounding to ``b`` bits (groups of ``group_size`` values, as
``pack_groups`` rounds them) and every other saved value exactly. The forward runs once, the
backward once exactly and once per pack and measured width (``retain_graph``), that one from the
pack's readers down (``backward_cut``); the noise reaches every reader of the
pack: the op that packed it and the values the rewrite rebuilds from it (a ReLU output rebuilt as
``mask * (γ x̂ + β)`` from BatchNorm's packed normalised input reads ``mask * γ`` times the noise
on x̂, and BatchNorm's own backward, which PyTorch feeds its input ``x = x̂ std + mean``, reads
``std`` times it), because the noise is put into PyTorch's own saved tensors as backward unpacks
them (``saved_tensors_hooks``). One
draw of the noise per pack: the squared error is a sum over many independent values, so one draw
is close to its expectation (the benchmark checks the ranking against the measured error).

It is measured at 1, 1.6 (three levels) and 2 bits (``MEASURED_BITS``); wider widths follow from the rounding
variance itself: stochastic rounding of a value at fraction ``f`` between two levels ``step``
apart has variance ``step^2 f (1 - f)`` (ActNN's range^2 estimate without averaging ``f (1 - f)``
to 1/6), so ``Var_p(b) = Var_p(2) * sum_i sigma_i^2(b) / sum_i sigma_i^2(2)``. That scaling
holds from 2 bits up (4-bit noise scaled to 2 bits came within 10% of 2-bit noise measured), not
down to 1: the values whose rounding reaches the gradient most are not a fair sample of the
pack, and 1-bit noise measured was 2.5x (up to 4.9x) its scaled estimate per pack on torchvision
regnet_x_400mf, whose plan then chose 1 bit where it hurt and did worse than uniform 2-bit.
Three levels are measured for the same reason (one more backward per pack in calibration).

Packs of different values round independently with zero mean, so the gradient's variance is the
sum of the packs' ``Var_p``: that sum is what the planner minimises. Packs that hold something
PyTorch never saves (attention's q, k, v that backward recomputes from, GELU's derivative,
LayerNorm's normalised input) get no estimate here: ``probe_sensitivity`` measures those on the
converted model itself.
"""

from __future__ import annotations

import dataclasses
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.fx import Interpreter, Node

from actfx.kernels import ALLOWED_BITS, TERNARY, levels, reference_kernels
from actfx.outputs import grad_leaves
from actfx.passes.analyze import CARRIED
from actfx.passes.capture import buffers_restored
from actfx.passes.signatures import bind
from actfx.planner.backward_cut import RecordedBackward, restarted_gradient
from actfx.variants.batchnorm import per_channel, uses_batch_stats

# Kinds whose backward recomputes from what it packed rather than reading what PyTorch saves.
UNMEASURED_KINDS = frozenset({"sdpa", "attention", "transformer_layer"})
MEASURED_BITS = (1, TERNARY, 2)  # widths whose noise is measured; wider ones scale from 2 bits


def per_width(measure, rounding, widths=MEASURED_BITS) -> dict:
    """{bits: gradient variance} at every allowed width: ``measure(b)`` at each of ``widths``, the
    rest scaled by the rounding variance ``rounding(b)`` from the widest measured width below."""
    measured = {b: measure(b) for b in widths}

    def scaled(b):
        ref = max((m for m in measured if m <= b), default=min(measured))
        base = rounding(ref)
        return measured[ref] * rounding(b) / base if base > 0 else 0.0

    return {b: measured[b] if b in measured else scaled(b) for b in ALLOWED_BITS}


@dataclasses.dataclass(frozen=True)
class PackSensitivity:
    """Gradient variance (squared gradient norm) one pack adds at each width, at the calibration batch."""

    variance: dict  # bits -> float

    def at(self, bits: int) -> float:
        return self.variance[bits]


def _groups(x: torch.Tensor, group_size: int) -> torch.Tensor:
    flat = x.detach().reshape(-1).float()
    pad = (-flat.numel()) % group_size
    if pad:
        flat = torch.cat([flat, flat[-1:].expand(pad)])
    return flat.view(-1, group_size)


def _levels(groups: torch.Tensor, bits: int):
    lo = groups.amin(1, keepdim=True)
    step = (groups.amax(1, keepdim=True) - lo) / levels(bits)
    pos = (groups - lo) / torch.where(step > 0, step, torch.ones_like(step))
    return lo, step, pos


def rounding_variance(x: torch.Tensor, bits: int, group_size: int) -> torch.Tensor:
    """Per-value variance of stochastic rounding of ``x`` (flattened in logical order, grouped as
    ``pack_groups`` does) to ``bits``: ``step^2 f (1 - f)``."""
    _, step, pos = _levels(_groups(x, group_size), bits)
    frac = pos - pos.floor()
    return (step.square() * frac * (1 - frac)).reshape(-1)[: x.numel()]


def rounding_noise(x: torch.Tensor, bits: int, group_size: int, generator: torch.Generator) -> torch.Tensor:
    """``round(x) - x`` for one draw of stochastic rounding to ``bits``, shaped like ``x``."""
    groups = _groups(x, group_size)
    lo, step, pos = _levels(groups, bits)
    rounded = lo + step * (pos + torch.rand(pos.shape, generator=generator).to(pos.device)).floor()
    return (rounded - groups).reshape(-1)[: x.numel()].reshape(x.shape)


def pack_sensitivities(model: nn.Module, graphs: dict, decisions: list, inputs: tuple, *, loss_fn=None,
                       group_size: int = 256, seed: int = 0) -> dict:
    """{pack key (graph path, value name, derived): PackSensitivity} for every pack the decisions
    name that some backward reads (a BatchNorm's packed normalised input is derived from its input).

    ``model``: the original (unconverted) model; ``graphs``: its training graphs per module path,
    traced as conversion traced them (``actfx.passes.analyze.trace_like``); ``decisions``: the
    conversion record's; ``inputs``: real example inputs; ``loss_fn(output) -> scalar``, by default
    ``<output, r>`` with a fixed Gaussian ``r`` (every output gradient N(0, 1)).
    """
    trees, reads = {}, {}
    for d in decisions:
        reads[(d.graph_path, d.node)] = set(d.values)
        if d.kind in UNMEASURED_KINDS:
            continue
        for name, source in zip(d.values, d.sources):
            if name is not None and source is not None:
                trees.setdefault((d.graph_path, name), source)
    state = _State(trees, reads)
    params = [p for p in model.parameters() if p.requires_grad]
    state.parameters = {p.untyped_storage().data_ptr() for p in [*model.parameters(), *model.buffers()]}
    generator = torch.Generator().manual_seed(seed)
    with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(state.pack, state.unpack):
        out = _Calibrating(model, graphs[""], "", state, graphs).run(*inputs) if "" in graphs else model(*inputs)
    loss = loss_fn(out) if loss_fn is not None else _projection(out, generator)
    recorded = _recorded_backward(loss, params, state)
    exact = recorded.exact if recorded is not None else _gradient(loss, params)
    result = {}
    for key in sorted(state.readers):
        value = state.leaf_value(key)
        if value is None:
            continue

        def start(bits, key=key, value=value):
            state.active = (key, rounding_noise(value, bits, group_size, generator))

        below = recorded.restarted(state.readers_of.get(key, ())) if recorded is not None else None
        result[key] = measured_variance(start, loss, params, exact,
                                        lambda b, value=value: float(rounding_variance(value, b, group_size).sum()),
                                        below=below)
    state.active = None
    return result


COMPOUNDING = 10  # measured over estimated variance past which the plan says its estimate failed


def warn_if_compounding(model: nn.Module, converted: nn.Module, inputs: tuple, loss_fn, estimate: float,
                        draws: int = 1, seed: int = 0, remedy: str = "recompute (recompute=0.3)") -> float:
    """The chosen conversion's gradient variance, measured (``draws`` real steps on the calibration
    inputs against the exact one), with a warning where it exceeds the summed estimate
    ``COMPOUNDING`` times. Why: the estimate adds packs' noise independently, which fails where
    many packs sit at 1 bit and their noise compounds across layers; at 0.8x uniform 2-bit's
    bytes torchvision regnet_y_400mf's plan predicted 30 |g|^2 and measured 1.8e9 |g|^2, silently."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not params or estimate <= 0:
        return 0.0

    with buffers_restored(model), torch.enable_grad():  # the converted model shares the buffers
        exact = seeded_gradient(model, inputs, params, loss_fn, seed)
        with reference_kernels():  # one step: compiling packs for the chosen widths cost more
            measured = sum(squared_distance(seeded_gradient(converted, inputs, params, loss_fn, seed), exact)
                           for _ in range(draws)) / draws
    if measured > COMPOUNDING * estimate:
        norm = sum(float(g.double().square().sum()) for g in exact) or 1.0
        warnings.warn(f"actfx.plan: the chosen widths' gradient error, measured on the calibration inputs, is "
                      f"{measured / estimate:.0f}x what the plan estimated ({measured / norm:.3g} against "
                      f"{estimate / norm:.3g} times the gradient's squared norm): rounding noise compounds where many "
                      f"values sit at 1 bit; raise the budget or {remedy}", stacklevel=3)
    return measured


# The recorded gradients are about as large as the forward's values: past this many bytes of them
# (a calibration on a full batch) each measurement starts at the loss instead.
RECORD_LIMIT = 1 << 30


def _recorded_backward(loss: torch.Tensor, params: list, state: _State) -> RecordedBackward | None:
    """The exact backward, recorded so that each measurement starts below the pack's readers
    (``backward_cut``), which the unpack hook notes meanwhile; None where ``autograd.grad``
    cannot run it (a reentrant checkpoint) or the values are over ``RECORD_LIMIT``: then each
    measurement starts at the loss."""
    held = sum(values[0][1].untyped_storage().nbytes() for values in state.storage.values())
    if held > RECORD_LIMIT:
        return None
    state.reader_nodes = {}
    try:
        recorded = RecordedBackward(loss, params)
    except RuntimeError as err:
        if "use_reentrant=True" not in str(err):
            raise
        return None
    finally:
        state.readers_of, state.reader_nodes = state.reader_nodes, None
    return recorded


def measured_variance(start, loss: torch.Tensor, params: list, exact: list, rounding,
                      below: tuple | None = None) -> PackSensitivity:
    """One value's ``PackSensitivity``: ``start(bits)`` puts one draw of its rounding noise at
    ``bits`` where backward reads it, then ``||g - exact||^2`` is measured (``per_width``).
    ``below``: ``RecordedBackward.restarted`` for the value's readers, the backward then runs
    from them down, for the parameters below them only (``actfx plan resnet50 --gpu t4``'s
    calibration: 18.5 -> 6.7 s, the same variances). Else from the loss: only the parameters the first draw
    moved are asked for again, which skips the weight gradients of the layers after the
    readers (ResNet-50's two widths: 16.1 -> 13.5 s)."""
    if below is not None:
        outputs, grad_outputs, reached = below

        def from_readers(bits):
            start(bits)
            moved = restarted_gradient(outputs, grad_outputs, [params[i] for i in reached])
            return squared_distance(moved, [exact[i] for i in reached]) if reached else 0.0

        return PackSensitivity(per_width(from_readers, rounding))
    reached = None

    def measure(bits):
        nonlocal reached
        start(bits)
        if reached is None:
            moved = distances(_gradient(loss, params), exact)
            reached = moved.nonzero().flatten().tolist()
            return float(moved.double().square().sum())
        if not reached:
            return 0.0
        return squared_distance(_gradient(loss, [params[i] for i in reached]), [exact[i] for i in reached])

    return PackSensitivity(per_width(measure, rounding))


def distances(a: list, b: list) -> torch.Tensor:
    """``||a_i - b_i||`` per pair of tensors (two gradients); ``torch.dist`` allocates no
    difference (a third of the time of a foreach subtraction on ResNet-50's gradients)."""
    return torch.stack([torch.dist(x, y) for x, y in zip(a, b)]) if a else torch.zeros(0)


def squared_distance(a: list, b: list) -> float:
    """``||a - b||^2`` over lists of tensors."""
    return float(distances(a, b).double().square().sum())


def seeded_gradient(model: nn.Module, inputs: tuple, params: list, loss_fn, seed: int) -> list:
    """The gradient of one forward of ``model`` with the random state seeded (dropout draws the
    same masks in every run) and the calibration loss (``loss_fn``, or the seeded projection)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        out = model(*inputs)
    loss = loss_fn(out) if loss_fn is not None else _projection(out, torch.Generator().manual_seed(seed))
    return _gradient(loss, params)


def _gradient(loss: torch.Tensor, params: list) -> list:
    try:
        grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
    except RuntimeError as err:
        if "use_reentrant=True" not in str(err):
            raise
        grads = _gradient_by_backward(loss, params)
    return [torch.zeros_like(p) if g is None else g.detach() for g, p in zip(grads, params)]


def _gradient_by_backward(loss: torch.Tensor, params: list) -> list:
    """The gradient through ``.backward()``, each parameter's own ``.grad`` put back after: a
    model calling ``torch.utils.checkpoint(..., use_reentrant=True)`` refuses ``autograd.grad``
    (planning such a model raised PyTorch's RuntimeError)."""
    kept = [p.grad for p in params]
    for p in params:
        p.grad = None
    try:
        loss.backward(retain_graph=True)
        return [p.grad for p in params]
    finally:
        for p, g in zip(params, kept):
            p.grad = g


def _projection(out, generator) -> torch.Tensor:
    leaves = grad_leaves(out)
    if not leaves:
        raise ValueError("the model's output does not depend on its parameters: nothing to calibrate; "
                         "pass loss_fn=... that returns a scalar loss")
    return sum((t.float() * torch.randn(t.shape, generator=generator).to(t.device)).sum() for t in leaves)


class _State:
    """What the calibration run keeps: node values (copied before any in-place op touches them),
    which saved tensors read which packs, and the one pack whose noise backward reads now."""

    def __init__(self, trees: dict, reads: dict):
        self.trees = trees
        self.reads = reads  # (graph path, converted op) -> the values its backward reads from packs
        self.current = None  # (graph path, node) the calibration forward runs now
        self.values: dict = {}  # key -> copy of the value
        self.storage: dict = {}  # storage data_ptr -> [(key, live tensor)] in execution order
        self.scale: dict = {}  # BatchNorm key -> its weight, per channel (output = weight * x̂ + bias)
        self.std: dict = {}  # BatchNorm key -> the std it divides its input by, per channel
        self.normalized: dict = {}  # BatchNorm key -> its normalised input x̂ (what the conversion packs)
        self.readers: set = set()  # packs some saved tensor reads
        self.parameters: set = set()
        self.active = None  # (pack key, its noise) while one backward runs
        self.reader_nodes: dict | None = None  # pack key -> autograd nodes reading it, while the exact backward runs
        self.readers_of: dict = {}  # ... as noted then
        self.wanted: set = set()
        for (path, _), tree in trees.items():
            self.wanted |= set(_named(path, tree))

    def record(self, key, value, batch_norm=None) -> None:
        """``batch_norm``: (input, mean, std, weight) per channel when the node is a BatchNorm."""
        if isinstance(value, torch.Tensor) and value.is_floating_point():
            self.storage.setdefault(value.untyped_storage().data_ptr(), []).append((key, value))
            if key in self.wanted:
                self.values[key] = value.detach().clone()
                if batch_norm is not None:
                    x, mean, std, weight = batch_norm
                    self.normalized[key] = (x.detach().float() - mean) / std
                    self.std[key], self.scale[key] = std, weight

    def leaf_value(self, leaf) -> torch.Tensor | None:
        """What a pack (``_leaves``' key) stores: a node's value, or a BatchNorm's x̂ (None: not recorded)."""
        path, name, derived = leaf
        return (self.normalized if derived else self.values).get((path, name))

    def pack(self, t: torch.Tensor):
        ptr = t.untyped_storage().data_ptr()
        if ptr in self.parameters or not t.is_floating_point():
            return (t, None)
        for key, value in reversed(self.storage.get(ptr, [])):
            geometry = _Geometry(tuple(value.shape), tuple(value.stride()), value.storage_offset())
            if key not in self.trees or _offset_in(geometry, t) is None:
                continue
            if self.current in self.reads and key[1] not in self.reads[self.current]:
                # an op the conversion keeps this value exact for (a ReLU's own mask, from its output)
                return (t, None)
            # a BatchNorm's x̂ is recorded after the op that saves its input ran: leaves are looked up later
            leaves = _leaves(key[0], self.trees[key])
            if not leaves:
                return (t, None)
            self.readers.update(leaves)
            return (t, (key, geometry, frozenset(leaves)))
        return (t, None)

    def unpack(self, box):
        t, read = box
        if read is not None and self.reader_nodes is not None:  # the exact backward: note who reads
            node = torch._C._current_autograd_node()
            for key in read[2] if node is not None else ():
                self.reader_nodes.setdefault(key, set()).add(node)
        if read is None or self.active is None or self.active[0] not in read[2]:
            return t
        key, geometry, _ = read
        noise = self._noise(key[0], self.trees[key], geometry.shape)
        return t if noise is None else t + _view(noise, geometry, t).to(t.dtype)

    def _noise(self, path: str, tree, shape) -> torch.Tensor | None:
        """The active pack's noise as the value ``tree`` describes reads it (None: not at all)."""
        kind = tree[0]
        if kind in ("pack", "normalized"):
            return self.active[1] if (path, tree[1], kind == "normalized") == self.active[0] else None
        if kind == "sum":
            parts = [self._noise(path, part, shape) for part in tree[1:]]
            parts = [p.reshape(shape) for p in parts if p is not None]
            return None if not parts else parts[0] if len(parts) == 1 else parts[0] + parts[1]
        inner = self._noise(path, tree[-1], shape)
        if inner is None:
            return None
        inner = inner.reshape(shape)
        key = (path, tree[1]) if kind in ("masked", "affine", "unnormalized") else None
        if kind == "masked" and key in self.values:
            return inner * (self.values[key] != 0)
        if kind == "affine" and key in self.scale:
            return inner * self.scale[key]
        if kind == "unnormalized" and key in self.std:  # x = x̂ std + mean
            return inner * self.std[key]
        return inner


@dataclasses.dataclass(frozen=True)
class _Geometry:
    shape: tuple
    stride: tuple
    offset: int

    def is_contiguous(self) -> bool:
        expected = 1
        for n, s in reversed(list(zip(self.shape, self.stride))):
            if n != 1 and s != expected:
                return False
            expected *= n
        return True


def _named(path: str, tree) -> list:
    """Every (path, node name) a noise tree reads a value of."""
    if tree is None:
        return []
    out = [(path, tree[1])] if tree[0] in ("pack", "masked", "affine", "normalized", "unnormalized") else []
    return out + [k for part in tree[1:] if isinstance(part, tuple) for k in _named(path, part)]


def _leaves(path: str, tree) -> list:
    """The pack keys a noise tree reads (see ``probe_sensitivity.pack_key``)."""
    if tree is None:
        return []
    if tree[0] in ("pack", "normalized"):
        return [(path, tree[1], tree[0] == "normalized")]
    return [k for part in tree[1:] if isinstance(part, tuple) for k in _leaves(path, part)]


def _offset_in(value: _Geometry, saved: torch.Tensor) -> int | None:
    """Where ``saved`` starts inside ``value``'s elements when it views the same storage within
    them (``-1``: it is ``value`` itself), else None."""
    if tuple(saved.shape) == value.shape and tuple(saved.stride()) == value.stride \
            and saved.storage_offset() == value.offset:
        return -1
    if not value.is_contiguous() or saved.numel() == 0:
        return None
    offset = saved.storage_offset() - value.offset
    numel = 1
    for n in value.shape:
        numel *= n
    if offset < 0 or offset + sum((n - 1) * s for n, s in zip(saved.shape, saved.stride())) >= numel:
        return None
    return offset


def _view(noise: torch.Tensor, value: _Geometry, saved: torch.Tensor) -> torch.Tensor:
    """``noise`` (shaped like ``value``) seen the way ``saved`` views the same storage."""
    offset = _offset_in(value, saved)
    if offset == -1:
        return noise
    return noise.reshape(-1).as_strided(saved.shape, saved.stride(), offset)


def _batch_norm_stats(module, node: Node, env: dict):
    """(input, mean, std, weight), each per channel shaped to broadcast over the input, for a
    BatchNorm module call or an ``F.batch_norm`` node; None for any other node."""
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        x = env.get(node.args[0]) if node.args else None
        batch_stats = uses_batch_stats(module)
        running, weight, eps = (module.running_mean, module.running_var), module.weight, module.eps
    elif node.op == "call_function" and node.target is F.batch_norm:
        bound = bind("batch_norm", *torch.fx.node.map_arg((node.args, node.kwargs), lambda n: env[n]))
        if bound is None:
            return None
        x, batch_stats, weight, eps = bound["input"], bound["training"], bound["weight"], bound["eps"]
        running = (bound["running_mean"], bound["running_var"])
    else:
        return None
    if not isinstance(x, torch.Tensor) or x.dim() < 2 or (not batch_stats and running[0] is None):
        return None
    with torch.no_grad():
        xf = x.detach().float()
        if batch_stats:
            var, mean = torch.var_mean(xf, [d for d in range(x.dim()) if d != 1], correction=0, keepdim=True)
        else:
            mean, var = per_channel(running[0].float(), x), per_channel(running[1].float(), x)
        std = torch.sqrt(var + eps)
        scale = torch.ones_like(std) if weight is None else per_channel(weight.detach().float(), x)
    return x, mean, std, scale


class _Calibrating(Interpreter):
    """Runs a traced graph, recording node values for the noise model (recursing into the graphs
    of modules converted on their own)."""

    def __init__(self, root, graph, path: str, state: _State, graphs: dict):
        super().__init__(root, garbage_collect_values=False, graph=graph)
        self.path, self.state, self.graphs = path, state, graphs

    def run_node(self, n: Node):
        self.state.current = (self.path, n.name)
        # a constant export lifted lives on the converted model only (analyze._with_carried)
        result = n.meta[CARRIED] if n.op == "get_attr" and CARRIED in n.meta else super().run_node(n)
        module = self.module.get_submodule(n.target) if n.op == "call_module" else None
        key = (self.path, n.name)
        self.state.record(key, result, _batch_norm_stats(module, n, self.env) if key in self.state.wanted else None)
        return result

    def call_module(self, target, args, kwargs):
        path = f"{self.path}.{target}" if self.path else target
        if path in self.graphs:
            return _Calibrating(self.fetch_attr(target), self.graphs[path], path, self.state, self.graphs).run(*args)
        return super().call_module(target, args, kwargs)
