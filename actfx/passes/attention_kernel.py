"""Per SDPA call, which attention kernel actfx traces: PyTorch's math backend or a fused one.

Why: the two keep different values for backward. Math (matmul -> softmax -> matmul) keeps the
probabilities, which backward reads linearly, so they are packed (at the attention width, 8 bits
by default) with q, k and v. A fused kernel (flash, memory-efficient, CPU flash) recomputes the
probabilities from q and k, so those stay exact (``actfx.rules``) and only v and the output are
packed. Per head, with Q queries, S keys, head width D, ``a`` bytes per packed attention value
and ``e`` bytes per element of q, math holds ``Q*S*a + (Q + 2S)*D*a`` and the fused kernel
``(Q + S)*D*(e + a)``: math where that is less (self-attention, Q = S, a GPT-2 head of 64 at 8
bits: up to 447 keys; a Perceiver's 8 latents over 64 keys of width 32: math), and at most ``8*D`` keys,
since math's forward also materialises each S-wide row in full precision. In half precision and
under autocast the fused kernel stays: the math backend rounds its softmax to 16 bits, so the
forward would differ from torch.compile's; in fp32 the two agree to float rounding.
"""

from __future__ import annotations

import functools
import math
import types

import torch
import torch.nn.functional as F
from torch import fx

_SDPA = (torch._C._nn.scaled_dot_product_attention, F.scaled_dot_product_attention)
_MHA = (F.multi_head_attention_forward,)  # nn.MultiheadAttention: dynamo keeps it one call
_FULL_PRECISION = (torch.float32, torch.float64)
MAX_KEYS_PER_HEAD_WIDTH = 8  # math's forward row of S full-precision scores, against D


def math_holds_less(query: torch.Tensor, key: torch.Tensor, attention_bits: int, min_numel: int = 0,
                    probabilities: int | None = None) -> bool:
    """Whether the math backend keeps fewer bytes for backward than a fused kernel (docstring).
    A value of fewer than ``min_numel`` elements stays exact, and is counted so: the
    probabilities (``probabilities`` values, else counted from the shapes) of a 7-token BART
    (math held more than torch.compile), or the q and k of a few-token attention, which the
    fused kernel keeps exact anyway (MobileViT's 4-token stage: fused 25.6 KB, math 12.8 KB,
    where math was refused whenever the probabilities were that few)."""
    if query.dtype not in _FULL_PRECISION or query.dim() < 2 or key.dim() < 2:
        return False
    width, queries, keys, element = query.shape[-1], query.shape[-2], key.shape[-2], query.element_size()
    if not all(isinstance(s, int) for s in (width, queries, keys)):
        return False  # symbolic sizes: their values stay exact either way; int() would add a guard
    rows = probabilities // keys if probabilities is not None else math.prod(query.shape[:-1])
    if not isinstance(rows, int) or rows < queries:
        return False
    heads = rows // queries

    def held(count: int) -> float:
        return count * (min(attention_bits / 8, element) if count >= min_numel else element)

    # math packs the Q x S probabilities, q, k and v; the fused kernel keeps q and k exact and
    # packs v and its output (fewer queries than keys, Perceiver's latents: k and v outweigh
    # the probabilities, and the fused kernel's exact k decides)
    q, kv = heads * queries * width, heads * keys * width
    if rows * keys < min_numel and min(q, kv) < min_numel:
        return False  # math packs next to nothing: its other saved values are not counted here
    math_bytes = held(rows * keys) + held(q) + 2 * held(kv)
    fused_bytes = (q + kv) * element + held(kv) + held(q)
    return math_bytes < fused_bytes and keys <= MAX_KEYS_PER_HEAD_WIDTH * width


def choose_attention_kernels(gm: fx.GraphModule, attention_bits: int, min_numel: int = 0) -> bool:
    """Point each SDPA call of a dynamo graph at the kernel that holds less (module docstring).
    False where the fused kernels stay whatever they hold (half precision, autocast)."""
    if _autocast(gm):
        return False
    for module in gm.modules():  # the graph and its subgraphs (checkpointed regions, ...)
        if not isinstance(module, fx.GraphModule):
            continue
        for node in module.graph.nodes:
            if node.op == "call_function" and node.target in _MHA:
                heads = _mha_query_key(node)
                if heads is not None and math_holds_less(*heads, attention_bits, min_numel):
                    node.target = multi_head_attention_as_math
                elif heads is not None and _example(node.args[0]).device.type == "meta":
                    node.target = multi_head_attention_fused_on_meta
                continue
            if node.op != "call_function" or node.target not in _SDPA:
                continue
            query, key = (_example(a) for a in _query_key(node))
            if query is None or key is None:
                continue
            if math_holds_less(query, key, attention_bits, min_numel):
                node.target = attention_as_math
            elif query.device.type == "meta":
                node.target = fused_attention_on_meta
        module.recompile()
    return True


def attention_as_math(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **kwargs):
    """F.scaled_dot_product_attention traced through PyTorch's math backend, with the scale
    applied to the query beforehand. Why: Inductor's joint-graph patterns
    (``fx_passes/fuse_attention.py``) match the math backend's own scaling (a float factor on q
    and k) and turn the traced math back into the fused CPU kernel, whose q and k stay exact
    (a Hugging Face GPT-2 at 4 x 256 tokens held 25.8 MB instead of 17.1); a query scaled
    before the call leaves the scores unscaled, which none of those patterns takes. Where the
    caller scaled the query itself (OPT: ``scale=1.0``), a factor of 1 is removed as a no-op and
    the unscaled pattern matched again (OPT kept q and k exact: 3.9x instead of 8.5x); the query
    then goes through x2 and x0.5, exact in binary floating point, which no pattern takes either."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    factor = scale if scale is not None else 1.0 / math.sqrt(query.shape[-1])  # SDPA's default
    scaled = query * 2.0 * 0.5 if factor == 1.0 else query * factor
    with sdpa_kernel([SDPBackend.MATH]):
        return F.scaled_dot_product_attention(scaled, key, value, attn_mask=attn_mask, dropout_p=dropout_p,
                                              is_causal=is_causal, scale=1.0, **kwargs)


def _with_attention(fn, attention):
    """A copy of ``fn`` (a function of ``torch.nn.functional``) whose global name
    ``scaled_dot_product_attention`` is ``attention``; torch's own is left alone."""
    scope = {**fn.__globals__, "scaled_dot_product_attention": attention}
    copy = types.FunctionType(fn.__code__, scope, fn.__name__, fn.__defaults__, fn.__closure__)
    copy.__kwdefaults__ = fn.__kwdefaults__
    scope[fn.__name__] = copy  # its __torch_function__ dispatch (under tracing) calls itself by name
    return functools.wraps(fn)(copy)


# ``F.multi_head_attention_forward`` (nn.MultiheadAttention's) with its SDPA call traced as the chosen math,
# or on meta tensors (estimates) as the fused kernel the CPU would run
multi_head_attention_as_math = _with_attention(_MHA[0], attention_as_math)


def _mha_query_key(node: fx.Node):
    """Per-head query and key shapes of a ``multi_head_attention_forward`` call ((L, N, E) inputs,
    ``num_heads`` fifth), as meta tensors; None where unknown."""
    query, key = (_example(a) for a in _query_key(node))
    heads = node.args[4] if len(node.args) > 4 else node.kwargs.get("num_heads")
    if query is None or key is None or not isinstance(heads, int) or query.dim() != 3 or key.dim() != 3:
        return None
    (length, batch, width), keys = query.shape, key.shape[0]
    if not all(isinstance(s, int) for s in (length, batch, width, keys)) or width % heads:
        return None
    return (torch.empty(batch, heads, length, width // heads, dtype=query.dtype, device="meta"),
            torch.empty(batch, heads, keys, width // heads, dtype=key.dtype, device="meta"))


def fused_attention_on_meta(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                            enable_gqa=False):
    """A fused kernel's saved values on meta tensors, for estimates (SDPA on meta traces math):
    the memory-efficient kernel's (CUDA's choice in fp32), output strides included, so that its
    readers share it as they do on the device; for grouped-query attention the CPU kernel's,
    which keeps k and v ungrouped."""
    if query.dim() != 4:
        return F.scaled_dot_product_attention(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p,
                                              is_causal=is_causal, scale=scale, enable_gqa=enable_gqa)
    if query.shape[1] != key.shape[1]:  # grouped-query attention: the CPU kernel keeps k, v ungrouped
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            query, key, value, dropout_p, is_causal, attn_mask=attn_mask, scale=scale)[0]
    if attn_mask is not None and attn_mask.dtype == torch.bool:  # as SDPA hands a boolean mask to the kernel
        attn_mask = torch.where(attn_mask, 0.0, float("-inf")).to(query.dtype)
    if attn_mask is not None:
        attn_mask = attn_mask.expand(query.shape[0], query.shape[1], query.shape[2], key.shape[2])
    return torch.ops.aten._scaled_dot_product_efficient_attention(
        query, key, value, attn_mask, True, dropout_p, is_causal, scale=scale)[0]


multi_head_attention_fused_on_meta = _with_attention(_MHA[0], fused_attention_on_meta)


def _query_key(node: fx.Node):
    query = node.args[0] if node.args else node.kwargs.get("query")
    key = node.args[1] if len(node.args) > 1 else node.kwargs.get("key")
    return query, key


def _example(arg) -> torch.Tensor | None:
    value = arg.meta.get("example_value") if isinstance(arg, fx.Node) else None
    return value if isinstance(value, torch.Tensor) else None


def _autocast(gm: fx.GraphModule) -> bool:
    """Autocast on around the compiled call, or entered inside the graph."""
    if any(torch.is_autocast_enabled(device) for device in ("cpu", "cuda")):
        return True
    return any(node.op == "call_function" and "autocast" in getattr(node.target, "__name__", "")
               for module in gm.modules() if isinstance(module, fx.GraphModule) for node in module.graph.nodes)
