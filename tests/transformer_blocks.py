"""Transformer blocks written the ways people write them, for the transformer conversion tests."""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

DIM, HEADS, SEQ, BATCH = 64, 4, 32, 4


class GPTBlock(nn.Module):
    """Pre-norm block: LayerNorm, fused qkv, causal SDPA with dropout, GELU(tanh) MLP."""

    def __init__(self):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(DIM), nn.LayerNorm(DIM)
        self.qkv, self.proj = nn.Linear(DIM, 3 * DIM), nn.Linear(DIM, DIM)
        self.fc, self.out = nn.Linear(DIM, 4 * DIM), nn.Linear(4 * DIM, DIM)
        self.drop = nn.Dropout(0.1)

    def forward(self, x):
        b, t, c = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(c, dim=2)
        q, k, v = (z.view(b, t, HEADS, c // HEADS).transpose(1, 2) for z in (q, k, v))
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=0.1 if self.training else 0.0)
        x = x + self.drop(self.proj(a.transpose(1, 2).reshape(b, t, c)))
        return x + self.drop(self.out(F.gelu(self.fc(self.ln2(x)), approximate="tanh")))


def rotate_half(x):
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2 :]
    return torch.cat((-x2, x1), dim=-1)


class LlamaBlock(nn.Module):
    """Hand-written RMSNorm, rotary embeddings on slices, SwiGLU MLP, causal SDPA, no biases."""

    def __init__(self):
        super().__init__()
        self.w1, self.w2 = nn.Parameter(torch.ones(DIM)), nn.Parameter(torch.ones(DIM))
        self.q, self.k, self.v, self.o = (nn.Linear(DIM, DIM, bias=False) for _ in range(4))
        self.gate, self.up = nn.Linear(DIM, 2 * DIM, bias=False), nn.Linear(DIM, 2 * DIM, bias=False)
        self.down = nn.Linear(2 * DIM, DIM, bias=False)
        inv = 1.0 / (10000 ** (torch.arange(0, DIM // HEADS, 2).float() / (DIM // HEADS)))
        angles = torch.outer(torch.arange(SEQ).float(), inv)
        self.register_buffer("cos", torch.cat([angles.cos()] * 2, -1), persistent=False)
        self.register_buffer("sin", torch.cat([angles.sin()] * 2, -1), persistent=False)

    @staticmethod
    def rms(x, w):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * w

    def forward(self, x):
        b, t, c = x.shape
        h = self.rms(x, self.w1)
        q, k, v = (p(h).view(b, t, HEADS, c // HEADS).transpose(1, 2) for p in (self.q, self.k, self.v))
        q = q * self.cos + rotate_half(q) * self.sin
        k = k * self.cos + rotate_half(k) * self.sin
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.o(a.transpose(1, 2).reshape(b, t, c))
        h = self.rms(x, self.w2)
        return x + self.down(F.silu(self.gate(h)) * self.up(h))


class BertBlock(nn.Module):
    """Post-norm block with hand-written attention: matmul -> masked softmax -> dropout -> matmul."""

    def __init__(self):
        super().__init__()
        self.qkv, self.proj = nn.Linear(DIM, 3 * DIM), nn.Linear(DIM, DIM)
        self.ln1, self.ln2 = nn.LayerNorm(DIM), nn.LayerNorm(DIM)
        self.fc, self.out = nn.Linear(DIM, 4 * DIM), nn.Linear(4 * DIM, DIM)
        self.drop = nn.Dropout(0.1)

    def forward(self, x, mask):
        b, t, c = x.shape
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        q, k, v = (z.reshape(b, t, HEADS, c // HEADS).permute(0, 2, 1, 3) for z in (q, k, v))
        scores = q @ k.transpose(-2, -1) / math.sqrt(c // HEADS)
        scores = scores.masked_fill(mask, float("-inf"))
        attn = self.drop(torch.softmax(scores, dim=-1))
        a = (attn @ v).permute(0, 2, 1, 3).reshape(b, t, c)
        x = self.ln1(x + self.drop(self.proj(a)))
        return self.ln2(x + self.drop(self.out(F.gelu(self.fc(x)))))


class TorchEncoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.layer = nn.TransformerEncoderLayer(DIM, HEADS, 4 * DIM, dropout=0.1, batch_first=True)

    def forward(self, x):
        return self.layer(x)


class TorchMHA(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = nn.MultiheadAttention(DIM, HEADS, dropout=0.1, batch_first=True)
        self.norm = nn.LayerNorm(DIM)

    def forward(self, x):
        h = self.norm(x)
        out, _ = self.attn(h, h, h, need_weights=False)
        return x + out


def example(name):
    torch.manual_seed(0)
    x = torch.randn(BATCH, SEQ, DIM)
    if name == "bert":
        mask = torch.zeros(BATCH, 1, SEQ, SEQ, dtype=torch.bool)
        mask[..., -3:] = True
        return BertBlock(), (x, mask)
    return {"gpt": GPTBlock, "llama": LlamaBlock, "torch_encoder": TorchEncoder, "mha": TorchMHA}[name](), (x,)


BLOCKS = ["gpt", "llama", "bert", "torch_encoder", "mha"]
