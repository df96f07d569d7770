"""Benchmark 2: a prepared (resized) data set vs the raw full-size JPEGs.

`ec2train data prepare` decodes every photo once; each epoch then reads small JPEGs. This
times fit's loader (one thread, CPU seconds, as in bench_decode.py) over the same images,
raw and prepared, and what the one-time preparation costs. Target: >= 5x.

    python bench/bench_prepare.py
"""

from __future__ import annotations

import argparse
import shutil
import time

import torch
from _common import DEFAULT_ROOT, best_of, big_data, drain, row

from ec2train.data import ImageDataset, scan_split
from ec2train.prepare import prepare_dataset
from ec2train.preprocess import decode_min_side, eval_pixels, train_pixels
from ec2train.threads import available_cpus


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=64)
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--size", type=int, default=256, help="data prepare --size")
    ap.add_argument("--rounds", type=int, default=3)
    a = ap.parse_args()
    raw_root = big_data()
    prepared_root = DEFAULT_ROOT / f"big-{a.size}"
    shutil.rmtree(prepared_root, ignore_errors=True)
    t0 = time.perf_counter()
    report = prepare_dataset(raw_root, prepared_root, size=a.size)
    prep_seconds = time.perf_counter() - t0
    print(
        f"benchmark 2: prepared vs raw; `ec2train data prepare --size {a.size}` of {report.written} photos took "
        f"{prep_seconds:.1f} s wall on {available_cpus()} CPUs ({report.written / prep_seconds:.0f} img/s, once)"
    )

    torch.set_num_threads(1)
    s = a.image_size
    _, raw = scan_split(raw_root, "train")
    _, prepared = scan_split(prepared_root, "train")
    pick = slice(None, None, max(1, len(raw) // a.images))
    raw, prepared = raw[pick][: a.images], prepared[pick][: a.images]
    assert [p.name for p, _ in raw] == [p.name for p, _ in prepared]
    n = len(raw)
    ratios = {}
    for name, transform, train in (("train", train_pixels(s), True), ("eval", eval_pixels(s), False)):
        ms = decode_min_side(s, train)
        t_plain, t_raw, t_prep = best_of(
            a.rounds,
            drain(ImageDataset(raw, transform, None)),
            drain(ImageDataset(raw, transform, ms)),
            drain(ImageDataset(prepared, transform, ms)),
            cpu=True,
        )
        print(row(f"{name}: raw 1600x1200, full decode", t_plain, n))
        print(row(f"{name}: raw 1600x1200, reduced-scale decode (fit's loader)", t_raw, n))
        print(row(f"{name}: prepared, short side {a.size}", t_prep, n))
        ratios[name] = (t_raw / t_prep, t_plain / t_prep)
    for name, (vs_fit, vs_plain) in ratios.items():
        print(f"  speed-up, {name}: {vs_fit:.1f}x vs raw with reduced-scale decode, {vs_plain:.1f}x vs raw full decode")
    print(
        f"RESULT prepare: train {ratios['train'][0]:.1f}x, eval {ratios['eval'][0]:.1f}x vs raw through fit's loader; "
        f"{ratios['train'][1]:.1f}x / {ratios['eval'][1]:.1f}x vs full decode (target >= 5x)"
    )


if __name__ == "__main__":
    main()
