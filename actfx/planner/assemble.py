"""A plan from the widths chosen per group: one Site per op, its bytes and variance, the totals."""

from __future__ import annotations

from actfx.config import KEEP_EXACT
from actfx.kernels import ALLOWED_BITS, code_bits
from actfx.planner.choose import Option
from actfx.planner.inventory import Inventory
from actfx.planner.plan import CHECKPOINT, Plan, Site, site_order
from actfx.planner.recompute import held_bytes


def option(group, sensitivity: dict, group_size: int, exact: bool) -> Option:
    """A group's bytes and measured variance at each width (packs without an estimate add none);
    ``exact``: keeping it as it is is an option too (no variance)."""
    widths = (*ALLOWED_BITS, KEEP_EXACT) if exact else ALLOWED_BITS
    measured = {p.key: p for p in group.packs if p.key in sensitivity}  # two packs of one value: one estimate
    joint = sensitivity.get(joint_key(group))  # the packs probed together
    return Option({b: group.nbytes(b, group_size) for b in widths},
                  {b: 0.0 if b == KEEP_EXACT else sum(sensitivity[k].at(p.width(b)) for k, p in measured.items())
                   + (joint.at(b) if joint is not None else 0.0) for b in widths})


def joint_key(group) -> tuple:
    """The sensitivity entry of a group's packs measured together (``probe_sensitivity``)."""
    return ("joint", group.units)


def assemble(inventory: Inventory, planned, widths, options, fixed_bytes, peak, bits, group_size, batch,
             words, recomputed=()) -> Plan:
    """The Plan for ``widths`` (one per planned group; None for a group inside a ``recomputed``
    block): a Site per unit, carrying the bytes and the variance of the packs it is first consumer
    of, and one ``checkpoint`` Site per recomputed block; units of unplanned groups keep their widths."""
    chosen = {g.units: w for g, w in zip(planned, widths) if w is not None}
    variance = {g.units: o.variance[w] for g, o, w in zip(planned, options, widths) if w is not None}
    inside = [b.path for b in recomputed]
    per_unit: dict = {}
    numel_bits = numel = 0
    for group in inventory.groups:
        if all(_within(u, inside) for u in group.units):
            continue  # recomputed: nothing of it is held
        width = chosen.get(group.units)
        # units inside a recomputed module are not ops of the conversion any more; the group's
        # packs are made for its units outside it
        outside = [u for u in group.units if not _within(u, inside)]
        for unit in outside:
            per_unit.setdefault(unit, [width, 0, None if width is None else 0.0])
        for pack in group.packs:
            b = pack.width(width) if width is not None else pack.bits
            numel_bits += pack.numel * (8 * pack.itemsize if b == KEEP_EXACT else code_bits(b, group_size))
            numel += pack.numel
            first = per_unit[next((u for u in pack.source.units if u in outside), outside[0])]
            first[1] += pack.nbytes(b, group_size)
        if width is not None:
            per_unit[outside[0]][2] += variance[group.units]
    sites = []
    for unit, (width, nbytes, var) in sorted(per_unit.items()):
        module, _, op = unit.rpartition(":")
        sites.append(Site(module, op, width if width is not None else _default_bits(inventory, unit), nbytes, var))
    sites += [Site(b.path, CHECKPOINT, KEEP_EXACT, b.input_bytes, 0.0) for b in recomputed]
    activation = fixed_bytes + sum(o.nbytes[w] for o, w in zip(options, widths) if w is not None) + \
        held_bytes(recomputed)
    return Plan(tuple(sorted(sites, key=lambda s: site_order(s.key))), bits, group_size, batch, activation, peak.peak(activation),
                numel_bits / numel if numel else float(bits), sum(variance.values()), words)


def _within(unit: str, paths) -> bool:
    module = unit.rpartition(":")[0]
    return any(module == p or module.startswith(p + ".") for p in paths)


def _default_bits(inventory: Inventory, unit: str) -> int:
    for group in inventory.groups:
        if unit in group.units:
            return max(p.bits for p in group.packs)
    raise KeyError(unit)
