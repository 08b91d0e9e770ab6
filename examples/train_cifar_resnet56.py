"""Train a CIFAR ResNet-56 (He et al. 2015) in fp32 or with actfx-compressed activations.

    python examples/train_cifar_resnet56.py --data ~/data/cifar-10-batches-py --bits 2
    python examples/train_cifar_resnet56.py --data ~/data/cifar-100-python --bits 32   # fp32 baseline

--data is a folder with the standard "python version" pickles as distributed by the CIFAR authors
(CIFAR-10: data_batch_1..5 and test_batch; CIFAR-100: train and test), or a folder containing
cifar-10-batches-py / cifar-100-python. Nothing is downloaded. The recipe is the paper's: SGD with
momentum 0.9, weight decay 1e-4, batch 128, lr 0.1 divided by 10 at 50% and 75% of training,
random crops from 4-pixel padding and horizontal flips.
"""

from __future__ import annotations

import argparse
import json
import pickle
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import actfx
from actfx.models import resnet56

_CIFAR10 = ("data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5"), "test_batch", b"labels"
_CIFAR100 = ("train",), "test", b"fine_labels"


def find_cifar(root: Path) -> tuple[Path, tuple]:
    """The folder holding the pickles and which layout it has; SystemExit with a clear message if none."""
    for folder in (root, root / "cifar-10-batches-py", root / "cifar-100-python"):
        if (folder / "data_batch_1").is_file() and (folder / "test_batch").is_file():
            return folder, _CIFAR10
        if (folder / "train").is_file() and (folder / "test").is_file():
            return folder, _CIFAR100
    sys.exit(
        f"no CIFAR data under {root}: expected the python-version pickles, i.e. data_batch_1..5 + test_batch "
        f"(CIFAR-10, folder cifar-10-batches-py) or train + test (CIFAR-100, folder cifar-100-python). "
        f"This script never downloads; fetch and extract cifar-10-python.tar.gz or cifar-100-python.tar.gz "
        f"yourself and pass the folder with --data."
    )


def _read(path: Path, label_key: bytes) -> tuple[torch.Tensor, torch.Tensor]:
    with open(path, "rb") as f:
        batch = pickle.load(f, encoding="bytes")
    images = torch.as_tensor(batch[b"data"], dtype=torch.uint8).view(-1, 3, 32, 32)
    return images, torch.as_tensor(batch[label_key], dtype=torch.long)


def load_cifar(root: Path):
    """(x_train uint8 [N,3,32,32], y_train, x_test, y_test, num_classes)."""
    folder, (train_files, test_file, label_key) = find_cifar(root)
    parts = [_read(folder / name, label_key) for name in train_files]
    x_train, y_train = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
    x_test, y_test = _read(folder / test_file, label_key)
    return x_train, y_train, x_test, y_test, 100 if label_key == b"fine_labels" else 10


def augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random 32x32 crops of the 4-pixel zero-padded images, and random horizontal flips."""
    n = x.shape[0]
    padded = F.pad(x, (4, 4, 4, 4))
    dy = torch.randint(0, 9, (n, 1), generator=gen).to(x.device)
    dx = torch.randint(0, 9, (n, 1), generator=gen).to(x.device)
    ar = torch.arange(32, device=x.device)
    rows, cols = (dy + ar)[:, :, None], (dx + ar)[:, None, :]
    flip = (torch.rand(n, generator=gen) < 0.5).to(x.device)[:, None, None]
    cols = torch.where(flip, cols.flip(-1), cols)
    out = padded[torch.arange(n, device=x.device)[:, None, None], :, rows, cols]  # [n, 32, 32, c]
    return out.permute(0, 3, 1, 2)


def evaluate(model, x, y, mean, std, batch: int = 1000) -> tuple[float, float]:
    model.eval()
    loss, correct = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(x), batch):
            logits = model((x[i:i + batch].float() / 255 - mean) / std)
            loss += F.cross_entropy(logits, y[i:i + batch], reduction="sum").item()
            correct += (logits.argmax(1) == y[i:i + batch]).sum().item()
    model.train()
    return loss / len(x), correct / len(x)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, required=True, help="folder with the CIFAR-10/100 python pickles")
    p.add_argument("--bits", type=int, default=2, choices=[1, 2, 4, 8, 32], help="32 = plain fp32, no actfx")
    p.add_argument("--epochs", type=int, default=160)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--subset", type=int, help="train on the first N images only (smoke runs)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--json", metavar="PATH", help="write the per-epoch history")
    args = p.parse_args(argv)

    x_train, y_train, x_test, y_test, classes = load_cifar(args.data.expanduser())
    if args.subset:
        x_train, y_train = x_train[: args.subset], y_train[: args.subset]
    device = torch.device(args.device)
    x_train, y_train, x_test, y_test = (t.to(device) for t in (x_train, y_train, x_test, y_test))
    scaled = x_train.float() / 255
    mean, std = scaled.mean((0, 2, 3), keepdim=True), scaled.std((0, 2, 3), keepdim=True)
    del scaled

    torch.manual_seed(args.seed)
    model = resnet56(num_classes=classes).to(device)
    run = model if args.bits == 32 else actfx.convert(model, bits=args.bits)
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, [args.epochs // 2, args.epochs * 3 // 4], 0.1)
    gen = torch.Generator().manual_seed(args.seed)
    label = "fp32" if args.bits == 32 else f"actfx {args.bits}-bit"
    print(f"ResNet-56, {classes} classes, {len(x_train)} train / {len(x_test)} test images, {label}, {device}")
    history = []
    for epoch in range(args.epochs):
        t0, total, seen = time.perf_counter(), 0.0, 0
        for idx in torch.randperm(len(x_train), generator=gen).split(args.batch):
            idx = idx.to(device)
            images = (augment(x_train[idx], gen).float() / 255 - mean) / std
            loss = F.cross_entropy(run(images), y_train[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total, seen = total + loss.item() * len(idx), seen + len(idx)
        sched.step()
        test_loss, test_acc = evaluate(model, x_test, y_test, mean, std)
        history.append({"epoch": epoch + 1, "train_loss": total / seen, "test_loss": test_loss, "test_acc": test_acc,
                        "seconds": time.perf_counter() - t0})
        print(f"epoch {epoch + 1:3d}: train loss {total / seen:.4f}  test loss {test_loss:.4f}  "
              f"test acc {test_acc:.4f}  ({history[-1]['seconds']:.0f} s)", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": {k: str(v) for k, v in vars(args).items()}, "history": history}, f, indent=2)


if __name__ == "__main__":
    main()
