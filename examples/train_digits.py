"""Does a model trained on compressed activations learn as well? fp32 against actfx at 1, 2 and 4 bits.

    pip install scikit-learn          # ships the dataset; nothing is downloaded
    python examples/train_digits.py [--seeds 0 1 2] [--epochs 20] [--bits 1 2 4] [--json out.json]
    python examples/train_digits.py --bits 2 --plan 0.5    # also actfx.plan at half of 2-bit's bytes

The data is the UCI handwritten digits set bundled inside scikit-learn (1,797 8x8 grey images,
10 classes), split 80/20 with a fixed, stratified split. A small conv net with BatchNorm trains
from the same initialisation and on the same batches under every setting, so the settings differ
only by the noise in their gradients. Prints final test accuracy and losses, mean and spread
over the seeds.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys

import torch
import torch.nn.functional as F
from torch import nn

import actfx


def load_data(seed: int = 0):
    """(x_train, y_train, x_test, y_test) as tensors, images standardised to zero mean, unit std."""
    try:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
    except ImportError:
        print("This example needs scikit-learn, which ships the digits data set: pip install scikit-learn",
              file=sys.stderr)
        sys.exit(2)
    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1)
    y = torch.tensor(digits.target)
    idx_train, idx_test = train_test_split(torch.arange(len(y)).numpy(), test_size=0.2, random_state=seed,
                                           stratify=y.numpy())
    x_train, x_test = x[idx_train], x[idx_test]
    mean, std = x_train.mean(), x_train.std()
    return (x_train - mean) / std, y[idx_train], (x_test - mean) / std, y[idx_test]


def small_cnn(num_classes: int = 10) -> nn.Module:
    def block(cin, cout):
        return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]

    return nn.Sequential(*block(1, 32), *block(32, 32), nn.MaxPool2d(2), *block(32, 64),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, num_classes))


def train(bits, seed: int, data, epochs: int, batch: int, lr: float) -> dict:
    """``bits``: None (fp32), a width, or an ``actfx.Plan`` (made for the same architecture)."""
    x_train, y_train, x_test, y_test = data
    torch.manual_seed(seed)
    model = small_cnn()
    if bits is None:
        run = model
    elif isinstance(bits, actfx.Plan):
        run = actfx.convert(model, plan=bits)
    else:
        run = actfx.convert(model, bits=bits)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)
    steps = epochs * ((len(x_train) + batch - 1) // batch)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    order = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        run.train()
        losses = []
        for idx in torch.randperm(len(x_train), generator=order).split(batch):
            loss = F.cross_entropy(run(x_train[idx]), y_train[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            losses.append(loss.item())
    model.eval()
    with torch.no_grad():
        logits = model(x_test)
    return {"train_loss": statistics.mean(losses),  # last epoch
            "test_loss": F.cross_entropy(logits, y_test).item(),
            "test_acc": (logits.argmax(1) == y_test).float().mean().item()}


def make_plan(data, fraction: float, batch: int) -> actfx.Plan:
    """A plan for the training batch holding ``fraction`` of what uniform 2-bit holds, calibrated
    on one training batch at initialisation (seed 0)."""
    from actfx.accounting import count_saved

    x_train, y_train, _, _ = data
    torch.manual_seed(0)
    model = small_cnn()
    x, y = x_train[:batch], y_train[:batch]
    uniform = actfx.convert(model, bits=2)
    with count_saved(uniform) as saved:
        out = uniform(x)  # held until the count closes
    del out
    return actfx.plan(model, x, activation_budget=int(fraction * saved.activation_bytes),
                      loss_fn=lambda out: F.cross_entropy(out, y))


def _mean_std(values) -> str:
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.4f} ± {std:.4f}"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bits", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (default 1: 8x8 images are too small to split across cores)")
    p.add_argument("--plan", type=float, metavar="F",
                   help="also train with actfx.plan at F times the bytes uniform 2-bit holds")
    p.add_argument("--json", metavar="PATH")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    data = load_data()
    print(f"digits: {len(data[1])} train / {len(data[3])} test images; {args.epochs} epochs, seeds {args.seeds}")
    results = {}
    settings = [None, *args.bits]
    if args.plan is not None:
        plan = make_plan(data, args.plan, args.batch)
        print(f"plan at {args.plan:g}x uniform 2-bit's bytes: average {plan.average_bits:.2f} bits, "
              f"{plan.activation_bytes} bytes held at batch {args.batch}")
        settings.append(plan)
    for bits in settings:
        name = "fp32" if bits is None else f"actfx plan {bits.average_bits:.2f}-bit" \
            if isinstance(bits, actfx.Plan) else f"actfx {bits}-bit"
        results[name] = [train(bits, seed, data, args.epochs, args.batch, args.lr) for seed in args.seeds]
        runs = results[name]
        print(f"{name:>12}: test acc {_mean_std([r['test_acc'] for r in runs])}  "
              f"test loss {_mean_std([r['test_loss'] for r in runs])}  "
              f"last-epoch train loss {_mean_std([r['train_loss'] for r in runs])}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "results": results}, f, indent=2)


if __name__ == "__main__":
    main()
