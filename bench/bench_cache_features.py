"""Benchmark 3: 5-epoch frozen-backbone fit with --cache-features vs without.

Plain `fit` calls on the ~1600x1200 photos from the same frozen backbone (fit's defaults
otherwise: loader workers from the CPUs, reduced-scale decode). --cache-features trains without
augmentation, so the like-for-like run without it uses --no-augment: the same training, so the
same accuracy. --augmented-too adds the default run with augmentation (a different recipe:
its accuracy may differ either way by a few points). Target: >= 3x, accuracy within one point.

    python bench/bench_cache_features.py [--augmented-too]
"""

from __future__ import annotations

import argparse
import shutil
import time

from _common import DEFAULT_ROOT, big_data, pretrained_backbone

from ec2train.config import resolve
from ec2train.loop import fit


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--arch", default="resnet18")
    ap.add_argument("--image-size", type=int, default=112)
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--augmented-too", action="store_true")
    a = ap.parse_args()
    data = big_data()
    weights = pretrained_backbone(arch=a.arch)
    print(f"benchmark 3: {a.epochs}-epoch fit, frozen {a.arch} backbone, --image-size {a.image_size}, {data}")
    runs = {}
    variants = [("without, --no-augment", False, False), ("with --cache-features", True, False)]
    if a.augmented_too:
        variants.append(("without, augmented", False, True))
    for name, cache, augment in variants:
        out = DEFAULT_ROOT / "runs" / f"cache-{cache}-{augment}"
        shutil.rmtree(out, ignore_errors=True)  # a cold start: no feature cache from earlier runs
        cfg = resolve(
            data=str(data),
            output=str(out),
            logdir=str(DEFAULT_ROOT / "runs" / "tb"),
            arch=a.arch,
            weights=str(weights),
            freeze_backbone=True,
            image_size=a.image_size,
            epochs=a.epochs,
            cache_features=cache,
            augment=augment,
        )
        t0 = time.perf_counter()
        result = fit(cfg)
        runs[name] = (time.perf_counter() - t0, result.metrics)
        m = result.metrics
        print(
            f"  {name:<26} {runs[name][0]:7.1f} s  valid acc {m['valid_acc1']:.3f}  test acc {m['test_acc1']:.3f}"
            f"  ({m['valid_acc1'] * 100:.0f}/{m['test_acc1'] * 100:.0f} points on {m['test_images']} images)"
        )
    (t_plain, m_plain), (t_cache, m_cache) = list(runs.values())[:2]
    print(
        f"RESULT cache-features: {t_plain / t_cache:.1f}x faster (target >= 3x); valid accuracy "
        f"{100 * (m_cache['valid_acc1'] - m_plain['valid_acc1']):+.1f} points, test accuracy "
        f"{100 * (m_cache['test_acc1'] - m_plain['test_acc1']):+.1f} points (target: within 1)"
    )


if __name__ == "__main__":
    main()
