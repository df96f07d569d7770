"""Benchmark 4: `ec2train fit` with its defaults vs a classic single-process training script.

The classic loop is written below the way the course starter script trains (fixed: it trains
on train/, validates under no_grad, counts images): torchvision ImageFolder, batch size 32,
no loader workers, fp32, every photo decoded at full size every epoch, the frozen backbone
left in train() mode (so its BatchNorm statistics drift to the new photos; fit keeps a frozen
backbone in eval mode, so its features stay those of the weights). Both train the same model (the same frozen backbone, a linear head)
on the same ~1600x1200 photos for the same epochs, validate every epoch and test once.

    python bench/bench_vs_script.py
"""

from __future__ import annotations

import argparse
import shutil
import time

import torch
import torch.nn.functional as F
import torchvision
from torchvision import transforms as T

from _common import DEFAULT_ROOT, big_data, pretrained_backbone

from ec2train.config import resolve
from ec2train.loop import fit


def classic_script(data, weights, image_size: int, epochs: int, lr: float = 1e-3) -> dict:
    """The classic loop: what most hand-written training scripts do."""
    torch.manual_seed(0)
    state = torch.load(weights, weights_only=True)["state_dict"]
    model = torchvision.models.resnet18(num_classes=4)
    model.load_state_dict(state)
    for p in model.parameters():
        p.requires_grad = False
    model.fc = torch.nn.Linear(model.fc.in_features, 4)
    norm = T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    train_tf = T.Compose([T.RandomResizedCrop(image_size), T.RandomHorizontalFlip(), T.ToTensor(), norm])
    eval_tf = T.Compose([T.Resize(int(image_size / 0.875)), T.CenterCrop(image_size), T.ToTensor(), norm])
    train = torchvision.datasets.ImageFolder(f"{data}/train", train_tf)
    loaders = {
        split: torch.utils.data.DataLoader(torchvision.datasets.ImageFolder(f"{data}/{split}", eval_tf), batch_size=32)
        for split in ("valid", "test")
    }
    train_loader = torch.utils.data.DataLoader(train, batch_size=32, shuffle=True)
    optimizer = torch.optim.Adam(model.fc.parameters(), lr=lr)

    def accuracy(loader) -> float:
        model.eval()
        correct = total = 0
        with torch.no_grad():
            for x, y in loader:
                correct += (model(x).argmax(1) == y).sum().item()
                total += len(y)
        return correct / total

    valid = 0.0
    for _ in range(epochs):
        model.train()
        for x, y in train_loader:
            loss = F.cross_entropy(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        valid = accuracy(loaders["valid"])
    return {"valid_acc1": valid, "test_acc1": accuracy(loaders["test"])}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--image-size", type=int, default=112)
    ap.add_argument("--epochs", type=int, default=3)
    a = ap.parse_args()
    data = big_data()
    weights = pretrained_backbone()
    print(f"benchmark 4: ec2train fit vs a classic script, resnet18 (frozen, from {weights.name}), "
          f"{a.epochs} epochs, --image-size {a.image_size}, {data}")
    t0 = time.perf_counter()
    m = classic_script(data, weights, a.image_size, a.epochs)
    t_classic = time.perf_counter() - t0
    print(f"  {'classic script loop':<34} {t_classic:7.1f} s  valid acc {m['valid_acc1']:.3f}  test acc {m['test_acc1']:.3f}")
    times = {}
    for name, extra in (("ec2train fit (defaults)", {}), ("ec2train fit --cache-features", {"cache_features": True})):
        out = DEFAULT_ROOT / "runs" / ("vs-cache" if extra else "vs-default")
        cfg = resolve(data=str(data), output=str(out), logdir=str(DEFAULT_ROOT / "runs" / "tb"), arch="resnet18",
                      weights=str(weights), image_size=a.image_size, epochs=a.epochs, resume="never", **extra)
        assert cfg.frozen  # fit's default with starting weights: the backbone stays frozen, as in the script
        shutil.rmtree(out, ignore_errors=True)  # a cold start: no feature cache from earlier runs
        t0 = time.perf_counter()
        r = fit(cfg)
        times[name] = time.perf_counter() - t0
        print(f"  {name:<34} {times[name]:7.1f} s  valid acc {r.metrics['valid_acc1']:.3f}  test acc {r.metrics['test_acc1']:.3f}")
    ratios = ", ".join(f"{name}: {t_classic / t:.1f}x" for name, t in times.items())
    print(f"RESULT vs classic script: {ratios} faster")


if __name__ == "__main__":
    main()
