"""How good are actfx's gradients? Bias and variance per layer against the exact gradient.

    python benchmarks/gradient_quality.py                     # ResNet-56 (CIFAR), batch 128, bits 1 2 4 8, K=16
    python benchmarks/gradient_quality.py --model resnet50 --batch 4 --bits 2 8 --samples 8 --json out.json

Definitions (the same on every line printed). For one fixed batch and fixed parameters:

* g: the exact gradient (plain PyTorch; BatchNorm in training mode, as in a real step) on a
  random N(0, 1) batch with random labels, at initialisation (nothing is downloaded; ActNN
  measured a network in training on real CIFAR images, so expect the same order, not the same digits);
* g_1..g_K: gradients of the converted model on the same batch, each with fresh rounding noise
  (the forward is identical; only what backward reads differs), and m = (g_1 + ... + g_K) / K;
* bias     = ||m - g|| / ||g||
* variance = sum_k ||g_k - m||^2 / (K - 1) / ||g||^2   (unbiased sample variance, relative)
* rel. error of one sample = sqrt(mean_k ||g_k - g||^2) / ||g||

per layer (the parameters a module owns directly) and overall (all parameters as one vector).
Because E||m - g||^2 = ||E[g_k] - g||^2 + variance * ||g||^2 / K, a finite K leaves a noise floor
of sqrt(variance / K) in the measured bias; "bias (debiased)" subtracts it. ActNN (Chen et al.,
2021) reports bias 0.039 and variance 0.077 for ResNet-56 at its L3 level; its exact
normalisation may differ from the one above, so compare orders of magnitude.

The K-curve reports ||mean of the first K samples - g|| / ||g|| for K = 1, 2, 4, ...: unbiased
gradients fall like 1/sqrt(K) (slope -0.5 on log-log axes) until they meet the bias.
"""

from __future__ import annotations

import argparse
import json
import math

import torch
import torch.nn.functional as F
from rich.console import Console
from rich.table import Table

import actfx
from actfx.models import build_model, get_model_spec

_DATA_SEED = 1234  # re-applied before every forward so dropout (if any) draws the same masks


def layer_params(model: torch.nn.Module) -> dict[str, list[torch.nn.Parameter]]:
    """Parameters grouped by the module owning them directly; shared (tied) parameters once."""
    seen, out = set(), {}
    for name, module in model.named_modules():
        params = [p for p in module.parameters(recurse=False) if p.requires_grad and id(p) not in seen]
        seen.update(id(p) for p in params)
        if params:
            out[name or "<root>"] = params
    return out


def gradient(model: torch.nn.Module, layers: dict, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
    """One float64 vector per layer: d loss / d parameters on (x, y)."""
    model.zero_grad(set_to_none=True)
    torch.manual_seed(_DATA_SEED)
    out = model(x)
    F.cross_entropy(out.flatten(0, -2).float(), y.flatten()).backward()
    grads = {}
    for name, params in layers.items():
        parts = [torch.zeros(p.numel(), dtype=torch.float64) if p.grad is None else p.grad.reshape(-1).double()
                 for p in params]
        grads[name] = torch.cat(parts)
    model.zero_grad(set_to_none=True)
    return grads


class Moments:
    """Streaming sums over K gradient samples: enough for bias, variance and the K-curve."""

    def __init__(self, exact: dict[str, torch.Tensor]) -> None:
        self.exact = exact
        self.sum = {k: torch.zeros_like(v) for k, v in exact.items()}
        self.sq_dev = {k: 0.0 for k in exact}  # sum_k ||g_k - g||^2
        self.sq = {k: 0.0 for k in exact}  # sum_k ||g_k||^2
        self.count = 0
        self.curve: list[tuple[int, float]] = []

    def add(self, sample: dict[str, torch.Tensor]) -> None:
        self.count += 1
        for k, v in sample.items():
            self.sum[k] += v
            self.sq_dev[k] += float((v - self.exact[k]).square().sum())
            self.sq[k] += float(v.square().sum())
        if self.count & (self.count - 1) == 0:  # K = 1, 2, 4, 8, ...
            err = sum(float((self.sum[k] / self.count - self.exact[k]).square().sum()) for k in self.exact)
            self.curve.append((self.count, math.sqrt(err / self._norm2(self.exact))))

    @staticmethod
    def _norm2(vectors) -> float:
        return sum(float(v.square().sum()) for v in vectors.values()) if isinstance(vectors, dict) else vectors

    def stats(self, keys=None) -> dict:
        """bias, variance, noise floor, debiased bias, one-sample error over `keys` (all by default)."""
        keys = list(self.exact) if keys is None else keys
        K = self.count
        g2 = sum(float(self.exact[k].square().sum()) for k in keys)
        if g2 == 0.0:
            return {"grad_norm": 0.0}
        mean_dev2 = sum(float((self.sum[k] / K - self.exact[k]).square().sum()) for k in keys)
        mean2 = sum(float((self.sum[k] / K).square().sum()) for k in keys)
        spread = sum(self.sq[k] for k in keys) - K * mean2  # sum_k ||g_k - m||^2
        variance = max(spread, 0.0) / max(K - 1, 1) / g2
        bias = math.sqrt(mean_dev2 / g2)
        return {
            "grad_norm": math.sqrt(g2), "bias": bias, "variance": variance,
            "noise_floor": math.sqrt(variance / K), "bias_debiased": math.sqrt(max(bias**2 - variance / K, 0.0)),
            "rel_error": math.sqrt(sum(self.sq_dev[k] for k in keys) / K / g2),
        }


def curve_slope(curve: list[tuple[int, float]]) -> float | None:
    """Least-squares slope of log(error) against log(K); -0.5 for unbiased noise."""
    pts = [(math.log(k), math.log(e)) for k, e in curve if e > 0]
    if len(pts) < 2:
        return None
    mx = sum(p[0] for p in pts) / len(pts)
    my = sum(p[1] for p in pts) / len(pts)
    return sum((a - mx) * (b - my) for a, b in pts) / sum((a - mx) ** 2 for a, _ in pts)


def measure(model_name: str, batch: int, bits_list, samples: int, *, seed: int = 0) -> dict:
    """Exact gradient once, then `samples` compressed gradients per bits; per-layer and overall stats."""
    torch.manual_seed(seed)
    model = build_model(model_name)
    spec = get_model_spec(model_name)
    gen = torch.Generator().manual_seed(seed)
    x = spec.example_input(batch, generator=gen)
    with torch.no_grad():
        out = model(x)
    y = torch.randint(out.shape[-1], out.shape[:-1], generator=gen)
    layers = layer_params(model)
    exact = gradient(model, layers, x, y)
    results = {}
    for bits in bits_list:
        converted = actfx.convert(model, bits=bits)
        moments = Moments(exact)
        for _ in range(samples):
            moments.add(gradient(converted, layers, x, y))
        results[bits] = {
            "overall": moments.stats(), "curve": moments.curve, "curve_slope": curve_slope(moments.curve),
            "layers": {name: moments.stats([name]) for name in layers},
        }
    return {"model": model_name, "batch": batch, "samples": samples, "input_shape": list(x.shape), "bits": results}


def render(result: dict, layer_bits: int | None, console: Console) -> None:
    overall = Table(title=f"{result['model']}, batch {result['batch']}, K={result['samples']} samples: "
                          "compressed vs exact gradient (relative to ||g||)")
    for col in ("bits", "bias", "noise floor", "bias (debiased)", "variance", "1-sample rel. error",
                "K-curve slope"):
        overall.add_column(col, justify="right")
    for bits, r in result["bits"].items():
        o = r["overall"]
        slope = "-" if r["curve_slope"] is None else f"{r['curve_slope']:.2f}"
        overall.add_row(str(bits), f"{o['bias']:.4f}", f"{o['noise_floor']:.4f}", f"{o['bias_debiased']:.4f}",
                        f"{o['variance']:.4f}", f"{o['rel_error']:.4f}", slope)
    console.print(overall)
    for bits, r in result["bits"].items():
        console.print(f"bits={bits} K-curve: " + ", ".join(f"K={k}: {e:.4f}" for k, e in r["curve"]))
    if layer_bits in result["bits"]:
        table = Table(title=f"per layer at bits={layer_bits}")
        for col in ("layer", "||g||", "bias", "bias (debiased)", "variance"):
            table.add_column(col, justify="left" if col == "layer" else "right")
        for name, s in result["bits"][layer_bits]["layers"].items():
            if "bias" not in s:
                table.add_row(name, "0", "-", "-", "-")
                continue
            table.add_row(name, f"{s['grad_norm']:.3g}", f"{s['bias']:.4f}", f"{s['bias_debiased']:.4f}",
                          f"{s['variance']:.4f}")
        console.print(table)
    console.print("bias = ||mean_k g_k - g|| / ||g||; variance = sum_k ||g_k - mean||^2 / (K-1) / ||g||^2; "
                  "noise floor = sqrt(variance / K); debiased = sqrt(max(bias^2 - variance / K, 0)); "
                  "1-sample rel. error = sqrt(mean_k ||g_k - g||^2) / ||g||.")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="resnet56")
    p.add_argument("--batch", type=int, default=128, help="128 as in ActNN's CIFAR experiments")
    p.add_argument("--bits", type=int, nargs="+", default=[1, 2, 4, 8])
    p.add_argument("--samples", type=int, default=16, help="compressed gradients per bits (K)")
    p.add_argument("--layer-bits", type=int, default=2, help="print the per-layer table for this width")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's choice)")
    p.add_argument("--json", metavar="PATH")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.samples < 2:
        p.error("--samples must be at least 2 (variance needs two samples)")
    result = measure(args.model, args.batch, args.bits, args.samples, seed=args.seed)
    render(result, args.layer_bits, Console(width=max(Console().width, 120)))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
