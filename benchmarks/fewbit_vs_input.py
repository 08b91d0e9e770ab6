"""GELU / SiLU backward from a packed input vs from a packed derivative (fewbit-style).

Both store 2-bit codes of one tensor per activation (same memory). Packing the input and
recomputing evaluates the derivative at a quantized point (biased: the derivative is
non-linear); packing the derivative itself keeps the gradient linear in what is stored
(unbiased). Prints single-sample error and the error of the mean of K samples for each.

    python benchmarks/fewbit_vs_input.py [--bits 2] [--k 64]
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

import actfx


def derivative(fn, x):
    x = x.detach().requires_grad_(True)
    (d,) = torch.autograd.grad(fn(x).sum(), x)
    return d


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bits", type=int, default=2)
    parser.add_argument("--k", type=int, default=64)
    parser.add_argument("--numel", type=int, default=1 << 18)
    args = parser.parse_args()
    torch.manual_seed(0)
    x = torch.randn(args.numel) * 1.5
    g = torch.randn(args.numel)
    print(f"{'op':14s} {'stored':12s} {'1-sample err':>13s} {f'mean of {args.k} err':>16s}")
    for name, fn in (("gelu", F.gelu), ("gelu_tanh", lambda t: F.gelu(t, approximate="tanh")), ("silu", F.silu)):
        exact = g * derivative(fn, x)
        d = derivative(fn, x)
        for stored in ("input", "derivative"):
            samples = []
            for k in range(args.k):
                if stored == "input":
                    samples.append(g * derivative(fn, actfx.pack(x, args.bits, seed=k).unpack()))
                else:
                    samples.append(g * actfx.pack(d, args.bits, seed=k).unpack())
            one = ((samples[0] - exact).norm() / exact.norm()).item()
            mean = ((torch.stack(samples).mean(0) - exact).norm() / exact.norm()).item()
            print(f"{name:14s} {stored:12s} {one:13.4f} {mean:16.4f}")


if __name__ == "__main__":
    main()
