"""Decorrelate: a product of two factors that each read one saved value gets a second, independent pack.

Why: with one pack ``x~`` of ``x``, a backward product ``f(x~) * h(x~)`` (both factors linear
in ``x~``) has expectation ``f(x) h(x) + Cov``: biased, so the value stayed exact. Read through
two independently rounded packs, ``E[f(x~1) h(x~2)] = f(x) h(x)``: unbiased, at twice a pack's
bytes (still a quarter of fp32 at 8 bits). Softmax's backward ``P * (g - sum(g * P))`` is such a
product: attention probabilities on rows shorter than ``rules.DILUTION_MIN`` (a ViT's 65 tokens)
were kept exact; so is LayerNorm's ``x^ * sum(g x^)`` over short rows (ConvNeXt's channels).
One factor's reads (a short chain of views and pointwise ops from the saved value, not depending
on the gradient) are copied onto a second saved copy (a forward ``alias``);
the split is kept only if neither copy is biased afterwards.
"""

from __future__ import annotations

import torch
from torch import fx

from actfx.passes import noise_degree
from actfx.rules import Kind, rule_for

aten = torch.ops.aten
MAX_CHAIN = 8  # nodes copied onto the second read: views and casts, not computation


def decorrelate(run) -> None:
    """Split the reads of each value whose only bias is one such product (see the module docstring)."""
    sources = run.sources()
    dependent = noise_degree.tangent_dependent(run.g.bwd)
    for placeholder, culprit in noise_degree.biased_sources(run.g.bwd, sources).items():
        rule = rule_for(culprit.target)
        if rule.kind is not Kind.PRODUCT:
            continue
        factors = [i for i, a in enumerate(culprit.args) if isinstance(a, fx.Node) and _reaches(a, placeholder)
                   and i not in (rule.linear_args or ()) and i not in rule.shape_only]
        chains = [(c, i) for i in factors if (c := _chain(placeholder, culprit.args[i], dependent)) is not None]
        if len(factors) != 2 or not chains:
            continue
        chain, position = min(chains, key=lambda c: len(c[0]))
        _split(run, placeholder, sources[placeholder], culprit, position, chain, sources)


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


def _split(run, placeholder: fx.Node, fwd: fx.Node, culprit: fx.Node, position: int, chain: list,
           sources: dict) -> None:
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
    # each source's degrees are its own: the two copies' are all the check needs
    biased = noise_degree.biased_sources(run.g.bwd, {placeholder: fwd, second: copy})
    if placeholder in biased or second in biased:  # undo: the value stays exact as before
        culprit.update_arg(position, factor)
        for n in reversed(chain):
            run.g.bwd.erase_node(copies[n])
        run.g.drop_saved(copy)
        run.g.fwd.erase_node(copy)
        return
    sources[second] = copy
