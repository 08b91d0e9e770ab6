"""Training parity of a small character-level GPT: fp32 vs actfx at several settings.

The corpus is real text that ships with Python (the source of a few standard-library modules),
so nothing is downloaded. Prints final validation loss per setting; the defaults for attention
bits in ``actfx.Config`` were chosen from this table.

    python benchmarks/lm_parity.py [--steps 400] [--seeds 3] [--layers 3]
"""

from __future__ import annotations

import argparse
import inspect
import time

import torch
import torch.nn.functional as F

import actfx
from actfx.models.gpt import GPT, GPTConfig


def corpus() -> torch.Tensor:
    import argparse as a, collections as c, inspect as i, typing as t  # noqa: E401

    text = "".join(inspect.getsource(m) for m in (a, c, i, t))
    return torch.tensor(list(text.encode("utf-8")), dtype=torch.long)


def batches(data, batch, seq, generator):
    idx = torch.randint(0, data.numel() - seq - 1, (batch,), generator=generator)
    x = torch.stack([data[j : j + seq] for j in idx])
    y = torch.stack([data[j + 1 : j + seq + 1] for j in idx])
    return x, y


def train(config: actfx.Config | None, steps: int, seed: int, batch=16, seq=64, layers=3) -> float:
    data = corpus()
    split = int(0.9 * data.numel())
    train_data, val_data = data[:split], data[split:]
    torch.manual_seed(seed)
    model = GPT(GPTConfig(vocab_size=256, n_positions=seq, n_layer=layers, n_head=4, n_embd=128, dropout=0.0))
    if config is not None:
        model = actfx.convert(model, config=config)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(steps):
        x, y = batches(train_data, batch, seq, gen)
        loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    model.eval()
    gen = torch.Generator().manual_seed(1234)
    with torch.no_grad():
        losses = [F.cross_entropy(model(x).flatten(0, 1), y.flatten()).item()
                  for x, y in (batches(val_data, 32, seq, gen) for _ in range(8))]
    return sum(losses) / len(losses)


SETTINGS = {
    "fp32": None,
    "actfx 2-bit (default: attention 8-bit)": actfx.Config(bits=2),
    "actfx 2-bit, attention 4-bit": actfx.Config(
        bits=2, op_bits={"sdpa": 4, "attention": 4, "softmax": 4, "matmul": 4}),
    "actfx 2-bit everywhere": actfx.Config(bits=2, op_bits={}),
    "actfx 4-bit": actfx.Config(bits=4),
    "actfx 8-bit": actfx.Config(bits=8),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--layers", type=int, default=3)
    args = parser.parse_args()
    print(f"{'setting':42s} {'val loss (mean over seeds)':>28s} {'per seed':>24s} {'time':>8s}")
    for name, config in SETTINGS.items():
        t = time.perf_counter()
        losses = [train(config, args.steps, seed, layers=args.layers) for seed in range(args.seeds)]
        per_seed = " ".join(f"{v:.3f}" for v in losses)
        print(f"{name:42s} {sum(losses) / len(losses):28.4f} {per_seed:>24s} {time.perf_counter() - t:7.1f}s")


if __name__ == "__main__":
    main()
