"""Conversion settings: one frozen, validated value per converted model (no global state)."""

from __future__ import annotations

import dataclasses
from typing import Mapping

from actfx.kernels import check_bits, check_group_size

# Attention's saved tensors are the sensitive part of a transformer (see Config.op_bits).
ATTENTION_BITS = {"sdpa": 8, "attention": 8, "softmax": 8, "matmul": 8, "transformer_layer": 8}
# A loss's class probabilities, or its input gradients: their rounding noise goes straight into
# the logits' gradient (at 2 bits the output layer's weight gradient was 0.8 off in one step,
# 0.01 at 8 bits).
PROBABILITY_BITS = {"cross_entropy": 8, "log_softmax": 8, "loss": 8}
DEFAULT_OP_BITS = {**ATTENTION_BITS, **PROBABILITY_BITS}
# A site_bits width meaning "keep the value as it is" (any dtype); wider than every packed width,
# so a value one consumer keeps exact is kept exact for all of them.
KEEP_EXACT = 32


@dataclasses.dataclass(frozen=True)
class Config:
    """How a model is converted.

    bits: default width for packed activations.
    group_size: values per quantization group (min and step are stored per group).
    stochastic: stochastic rounding (unbiased gradients); False rounds to nearest (tests, debugging).
    rebuild_chains: rebuild a conv input from BatchNorm's packed input and the exact ReLU mask
        instead of packing it a second time (conv -> BN -> ReLU -> conv chains).
    min_numel: activations smaller than this stay unpacked (packing tiny tensors saves nothing).
    op_bits: per-op-kind widths, e.g. {"matmul": 8} (kinds as in ``actfx.show``). The default keeps
        attention's saved tensors and a loss's class probabilities (cross_entropy, log_softmax)
        at 8 bits (see README, "Transformers"); ``op_bits={}`` packs everything at ``bits``.
    module_bits: per-module-path widths; a key matches a module path or any prefix of it
        (``"layer4"`` covers ``layer4.1.conv2``); the longest match wins over op_bits.
    site_bits: per-op widths keyed ``"module.path:kind"`` (the exact module path the op runs in,
        ``""`` for the root, and its kind as in ``actfx.show``), e.g. ``{"layer1.0.conv1:conv": 4}``;
        wins over module_bits and op_bits; ``KEEP_EXACT`` (32) keeps the values it would pack as
        they are. ``actfx.plan`` writes this table.
    recompute_modules: module paths (e.g. ``("layers.3", "layers.7")``) whose forward backward
        reruns from their inputs, kept exact (activation checkpointing inside a converted model:
        nothing inside them is held, gradients stay exact); ``actfx.plan`` picks them. In a
        model torch.export captured (flat), the block's ops are outlined into one rerun call.
    attention_math: ``actfx.convert``: scaled_dot_product_attention calls without dropout keep
        two packs of their probabilities and backward reads them (``variants/attention_math``),
        so q and k may be packed below 8 bits; it holds 2 S values per query row more (S keys),
        so it pays for short rows at narrow widths. ``actfx.plan`` sets it where that plans a
        lower gradient variance.
    pack_kernel: ``actfx.compile`` on CPU: pack convolution and matmul outputs and the 1-bit
        masks with one precompiled C++ kernel instead of code Inductor generates for each
        value: the same bytes, a first step 40% shorter, slower steps (ResNet-50 batch
        8: first step 108 s against 177 s, step 1.43x torch.compile's against 1.17x; see README).
    """

    bits: int = 2
    group_size: int = 256
    stochastic: bool = True
    rebuild_chains: bool = True
    min_numel: int = 1024
    op_bits: Mapping[str, int] = dataclasses.field(default_factory=lambda: dict(DEFAULT_OP_BITS))
    module_bits: Mapping[str, int] = dataclasses.field(default_factory=dict)
    site_bits: Mapping[str, int] = dataclasses.field(default_factory=dict)
    recompute_modules: tuple = ()
    pack_kernel: bool = False
    attention_math: bool = False

    def __post_init__(self) -> None:
        check_bits(self.bits)
        paths = self.recompute_modules
        if isinstance(paths, str) or not isinstance(paths, (tuple, list, frozenset, set)) or \
                not all(isinstance(p, str) and p for p in paths):
            raise TypeError(f"Config.recompute_modules must be a tuple of module paths such as ('layers.3',), "
                            f"got {paths!r}")
        object.__setattr__(self, "recompute_modules", tuple(sorted(set(paths))))
        check_group_size(self.group_size)
        for name in ("stochastic", "rebuild_chains", "pack_kernel", "attention_math"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"Config.{name} must be a bool, got {getattr(self, name)!r}")
        if isinstance(self.min_numel, bool) or not isinstance(self.min_numel, int) or self.min_numel < 0:
            raise ValueError(f"Config.min_numel must be a non-negative int, got {self.min_numel!r}")
        for field in ("op_bits", "module_bits", "site_bits"):
            table = getattr(self, field)
            if not isinstance(table, Mapping):
                raise TypeError(f"Config.{field} must be a mapping of str -> bits, got {type(table).__name__}")
            for key, value in table.items():
                if not isinstance(key, str):
                    raise TypeError(f"Config.{field} keys must be str, got {key!r}")
                if field == "site_bits" and key.count(":") != 1:
                    raise ValueError(f"Config.site_bits key {key!r} must read 'module.path:kind', "
                                     "e.g. 'layer1.0.conv1:conv' (':kind' for the root)")
                try:
                    if not (field == "site_bits" and value == KEEP_EXACT and not isinstance(value, bool)):
                        check_bits(value)
                except (TypeError, ValueError) as err:
                    raise type(err)(f"Config.{field}[{key!r}]: {err}") from None
            # Freeze the table so the config stays immutable and hashable.
            object.__setattr__(self, field, _FrozenDict(table))

    def check_paths(self, model) -> None:
        """Every module path this config names is one of ``model``'s: a misspelt path matched
        nothing and that part of the model trained at the default width, silently."""
        check_module_paths(model, (("Config.recompute_modules", self.recompute_modules),
                                   ("Config.module_bits", self.module_bits),
                                   ("Config.site_bits", [key.split(":")[0] for key in self.site_bits])))

    @property
    def user_op_bits(self) -> dict:
        """The op_bits entries the user set (those that differ from the defaults)."""
        return {k: v for k, v in self.op_bits.items() if DEFAULT_OP_BITS.get(k) != v}

    def unknown_kinds(self, kinds) -> list:
        """The op_bits kinds, beyond the defaults, that none of ``kinds`` (a model's) is."""
        present = set(kinds)
        return sorted(k for k in self.op_bits if k not in DEFAULT_OP_BITS and k not in present)

    def bits_for(self, kind: str, module_path: str | None, key: str | None = None) -> int:
        """The width to use for a value saved by an op of ``kind`` inside ``module_path``; ``key``:
        the op's own ``site_bits`` key where it is not ``module:kind`` (the second op of a kind in
        one module is ``module:kind#2``)."""
        if self.site_bits:
            exact = self.site_bits.get(key if key is not None else f"{module_path or ''}:{kind}")
            if exact is not None:
                return exact
        if module_path is not None and self.module_bits:
            best = None
            for key, value in self.module_bits.items():
                if module_path == key or module_path.startswith(key + ".") or key == "":
                    if best is None or len(key) > len(best[0]):
                        best = (key, value)
            if best is not None:
                return best[1]
        return self.op_bits.get(kind, self.bits)


def check_module_paths(model, named) -> None:
    """Refuse, in one line, a module path of ``named`` ((what, paths) pairs; "" is the root) that
    ``model`` does not have."""
    names = {name for name, _ in model.named_modules()}
    for what, paths in named:
        missing = [path for path in paths if path and path not in names]
        if missing:
            raise ValueError(f"{what} names {missing[0]!r}, which is not a submodule of {type(model).__name__}; "
                             "use paths as model.named_modules() lists them")


class _FrozenDict(dict):
    """A dict that refuses mutation and hashes by content, for frozen configs."""

    def _refuse(self, *args, **kwargs):
        raise TypeError("Config tables are read-only; build a new Config with dataclasses.replace")

    __setitem__ = __delitem__ = clear = pop = popitem = setdefault = update = _refuse

    def __hash__(self) -> int:  # type: ignore[override]
        return hash(tuple(sorted(self.items())))

    def __reduce__(self):  # pickling and deepcopy rebuild it from a plain dict
        return (_FrozenDict, (dict(self),))

    def __copy__(self):
        return self

    def __deepcopy__(self, memo):
        return self
