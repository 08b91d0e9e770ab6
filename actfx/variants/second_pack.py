"""A second pack of a normalised input, for normalisations over few values per row.

Training backward of BatchNorm, GroupNorm, InstanceNorm, LayerNorm and RMSNorm reads x̂ twice, in
``x̂_i mean_j(g_j x̂_j)``. From one pack, element i's rounding meets itself in the mean and biases
the product by ``g_i var_i / M``, M the values per normalised row (2 bits: the mean of 1024
input gradients stayed 3.6% off for BatchNorm at M = 16, 8.6% for InstanceNorm at M = 4, 6.3%
for GroupNorm at M = 8, 4.9% for LayerNorm over 16 features; about 0.8% per LayerNorm at 128).
Below ``SECOND_PACK_BELOW`` values per row, a second pack of x̂, rounded independently on the
same grid, gives ``(x̂ - x̂')^2 / 2``: an unbiased estimate of each element's rounding variance, which backward
adds back, ``rstd g_i var_i / M``. Both packs share one grid, so the estimate is 0 or half a step
squared (bounded). It costs variance: EfficientNet-B0 at 64 px, batch 4, 2 bits, one step's
error is 4.1x the gradient's norm against 2.6x from one pack, whose mean of 32 steps stayed at
0.58x (a bias of about 0.36x the norm) where the corrected one reached 0.70x = 4.1/sqrt(32).
"""

from __future__ import annotations

import torch

# Rows of fewer values get the second pack. Why above ``rules.DILUTION_MIN``: the O(1/M) bias
# adds up over a network's norms; a 2-layer BERT of width 128 (M = 128, one pack) kept its
# embeddings' mean-of-128 two-bit gradient 1.7% of the norm off (0.16 of one step's error
# against the 0.088 of 1/sqrt(128)). Widths of 512 and more (BERT-base, GPT-2) keep one pack:
# 0.2% or less per norm.
SECOND_PACK_BELOW = 512


def copy_for_small_rows(xhat, rows: int, x):
    """x̂ again (to be packed on its own) where ``rows`` normalised rows hold fewer than
    ``SECOND_PACK_BELOW`` values each and the input ``x`` wants a gradient (the term is in its
    gradient only), else None (nothing is packed)."""
    if xhat is None or not x.requires_grad or rows == 0 or xhat.numel() // rows >= SECOND_PACK_BELOW:
        return None
    return xhat.view_as(xhat)  # another tensor object: torch.compile refuses one tensor passed twice


def add_rounding_variance(gx: torch.Tensor, weighted_grad: torch.Tensor, xhat: torch.Tensor, copy: torch.Tensor,
                          scale) -> torch.Tensor:
    """``gx + weighted_grad * (x̂ - x̂')^2 / 2 * scale`` in fp32, returned in gx's dtype: the
    diagonal term's rounding variance given back. ``weighted_grad`` is the output's gradient
    times the weight; ``scale`` is rstd / M per row, shaped to broadcast over x̂."""
    variance = (xhat.float() - copy.float()).square_().mul_(0.5)  # unbiased for each element's
    return (gx.float() + weighted_grad.float() * variance * scale).to(gx.dtype)
