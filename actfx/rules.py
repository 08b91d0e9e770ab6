"""Op rules keyed by ATen op: how an op's output depends on each tensor argument.

Why: a saved value may be stored with unbiased noise (stochastic rounding) only where every
gradient is *linear* in it. Whether that holds is a property of the ATen ops that read the value
in backward, not of how the model spelled its forward (module, functional, method, in-place all
reach the same ATen ops). One table here answers it for every op; the compiled path
(``actfx/passes/noise_degree.py``) reads it, op by op, over the partitioned backward graph.

Each entry says how the noise *degree* of the op's output follows from its arguments' degrees:

* ``LINEAR``: the output is a linear map of each tensor argument (views, add, cat, sum, pooling
  backward, index with exact indices): degree = the largest argument degree.
* ``PRODUCT``: the output multiplies its tensor arguments (mul, mm, conv): degrees add up, so a
  product of two noisy copies of one value is biased, of two independent ones is not.
* ``REDUCTION``: linear, and a sum over many values: noise of one element barely correlates with
  the sum, so ``x_i * sum_j(g_j x_j)`` (normalisation backward) keeps a bias of O(1/R), R the
  number of values reduced (>= ``DILUTION_MIN``).
* ``NONLINEAR`` (every op not listed): the output is biased by any noise in any argument.

``exact`` lists argument positions (keyword arguments by their schema position) whose values must be exact (indices, conditions, divisors),
``shape_only`` those whose values are never read (``max_pool2d_with_indices_backward``'s input),
``outputs`` which arguments each result of a tuple-returning op reads.
Adding an op is one entry in ``RULES`` (``RULES_BY_NAME`` for other libraries' ops);
``tests/test_rules.py`` checks each kind's claim numerically (mean of K noisy evaluations against the exact one).
"""

from __future__ import annotations

import dataclasses
import enum
import operator

import torch
import torch._inductor.inductor_prims  # noqa: F401 - registers prims.fma, which Inductor's decompositions emit
from torch.fx import Node

aten = torch.ops.aten
prims = torch.ops.prims

# A sum over at least this many values makes its noise a dilute function of any one element.
DILUTION_MIN = 128


class Kind(enum.Enum):
    LINEAR = "linear"
    PRODUCT = "product"
    REDUCTION = "reduction"
    NONLINEAR = "nonlinear"


@dataclasses.dataclass(frozen=True)
class Rule:
    kind: Kind
    exact: tuple[int, ...] = ()  # argument positions that must be exact
    shape_only: tuple[int, ...] = ()  # argument positions whose values are not read
    linear_args: tuple[int, ...] | None = None  # PRODUCT: positions combined linearly (addmm's bias)
    outputs: tuple[tuple[int, ...], ...] | None = None  # tuple results: the argument positions each reads


_L, _P, _R = Rule(Kind.LINEAR), Rule(Kind.PRODUCT), Rule(Kind.REDUCTION)
_SHAPE = Rule(Kind.LINEAR, shape_only=(0,))

RULES: dict[object, Rule] = {
    # views, copies, layout
    **{op: _L for op in (
        aten.view, aten._unsafe_view, aten.reshape, aten.permute, aten.transpose, aten.t,
        aten.expand, aten.squeeze, aten.unsqueeze, aten.clone, aten.contiguous, aten.slice,
        aten.select, aten.cat, aten.stack, aten.alias, aten.split, aten.split_with_sizes,
        aten.unbind, aten._to_copy, aten.copy, aten.repeat, aten.flip, aten.roll, aten.as_strided,
        aten.narrow, aten.diagonal, aten.unfold, aten.pixel_shuffle, aten.pixel_unshuffle,
        aten.constant_pad_nd, aten.view_as_real, aten.view_as_complex, aten.squeeze_copy,
        aten.permute_copy, aten.view_copy, aten.expand_copy, aten.lift_fresh_copy,
        aten.select_scatter, aten.slice_scatter, aten.col2im, aten.im2col,
        prims.convert_element_type, operator.getitem,
    )},
    # linear arithmetic
    aten.add: _L, aten.sub: _L, aten.neg: _L, aten.rsub: _L,
    aten.div: Rule(Kind.LINEAR, exact=(1,)),
    aten.where: Rule(Kind.LINEAR, exact=(0,)),
    aten.masked_fill: Rule(Kind.LINEAR, exact=(1,)),
    # activation backwards: linear in the incoming gradient, nonlinear in the value they read
    **{op: Rule(Kind.LINEAR, exact=(1,)) for op in (
        aten.threshold_backward, aten.gelu_backward, aten.sigmoid_backward, aten.tanh_backward,
        aten.silu_backward, aten.native_dropout_backward,
    )},
    # products: degrees add up
    aten.mul: _P, aten.mm: _P, aten.bmm: _P, aten.matmul: _P, aten.dot: _P, aten.mv: _P,
    aten.convolution: Rule(Kind.PRODUCT, linear_args=(2,)),
    # (grad_input, grad_weight, grad_bias) read (grad, weight), (grad, input), (grad)
    aten.convolution_backward: Rule(Kind.PRODUCT, outputs=((0, 2), (0, 1), (0,))),
    # (grad_input, grad_grid) read (grad, grid), (grad, input, grid); the grid exact (sample positions)
    aten.grid_sampler_2d_backward: Rule(Kind.PRODUCT, exact=(2,), outputs=((0, 2), (0, 1, 2))),
    aten.grid_sampler_3d_backward: Rule(Kind.PRODUCT, exact=(2,), outputs=((0, 2), (0, 1, 2))),
    # mixture-of-experts grouped matmul (tokens, experts, group ends exact, bias)
    aten._grouped_mm: Rule(Kind.PRODUCT, exact=(2,), linear_args=(3,)),
    # fused attention backward: P = exp(q k^T s - logsumexp) is recomputed from q, k (exact), and
    # the gradients are linear in v (dO v^T) and in out (rowsum(dO * out)), each a factor of dO
    aten._scaled_dot_product_flash_attention_for_cpu_backward: Rule(Kind.PRODUCT, exact=(1, 2, 5, 8)),
    aten._scaled_dot_product_efficient_attention_backward: Rule(Kind.PRODUCT, exact=(1, 2, 4, 6, 7, 8)),
    aten._scaled_dot_product_flash_attention_backward: Rule(Kind.PRODUCT, exact=(1, 2, 5, 6, 7, 12, 13)),
    aten._scaled_dot_product_cudnn_attention_backward: Rule(Kind.PRODUCT, exact=(1, 2, 5, 6, 7, 8, 9, 10)),
    aten._scaled_dot_product_fused_attention_overrideable_backward: Rule(
        Kind.PRODUCT, exact=(1, 2, 4, 7, 8, 9, 14, 15)),
    aten.addmm: Rule(Kind.PRODUCT, linear_args=(0,)),
    aten.baddbmm: Rule(Kind.PRODUCT, linear_args=(0,)),
    aten.addcmul: Rule(Kind.PRODUCT, linear_args=(0,)),
    prims.fma: Rule(Kind.PRODUCT, linear_args=(2,)),  # a * b + c
    # sums
    aten.sum: _R, aten.mean: _R,
    # pooling and resampling: linear in the values, indices exact
    aten.avg_pool2d: _L, aten.avg_pool2d_backward: Rule(Kind.LINEAR, shape_only=(1,)),
    aten.avg_pool3d: _L, aten.avg_pool3d_backward: Rule(Kind.LINEAR, shape_only=(1,)),
    aten._adaptive_avg_pool2d: _L, aten._adaptive_avg_pool2d_backward: Rule(Kind.LINEAR, shape_only=(1,)),
    aten.max_pool2d_with_indices_backward: Rule(Kind.LINEAR, shape_only=(1,), exact=(7,)),
    aten.max_pool3d_with_indices_backward: Rule(Kind.LINEAR, shape_only=(1,), exact=(7,)),
    aten.upsample_nearest2d: _L, aten.upsample_bilinear2d: _L, aten.upsample_nearest1d: _L,
    aten.upsample_nearest2d_backward: _L, aten.upsample_bilinear2d_backward: _L,
    aten.embedding_dense_backward: Rule(Kind.LINEAR, exact=(1,)),
    aten.index: Rule(Kind.LINEAR, exact=(1,)), aten._unsafe_index: Rule(Kind.LINEAR, exact=(1,)),
    aten.index_select: Rule(Kind.LINEAR, exact=(2,)), aten.gather: Rule(Kind.LINEAR, exact=(2,)),
    aten.index_put: Rule(Kind.LINEAR, exact=(1,)), aten._unsafe_index_put: Rule(Kind.LINEAR, exact=(1,)),
    aten.index_add: Rule(Kind.LINEAR, exact=(2,)), aten.scatter_add: Rule(Kind.LINEAR, exact=(2,)),
    aten.new_zeros: _SHAPE, aten.new_empty: _SHAPE, aten.new_ones: _SHAPE, aten.new_full: _SHAPE,
    aten.zeros_like: _SHAPE, aten.ones_like: _SHAPE, aten.empty_like: _SHAPE, aten.full_like: _SHAPE,
    aten.sym_size: _SHAPE, aten.sym_numel: _SHAPE, aten.sym_stride: _SHAPE,
}

# Ops that fill a tensor with one value given as an argument (no tensor input, no randomness): a
# saved one is rebuilt in backward for free instead of being stored. (Index ranges, arange and
# iota, are left to the partitioner: the masks computed from them are stored as bits.)
CONSTANT_FACTORIES = {aten.full.default, aten.zeros.default, aten.ones.default}

# Ops of other libraries, by qualified name (their library need not be imported).
RULES_BY_NAME: dict[str, Rule] = {
    # transformers' MoE grouped matmul (input, weight, offs) and its backward op
    # (input, weight, offs, grad) -> (grad_input, grad_weight), reading (weight, grad), (input, grad)
    "transformers::grouped_mm_fallback": Rule(Kind.PRODUCT, exact=(2,)),
    "transformers::grouped_mm_fallback_backward": Rule(Kind.PRODUCT, exact=(2,), outputs=((1, 3), (0, 3))),
}

_NONLINEAR = Rule(Kind.NONLINEAR)


def rule_for(target) -> Rule:
    """The rule of an fx node's target (an OpOverload, its packet, or a Python callable)."""
    rule = RULES.get(target)
    if rule is None:
        rule = RULES.get(getattr(target, "overloadpacket", None))
    if rule is None and isinstance(target, torch._ops.OpOverload):
        rule = RULES_BY_NAME.get(target.name())
    return rule or _NONLINEAR


def power_rule(exponent) -> Kind | None:
    """``pow(x, 1)`` is linear and ``pow(x, 2)`` a product of x with itself; other exponents are not."""
    return {1: Kind.LINEAR, 2: Kind.PRODUCT}.get(exponent)


# ------------------------------------------------------------ fx nodes -> ATen

# Python operators and their ATen ops (method and torch-function names are ATen names already).
_OPERATORS = {operator.mul: aten.mul, operator.add: aten.add, operator.sub: aten.sub, operator.truediv: aten.div,
              operator.neg: aten.neg, operator.pow: aten.pow, operator.abs: aten.abs, operator.gt: aten.gt,
              operator.ge: aten.ge, operator.lt: aten.lt, operator.le: aten.le, operator.eq: aten.eq,
              operator.ne: aten.ne}
_TORCH_NAMESPACES = ("torch", "torch.nn.functional", "torch._C._nn", "torch._C._VariableFunctions", "torch.special",
                     "torch._C._special", "torch._C._linalg")


def aten_packet(op: str, target):
    """The ATen op an fx node (``op``, ``target``) dispatches to, when its spelling names one:
    an OpOverload's packet, an operator, a Tensor method or a ``torch``/``F`` function of the
    same name. None otherwise (modules, user functions)."""
    if isinstance(target, torch._ops.OpOverload):
        return target.overloadpacket
    if isinstance(target, torch._ops.OpOverloadPacket):
        return target
    if op == "call_method" and target in _CAST_METHODS:
        return aten._to_copy
    if op == "call_method" and isinstance(target, str):
        name = target
    elif op == "call_function" and target in _OPERATORS:
        return _OPERATORS[target]
    elif op == "call_function" and getattr(target, "__module__", None) in _TORCH_NAMESPACES:
        name = getattr(target, "__name__", None)
    else:
        return None
    packet = getattr(aten, name, None) if isinstance(name, str) and not name.startswith("_") else None
    if isinstance(packet, torch._ops.OpOverloadPacket) and name.startswith("special_"):
        return _aliased(packet, name[len("special_"):])
    return packet if isinstance(packet, torch._ops.OpOverloadPacket) else None


def node_packet(node) -> object:
    """``aten_packet`` of an fx node's call; None for anything else (placeholders, constants)."""
    if not isinstance(node, Node) or node.op not in ("call_function", "call_method"):
        return None
    return aten_packet(node.op, node.target)


def _aliased(special, name: str):
    """``torch.special.erfinv`` and its kind are aliases of ``erfinv`` (``aten.special_erfinv``
    is not tagged element-wise; its target is): the op of the plain name where its signature is
    the alias's, else the special op itself."""
    plain = getattr(aten, name, None)
    if not isinstance(plain, torch._ops.OpOverloadPacket) or "default" not in special.overloads():
        return special

    def signature(op):
        return [(a.name, str(a.type)) for a in op._schema.arguments]

    wanted = signature(special.default)  # matched by any overload: xlogy's tensor one is "Tensor"
    return plain if any(signature(getattr(plain, o)) == wanted for o in plain.overloads()) else special


# Factorizations and solves: their backward multiplies the gradient by the inverse of their input
# (a kernel matrix's, a covariance's), so rounding in what element-wise ops saved on the way to them
# comes back scaled by the condition number (a deep-kernel GP's RBF kernel at 8 bits: 10% off).
ILL_CONDITIONED = {getattr(aten, name) for name in (
    "linalg_cholesky", "linalg_cholesky_ex", "cholesky", "linalg_solve", "linalg_solve_ex", "linalg_inv",
    "linalg_inv_ex", "inverse", "linalg_slogdet", "slogdet", "logdet", "det", "linalg_det", "linalg_eigh",
    "linalg_lu_factor", "linalg_lu_factor_ex", "linalg_lu", "linalg_pinv", "linalg_lstsq", "triangular_solve",
    "linalg_solve_triangular", "cholesky_solve", "cholesky_inverse") if hasattr(aten, name)}  # (names vary by release)

# Element-wise ops whose backward needs only a sign or comparison: exact 1-bit masks serve them.
SIGN_ONLY = {aten.relu, aten.relu6, aten.leaky_relu, aten.hardtanh, aten.threshold}

# Element-wise ops ATen does not tag ``pointwise``, and dtype casts (element-wise too).
_UNTAGGED_POINTWISE = {aten.hardswish, aten.hardsigmoid, aten.log_sigmoid, aten.to, aten._to_copy, aten.where,
                       aten.masked_fill}
_CAST_METHODS = {"float", "half", "double", "bfloat16"}


def is_pure(op) -> bool:
    """Whether running the ATen overload ``op`` again gives the same value and changes nothing:
    it draws no random numbers (ATen's ``nondeterministic_seeded`` tag) and writes no tensor (its
    schema). What may be made again rather than kept, or merged with its twin."""
    return torch.Tag.nondeterministic_seeded not in op.tags and not op._schema.is_mutable


def is_pointwise(packet) -> bool:
    """Element-wise by ATen's own tag on every overload that maps tensors to one tensor (so
    ``max``, whose ``dim`` overload reduces, is not), and deterministic (random ops are not re-run)."""
    if packet in _UNTAGGED_POINTWISE:
        return True
    tagged = []
    for name in packet.overloads():
        op = getattr(packet, name)
        returns, args = op._schema.returns, op._schema.arguments
        if torch.Tag.nondeterministic_seeded in op.tags:
            return False
        if "out" in name or len(returns) != 1 or str(returns[0].type) != "Tensor":
            continue
        if not args or str(args[0].type) not in ("Tensor", "Optional[Tensor]"):
            continue  # e.g. pow.Scalar(Scalar self, Tensor exponent): tagged or not, not our case
        tagged.append(torch.Tag.pointwise in op.tags)
    return bool(tagged) and all(tagged)
