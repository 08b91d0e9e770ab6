"""PyTorch functions fx records as one opaque call although their bodies are plain tensor code.

Why: such a function checks for ``__torch_function__`` first, so a traced Proxy stops there and
the graph holds a single call actfx has no variant for (it saves what PyTorch saves). Written out
here as the same ops in the same order, forward bit-identical, each op meets its own variant. One
entry per function; the tracer (``capture.py``) expands a call to a function listed in
``TRACED_THROUGH`` instead of recording it.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F


def gumbel_softmax(logits, tau=1.0, hard=False, eps=1e-10, dim=-1):
    """F.gumbel_softmax: softmax of logits plus Gumbel noise (the softmax's output, which its
    backward reads, is then packed); ``hard``: the one-hot of the sample in forward, the soft
    sample's gradient in backward (straight through)."""
    if eps != 1e-10:
        warnings.warn("`eps` parameter is deprecated and has no effect.", stacklevel=3)
    exponential = torch.empty_like(logits, memory_format=torch.legacy_contiguous_format).exponential_()
    soft = ((logits + -exponential.log()) / tau).softmax(dim)
    if not hard:
        return soft
    one_hot = torch.zeros_like(logits, memory_format=torch.legacy_contiguous_format)
    one_hot = one_hot.scatter_(dim, soft.max(dim, keepdim=True)[1], 1.0)
    return one_hot - soft.detach() + soft


def local_response_norm(input, size, alpha=1e-4, beta=0.75, k=1.0):
    """F.local_response_norm (AlexNet's, GoogLeNet's LRN): ``input / (k + alpha * mean of squares
    over size channels) ** beta``; its square, pooling and division then meet their variants
    (as one call it kept its input and four intermediates exact, more than the layers around it
    held packed). PyTorch's 3-d branch pools with avg_pool2d; its 4-d+ one, taken here for every
    rank (a traced rank cannot choose a branch), gives the same windows and values."""
    sizes = input.size()
    div = input.mul(input).view(sizes[0], 1, sizes[1], sizes[2], -1)
    div = F.pad(div, (0, 0, 0, 0, size // 2, (size - 1) // 2))
    div = F.avg_pool3d(div, (size, 1, 1), stride=1).squeeze(1).view(sizes)
    div = div.mul(alpha).add(k).pow(beta)
    return input / div


TRACED_THROUGH = {F.gumbel_softmax: gumbel_softmax, F.local_response_norm: local_response_norm}
