"""`ec2train fit` at its defaults vs torchvision's reference classification recipe, on the CPU.

The reference is pytorch/vision `references/classification/train.py`, run as
`train.py --model resnet18 --device cpu -b 32 --epochs 3 -j 1 --train-crop-size 64
--val-crop-size 64 --val-resize-size 73` (no pretrained weights, no --output-dir). Its script
cannot be downloaded here, so `reference()` below re-implements exactly the loop that command
runs: ImageFolder with its train preset (RandomResizedCrop, horizontal flip, PILToTensor,
ConvertImageDtype, Normalize) and eval preset (Resize, CenterCrop, ...), DataLoader with 1
worker and pin_memory, SGD (lr 0.1, momentum 0.9, weight decay 1e-4), StepLR(30, 0.1),
a loss.item() and top-1/top-5 accuracy every step (its MetricLogger), an evaluation on
the validation split after every epoch, torch's default thread settings.

ec2train runs `ec2train fit --arch resnet18 --weights none --image-size 64 --batch-size 32
--epochs 3` and nothing else: its defaults (AdamW, loader workers and threads from the thread
plan, the checkpoint every epoch, TensorBoard, the final test pass and the model export).

Each side is a fresh process (imports included), interleaved, on 1600x1200 photos and on 64 px
images, first on the idle box and then beside --busy N CPU-spinning processes.

    python bench/bench_vs_reference.py                 # about 5 minutes on 2 idle cores
    python bench/bench_vs_reference.py --busy 0 --sets small
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from _common import DEFAULT_ROOT, add_busy_option, big_data, compare_processes

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # the reference's presets


def reference(data: Path, epochs: int, crop: int, batch_size: int, workers: int) -> dict:
    """The reference recipe's main() for this command line, minus its distributed and logging plumbing."""
    import torch
    import torchvision
    from torch import nn
    from torchvision import transforms as T

    device = torch.device("cpu")
    resize = int(crop * 256 / 224)  # its default 256/224 ratio, for a 64 px crop: 73
    train_tf = T.Compose(
        [
            T.RandomResizedCrop(crop, interpolation=T.InterpolationMode.BILINEAR, antialias=True),
            T.RandomHorizontalFlip(0.5),
            T.PILToTensor(),
            T.ConvertImageDtype(torch.float),
            T.Normalize(MEAN, STD),
        ]
    )
    eval_tf = T.Compose(
        [
            T.Resize(resize, interpolation=T.InterpolationMode.BILINEAR, antialias=True),
            T.CenterCrop(crop),
            T.PILToTensor(),
            T.ConvertImageDtype(torch.float),
            T.Normalize(MEAN, STD),
        ]
    )
    dataset = torchvision.datasets.ImageFolder(str(data / "train"), train_tf)
    dataset_test = torchvision.datasets.ImageFolder(str(data / "valid"), eval_tf)  # its "val"
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=torch.utils.data.RandomSampler(dataset),
        num_workers=workers,
        pin_memory=True,
    )
    loader_test = torch.utils.data.DataLoader(
        dataset_test,
        batch_size=batch_size,
        sampler=torch.utils.data.SequentialSampler(dataset_test),
        num_workers=workers,
        pin_memory=True,
    )
    model = torchvision.models.resnet18(weights=None, num_classes=len(dataset.classes)).to(device)
    criterion = nn.CrossEntropyLoss(label_smoothing=0.0)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=30, gamma=0.1)

    def accuracy(output, target, topk=(1, 5)):
        maxk = min(max(topk), output.shape[1])
        _, pred = output.topk(maxk, 1, True, True)
        correct = pred.t().eq(target[None])
        return [correct[: min(k, maxk)].flatten().sum(dtype=torch.float32) * (100.0 / target.size(0)) for k in topk]

    acc1 = 0.0
    for _epoch in range(epochs):
        model.train()
        for image, target in loader:  # train_one_epoch
            image, target = image.to(device), target.to(device)
            output = model(image)
            optimizer.zero_grad()
            loss = criterion(output, target)
            loss.backward()
            optimizer.step()
            a1, a5 = accuracy(output, target)
            loss.item(), a1.item(), a5.item()  # its MetricLogger reads these every step
        scheduler.step()
        model.eval()
        correct = total = 0
        with torch.inference_mode():  # evaluate
            for image, target in loader_test:
                output = model(image.to(device))
                criterion(output, target).item()
                a1, _ = accuracy(output, target)
                correct += a1.item() * len(target) / 100
                total += len(target)
        acc1 = correct / total
    return {"valid_acc1": round(acc1, 3)}


def small_data(root: Path = DEFAULT_ROOT) -> Path:
    """64 px images in the same count and classes as the big set (ec2train's demo drawings)."""
    from ec2train.data import make_demo_dataset

    return make_demo_dataset(root / "small64", classes=4, per_class=50, size=64, eval_per_class=25)


def arms(data: Path, epochs: int, out: Path) -> dict[str, list[str]]:
    py, me = sys.executable, str(Path(__file__).resolve())
    return {
        "torchvision reference recipe": [py, me, "--arm", "reference", "--data", str(data), "--epochs", str(epochs)],
        "ec2train fit (defaults)": [
            py,
            "-m",
            "ec2train",
            "fit",
            "--data",
            str(data),
            "--arch",
            "resnet18",
            "--weights",
            "none",
            "--image-size",
            "64",
            "--batch-size",
            "32",
            "--epochs",
            str(epochs),
            "--output",
            str(out / "fit"),
            "--logdir",
            str(out / "runs"),
            "--resume",
            "never",
        ],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=1, help="interleaved rounds per box state; each run keeps its best")
    ap.add_argument("--sets", nargs="+", choices=("big", "small"), default=["big", "small"])
    add_busy_option(ap)
    ap.add_argument("--arm", choices=("reference",), help=argparse.SUPPRESS)
    ap.add_argument("--data", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.arm:
        t0 = time.perf_counter()
        result = reference(Path(a.data), a.epochs, crop=64, batch_size=32, workers=1)
        print(json.dumps({**result, "seconds_in_loop": round(time.perf_counter() - t0, 1)}))
        return
    import torch

    print(
        f"ec2train fit vs torchvision's reference recipe: resnet18, no pretrained weights, 64 px, batch 32, "
        f"{a.epochs} epochs, CPU; torch {torch.__version__}"
    )
    for name in a.sets:
        data = big_data() if name == "big" else small_data()
        print(f"\n{'1600x1200 photos' if name == 'big' else '64 px images'}: {data}", flush=True)
        compare_processes(
            arms(data, a.epochs, DEFAULT_ROOT / "vs-reference" / name),
            a.busy,
            a.rounds,
            baseline="torchvision reference recipe",
        )


if __name__ == "__main__":
    main()
