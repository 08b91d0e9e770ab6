"""Store an RMS norm's input scaled by its own ``rsqrt``: each pack group then holds rows of one scale.

An RMS norm (Llama's, Gemma's, T5's: ``x * rsqrt(mean(x ** 2) + eps)``) leaves the partitioner
saving its raw input ``x`` and the per-row ``rsqrt`` r, and backward multiplies x by r (the norm's
own gradient, and the recomputed norm output a projection's weight gradient reads). Packed raw, a
group spanning a row of small values and one of large values rounds the small row with the large
row's step, and backward multiplies that error by the small row's large r. Gemma's padding
token embeds to a zero row (r = 1 / sqrt(eps), 1000x): one step's 2-bit gradient under
actfx.compile was 7x its norm off, from layer 0's value projection alone (convert, which packs
the normalised value: 1.05x).

Instead forward saves ``x * r`` (same bytes, rows of one scale) and backward reads
``(x * r) / r``: linear in what is packed, exact up to float rounding. r is positive
(``rsqrt`` of a mean of squares plus a positive eps), so the division is safe. The statistic
may be taken of x reshaped, cast to fp32 or multiplied by a scalar (Gemma's ``embed * sqrt(d)``):
rows of those are proportional to x's rows.
"""

from __future__ import annotations

import functools
import numbers

import torch
from torch import fx

from actfx.passes.graph_emit import emit
from actfx.passes.saved_pair import ORDER_KEEPING_VIEWS, is_tensor, numel, static_shape, val

aten = torch.ops.aten
prims = torch.ops.prims

_CASTS = {prims.convert_element_type.default, aten._to_copy.default}


def rms_inputs(run) -> None:
    """Save ``x * r`` in place of every packable saved x that an RMS statistic r is taken of."""
    sources = run.sources()
    by_root: dict = {}  # root -> [(r, the statistic's input)], in graph order
    for r in run.g.fwd.nodes:
        x = _rms_input(r)
        if x is not None:
            by_root.setdefault(_row_root(x), []).append((r, x))
    if not by_root:
        return
    scaled: dict = {}  # (r, the statistic's input) -> the saved x * r, one per pair
    order = {n: i for i, n in enumerate(run.g.bwd.nodes)}
    for fwd, bwd in list(run.g.saved_tensors()):
        if bwd not in sources or not bwd.users or not static_shape(fwd):
            continue
        root = _row_root(fwd)
        found = next(((r, x) for r, x in by_root.get(root, ()) if numel(x) == numel(fwd) and static_shape(x)), None)
        if found is None or not val(root).is_contiguous() or not val(fwd).is_contiguous():
            continue
        r, x = found
        if (r, x) not in scaled:
            run.g.renumber()
            last = max((fwd, r), key=run.g.order.__getitem__)
            shape = tuple(val(x).shape)
            product = emit(run.g.fwd, functools.partial(_scaled, shape=shape), [fwd, r], before=last.next,
                           key=("rms_scaled", shape))
            product.meta["nn_module_stack"] = fwd.meta.get("nn_module_stack")  # listed where x was made
            placeholder = run.g.add_saved(product, fwd)
            stat = run.g.placeholder_of.get(r) or run.g.add_saved(r, fwd)
            scaled[(r, x)] = (placeholder, stat)
        placeholder, stat = scaled[(r, x)]
        shape, dtype = tuple(val(fwd).shape), val(fwd).dtype
        first = min(bwd.users, key=order.__getitem__)
        rebuilt = emit(run.g.bwd, functools.partial(_unscaled, shape=shape, dtype=dtype), [placeholder, stat],
                       before=first, key=("rms_unscaled", shape, dtype))
        bwd.replace_all_uses_with(rebuilt)
        run.g.drop_saved(fwd)


def _scaled(x: torch.Tensor, r: torch.Tensor, *, shape: tuple) -> torch.Tensor:
    return x.reshape(shape).to(r.dtype) * r


def _unscaled(xr: torch.Tensor, r: torch.Tensor, *, shape: tuple, dtype: torch.dtype) -> torch.Tensor:
    return (xr / r).to(dtype).reshape(shape)


def _rms_input(node: fx.Node):
    """x where ``node = rsqrt(mean(x ** 2, dims, keepdim=True) + eps)`` with eps > 0, else None."""
    if node.op != "call_function" or node.target is not aten.rsqrt.default or not is_tensor(node):
        return None
    shifted = node.args[0]
    if not (isinstance(shifted, fx.Node) and shifted.target is aten.add.Tensor and len(shifted.args) == 2):
        return None
    mean, eps = shifted.args if isinstance(shifted.args[0], fx.Node) else shifted.args[::-1]
    if not (isinstance(eps, numbers.Real) and eps > 0 and isinstance(mean, fx.Node)
            and mean.target is aten.mean.dim and len(mean.args) >= 3 and mean.args[2] is True):
        return None
    square = mean.args[0]
    if not isinstance(square, fx.Node):
        return None
    if square.target is aten.pow.Tensor_Scalar and square.args[1] == 2:
        x = square.args[0]
    elif square.target is aten.mul.Tensor and square.args[0] is square.args[1]:
        x = square.args[0]
    else:
        return None
    return x if isinstance(x, fx.Node) and is_tensor(x) and val(x).is_floating_point() else None


def _row_root(node: fx.Node) -> fx.Node:
    """The value ``node`` is, up to order-keeping reshapes, casts and a scalar factor: values with
    one root have proportional rows."""
    while node.op == "call_function":
        if node.target in ORDER_KEEPING_VIEWS or node.target in _CASTS:
            node = node.args[0]
        elif node.target is aten.mul.Tensor and len(node.args) == 2:
            a, b = node.args
            if _scalar(b) and isinstance(a, fx.Node):
                node = a
            elif _scalar(a) and isinstance(b, fx.Node):
                node = b
            else:
                break
        else:
            break
    return node


def _scalar(value) -> bool:
    return isinstance(value, numbers.Number) or (isinstance(value, fx.Node) and is_tensor(value)
                                                 and val(value).dim() == 0)
