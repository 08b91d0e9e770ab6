"""Rewrite a traced graph so every covered op saves compressed values for backward.

For each value some backward needs, the pass picks the cheapest exact-in-expectation storage:
- already packed for another consumer (and not modified in place since): share that pack;
- the output of a ReLU whose input is BatchNorm's output: rebuild it in backward as
  ``mask * (γ x̂ + β)`` from BatchNorm's packed normalised input, the exact 1-bit ReLU mask and
  BatchNorm's per-channel weight and bias -- nothing new is stored (conv -> BN -> ReLU -> conv);
- LayerNorm's output: ``w * x̂ + b`` from the normalised input LayerNorm packed (LN -> linear);
- a reshape of something already stored: reshape it back;
- a residual add of two values that are both available that way: add them back in backward
  (at most one add deep, so backward work per consumer stays bounded; in a ResNet every other
  block output is rebuilt as mask * (γ x̂3 + β + block_input));
- otherwise pack it once, right before its first consumer, at the widest bits any consumer asks for.
Parameters, buffers and values derived only from them are kept as they are (never compressed).
"""

from __future__ import annotations

import collections
import dataclasses
import operator

import torch
from torch.fx import Graph, GraphModule, Node

from actfx.config import KEEP_EXACT, Config
from actfx.passes.capture import CHECKPOINTED
from actfx.passes.outline_recompute import BLOCK_PATH
from actfx.passes.parameter_rebuild import parameter_rebuild
from actfx.passes.graph_facts import GraphFacts
from actfx.passes.inplace_accumulation import write_accumulations_out_of_place
from actfx.passes.pointwise_regions import collapse_pointwise_regions
from actfx.passes.norm_divisions import collapse_norm_divisions
from actfx.passes.rms_regions import collapse_rms_norms
from actfx.passes.row_regions import collapse_row_regions
from actfx.passes.site import NONLINEAR_BITS
from actfx.passes.sites import Site, checkpoint_site, find_site, saves_nothing
from actfx.passes.softmax_regions import fold_softmax_regions
from actfx.rules import ILL_CONDITIONED, aten_packet, is_pointwise
from actfx.variants.packing import next_seed, pack_value
from actfx.variants.parameter_chain import made_from_parameters
from actfx.variants.saved import value_if_missing

_TRANSPOSES = {"transpose", "permute", "t", torch.transpose, torch.permute, torch.t}  # fx targets

SEED_BUFFER = "_actfx_seed"  # int64 buffer on the converted module
SEED_STATE = "_actfx_rng"  # its host-side SeedState (plain attribute)
SELF_ATTR = "_actfx_self"  # a converted leaf module's reference to itself


@dataclasses.dataclass
class Decision:
    """What the rewrite did for one node, for show() and reports."""

    node: str
    kind: str
    module_path: str | None
    saved: list  # one description per value its backward needs
    graph_path: str = ""  # the module whose graph holds the node ("" for the root)
    values: list = dataclasses.field(default_factory=list)  # per saved value: its node's name, or None
    # per saved value, where its backward's copy comes from, in the original graph's node names
    # (for the planner's calibration): ("pack", value) | ("masked", relu, inner) | ("affine", bn, inner)
    # | ("sum", left, right) | ("reshape", inner) | ("normalized", bn) (BatchNorm's packed x̂)
    # | ("unnormalized", bn, inner) (its input, x̂ * std + mean) | None (kept exact, or only its shape)
    sources: list = dataclasses.field(default_factory=list)
    key: str = ""  # its unit key (Config.site_bits, plans)


PACK_META = "actfx_pack"  # on each pack_value node: PackSource
UNIT_SEP = ":"  # a unit is "module.path:kind", as Config.site_bits keys it


@dataclasses.dataclass(frozen=True)
class PackSource:
    """What one pack in a rewritten graph stores: the original node's value, and the units (module
    path and op kind of each consumer) whose widths set its bits (the widest wins)."""

    value: str
    units: tuple
    derived: bool = False  # holds something computed from the node's input (GELU's derivative), not its value
    floor: int = 0  # the narrowest width it is packed at whatever its units ask (q, k of recomputed attention)


def unit_key(module_path: str | None, kind: str, occurrence: int = 1) -> str:
    """``"layer1.0.conv1:conv"``: a site's key in ``Config.site_bits`` and in plans. The n-th op of
    one kind in one module (functional code, a module called again) is ``"path:kind#n"``, so a
    plan sets each op's width, not one width per module and kind."""
    base = f"{module_path or ''}{UNIT_SEP}{kind}"
    return base if occurrence == 1 else f"{base}#{occurrence}"


def describe(spec: tuple) -> str:
    """A short human description of a storage spec, for show()."""
    kind = spec[0]
    if kind == "packed":
        return f"packed {spec[1]}-bit"
    if kind == "masked":
        return "rebuilt: 1-bit mask x " + describe(spec[-1])
    if kind == "affine":
        return "affine of " + describe(spec[-1])
    if kind == "reshape":
        return "reshape of " + describe(spec[-1])
    if kind == "sum":
        return "sum of (" + describe(spec[1]) + ") and (" + describe(spec[2]) + ")"
    if kind == "shape":
        return "shape only"
    if kind == "rebuilt":
        return "made again from parameters"
    if kind == "or_pack":
        return describe(spec[-1])  # what a model with nothing frozen stores
    return "kept exact"


def _nested(run: list) -> list:
    """An inner run whose head has the outer value's shape: drop the head (see saved.py)."""
    return [None, *run[1:]]


class _Rewriter:
    def __init__(self, gm: GraphModule, config: Config, prefix: str):
        self.gm, self.config, self.prefix = gm, config, prefix
        self.modules = dict(gm.named_modules())
        old_nodes = list(gm.graph.nodes)
        self.sites: dict[Node, Site] = {}
        checkpointed = set(config.recompute_modules)
        for node in old_nodes:
            if node.op == "call_module" and (self._full(node.target) in checkpointed or node.meta.get(CHECKPOINTED)):
                site = checkpoint_site(node, node.meta.get(BLOCK_PATH, node.target), self.modules[node.target],
                                       target=node.target)
            else:
                site = find_site(node, self.modules)
            if site is not None:
                self.sites[node] = site
        self.facts = GraphFacts(gm.graph)
        # An op on parameters alone (weight standardisation: batch_norm over a conv's weight, timm's
        # ScaledStdConv2d) saves what is alive anyway; packed as an activation it added bytes.
        self.sites = {n: s for n, s in self.sites.items() if not self.facts.is_parameter_like(n)}
        if config.attention_math:
            self.sites = {n: s.alternative or s for n, s in self.sites.items()}
        for site in self.sites.values():
            # an activation times a weight (Falcon's ``x @ w.T``) is a linear layer, not attention
            if site.kind == "matmul" and any(isinstance(v, Node) and self.facts.is_parameter_like(v)
                                             for i, v in enumerate(site.saved) if i not in site.shape_only):
                site.kind = "linear"
        # node -> the input it writes into, for every in-place op (asked once: the pass reads it twice)
        self.writes = {node: m for node in gm.graph.nodes
                       if (m := self.facts.mutated_input(node, self.sites.get(node))) is not None}
        self.keys = self._site_keys()
        self.widths = {node: self._width(node) for node in self.sites}
        self.bits = self._bits_per_value()
        self.new = Graph()
        self.env: dict[Node, Node] = {}
        self.seed: Node | None = None
        self.stream = 0
        self.packs: dict[Node, tuple] = {}  # value -> (spec, run) of its live pack
        self.masks: dict[Node, tuple] = {}  # relu node -> (mask node, slope)
        self.affine: dict[Node, tuple] = {}  # norm node -> (a, b, inner spec, inner run, source, channel dim)
        self.decisions: list[Decision] = []
        self.read_by_producer: set[Node] = set()  # packs a site made of its own output and reads itself
        self.pending_packs: dict[Node, tuple] = {}  # a site's pack of a value read through getitem, until copied
        self.written = set(self.writes.values())  # inputs the graph writes in place
        self.rebuilds: dict[Node, tuple | None] = {}  # parameter computation -> (handle, rebuild, leaves) or None
        # computations of parameters alone that sites save (weights they may make again)
        self.site_weights = {v for site in self.sites.values() for v in site.saved if isinstance(v, Node)
                             and v.op != "get_attr" and self.facts.is_parameter_like(v)}
        self.checkpointed_chains: list[Node] = []  # ops of weights forward runs as checkpoints

    def _full(self, target: str) -> str:
        return f"{self.prefix}.{target}" if self.prefix else target

    def _path(self, site: Site) -> str | None:
        path = site.module_path or self.facts.module_path(site.node)
        if path == SELF_ATTR:
            path = None
        if path is None:
            return self.prefix or None
        return f"{self.prefix}.{path}" if self.prefix else path

    def _site_keys(self) -> dict[Node, str]:
        """Each site's unit key, numbering repeats of one module and kind in graph order."""
        seen: collections.Counter = collections.Counter()
        keys = {}
        for node, site in self.sites.items():
            path = self._path(site)
            seen[path, site.kind] += 1
            keys[node] = unit_key(path, site.kind, seen[path, site.kind])
        return keys

    def _bits_per_value(self) -> dict[Node, int]:
        bits: dict[Node, int] = {}
        self.units: dict[Node, set] = {}
        self.floors: dict[Node, int] = {}
        for node, site in self.sites.items():
            b = self.widths[node]
            for i, v in enumerate(site.saved):
                if isinstance(v, Node):
                    bits[v] = max(bits.get(v, 0), b, NONLINEAR_BITS if i in site.nonlinear else 0)
                    if i in site.nonlinear:
                        self.floors[v] = NONLINEAR_BITS
                    self.units.setdefault(v, set()).add(self.keys[node])
        # Values that are reshapes or casts of one activation, read by more than one site
        # (``x.flatten(1)`` for a Linear beside a conv reading ``x``), are stored as one pack of
        # it, at the widest width any reader asks.
        roots = {v: self._root(v) for v in bits}
        readers = collections.Counter(roots.values())
        self.roots = {v: root if readers[root] > 1 else v for v, root in roots.items()}
        for v, root in self.roots.items():
            if root is not v:
                bits[root] = max(bits.get(root, 0), bits[v])
                self.units.setdefault(root, set()).update(self.units[v])
                if v in self.floors:
                    self.floors[root] = max(self.floors.get(root, 0), self.floors[v])
        for v, root in self.roots.items():
            bits[v] = bits[root]
        return bits

    def _root(self, v: Node) -> Node:
        """The activation ``v`` is a reshape or float cast of, through any chain of them, where
        nothing edits that activation in place: packed at a later reader's turn, after such an
        edit, a cast's copy would read the edited values."""
        start = v
        while True:
            src = self.facts.reshape_source(v)
            if src is None or self.facts.is_parameter_like(src) or self.facts.is_non_tensor(src):
                break
            v = src
        if v is not start and any(self.facts.same_storage(v, edited) for edited in self.writes.values()):
            return start
        return v

    def _width(self, node: Node) -> int:
        """The width of what the site at ``node`` saves (once per site: ``self.widths``): its
        config's, or kept exact where the site is element-wise and feeds a factorization."""
        site = self.sites[node]
        if self._elementwise(node) and self._feeds_a_factorization(node):
            return KEEP_EXACT
        return self.config.bits_for(site.kind, self._path(site), self.keys[node])

    def _feeds_a_factorization(self, node: Node, steps: int = 4) -> bool:
        """Whether ``node``'s value reaches a factorization or solve (``rules.ILL_CONDITIONED``)
        through element-wise ops only: the gradient arriving at it is then the inverse's, large
        and cancelling, so rounding what its site saves would come back scaled by it."""
        frontier = [node]
        for _ in range(steps):
            nxt = []
            for n in frontier:
                for user in n.users:
                    packet = aten_packet(user.op, user.target)
                    if packet in ILL_CONDITIONED:
                        return True
                    if self._elementwise(user):
                        nxt.append(user)
            frontier = nxt
        return False

    def _elementwise(self, node: Node) -> bool:
        packet = aten_packet(node.op, node.target)
        site = self.sites.get(node)
        return (packet is not None and is_pointwise(packet)) or (site is not None and site.kind == "pointwise")

    # ------------------------------------------------------------ storage choices

    def _pack(self, v: Node) -> tuple:
        if self.bits[v] == KEEP_EXACT:  # a plan keeps it as it is
            return ("exact",), [self.env[v]], None
        spec, run = self._pack_new(self.env[v], self.bits[v], PackSource(v.name, tuple(sorted(self.units[v])),
                                                                              floor=self.floors.get(v, 0)))
        self.packs[v] = (spec, run, ("pack", v.name))
        return self.packs[v]

    def _seed(self) -> Node:
        """The forward's seed node (made at the first pack)."""
        if self.seed is None:
            with self.new.inserting_after(self._last_placeholder):
                state = self.new.get_attr(SEED_STATE)
            with self.new.inserting_after(state):
                buffer = self.new.get_attr(SEED_BUFFER)
            with self.new.inserting_after(buffer):
                self.seed = self.new.call_function(next_seed, (state, buffer))
        return self.seed

    def _or_pack(self, v: Node, rebuilt: tuple) -> tuple:
        """``rebuilt`` (a ``_cheap`` rebuild of ``v``), packing ``v`` at run time where the rebuild's
        pieces are missing (their producer needs no backward: a frozen prefix)."""
        if self.bits[v] == KEEP_EXACT:
            return rebuilt
        spec, run, source = rebuilt
        missing = self.new.call_function(value_if_missing, (spec, self.env[v], *run[1:]))
        packed, (_, codes, meta) = self._pack_new(missing, self.bits[v], None)
        return ("or_pack", *packed[1:], spec), [self.env[v], codes, meta, *_nested(run)], source

    def _pack_new(self, value: Node, bits: int, source: PackSource | None) -> tuple:
        """``source`` None: a pack the planner does not list (``_or_pack``'s, made only where a
        rebuild is missing)."""
        self._seed()
        gs = self.config.group_size
        call = self.new.call_function(
            pack_value, (value, self.seed, self.stream, bits, gs, self.config.stochastic, self.config.min_numel)
        )
        if source is not None:
            call.meta[PACK_META] = source
        self.stream += 1
        codes = self.new.call_function(operator.getitem, (call, 0))
        meta = self.new.call_function(operator.getitem, (call, 1))
        return ("packed", bits, gs), [value, codes, meta]

    def _pack_output(self, value: Node, old: Node, copy: str = "") -> tuple:
        """Pack a value a site computes itself (softmax's output), at the site's width; ``copy``
        names a second, independently rounded pack of it (its own key for the planner)."""
        site = self.sites[old]
        bits = self.widths[old]
        if bits == KEEP_EXACT:
            return ("exact",), [value]
        source = PackSource(old.name + copy, (self.keys[old],), derived=site.kind != "softmax")
        return self._pack_new(value, bits, source)

    def _cheap(self, v: Node, adds: int = 1) -> tuple | None:
        """A way to have ``v`` in backward without storing anything new, if there is one
        (using at most ``adds`` residual adds)."""
        if v in self.packs:
            return self.packs[v]
        if not self.config.rebuild_chains:
            return None
        terms = self.facts.add_terms(v)
        if terms is not None and adds > 0:
            left, right = (self._cheap(t, adds - 1) for t in terms)
            if left is not None and right is not None:
                return (("sum", left[0], right[0]), [self.env[v], *left[1], *right[1]],
                        ("sum", left[2], right[2]))
        if v in self.masks:
            mask, slope, src = self.masks[v]
            inner = self._cheap(src, adds)
            if inner is not None:
                return (("masked", slope, inner[0]), [self.env[v], mask, *_nested(inner[1])],
                        ("masked", v.name, inner[2]))
        if v in self.affine:
            a, b, spec, run, source, channel_dim = self.affine[v]
            # not from a narrower pack than a consumer asks for (attention's 8 bits)
            if spec[0] != "exact" and not (spec[0] == "packed" and spec[1] < self.bits.get(v, 0)):
                return ("affine", channel_dim, spec), [self.env[v], a, b, *run], ("affine", v.name, source)
        src = self.facts.reshape_source(v)
        if src is not None:
            inner = self._cheap(src, adds)
            if inner is not None:
                return ("reshape", inner[0]), [self.env[v], *inner[1]], ("reshape", inner[2])
        return None

    def _storage(self, site: Site, i: int, v) -> tuple:
        if not isinstance(v, Node):
            return ("exact",), [v], None
        if i in site.shape_only:
            return ("shape",), [self.env[v]], None
        if i in site.exact or self.facts.is_non_tensor(v):
            return ("exact",), [self.env[v]], None
        if self.facts.is_parameter_like(v):
            return self._parameter_value(v)
        if self._read_by_no_gradient(site, i):
            # the product keeps it only if its partner needs a gradient after all: then exact
            return ("exact",), [self.env[v]], None
        if self._reads_itself(site, i, v):
            return self._own_rounding(v)
        if self._partner_made_by_a_reader_of(site, i, v):
            return self._pack(v)  # a pack of its own: the partner's site keeps the one it made
        rebuilt = self._cheap(v)
        if rebuilt is not None and rebuilt[0][0] != "packed":
            return self._or_pack(v, rebuilt)
        if rebuilt is None and self.roots[v] is not v and self.config.rebuild_chains and self.bits[v] != KEEP_EXACT:
            self._pack(self.roots[v])  # one pack of the activation serves each reshape of it
            return self._cheap(v)
        return rebuilt or self._pack(v)

    def _rebuild_of(self, v: Node) -> tuple | None:
        """(handle node, rebuild, leaves) for a value computed from parameters alone that
        backward can make again, else None; the handle is emitted at the first ask."""
        if v not in self.rebuilds:
            found = parameter_rebuild(self.gm, self.facts, v, self.written, self.config.min_numel)
            if found is not None:
                rebuild, leaves = found

                def handle():
                    return rebuild

                handle.__name__ = handle.__qualname__ = f"parameter_rebuild_{v.name}"
                handle.actfx_fresh = True  # made anew by each rewrite (provenance compares names)
                found = (self.new.call_function(handle, ()), rebuild, leaves)
            self.rebuilds[v] = found
        return self.rebuilds[v]

    def _parameter_value(self, v: Node) -> tuple:
        """A value computed from parameters alone: made again in backward where it can be (a
        standardised or merged weight), else kept (alive anyway where it is a parameter)."""
        found = self._rebuild_of(v)
        if found is None:
            return ("exact",), [self.env[v]], None
        handle, _, leaves = found
        return ("rebuilt", len(leaves)), [self.env[v], handle, *(self.new.get_attr(leaf) for leaf in leaves)], None

    def _copy_parameter_value(self, v: Node) -> Node:
        """``v``, a weight a site may make again: as a checkpoint where its own ops keep values
        of their own (``variants/parameter_chain.py``), else copied as it is."""
        found = self._rebuild_of(v)
        if found is None or not found[1].keeps:
            return self.new.node_copy(v, lambda n: self.env[n])
        handle, rebuild, leaves = found
        self.checkpointed_chains.extend(rebuild.nodes)
        return self.new.call_function(made_from_parameters, (handle, *(self.new.get_attr(leaf) for leaf in leaves)))

    def _drop_unread_chain_copies(self) -> None:
        """The copies of checkpointed computations' ops nothing reads any more (pure: checked)."""
        for old in reversed(self.checkpointed_chains):
            new = self.env.get(old)
            if new is not None and not new.users and new.graph is self.new:
                self.new.erase_node(new)
                del self.env[old]

    def _read_by_no_gradient(self, site: Site, i: int) -> bool:
        """A factor only its partner's gradient reads, where the partner needs none: a number
        (``x * 1.0``), or a value computed from buffers (a Llama's ``q * cos``: q was packed in
        every layer, and no backward kept it)."""
        if not site.factors or len(site.saved) != 2:
            return False
        partner = site.saved[1 - i]
        return not isinstance(partner, (Node, torch.Tensor)) or self.facts.needs_no_gradient(partner)

    def _reads_itself(self, site: Site, i: int, v: Node) -> bool:
        """Whether the gradient with respect to ``v`` reads ``v`` (``Site.reads_own``, or a factor
        of a product met twice, as in ``h * h`` or ``h @ h.mT``)."""
        if i in site.reads_own:
            return True
        if not site.factors:
            return False
        root = self._element_source(v)
        return any(j != i and isinstance(w, Node) and self._element_source(w) is root for j, w in enumerate(site.saved))

    def _partner_made_by_a_reader_of(self, site: Site, i: int, v: Node) -> bool:
        """Whether ``v`` is a product's factor whose partner a site computed that saves ``v`` too
        (``h * h.var(-1)``, ``h * h.norm(dim=-1)``): the product's gradient for the partner reads
        ``v``, and the partner's backward multiplies it by its own ``v``. One pack read there twice
        is biased (``h * h.var(-1, keepdim=True)`` at 2 bits: the mean of 2048 gradients
        2.16x the unbiased error, 1.36x at 512: growing; 0.99x with two packs, which round
        independently)."""
        if not site.factors or v not in self.packs:
            return False
        root = self._element_source(v)
        for j, w in enumerate(site.saved):
            partner = self.sites.get(self._element_source(w)) if j != i and isinstance(w, Node) else None
            if partner is not None and partner is not site and any(
                    isinstance(u, Node) and self._element_source(u) is root for u in partner.saved):
                return True
        return False

    def _element_source(self, v: Node) -> Node:
        """The value ``v`` is a reshape, cast or transpose of (all its elements, same noise)."""
        while True:
            src = self.facts.reshape_source(v)
            if src is None and v.op in ("call_method", "call_function") and v.args and isinstance(v.args[0], Node) and (
                    v.target in _TRANSPOSES or (v.target is getattr and v.args[1:] in (("mT",), ("T",)))):
                src = v.args[0]
            if src is None:
                return v
            v = src

    def _own_rounding(self, v: Node) -> tuple:
        """``v`` for a site whose gradient with respect to ``v`` reads ``v``. Why not rebuilt
        from what its producer packed (LayerNorm's x̂ as ``w x̂ + b``, softmax's output, a ReLU
        of those): that gradient carries the pack's rounding into the producer's backward, which
        multiplies it by the same rounding (a LayerNorm followed by ``h.var(-1)``: the mean of 64
        gradients stayed 0.77 of one step's error at 2 bits). A pack a consumer made is shared."""
        if v in self.packs and v not in self.read_by_producer:
            return self.packs[v]
        self.read_by_producer.discard(v)
        return self._pack(v)

    # ------------------------------------------------------------ the pass

    def run(self) -> Graph:
        self._last_placeholder = None  # the seed is read right after the inputs (or first)
        for node in self.gm.graph.nodes:
            site = self.sites.get(node)
            if site is None and node in self.site_weights:
                self.env[node] = self._copy_parameter_value(node)
            elif site is None:
                self.env[node] = self.new.node_copy(node, lambda n: self.env[n])
                if node.op == "placeholder":
                    self._last_placeholder = self.env[node]
                if node in self.pending_packs:
                    spec, run = self.pending_packs.pop(node)
                    self.packs[node] = (spec, [self.env[node], *run[1:]], ("pack", node.name))
                    self.read_by_producer.add(node)
            else:
                self._emit(site)
            mutated = self.writes.get(node)
            if mutated is not None:
                for other in list(self.packs):
                    if self.facts.same_storage(other, mutated):
                        del self.packs[other]
        self._drop_unread_chain_copies()
        self.new.lint()
        return self.new

    def _emit(self, site: Site) -> None:
        node = site.node
        chosen = [self._storage(site, i, v) for i, v in enumerate(site.saved)]
        specs = [spec for spec, _, _ in chosen]
        runs = [run for _, run, _ in chosen]
        emitted: list = []  # values the variant packs itself (an output, a derivative)

        def pack_output(value, old, copy=""):
            entry = self._pack_output(value, old, copy)
            emitted.append(entry[0])
            return entry

        pack_output.min_numel = self.config.min_numel  # a ReLU's mask is not worth it below that

        out, extras = site.emit(self.new, self.env, specs, runs, pack_output)
        out.meta.update(node.meta)
        self.env[node] = out
        if "mask" in extras:
            mask, slope, rebuildable = extras["mask"]
            if rebuildable:
                self.masks[node] = (mask, slope, site.source)
        if "packed_output" in extras:
            spec, run = extras["packed_output"]
            self.packs[node] = (spec, [out, *run[1:]], ("pack", node.name))
            self.read_by_producer.add(node)
        self.pending_packs.update(extras.get("packed_outputs", {}))  # {getitem of out: (spec, run)}
        if "affine" in extras:  # the output is a * inner + b per channel, inner a value the site
            a, b = extras["affine"]  # packed itself (BatchNorm's and LayerNorm's normalised input)
            spec, run, channel_dim, source = extras["affine_of"]
            self.affine[node] = (a, b, spec, run, source, channel_dim)
        reads = extras.get("reads", [])  # values backward reads through what the site packed itself
        self.decisions.append(Decision(
            node.name, site.kind, self._path(site), [describe(spec) for spec in [*specs, *emitted]], self.prefix,
            [v.name if isinstance(v, Node) else None for v in site.saved] + [v.name for v, _ in reads],
            [source for _, _, source in chosen] + [tree for _, tree in reads], self.keys[node]))


# Why an op left as it is keeps what it keeps, where that is not a missing variant.
PARAMETER_COMPUTATION = "computes from parameters alone: what it keeps is theirs or a few statistics"


def rewrite_graph(gm: GraphModule, config: Config, prefix: str = "") -> tuple[Graph, list[Decision], list]:
    """New graph for ``gm`` with compressed-save variants; also the decisions taken and, as
    (node, reason or None), the nodes that were left as they are."""
    write_accumulations_out_of_place(gm)
    collapse_rms_norms(gm)
    collapse_norm_divisions(gm)
    collapse_pointwise_regions(gm)
    collapse_row_regions(gm)
    fold_softmax_regions(gm)
    rewriter = _Rewriter(gm, config, prefix)
    graph = rewriter.run()
    facts = rewriter.facts
    uncovered = [(n, PARAMETER_COMPUTATION if facts.is_parameter_like(n) else None) for n in gm.graph.nodes
                 if n.op in ("call_module", "call_function", "call_method") and n not in rewriter.sites
                 and not saves_nothing(n, rewriter.modules) and not facts.is_non_tensor(n)]
    return graph, rewriter.decisions, uncovered
