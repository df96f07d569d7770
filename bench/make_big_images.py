"""Generate a learnable data set of realistic-size photos (about 1600x1200 JPEG) for the benchmarks.

The demo data set's shapes (ec2train.data.demo's `_draw_demo`: one shape and hue family per class)
are blended into a photographic-ish scene: a colour gradient, soft low-frequency blobs and
sensor-like noise, so the JPEGs carry real detail and cost what a real photo costs to decode
(about 0.5 MB each at quality 90), not what a flat-colour image costs.

    python bench/make_big_images.py /tmp/big --classes 4 --per-class 40
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from ec2train.data.demo import DEMO_SHAPES, _draw_demo


def _noise_field(width: int, height: int, cell: int, sigma: float, rng: np.random.Generator) -> np.ndarray:
    """Smooth random field (luminance-heavy, like real shading) at a scale of `cell` pixels."""
    small = rng.normal(0, sigma, (height // cell + 2, width // cell + 2, 1)) + rng.normal(
        0, sigma / 4, (height // cell + 2, width // cell + 2, 3)
    )
    small = Image.fromarray(np.clip(small + 128, 0, 255).astype(np.uint8))
    return np.asarray(small.resize((width, height), Image.BICUBIC), np.float32) - 128


def _scene(width: int, height: int, rng: np.random.Generator) -> np.ndarray:
    """A colour gradient with shading at several scales and a few hard-edged objects."""
    a, b = rng.uniform(40, 200, 3).astype(np.float32), rng.uniform(40, 200, 3).astype(np.float32)
    t = np.linspace(0, 1, width, dtype=np.float32)[None, :, None] * rng.uniform(0.3, 1) + np.linspace(
        0, 1, height, dtype=np.float32
    )[:, None, None] * rng.uniform(0.3, 1)
    img = a * (1 - t / t.max()) + b * (t / t.max())
    img += (
        _noise_field(width, height, 160, 30, rng)
        + _noise_field(width, height, 24, 14, rng)
        + _noise_field(width, height, 4, 6, rng)
    )
    clutter = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(clutter)
    for _ in range(int(rng.integers(6, 14))):  # neutral-coloured objects: edges, not class cues
        x, y, r = rng.uniform(0, width), rng.uniform(0, height), rng.uniform(20, 160)
        grey = int(rng.integers(20, 235))
        draw.ellipse(
            [x - r, y - r * rng.uniform(0.3, 1), x + r, y + r], outline=(grey,) * 3, width=int(rng.integers(2, 9))
        )
    return np.asarray(clutter, np.float32)


def big_image(cls: int, width: int, height: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    side = min(width, height)
    subject = np.asarray(_draw_demo(cls, side, random.Random(seed)).filter(ImageFilter.GaussianBlur(1.5)), np.float32)
    img = _scene(width, height, rng)
    x0 = int(rng.integers(0, width - side + 1))
    img[:, x0 : x0 + side] = 0.6 * subject + 0.4 * img[:, x0 : x0 + side]
    # Sensor noise: part of what makes real photos expensive to decode.
    img += rng.standard_normal(img.shape, dtype=np.float32) * 5
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))


def _write(job) -> None:
    cls, width, height, seed, path, quality = job
    big_image(cls, width, height, seed).save(path, quality=quality)


def make_big_dataset(
    root: str | Path,
    classes: int = 4,
    per_class: int = 40,
    eval_per_class: int = 10,
    width: int = 1600,
    height: int = 1200,
    quality: int = 90,
    seed: int = 0,
) -> Path:
    """Idempotent: the same call on an existing folder does nothing."""
    root = Path(root)
    params = dict(
        classes=classes,
        per_class=per_class,
        eval_per_class=eval_per_class,
        width=width,
        height=height,
        quality=quality,
        seed=seed,
    )
    marker = root / ".big-images.json"
    if marker.is_file() and json.loads(marker.read_text()) == params:
        return root
    tmp = root.with_name(f".{root.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    jobs = []
    for split, count in (("train", per_class), ("valid", eval_per_class), ("test", eval_per_class)):
        for c in range(classes):
            folder = tmp / split / f"{c + 1:03d}.{DEMO_SHAPES[c]}"
            folder.mkdir(parents=True)
            jobs += [
                (c, width, height, seed * 1_000_003 + len(jobs) + i, folder / f"{split}_{i:04d}.jpg", quality)
                for i in range(count)
            ]
    with ProcessPoolExecutor() as pool:
        list(pool.map(_write, jobs, chunksize=8))
    (tmp / marker.name).write_text(json.dumps(params))
    shutil.rmtree(root, ignore_errors=True)
    os.replace(tmp, root)
    return root


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("root")
    ap.add_argument("--classes", type=int, default=4)
    ap.add_argument("--per-class", type=int, default=40)
    ap.add_argument("--eval-per-class", type=int, default=10)
    ap.add_argument("--width", type=int, default=1600)
    ap.add_argument("--height", type=int, default=1200)
    a = ap.parse_args()
    path = make_big_dataset(a.root, a.classes, a.per_class, a.eval_per_class, a.width, a.height)
    sizes = [p.stat().st_size for p in path.rglob("*.jpg")]
    print(f"{len(sizes)} images in {path}, mean {sum(sizes) / len(sizes) / 1e3:.0f} KB")
