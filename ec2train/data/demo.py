"""A small learnable data set in the dogImages layout, drawn on the spot (`ec2train data demo`)."""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

from ec2train.data.layout import DataError
from ec2train.files import disk_full_error, is_disk_full

DEMO_SHAPES = ("Circle", "Square", "Triangle", "Cross", "Stripes", "Ring", "Diamond", "Dots")


def _draw_demo(cls: int, size: int, rng: random.Random):
    from PIL import Image, ImageDraw

    # Each class: its own shape and hue family; position, scale, shade and background vary.
    hue = (cls * 360 // 8 + rng.randint(-12, 12)) % 360
    fg = tuple(int(c) for c in _hsv(hue, 0.8, rng.uniform(0.7, 1.0)))
    bg = tuple(rng.randint(0, 90) for _ in range(3))
    img = Image.new("RGB", (size, size), bg)
    d = ImageDraw.Draw(img)
    r = rng.uniform(0.25, 0.42) * size
    cx, cy = rng.uniform(r, size - r), rng.uniform(r, size - r)
    box = [cx - r, cy - r, cx + r, cy + r]
    shape = DEMO_SHAPES[cls % len(DEMO_SHAPES)]
    w = max(2, size // 10)
    if shape == "Circle":
        d.ellipse(box, fill=fg)
    elif shape == "Square":
        d.rectangle(box, fill=fg)
    elif shape == "Triangle":
        d.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fg)
    elif shape == "Cross":
        d.rectangle([cx - r, cy - w, cx + r, cy + w], fill=fg)
        d.rectangle([cx - w, cy - r, cx + w, cy + r], fill=fg)
    elif shape == "Stripes":
        for x in range(0, size, 2 * w):
            d.rectangle([x, 0, x + w - 1, size], fill=fg)
    elif shape == "Ring":
        d.ellipse(box, outline=fg, width=w)
    elif shape == "Diamond":
        d.polygon([(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)], fill=fg)
    else:
        for _ in range(6):
            dx, dy = rng.uniform(0, size), rng.uniform(0, size)
            d.ellipse([dx - w, dy - w, dx + w, dy + w], fill=fg)
    return img


def _hsv(h: float, s: float, v: float) -> tuple[float, float, float]:
    import colorsys

    r, g, b = colorsys.hsv_to_rgb(h / 360, s, v)
    return 255 * r, 255 * g, 255 * b


def make_demo_dataset(
    root: str | Path,
    classes: int = 4,
    per_class: int = 40,
    size: int = 64,
    seed: int = 0,
    eval_per_class: int | None = None,
    force: bool = False,
) -> Path:
    """A small learnable data set in the dogImages layout (JPEGs; classes differ by content).

    Idempotent: the same call on an existing demo folder does nothing. Written to a temp
    folder and renamed, so an interrupted run never leaves a half-made data set.
    """
    if not 2 <= classes <= len(DEMO_SHAPES):
        raise DataError(f"--classes {classes}: must be between 2 and {len(DEMO_SHAPES)}")
    if per_class < 1 or size < 16:
        raise DataError("--per-class must be at least 1 and --size at least 16")
    root = Path(root)
    eval_n = eval_per_class if eval_per_class is not None else max(3, per_class // 4)
    params = {"classes": classes, "per_class": per_class, "size": size, "seed": seed, "eval_per_class": eval_n}
    marker = root / ".ec2train-demo.json"
    if root.exists():
        if marker.is_file() and json.loads(marker.read_text()) == params and not force:
            return root
        if not force and (any(root.iterdir()) if root.is_dir() else True):
            raise DataError(f"{root} already exists and is not this demo data set; pass --force to replace it")
    tmp = root.with_name(f".{root.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        _write_demo(tmp, classes, per_class, eval_n, size, seed)
        (tmp / marker.name).write_text(json.dumps(params))
        if root.exists():
            shutil.rmtree(root)
        os.replace(tmp, root)
    except BaseException as exc:  # Ctrl-C or a full disk: no half-made folder stays behind
        shutil.rmtree(tmp, ignore_errors=True)
        if is_disk_full(exc):
            raise disk_full_error(f"cannot write the demo data set in {root.parent}", root.parent) from None
        raise
    return root


def _write_demo(tmp: Path, classes: int, per_class: int, eval_n: int, size: int, seed: int) -> None:
    rng = random.Random(seed)
    for split, n in (("train", per_class), ("valid", eval_n), ("test", eval_n)):
        for c in range(classes):
            folder = tmp / split / f"{c + 1:03d}.{DEMO_SHAPES[c]}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                _draw_demo(c, size, rng).save(folder / f"{DEMO_SHAPES[c]}_{split}_{i:04d}.jpg", quality=90)
