"""Swin Transformer (Liu et al. 2021): attention inside local windows, shifted every other block.

Written from the paper: 4x4 patch embedding, stages of blocks on a [B, H, W, C] token grid,
window attention with a learned relative-position bias (hand-written: matmul -> softmax ->
matmul), cyclic shift by half a window with a mask so tokens only attend within their original
region, and patch merging (2x2 neighbours concatenated, then a Linear) between stages. Token
grid sizes are fixed at construction (like ViT's positional embedding), so every reshape has
constant sizes and torch.fx traces the whole model.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["SwinTransformer", "swin_t", "swin_tiny"]

_MASKED = -100.0  # added to attention scores across region borders (exp(-100) is 0 in fp32 softmax)


def _relative_position_index(window: int) -> torch.Tensor:
    """[w*w, w*w] index into the (2w-1)^2 table of relative offsets between two window positions."""
    coords = torch.stack(torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij")).flatten(1)
    rel = (coords[:, :, None] - coords[:, None, :]) + (window - 1)
    return rel[0] * (2 * window - 1) + rel[1]


def _shift_mask(height: int, width: int, window: int, shift: int) -> torch.Tensor:
    """[windows, w*w, w*w]: 0 within a region of the shifted grid, _MASKED across regions."""
    region = torch.zeros(height, width)
    cuts = (slice(0, -window), slice(-window, -shift), slice(-shift, None))
    label = 0
    for hs in cuts:
        for ws in cuts:
            region[hs, ws] = label
            label += 1
    windows = region.view(height // window, window, width // window, window).permute(0, 2, 1, 3)
    windows = windows.reshape(-1, window * window)
    different = windows[:, :, None] != windows[:, None, :]
    return torch.zeros(different.shape).masked_fill(different, _MASKED)


class WindowAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int, window: int, height: int, width: int, shift: int):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim ({dim}) must be divisible by num_heads ({num_heads})")
        self.num_heads, self.window, self.shift = num_heads, window, shift
        self.height, self.width, self.dim = height, width, dim
        self.scale = (dim // num_heads) ** -0.5
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window - 1) ** 2, num_heads))
        nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)
        self.register_buffer("relative_position_index", _relative_position_index(window), persistent=False)
        mask = _shift_mask(height, width, window, shift) if shift else None
        self.register_buffer("attn_mask", mask, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [B, H, W, C] -> [B, H, W, C]."""
        w, s, H, W, C = self.window, self.shift, self.height, self.width, self.dim
        n = w * w
        if s:
            x = torch.roll(x, shifts=(-s, -s), dims=(1, 2))
        windows = x.view(-1, H // w, w, W // w, w, C).permute(0, 1, 3, 2, 4, 5).reshape(-1, n, C)
        qkv = self.qkv(windows).view(-1, n, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        attn = (q * self.scale) @ k.transpose(-2, -1)  # [B * windows, heads, n, n]
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)]
        attn = attn + bias.view(n, n, -1).permute(2, 0, 1)
        if s:
            per_image = (H // w) * (W // w)
            attn = (attn.view(-1, per_image, self.num_heads, n, n) + self.attn_mask[None, :, None])
            attn = attn.view(-1, self.num_heads, n, n)
        out = (attn.softmax(dim=-1) @ v).transpose(1, 2).reshape(-1, n, C)
        out = self.proj(out)
        out = out.view(-1, H // w, W // w, w, w, C).permute(0, 1, 3, 2, 4, 5).reshape(-1, H, W, C)
        if s:
            out = torch.roll(out, shifts=(s, s), dims=(1, 2))
        return out


class SwinBlock(nn.Module):
    def __init__(self, dim: int, num_heads: int, window: int, height: int, width: int, shift: int, mlp_ratio=4.0):
        super().__init__()
        if min(height, width) <= window:  # one window covers the grid: no shift, window = grid
            window, shift = min(height, width), 0
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(dim, num_heads, window, height, width, shift)
        self.norm2 = nn.LayerNorm(dim)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class PatchMerging(nn.Module):
    """[B, H, W, C] -> [B, H/2, W/2, 2C]: each 2x2 neighbourhood concatenated, normalised, projected."""

    def __init__(self, dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(4 * dim)
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], dim=-1)
        return self.reduction(self.norm(x))


class SwinTransformer(nn.Module):
    """Input images must be exactly `image_size` square: window layouts are fixed at construction."""

    def __init__(self, image_size: int, patch_size: int, embed_dim: int, depths, num_heads, window: int,
                 num_classes: int = 1000):
        super().__init__()
        grid = image_size // patch_size
        sizes = [grid >> i for i in range(len(depths))]
        if image_size % patch_size or grid % 2 ** (len(depths) - 1) or any(
                s % window and s > window for s in sizes):
            raise ValueError(f"image_size {image_size} with patch {patch_size} gives token grids {sizes}: each must be "
                             f"a multiple of the window ({window}) or at most one window")
        self.patch_embed = nn.Conv2d(3, embed_dim, kernel_size=patch_size, stride=patch_size)
        self.patch_norm = nn.LayerNorm(embed_dim)
        stages = []
        dim = embed_dim
        for i, (depth, heads) in enumerate(zip(depths, num_heads)):
            size = sizes[i]
            blocks = [SwinBlock(dim, heads, window, size, size, shift=0 if j % 2 == 0 else window // 2)
                      for j in range(depth)]
            if i < len(depths) - 1:
                blocks.append(PatchMerging(dim))
            stages.append(nn.Sequential(*blocks))
            dim = dim * 2 if i < len(depths) - 1 else dim
        self.stages = nn.Sequential(*stages)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_norm(self.patch_embed(x).permute(0, 2, 3, 1))  # [B, H, W, C]
        x = self.norm(self.stages(x))
        return self.head(x.mean(dim=(1, 2)))


def swin_t(num_classes: int = 1000) -> SwinTransformer:
    """Swin-T: embed 96, depths 2-2-6-2, heads 3-6-12-24, window 7, 224px (28.3M)."""
    return SwinTransformer(224, 4, 96, (2, 2, 6, 2), (3, 6, 12, 24), 7, num_classes)


def swin_tiny(num_classes: int = 10) -> SwinTransformer:
    """32px, 2x2 patches, two stages (16x16 and 8x8 tokens), window 4: small enough for unit tests."""
    return SwinTransformer(32, 2, 32, (2, 2), (2, 4), 4, num_classes)
