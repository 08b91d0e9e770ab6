"""How a compressed-save variant keeps a value for its backward, and how it gets it back.

The rewrite pass gives each variant, for every activation its backward needs, a static *spec*
(a nested tuple, so graphs stay printable and torch.compile sees constants) plus a flat run of
tensors. The spec says how to rebuild the value from stored pieces:

    ("exact",)                          tensors: value                    -> kept as is
    ("packed", bits, group_size)        tensors: value, codes, meta       -> unpack
    ("masked", slope, inner)            tensors: value, mask, *inner      -> inner * mask (ReLU: slope None)
    ("affine", channel_dim, inner)      tensors: value, a, b, *inner      -> a * inner + b per channel (BatchNorm)
    ("reshape", inner)                  tensors: value, *inner            -> inner.reshape(value.shape), in
                                                                             value's dtype (a cast)
    ("permute", dims, inner)            tensors: value, *inner            -> inner.permute(dims)
    ("sum", left, right)                tensors: value, *left, *right     -> left + right (residual adds)
    ("shape",)                          tensors: value                    -> zeros of value's shape
                                        (for linear ops whose backward reads only the input's shape)
    ("rebuilt", n)                      tensors: value, rebuild, *n leaves -> rebuild(*leaves), made
                                        again in backward (a weight computed from parameters alone:
                                        passes/parameter_rebuild.py); kept exact when compiling
    ("or_pack", bits, group_size, inner) tensors: value, codes, meta, *inner
                                                                       -> inner, or, when its pieces
                                        are missing at run time, the value packed in forward where
                                        ``value_if_missing`` found them missing (codes None otherwise)

``value`` is the tensor itself; it is read for its shape and dtype and kept only when the cheaper
pieces are missing at run time (grad disabled when packing, tiny tensors, integer dtypes). Inside
"masked" and "affine" the inner value may be None: it has the outer value's shape and dtype (and
passing one tensor twice to an autograd.Function is something torch.compile refuses). Pieces
shared between variants (one packed BN input, one ReLU mask) are the same tensor objects, so
autograd keeps them once.
"""

from __future__ import annotations

import weakref
from typing import Iterator, Sequence

import torch

from actfx.kernels import affine_scale_by_mask, channel_affine, scale_by_mask, unpack_groups
from actfx.variants.common import autocast_state

EXACT = ("exact",)

# Tensor slots each spec kind reads from the flat run before its inner spec.
_HEAD = {"exact": 1, "shape": 1, "sum": 1, "packed": 3, "masked": 2, "affine": 3, "reshape": 1, "permute": 1,
         "or_pack": 3}


def spec_width(spec: tuple) -> int:
    """Number of tensor slots a spec consumes."""
    kind = spec[0]
    if kind in ("exact", "shape", "packed"):
        return _HEAD[kind]
    if kind == "rebuilt":
        return 2 + spec[1]
    if kind == "sum":
        return 1 + spec_width(spec[1]) + spec_width(spec[2])
    return _HEAD[kind] + spec_width(spec[-1])


def split_spec(spec: tuple, tensors: Sequence, like=None, dry: bool = False) -> tuple[tuple, list[torch.Tensor]]:
    """Turn a spec and its run of tensors into (plan, storage) for ``ctx.save_for_backward``.

    The plan is the spec with shapes and dtypes filled in; storage is what is actually kept.
    ``dry``: only the plan is wanted (no pack counts a reader).
    """
    kind = spec[0]
    value = tensors[0] if tensors[0] is not None or like is None else like
    if not isinstance(value, torch.Tensor):
        return ("const", value), []
    if kind == "exact":
        return EXACT, [held(value)]
    if kind == "shape":
        return ("zeros", tuple(value.shape), value.dtype, value.device), []
    if kind == "packed":
        codes, meta = tensors[1], tensors[2]
        if codes is None:
            return EXACT, [held(value)]
        if not dry:
            _count_reader(codes)
        return ("packed", tuple(value.shape), value.dtype, spec[1], spec[2]), [codes, meta]
    if kind == "or_pack":
        return _packed_if_missing(spec, tensors, value, dry)
    if kind == "rebuilt":
        return _rebuilt(value, tensors[1], list(tensors[2:]))
    if kind == "sum":
        width = spec_width(spec[1])
        left_plan, left_store = split_spec(spec[1], tensors[1 : 1 + width], like=value, dry=dry)
        right_plan, right_store = split_spec(spec[2], tensors[1 + width :], like=value, dry=dry)
        heads = (tensors[1], tensors[1 + width])
        same_shape = all(h is None or h.shape == value.shape for h in heads)
        if not same_shape or {left_plan[0], right_plan[0]} & {"exact", "const"}:
            return EXACT, [value]
        return ("sum", left_plan, right_plan), [*left_store, *right_store]
    inner_plan, inner_store = split_spec(spec[-1], tensors[_HEAD[kind]:], like=value, dry=dry)
    if inner_plan[0] in ("exact", "const"):
        # Nothing cheaper than the value itself underneath: keep the value.
        return EXACT, [value]
    if kind == "masked":
        mask = tensors[1]
        if mask is None:
            return EXACT, [value]
        return ("masked", tuple(value.shape), spec[1], inner_plan), [mask, *inner_store]
    if kind == "affine":
        a, b = tensors[1], tensors[2]
        if a is None or a.numel() == 0:
            return EXACT, [value]
        return ("affine", value.dim(), spec[1], value.dtype, inner_plan), [a, b, *inner_store]
    if kind == "reshape":
        if not value.is_floating_point():
            return EXACT, [value]
        return ("reshape", tuple(value.shape), value.dtype, inner_plan), inner_store
    if kind == "permute":
        return ("permute", spec[1], inner_plan), inner_store
    raise ValueError(f"unknown saved-value spec {spec!r}")


def _packed_if_missing(spec: tuple, tensors: Sequence, value: torch.Tensor, dry: bool) -> tuple:
    inner_plan, inner_store = split_spec(spec[-1], tensors[3:], like=value, dry=dry)
    if inner_plan[0] not in ("exact", "const") or tensors[1] is None:
        return inner_plan, inner_store
    return split_spec(("packed", spec[1], spec[2]), [value, tensors[1], tensors[2]], dry=dry)


def _rebuilt(value: torch.Tensor, rebuild, leaves: list) -> tuple[tuple, list[torch.Tensor]]:
    """The plan that makes ``value`` again from ``leaves`` under this forward's autocast state.
    Kept exact under torch.compile (its partitioner decides what to save there)."""
    if rebuild is None or torch.compiler.is_compiling():
        return EXACT, [held(value)]
    device = value.device.type
    return ("rebuilt", len(leaves), rebuild, tuple(value.shape), value.dtype, device, autocast_state(device)), leaves


def _rebuild(plan: tuple, leaves: list) -> torch.Tensor:
    _, _, rebuild, shape, dtype, device, autocast = plan
    # autocast off where forward ran without it, even if backward runs inside one
    with torch.no_grad(), torch.autocast(device, dtype=autocast[1] if autocast else None, enabled=autocast is not None):
        value = rebuild(*leaves)
    if tuple(value.shape) != shape or value.dtype != dtype:
        raise RuntimeError(f"actfx: {rebuild!r} made a {value.dtype} {list(value.shape)} value in backward where "
                           f"forward made a {dtype} {list(shape)} one; report this with the model's code")
    return value


def value_if_missing(inner: tuple, value, *pieces):
    """``value`` where the rebuild ``inner`` cannot be made from ``pieces`` at run time, else None
    (what the forward then packs for an ``or_pack`` spec). The pieces are made only where their
    producer's backward runs: with a frozen conv -> BatchNorm -> ReLU prefix (fine-tuning,
    torchvision detection's frozen layers) the first trainable conv found neither BatchNorm's x̂
    nor the ReLU's mask and kept its input in fp32 (ResNet-50 with conv1 and layer1 frozen held
    5.6x less than PyTorch instead of 10.8x)."""
    if not isinstance(value, torch.Tensor) or not torch.is_grad_enabled():
        return None
    plan, _ = split_spec(inner, [value, *pieces], dry=True)
    return value if plan[0] in ("exact", "const") else None


def held(value: torch.Tensor) -> torch.Tensor:
    """``value`` as kept exact: a copy when it is a small view of a much larger tensor (a CLS
    token ``x[:, 0]``, a slice too small to pack), which would otherwise keep all of that tensor
    alive for backward after its own consumers packed it."""
    if value._base is None or torch.compiler.is_compiling() or value.layout != torch.strided:
        return value
    if value.untyped_storage().nbytes() <= 4 * value.numel() * value.element_size():
        return value  # the view is most of its storage, or expanded (a stride 0 holds less)
    return value.detach().clone()


# Storage tensors each plan kind reads before its inner plan (the last element); watch, reshape
# and permute read none of their own.
PLAN_HEAD = {"masked": 1, "affine": 2}


def plan_width(plan: tuple) -> int:
    """How many storage tensors ``materialize(plan, ...)`` consumes."""
    kind = plan[0]
    if kind in ("const", "zeros"):
        return 0
    if kind == "exact":
        return 1
    if kind == "packed":
        return 2
    if kind == "rebuilt":
        return plan[1]
    if kind == "sum":
        return plan_width(plan[1]) + plan_width(plan[2])
    return PLAN_HEAD.get(kind, 0) + plan_width(plan[-1])


def materialize(plan: tuple, storage: Iterator[torch.Tensor], keep: bool = True) -> torch.Tensor:
    """Rebuild a value from its plan, consuming its tensors from ``storage`` in order.

    ``keep``: an unpacked value that other readers still wait for is held for them. Not for
    values reached through a residual shortcut: in a ResNet stage each block's output is rebuilt
    from the previous one's, so holding them would keep the whole chain unpacked (at full size)
    until backward reaches its first block; those are unpacked again when their reader comes."""
    kind = plan[0]
    if kind == "exact":
        return next(storage)
    if kind == "watch":
        _, ref, version, inner = plan
        value = ref()
        if value is not None and value._version != version:
            raise RuntimeError(
                "one of the variables needed for gradient computation has been modified by an inplace "
                f"operation: [{value.dtype} {list(value.shape)}] is at version {value._version}; expected "
                f"version {version} instead. (actfx kept a packed copy, but refuses, as autograd does, to "
                "differentiate through a value changed after it was used; make the edit out of place.)"
            )
        return materialize(inner, storage, keep)
    if kind == "const":
        return plan[1]
    if kind == "rebuilt":
        return _rebuild(plan, [next(storage) for _ in range(plan[1])])
    if kind == "zeros":
        return torch.zeros(plan[1], dtype=plan[2], device=plan[3])
    if kind == "packed":
        _, shape, dtype, bits, group_size = plan
        codes, meta = next(storage), next(storage)
        return _unpack_once(codes, meta, shape, dtype, bits, group_size, keep)
    if kind == "masked":
        _, shape, slope, inner_plan = plan
        codes = next(storage)
        outside = 0.0 if slope is None else slope
        # BatchNorm -> ReLU (conv -> BN -> ReLU -> conv), or ReLU(BatchNorm(branch) + shortcut)
        # after a residual add: rebuilt in one pass.
        affine, shortcut_plan = None, None
        if inner_plan[0] == "affine":
            affine = inner_plan
        elif inner_plan[0] == "sum" and inner_plan[1][0] == "affine":
            affine, shortcut_plan = inner_plan[1], inner_plan[2]
        if affine is not None and affine[1] == len(shape):
            _, _, channel_dim, dtype, affine_inner = affine
            a, b = next(storage), next(storage)
            x_storage = [next(storage) for _ in range(plan_width(affine_inner))]
            # The shortcut first: its own chain of rebuilds is done and freed before x is unpacked.
            shortcut = None if shortcut_plan is None else materialize(shortcut_plan, storage, keep=False).reshape(shape)
            x = materialize(affine_inner, iter(x_storage), keep).reshape(shape)
            return affine_scale_by_mask(x.contiguous(), a, b, channel_dim, codes, 1.0, outside, dtype,
                                        addend=None if shortcut is None else shortcut.contiguous())
        inner = materialize(inner_plan, storage, keep).reshape(shape)
        return scale_by_mask(inner.contiguous(), codes, 1.0, outside)
    if kind == "affine":
        _, _, channel_dim, dtype, inner_plan = plan
        a, b = next(storage), next(storage)
        return channel_affine(materialize(inner_plan, storage, keep), a, b, channel_dim, dtype)
    if kind == "sum":
        left = materialize(plan[1], storage, keep)
        return left + materialize(plan[2], storage, keep)
    if kind == "reshape":
        return materialize(plan[3], storage, keep).reshape(plan[1]).to(plan[2])
    if kind == "permute":
        return materialize(plan[2], storage, keep).permute(plan[1])
    raise ValueError(f"unknown saved-value plan {plan!r}")


# A packed value read by several backward formulas (BatchNorm's input is also, through the
# BN -> ReLU rebuild, the next conv's input) is unpacked once: the codes tensor itself counts
# its readers (one per Function that saved it) and holds the unpacked value until the last one
# has taken it. The state lives on the codes tensor, so it goes away with the graph; eager only
# (under torch.compile, Inductor sees the unpacks and schedules them itself).
_READERS, _UNPACKED = "_actfx_readers", "_actfx_unpacked"


def _count_reader(codes: torch.Tensor) -> None:
    if not torch.compiler.is_compiling():
        state = codes.__dict__
        state[_READERS] = state.get(_READERS, 0) + 1


def claim_unpacked(codes: torch.Tensor, shape, dtype) -> torch.Tensor | None:
    """Count one reader of ``codes`` as served; the unpacked value if an earlier reader left it."""
    state = codes.__dict__
    state[_READERS] = state.get(_READERS, 1) - 1
    value = state.pop(_UNPACKED, None)
    if value is None or value.dtype != dtype or tuple(value.shape) != tuple(shape):
        return None
    return value


def _unpack_once(codes, meta, shape, dtype, bits, group_size, keep: bool = True) -> torch.Tensor:
    if torch.compiler.is_compiling():
        return unpack_groups(codes, meta, shape, dtype, bits, group_size)
    value = claim_unpacked(codes, shape, dtype)
    if value is None:
        value = unpack_groups(codes, meta, shape, dtype, bits, group_size)
    if codes.__dict__[_READERS] > 0 and keep:
        codes.__dict__[_UNPACKED] = value
    return value


def split_all(specs: Sequence[tuple], tensors: Sequence) -> tuple[list[tuple], list[torch.Tensor]]:
    """split_spec over consecutive runs, one per spec.

    Values not kept as they are get watched: if the caller modifies one in place before
    backward, backward raises PyTorch's usual version-counter error instead of quietly using
    the copy taken at forward time (parity with what plain autograd does).
    """
    plans, storage, pos = [], [], 0
    for spec in specs:
        width = spec_width(spec)
        plan, store = split_spec(spec, tensors[pos : pos + width])
        head = tensors[pos]
        if plan[0] not in ("exact", "const") and isinstance(head, torch.Tensor) and not torch.compiler.is_compiling():
            plan = ("watch", weakref.ref(head), head._version, plan)
        plans.append(plan)
        storage.extend(store)
        pos += width
    return plans, storage


def rewatch(plans: Sequence[tuple]) -> list[tuple]:
    """``plans`` with each watched value's version read again (after an op's own in-place write)."""
    out = []
    for plan in plans:
        if plan[0] == "watch" and plan[1]() is not None:
            plan = ("watch", plan[1], plan[1]()._version, plan[3])
        out.append(plan)
    return out


def same_storage(a, b) -> bool:
    """Whether two tensors are one, or views of one base (so writing one changes the other)."""
    if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)):
        return False
    return (a if a._base is None else a._base) is (b if b._base is None else b._base)


def materialize_all(plans: Sequence[tuple], storage: Sequence[torch.Tensor]) -> list:
    it = iter(storage)
    return [materialize(plan, it) for plan in plans]


def split_weight(specs: Sequence[tuple], runs: Sequence, width: int, weight: torch.Tensor) -> tuple[list, list]:
    """(plans, storage) of a conv's or linear's weight: by ``specs[1]`` where the graph computes
    it (its run after the input's ``width`` slots, its own slot None: it is ``weight``), else the
    weight itself."""
    if len(specs) > 1:
        return split_all(specs[1:], [weight, *runs[width + 1:]])
    return [], [weight]


def weight_of(plans: Sequence[tuple], storage: Sequence[torch.Tensor]) -> torch.Tensor:
    """The weight :func:`split_weight` kept, made again or unpacked where it has a plan."""
    return materialize_all(plans, storage)[0] if plans else storage[0]


def head_positions(specs: Sequence[tuple], start: int) -> list[int]:
    """Where each run's head value sits among a Function's inputs (its gradient goes there)."""
    heads, pos = [], start
    for spec in specs:
        heads.append(pos)
        pos += spec_width(spec)
    return heads


def values_of(specs: Sequence[tuple], tensors: Sequence) -> list:
    """The head value of each run (what the op computes with in forward)."""
    out, pos = [], 0
    for spec in specs:
        out.append(tensors[pos])
        pos += spec_width(spec)
    return out
