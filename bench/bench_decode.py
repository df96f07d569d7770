"""Benchmark 1: reduced-scale JPEG decode (Pillow draft mode) vs plain decode + resize.

fit's own dataset and transforms on ~1600x1200 photos, through ec2train's loader in this
process (one thread, as in a loader worker) and timed in CPU seconds: the cost per image,
which is what limits a loader on a 4-vCPU box, whatever else the machine runs. Target: >= 3x.

    python bench/bench_decode.py
"""

from __future__ import annotations

import argparse

import torch
from _common import best_of, big_data, drain, row

from ec2train.data import ImageDataset, scan_split
from ec2train.preprocess import decode_min_side, eval_transform, train_transform


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=64)
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--width", type=int, default=1600, help="other than 1600: a set of this width (x 3/4) is generated")
    a = ap.parse_args()
    torch.set_num_threads(1)  # as in a loader worker
    _, samples = scan_split(big_data(width=a.width, images=a.images), "train")
    samples = samples[:: max(1, len(samples) // a.images)][: a.images]
    n, s = len(samples), a.image_size
    print(f"benchmark 1: reduced-scale decode, {n} JPEGs of {a.width}x{a.width * 3 // 4}, --image-size {s}")
    ratios = {}
    for name, transform, train in (
        ("train (random resized crop)", train_transform(s), True),
        ("eval (resize + center crop)", eval_transform(s), False),
    ):
        plain = ImageDataset(samples, transform, min_side=None)
        reduced = ImageDataset(samples, transform, min_side=decode_min_side(s, train))
        t_plain, t_reduced = best_of(a.rounds, drain(plain), drain(reduced), cpu=True)
        print(row(f"{name}: full decode + resize", t_plain, n))
        print(row(f"{name}: reduced-scale decode (min side {decode_min_side(s, train)})", t_reduced, n))
        ratios[name] = t_plain / t_reduced
    for name, r in ratios.items():
        print(f"  speed-up, {name}: {r:.1f}x")
    print(
        f"RESULT decode: train {ratios['train (random resized crop)']:.1f}x, eval {ratios['eval (resize + center crop)']:.1f}x "
        "(target >= 3x)"
    )


if __name__ == "__main__":
    main()
