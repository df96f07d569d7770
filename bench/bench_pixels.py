"""Benchmark 5: what fit's loader workers hand over: uint8 pixels vs normalized float tensors.

fit's datasets end in PILToTensor (uint8) and the training loop normalizes each batch on the
device (`preprocess.normalize_pixels`, bit for bit what ToTensor + Normalize give per image).
The baseline is the classic per-image ending, ToTensor + Normalize, in the worker. This
times fit's loader over the same images both ways (one thread, CPU seconds per image, as a
loader worker pays them), and, for training on the CPU, what normalizing the uint8 batch then
costs the main process per image. Bytes per image handed over: 3 x S x S against 4x that.

    python bench/bench_pixels.py
    python bench/bench_pixels.py --sets photos --image-size 224
"""

from __future__ import annotations

import argparse
import time

import torch
from _common import DEFAULT_ROOT, best_of, big_data, drain, row

from ec2train.data import ImageDataset, make_demo_dataset, scan_split
from ec2train.preprocess import (
    decode_min_side,
    eval_pixels,
    eval_transform,
    normalize_pixels,
    pixel_stats,
    train_pixels,
    train_transform,
)


def batch_normalize_ms(image_size: int, batch: int = 32, rounds: int = 20) -> float:
    """CPU ms per image of normalize_pixels on a uint8 batch (fit on the CPU pays it in the loop)."""
    pixels = torch.randint(0, 256, (batch, 3, image_size, image_size), dtype=torch.uint8)
    stats = pixel_stats((0.485, 0.456, 0.406), (0.229, 0.224, 0.225), "cpu")
    best = float("inf")
    for _ in range(rounds):
        t0 = time.process_time()
        normalize_pixels(pixels, stats, channels_last=False)
        best = min(best, time.process_time() - t0)
    return 1000 * best / batch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sets", nargs="+", choices=("small", "photos"), default=["small", "photos"])
    ap.add_argument("--image-size", type=int, default=None, help="[default: 32 on the small images, 112 on the photos]")
    ap.add_argument("--images", type=int, default=100, help="images per set (photos: at most the 200 train ones)")
    ap.add_argument("--rounds", type=int, default=3)
    a = ap.parse_args()
    torch.set_num_threads(1)  # as in a loader worker
    results = []
    for name in a.sets:
        if name == "small":
            root = make_demo_dataset(DEFAULT_ROOT / "small32", classes=4, per_class=50, size=32, eval_per_class=25)
        else:
            root = big_data()
        size = a.image_size or (32 if name == "small" else 112)
        _, samples = scan_split(root, "train")
        samples = samples[:: max(1, len(samples) // a.images)][: a.images]
        n = len(samples)
        print(f"\nbenchmark 5: loader output, {n} {name} images from {root}, --image-size {size}")
        for split, floats, pixels, train in (
            ("train", train_transform(size), train_pixels(size), True),
            ("eval", eval_transform(size), eval_pixels(size), False),
        ):
            min_side = decode_min_side(size, train)
            t_float, t_pixels = best_of(
                a.rounds,
                drain(ImageDataset(samples, floats, min_side)),
                drain(ImageDataset(samples, pixels, min_side)),
                cpu=True,
            )
            print(row(f"{split}: float32, ToTensor + Normalize per image", t_float, n))
            print(row(f"{split}: uint8 pixels (fit's loader)", t_pixels, n))
            results.append((f"{name} {split}", t_float / t_pixels))
        print(
            f"  normalizing the uint8 batch in the training loop on the CPU: {batch_normalize_ms(size):.3f} ms per image"
        )
    print("RESULT pixels: " + ", ".join(f"{what} {ratio:.2f}x" for what, ratio in results) + " (loader CPU per image)")


if __name__ == "__main__":
    main()
