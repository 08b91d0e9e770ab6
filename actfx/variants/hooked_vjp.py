"""``torch.func.vjp`` that also runs where saved-tensor hooks are active.

Why: backward recomputes an op and takes its vector-Jacobian product with ``torch.func.vjp``
(torch.compile traces it without a graph break), but torch.func refuses to run while a
``saved_tensors_hooks`` context is active. ``torch.autograd.graph.save_on_cpu`` and activation
offloading wrappers keep one open around the whole step, so a converted model's backward failed
where the original trained. There the product is taken with ``torch.autograd.grad`` instead.
"""

from __future__ import annotations

import torch
from torch.utils._pytree import tree_flatten, tree_unflatten


def vjp(fn, *primals, eager: bool = False):
    """``(fn(*primals), pullback)`` as ``torch.func.vjp`` returns them. ``eager``: always through
    autograd, for a replay that must draw random numbers as the forward did (functorch lays a
    dropout's draws over a transposed tensor in another order than eager: a replayed
    TransformerEncoderLayer's masks differed from its forward's, and its gradients were 20% off)."""
    if eager:
        return _autograd_vjp(fn, primals)
    try:
        return torch.func.vjp(fn, *primals)
    except RuntimeError as err:
        if "saved tensor hooks" not in str(err):
            raise
    return _autograd_vjp(fn, primals)


def _autograd_vjp(fn, primals: tuple):
    flat, spec = tree_flatten(primals)
    # identity hooks: this temporary graph stays out of the caller's hooks (it is freed at once)
    with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t):
        leaves = [t.detach().requires_grad_(t.is_floating_point() or t.is_complex()) for t in flat]
        out = fn(*tree_unflatten(leaves, spec))

    def pullback(cotangents):
        outs, cots = tree_flatten(out)[0], tree_flatten(cotangents)[0]
        pairs = [(o, c) for o, c in zip(outs, cots)
                 if isinstance(o, torch.Tensor) and o.requires_grad and isinstance(c, torch.Tensor)]
        wanted = [leaf for leaf in leaves if leaf.requires_grad]
        got = iter(torch.autograd.grad([o for o, _ in pairs], wanted, [c for _, c in pairs], allow_unused=True)
                   if pairs and wanted else [None] * len(wanted))
        grads = [next(got) if leaf.requires_grad else None for leaf in leaves]
        grads = [torch.zeros_like(leaf) if g is None and leaf.requires_grad else g for g, leaf in zip(grads, leaves)]
        return tree_unflatten(grads, spec)

    return out, pullback
