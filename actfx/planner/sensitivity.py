"""How much each packed value's rounding noise adds to the gradient's variance, per bit width.

The estimate is measured, in one calibration forward on real inputs (nothing is stored in the
model, and training steps after planning never sync with the host):

    Var_p(b) = E || g(noise on pack p at b bits) - g ||^2

``g`` is the exact parameter gradient; ``g(noise on p)`` the gradient when backward reads pack
``p`` through stochastic rounding to ``b`` bits (groups of ``group_size`` values, as
``pack_groups`` rounds them) and every other saved value exactly. The forward runs once, the
backward once exactly and once per pack (``retain_graph``); the noise reaches every reader of the
pack: the op that packed it and the values the rewrite rebuilds from it (a ReLU output rebuilt as
``mask * (a * bn_input + b)`` reads ``mask * a`` times the BN input's noise), because the noise is
put into PyTorch's own saved tensors as backward unpacks them (``saved_tensors_hooks``). One
draw of the noise per pack: the squared error is a sum over many independent values, so one draw
is close to its expectation (the benchmark checks the ranking against the measured error).

The other widths follow from the rounding variance itself: stochastic rounding of a value at
fraction ``f`` between two levels ``step`` apart has variance ``step^2 f (1 - f)`` (ActNN's
range^2 estimate without averaging ``f (1 - f)`` to 1/6), so
``Var_p(b) = Var_p(b0) * sum_i sigma_i^2(b) / sum_i sigma_i^2(b0)``.

Packs of different values round independently with zero mean, so the gradient's variance is the
sum of the packs' ``Var_p``: that sum is what the planner minimises. Packs that hold something
PyTorch never saves (attention's q, k, v that backward recomputes from, GELU's derivative,
LayerNorm's normalised input) get no estimate here: ``probe_sensitivity`` measures those on the
converted model itself.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn as nn
from torch.fx import Interpreter, Node

from actfx.kernels import ALLOWED_BITS

# Kinds whose backward recomputes from what it packed rather than reading what PyTorch saves.
UNMEASURED_KINDS = frozenset({"sdpa", "attention", "transformer_layer"})
CALIBRATION_BITS = 2


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
    step = (groups.amax(1, keepdim=True) - lo) / ((1 << bits) - 1)
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
    rounded = lo + step * (pos + torch.rand(pos.shape, generator=generator)).floor()
    return (rounded - groups).reshape(-1)[: x.numel()].reshape(x.shape)


def pack_sensitivities(model: nn.Module, graphs: dict, decisions: list, inputs: tuple, *, loss_fn=None,
                       group_size: int = 256, seed: int = 0) -> dict:
    """{(graph path, value name): PackSensitivity} for every pack the decisions name that some
    backward reads.

    ``model``: the original (unconverted) model; ``graphs``: its training graphs per module path,
    traced as conversion traced them (``actfx.passes.analyze.trace_like``); ``decisions``: the
    conversion record's; ``inputs``: real example inputs; ``loss_fn(output) -> scalar``, by default
    ``<output, r>`` with a fixed Gaussian ``r`` (every output gradient N(0, 1)).
    """
    trees = {}
    for d in decisions:
        if d.kind in UNMEASURED_KINDS:
            continue
        for name, source in zip(d.values, d.sources):
            if name is not None and source is not None:
                trees.setdefault((d.graph_path, name), source)
    state = _State(trees)
    params = [p for p in model.parameters() if p.requires_grad]
    state.parameters = {p.untyped_storage().data_ptr() for p in [*model.parameters(), *model.buffers()]}
    generator = torch.Generator().manual_seed(seed)
    with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(state.pack, state.unpack):
        out = _Calibrating(model, graphs[""], "", state, graphs).run(*inputs) if "" in graphs else model(*inputs)
    loss = loss_fn(out) if loss_fn is not None else _projection(out, generator)
    exact = _gradient(loss, params)
    result = {}
    for key in sorted(state.readers):
        value = state.values[key]
        state.active = (key, rounding_noise(value, CALIBRATION_BITS, group_size, generator))
        measured = sum(float(n) ** 2 for n in torch._foreach_norm(torch._foreach_sub(_gradient(loss, params), exact)))
        base = float(rounding_variance(value, CALIBRATION_BITS, group_size).sum())
        result[key] = PackSensitivity({
            b: measured * float(rounding_variance(value, b, group_size).sum()) / base if base > 0 else 0.0
            for b in ALLOWED_BITS})
    state.active = None
    return result


def _gradient(loss: torch.Tensor, params: list) -> list:
    grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
    return [torch.zeros_like(p) if g is None else g.detach() for g, p in zip(grads, params)]


def _projection(out, generator) -> torch.Tensor:
    leaves = [t for t in torch.utils._pytree.tree_leaves(out) if isinstance(t, torch.Tensor) and t.requires_grad]
    if not leaves:
        raise ValueError("the model's output does not depend on its parameters: nothing to calibrate; "
                         "pass loss_fn=... that returns a scalar loss")
    return sum((t.float() * torch.randn(t.shape, generator=generator)).sum() for t in leaves)


class _State:
    """What the calibration run keeps: node values (copied before any in-place op touches them),
    which saved tensors read which packs, and the one pack whose noise backward reads now."""

    def __init__(self, trees: dict):
        self.trees = trees
        self.values: dict = {}  # key -> copy of the value
        self.storage: dict = {}  # storage data_ptr -> [(key, live tensor)] in execution order
        self.scale: dict = {}  # key -> per-channel scale of a BatchNorm's output (its affine rebuild)
        self.readers: set = set()  # packs some saved tensor reads
        self.parameters: set = set()
        self.active = None  # (pack key, its noise) while one backward runs
        self.wanted: set = set()
        for (path, _), tree in trees.items():
            self.wanted |= set(_named(path, tree))

    def record(self, key, value, module, first_input) -> None:
        if isinstance(value, torch.Tensor) and value.is_floating_point():
            self.storage.setdefault(value.untyped_storage().data_ptr(), []).append((key, value))
            if key in self.wanted:
                self.values[key] = value.detach().clone()
                if isinstance(module, nn.modules.batchnorm._BatchNorm) and isinstance(first_input, torch.Tensor):
                    self.scale[key] = _bn_scale(module, first_input)

    def pack(self, t: torch.Tensor):
        ptr = t.untyped_storage().data_ptr()
        if ptr in self.parameters or not t.is_floating_point():
            return (t, None)
        for key, value in reversed(self.storage.get(ptr, [])):
            geometry = _Geometry(tuple(value.shape), tuple(value.stride()), value.storage_offset())
            if key not in self.trees or _offset_in(geometry, t) is None:
                continue
            leaves = [k for k in _leaves(key[0], self.trees[key]) if k in self.values]
            if not leaves:
                return (t, None)
            self.readers.update(leaves)
            return (t, (key, geometry, frozenset(leaves)))
        return (t, None)

    def unpack(self, box):
        t, read = box
        if read is None or self.active is None or self.active[0] not in read[2]:
            return t
        key, geometry, _ = read
        noise = self._noise(key[0], self.trees[key], geometry.shape)
        return t if noise is None else t + _view(noise, geometry, t).to(t.dtype)

    def _noise(self, path: str, tree, shape) -> torch.Tensor | None:
        """The active pack's noise as the value ``tree`` describes reads it (None: not at all)."""
        kind = tree[0]
        if kind == "pack":
            return self.active[1] if (path, tree[1]) == self.active[0] else None
        if kind == "sum":
            parts = [self._noise(path, part, shape) for part in tree[1:]]
            parts = [p.reshape(shape) for p in parts if p is not None]
            return None if not parts else parts[0] if len(parts) == 1 else parts[0] + parts[1]
        inner = self._noise(path, tree[-1], shape)
        if inner is None:
            return None
        inner = inner.reshape(shape)
        key = (path, tree[1]) if kind in ("masked", "affine") else None
        if kind == "masked" and key in self.values:
            return inner * (self.values[key] != 0)
        if kind == "affine" and key in self.scale:
            return inner * self.scale[key]
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
    out = [(path, tree[1])] if tree[0] in ("pack", "masked", "affine") else []
    return out + [k for part in tree[1:] if isinstance(part, tuple) for k in _named(path, part)]


def _leaves(path: str, tree) -> list:
    if tree is None:
        return []
    if tree[0] == "pack":
        return [(path, tree[1])]
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


def _bn_scale(module, x: torch.Tensor) -> torch.Tensor:
    """``weight / sqrt(batch var + eps)`` per channel, shaped to broadcast over the output."""
    dims = [d for d in range(x.dim()) if d != 1]
    scale = torch.rsqrt(x.detach().float().var(dims, unbiased=False) + module.eps)
    if module.weight is not None:
        scale = scale * module.weight.detach().float()
    return scale.reshape([1, -1] + [1] * (x.dim() - 2))


class _Calibrating(Interpreter):
    """Runs a traced graph, recording node values for the noise model (recursing into the graphs
    of modules converted on their own)."""

    def __init__(self, root, graph, path: str, state: _State, graphs: dict):
        super().__init__(root, garbage_collect_values=False, graph=graph)
        self.path, self.state, self.graphs = path, state, graphs

    def run_node(self, n: Node):
        result = super().run_node(n)
        module = self.module.get_submodule(n.target) if n.op == "call_module" else None
        first = self.env.get(n.args[0]) if n.args and isinstance(n.args[0], Node) else None
        self.state.record((self.path, n.name), result, module, first)
        return result

    def call_module(self, target, args, kwargs):
        path = f"{self.path}.{target}" if self.path else target
        if path in self.graphs:
            return _Calibrating(self.fetch_attr(target), self.graphs[path], path, self.state, self.graphs).run(*args)
        return super().call_module(target, args, kwargs)
