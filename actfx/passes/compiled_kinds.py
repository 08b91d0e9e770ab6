"""The ``Config.op_bits`` kinds of a value the compiled graph saves.

Eager conversion names a saved tensor's kind after the op that saves it (``conv``, ``linear``,
``layer_norm``, ...). In the partitioned graph a value is an ATen op's output read by other ATen
ops, so its kinds are the names of its producer and of its forward readers (the ops whose backward
needs it), each as ATen spells it and as eager conversion does; decomposed ops count by the op
they came from (``meta["original_aten"]``). A user's ``op_bits={"conv": 4}`` then reaches the
values convolutions save, as it does in ``actfx.convert``.
"""

from __future__ import annotations

from torch import fx

# ATen op (short name) -> the eager kinds it also answers to
EAGER_KINDS = {
    "convolution": ("conv",), "_convolution": ("conv",), "conv2d": ("conv",), "conv1d": ("conv",), "conv3d": ("conv",),
    "addmm": ("linear", "matmul"), "mm": ("linear", "matmul"), "linear": ("linear",), "bmm": ("matmul",),
    "native_layer_norm": ("layer_norm",), "layer_norm": ("layer_norm",),
    "native_batch_norm": ("batch_norm",), "_native_batch_norm_legit": ("batch_norm",),
    "_native_batch_norm_legit_functional": ("batch_norm",), "_native_batch_norm_legit_no_training": ("batch_norm",),
    "native_group_norm": ("group_norm",), "embedding": ("embedding",),
    "max_pool2d_with_indices": ("max_pool",), "avg_pool2d": ("avg_pool",),
    "_scaled_dot_product_flash_attention_for_cpu": ("sdpa",), "_scaled_dot_product_efficient_attention": ("sdpa",),
    "_scaled_dot_product_flash_attention": ("sdpa",), "scaled_dot_product_attention": ("sdpa",),
    "_softmax": ("softmax",), "_log_softmax": ("log_softmax",),
}


def short_name(target) -> str:
    """``aten.convolution.default`` -> ``convolution``."""
    text = str(target)
    return text.replace("aten.", "").split(".")[0] if text.startswith("aten.") else getattr(target, "__name__", text)


def name_kinds(name: str) -> set[str]:
    """An ATen short name's kinds; a derivative computed in forward (``gelu_backward``, hoisted
    from backward) answers to its op too, as the derivative eager GELU saves does."""
    base = name.removesuffix("_backward")
    return {name, base, *EAGER_KINDS.get(name, ()), *EAGER_KINDS.get(base, ())}


def node_kinds(node: fx.Node) -> set[str]:
    """The kinds of one forward op."""
    kinds: set[str] = set()
    if node.op == "call_function":
        for target in (node.target, node.meta.get("original_aten")):
            if target is not None:
                kinds |= name_kinds(short_name(target))
    return kinds


# ops that only view or lay out their input: the op reading the result reads the value
_VIEWS = {"view", "_unsafe_view", "reshape", "t", "permute", "transpose", "expand", "squeeze", "unsqueeze", "clone",
          "alias", "contiguous", "flatten", "slice", "select"}


def value_kinds(fwd: fx.Node) -> set[str]:
    """Every kind the saved value ``fwd`` answers to: its producer's and its forward readers',
    through views (a linear reads a flattened activation)."""
    kinds, readers, seen = node_kinds(fwd), list(fwd.users), {fwd}
    while readers:
        node = readers.pop()
        if node in seen:
            continue
        seen.add(node)
        kinds |= node_kinds(node)
        if node.op == "call_function" and short_name(node.target) in _VIEWS:
            readers.extend(node.users)
    return kinds


def chosen_kind(fwd: fx.Node, user_kinds, hoisted_from: str | None = None) -> str | None:
    """Of the kinds a user set widths for (``user_kinds``: kind -> bits), the one ``fwd`` takes:
    the widest where several match (a ReLU output a convolution reads), None where none does.
    ``hoisted_from``: the backward op a value computed in forward stands for."""
    kinds = value_kinds(fwd) | (name_kinds(short_name(hoisted_from)) if hoisted_from else set())
    matching = [k for k in kinds if k in user_kinds]
    return max(matching, key=lambda k: (user_kinds[k], k)) if matching else None
