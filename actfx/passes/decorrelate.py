"""Decorrelate: a product of two factors that each read one saved value gets a second, independent pack.

Why: with one pack ``x~`` of ``x``, a backward product ``f(x~) * h(x~)`` (both factors linear
in ``x~``) has expectation ``f(x) h(x) + Cov``: biased, so the value stayed exact. Read through
two independently rounded packs, ``E[f(x~1) h(x~2)] = f(x) h(x)``: unbiased, at twice a pack's
bytes (still a quarter of fp32 at 8 bits). Softmax's backward ``P * (g - sum(g * P))`` is such a
product: attention probabilities on rows shorter than ``rules.DILUTION_MIN`` (a ViT's 65 tokens)
were kept exact; so is LayerNorm's ``x^ * sum(g x^)`` over short rows (ConvNeXt's channels).
One factor's reads (a short chain of views and pointwise ops from the saved value, not depending
on the gradient) are copied onto a second saved copy (a forward ``alias``). Where another product
is then biased (RMSNorm's backward multiplies its input twice, and the gradient it passes on
meets the input again in a weight's gradient), that one is split onto a third copy, and so on up
to ``MAX_COPIES`` while the copies cost less than the exact value; the splits are kept only if no
copy is biased in the end. A value still biased after the hoists below gets a last try with up to
``MAX_COPIES_LAST``.

Where the gradient-free factor is built from several saved values (a residual stream the
partitioner rebuilds in backward from each layer's output, read twice by a later norm's backward),
no copy of one value makes the product unbiased. A norm's normalised value is then computed in
forward and saved in place of the values it was rebuilt from (``hoist.normalised_inputs``), and
any other such factor is computed in forward and saved as a value of its own: rounded
independently of the values it was built from, and split as above where the product reads it
twice. A hoisted factor after which its values are all still biased is taken back.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import fx

from actfx.passes import noise_degree
from actfx.passes.hoist import backward_region, hoist_one, normalised_inputs
from actfx.passes.saved_pair import module_path
from actfx.rules import Kind, rule_for

aten = torch.ops.aten
MAX_CHAIN = 8  # nodes copied onto the second read: views and casts, not computation
MAX_COPIES = 4  # packs one value's reads are split over (4 at 2 bits: 9 bits a value, against 32)
# ... and, last, for a value still biased after the hoists, while the packs cost less than the
# exact value: a residual stream's first value (an embedding) read by a first norm and, rebuilt,
# by the later ones needed five in a Hugging Face Llama, and stayed exact (32 KB of its 246).
# Not from the start: more copies of a LayerScale stream held twice what its hoists hold.
MAX_COPIES_LAST = 8
MIXED_ROUNDS = 16  # hoist-then-split rounds: each can expose the next product upstream


def decorrelate(run) -> None:
    """Split the reads of each value whose only bias is one such product; then hoist the factors
    built from several saved values and split again (see the module docstring)."""
    _split_products(run)
    normalised_inputs(run, biased_only=True)
    _split_products(run)
    hoists: list = []
    for _ in range(MIXED_ROUNDS):
        if not _hoist_mixed_factors(run, hoists):
            break
        _split_products(run)
    _undo_unhelpful(run, hoists)
    _split_products(run, limit=MAX_COPIES_LAST)


@dataclasses.dataclass
class _Hoist:
    factor: fx.Node  # the backward node, left without readers
    forward: list  # the forward nodes that compute it, in graph order (the saved value last)
    read: list  # the biased saved values it was built from


def _hoist_mixed_factors(run, hoists: list) -> bool:
    """Compute in forward the gradient-free factor of each product where bias starts (each factor
    at most linear, the product not) that reads several saved values, noting each in ``hoists``;
    whether any was."""
    run.g.renumber()  # the splits added forward aliases
    sources = run.sources()
    dependent = noise_degree.tangent_dependent(run.g.bwd)
    degrees = noise_degree.degrees(run.g.bwd, sources)
    biased = noise_degree.biased_at_output(run.g.bwd, degrees)
    hoisted = False
    for product in _bias_origins(run.g.bwd, degrees):
        for factor in product.all_input_nodes:
            if factor.op != "call_function" or factor in dependent:
                continue
            nodes, leaves = backward_region(run, factor)
            read = [leaf for leaf in (leaves or ()) if leaf in sources]
            if nodes is None or len(read) < 2:
                continue
            forward = hoist_one(run, factor, read, sources)
            if forward:
                hoists.append(_Hoist(factor, forward, [r for r in read if r in biased]))
                hoisted = True
                break
    return hoisted


def _undo_unhelpful(run, hoists: list) -> None:
    """Take back each hoist after which every value it was built from is still biased (they stay
    exact, and the hoisted value would be stored besides them), where the hoisted value was read
    as it is (not split)."""
    if not hoists:
        return
    biased = noise_degree.biased_sources(run.g.bwd, run.sources())
    order = {n: i for i, n in enumerate(run.g.bwd.nodes)}
    for hoist in reversed(hoists):
        computed = hoist.forward[-1]
        placeholder = run.g.placeholder_of.get(computed)
        if placeholder is None or not all(r in biased for r in hoist.read):
            continue
        if any(order[u] < order[hoist.factor] for u in placeholder.users):
            continue  # a reader placed since (a split's copy) comes before the backward node: keep it
        if any(f.target is aten.alias.default and f.args[0] is computed for f in run.g.placeholder_of):
            continue  # split: its copies are read too
        placeholder.replace_all_uses_with(hoist.factor)
        run.g.drop_saved(computed)
        for node in reversed(hoist.forward):
            if not node.users:
                run.g.fwd.erase_node(node)
        run.hoisted.pop(computed.name, None)
    run.g.renumber()


def _bias_origins(graph: fx.Graph, degrees: dict) -> list:
    """The products whose factors are each at most linear in every source but whose result is not."""
    origins = []
    for node in graph.nodes:
        if node.op != "call_function" or rule_for(node.target).kind is not Kind.PRODUCT:
            continue
        if not any(d > noise_degree.ONE for d in degrees.get(node, {}).values()):
            continue
        if all(d <= noise_degree.ONE for a in node.all_input_nodes for d in degrees.get(a, {}).values()):
            origins.append(node)
    return origins


def _split_products(run, limit: int = MAX_COPIES) -> None:
    sources = run.sources()
    dependent = noise_degree.tangent_dependent(run.g.bwd)
    for placeholder, culprit in noise_degree.biased_sources(run.g.bwd, sources).items():
        _split_value(run, placeholder, culprit, sources, dependent, limit)


def _split_value(run, placeholder: fx.Node, culprit: fx.Node, sources: dict, dependent: set, limit: int) -> None:
    """Split the reads of one value, product by product, onto up to ``limit`` packs; undone
    (the value stays exact) unless no copy is biased in the end."""
    group = {placeholder: sources[placeholder]}  # this value's copies: backward placeholder -> forward node
    done: list = []
    for _ in range(_most_copies(run, sources[placeholder], limit) - 1):
        split = _split(run, placeholder, group[placeholder], culprit, dependent)
        if split is None:
            break
        done.append(split)
        group[split.second] = split.copy
        # each source's degrees are its own: the copies' are all the check needs
        biased = noise_degree.biased_sources(run.g.bwd, group)
        if not biased:
            sources.update({s.second: s.copy for s in done})
            return
        placeholder, culprit = next(iter(biased.items()))
    for split in reversed(done):
        split.undo(run)


def _chain(placeholder: fx.Node, factor: fx.Node, dependent: set) -> list | None:
    """The nodes between ``placeholder`` and ``factor`` (inclusive), in graph order, if ``factor``
    reads it through a short gradient-free chain; empty when the factor is the saved value
    itself (LayerNorm's ``x^ * sum(g x^)`` over ConvNeXt's short channel rows); else None."""
    if factor is placeholder:
        return []
    nodes, stack = set(), [factor]
    while stack:
        n = stack.pop()
        if n is placeholder or n in nodes or not _reaches(n, placeholder):
            continue  # side inputs (a saved mean, a constant) are read as they are
        if n.op != "call_function" or n in dependent or len(nodes) >= MAX_CHAIN:
            return None
        nodes.add(n)
        stack.extend(n.all_input_nodes)
    if not nodes:
        return None
    order = {n: i for i, n in enumerate(factor.graph.nodes)}
    return sorted(nodes, key=order.get)


def _reaches(node: fx.Node, target: fx.Node) -> bool:
    stack, seen = [node], set()
    while stack:
        n = stack.pop()
        if n is target:
            return True
        if n in seen:
            continue
        seen.add(n)
        stack.extend(n.all_input_nodes)
    return False


def _most_copies(run, fwd: fx.Node, limit: int) -> int:
    """How many packs of ``fwd`` still cost less than keeping it exact (at least two, as before
    more were tried; at most ``limit``): 3 of an fp32 value at 8 bits, 12 at 2 bits before the limit."""
    bits = run.config.bits_for(run._kind(fwd), module_path(fwd))
    width = torch.finfo(fwd.meta["val"].dtype).bits
    return max(2, min(limit, int(width / (bits + 0.5))))


@dataclasses.dataclass
class _Split:
    culprit: fx.Node
    position: int
    factor: fx.Node
    copied: list  # the chain's backward copies, in graph order
    copy: fx.Node  # the forward alias saved as the second pack
    second: fx.Node  # its backward placeholder

    def undo(self, run) -> None:
        self.culprit.update_arg(self.position, self.factor)
        for n in reversed(self.copied):
            run.g.bwd.erase_node(n)
        run.g.drop_saved(self.copy)
        run.g.fwd.erase_node(self.copy)


def _split(run, placeholder: fx.Node, fwd: fx.Node, culprit: fx.Node, dependent: set) -> _Split | None:
    """``culprit``'s shorter gradient-free factor read through a new pack of ``fwd`` (a forward
    alias); None where ``culprit`` is not such a product."""
    rule = rule_for(culprit.target)
    if rule.kind is not Kind.PRODUCT:
        return None
    factors = [i for i, a in enumerate(culprit.args) if isinstance(a, fx.Node) and _reaches(a, placeholder)
               and i not in (rule.linear_args or ()) and i not in rule.shape_only]
    chains = [(c, i) for i in factors if (c := _chain(placeholder, culprit.args[i], dependent)) is not None]
    if len(factors) != 2 or not chains:
        return None
    chain, position = min(chains, key=lambda c: len(c[0]))
    with run.g.fwd.inserting_after(fwd):
        copy = run.g.fwd.call_function(aten.alias.default, (fwd,))
    copy.meta.update(fwd.meta)
    second = run.g.add_saved(copy, fwd)
    copies: dict = {placeholder: second}
    with run.g.bwd.inserting_before(culprit):
        for n in chain:
            copies[n] = run.g.bwd.node_copy(n, lambda a: copies.get(a, a))
    factor = chain[-1] if chain else placeholder
    culprit.update_arg(position, copies[factor])
    return _Split(culprit, position, factor, [copies[n] for n in chain], copy, second)
