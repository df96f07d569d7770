"""Benchmark 4: `ec2train fit` with its defaults vs a classic single-process training script.

The classic loop is written below the way the course starter script trains (fixed: it trains
on train/, validates under no_grad, counts images): torchvision ImageFolder, batch size 32,
no loader workers, fp32, every photo decoded at full size every epoch, the frozen backbone
left in train() mode (so its BatchNorm statistics drift to the new photos; fit keeps a frozen
backbone in eval mode, so its features stay those of the weights). Both train the same model (the same frozen backbone, a linear head)
for the same epochs, validate every epoch and test once: on 32 px images (fixed costs show: start-up,
TensorBoard, checkpoints, the test pass) and on ~1600x1200 photos (decoding dominates). Each run is
a fresh process, interleaved, on the idle box and beside --busy N CPU-spinning processes.

    python bench/bench_vs_script.py
    python bench/bench_vs_script.py --sets small --busy 3
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision
from _common import DEFAULT_ROOT, add_busy_option, big_data, compare_processes, pretrained_backbone
from torchvision import transforms as T


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


def small_data(root: Path = DEFAULT_ROOT) -> Path:
    """32 px images, as many as the big set: here decoding is cheap and fixed costs show."""
    from ec2train.data import make_demo_dataset

    return make_demo_dataset(root / "small32", classes=4, per_class=50, size=32, eval_per_class=25)


def arms(data: Path, weights: Path, image_size: int, epochs: int, out: Path, cache: bool) -> dict[str, list[str]]:
    py, me = sys.executable, str(Path(__file__).resolve())
    fit = [
        py,
        "-m",
        "ec2train",
        "fit",
        "--data",
        str(data),
        "--arch",
        "resnet18",
        "--weights",
        str(weights),
        "--image-size",
        str(image_size),
        "--epochs",
        str(epochs),
        "--logdir",
        str(out / "runs"),
        "--resume",
        "never",
    ]
    out_arms = {
        "classic script loop": [
            py,
            me,
            "--arm",
            "classic",
            "--data",
            str(data),
            "--weights",
            str(weights),
            "--image-size",
            str(image_size),
            "--epochs",
            str(epochs),
        ],
        "ec2train fit (defaults)": fit + ["--output", str(out / "fit")],
    }
    if cache:  # a fresh output folder each run: the feature cache is built inside the timed run
        cmd = fit + ["--cache-features", "--output", str(out / "cache")]
        out_arms["ec2train fit --cache-features"] = [
            "sh",
            "-c",
            f"rm -rf {shlex.quote(str(out / 'cache'))} && exec {shlex.join(cmd)}",
        ]
    return out_arms


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--image-size", type=int, default=None, help="[default: 112 on the photos, 32 on the small images]")
    ap.add_argument(
        "--epochs",
        type=int,
        default=None,
        help="[default: 8 on the small images, as issue 14 measured them; 3 on the photos]",
    )
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--sets", nargs="+", choices=("big", "small"), default=["small", "big"])
    add_busy_option(ap)
    ap.add_argument("--arm", choices=("classic",), help=argparse.SUPPRESS)
    ap.add_argument("--data", help=argparse.SUPPRESS)
    ap.add_argument("--weights", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.arm:
        print(json.dumps(classic_script(a.data, a.weights, a.image_size, a.epochs)))
        return
    weights = pretrained_backbone()
    for name in a.sets:
        data, size = (big_data(), a.image_size or 112) if name == "big" else (small_data(), a.image_size or 32)
        epochs = a.epochs or (3 if name == "big" else 8)
        print(
            f"\nec2train fit vs a classic script, resnet18 (frozen, from {weights.name}), {epochs} epochs, "
            f"--image-size {size}, {data}",
            flush=True,
        )
        out = DEFAULT_ROOT / "vs-script" / name
        shutil.rmtree(out, ignore_errors=True)
        compare_processes(
            arms(data, weights, size, epochs, out, cache=name == "big"),
            a.busy,
            a.rounds,
            baseline="classic script loop",
        )


if __name__ == "__main__":
    main()
