"""Reduced-scale JPEG decode (Pillow draft mode): decodes less, and the model sees the same picture."""

from __future__ import annotations

import io
import math
from pathlib import Path

import pytest
import torch

from ec2train.preprocess import decode_min_side, eval_transform, load_rgb, resize_size, train_transform
from tests.perf_images import jpeg_bytes, photo_like


@pytest.fixture(scope="module")
def big_jpeg() -> bytes:
    return jpeg_bytes(photo_like(1600, 1200))


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = ((a - b) ** 2).mean().item()
    return 10 * math.log10(255**2 / mse)


@pytest.mark.parametrize("image_size", [224, 128, 64])
def test_reduced_decode_is_visually_equivalent_after_eval_transform(big_jpeg: bytes, image_size: int):
    # Compare on 0-255 pixels, before normalisation.
    to_pixels = lambda img: eval_transform(image_size, (0, 0, 0), (1 / 255,) * 3)(img)  # noqa: E731
    full = to_pixels(load_rgb(big_jpeg))
    reduced_img = load_rgb(big_jpeg, min_side=decode_min_side(image_size, train=False))
    assert min(reduced_img.size) < 1200  # the draft path really ran
    reduced = to_pixels(reduced_img)
    assert full.shape == reduced.shape == (3, image_size, image_size)
    assert (full - reduced).abs().mean().item() < 2.0  # mean absolute difference under 2/255
    assert psnr(full, reduced) > 30


@pytest.mark.parametrize(
    "size, min_side, expected",
    [
        ((1600, 1200), 256, (400, 300)),  # eval at 224: 1/4 scale, still >= 256
        ((1600, 1200), 448, (800, 600)),  # train at 224: 1/2 scale keeps 2x for random crops
        ((1600, 1200), 100, (200, 150)),  # 1/8 is the smallest DCT scale
        ((1200, 1600), 256, (300, 400)),  # portrait
        ((512, 400), 256, (512, 400)),  # short side under 2x min_side: nothing to gain, full decode
        ((512, 512), 256, (256, 256)),  # exactly 2x: half scale, exactly min_side
    ],
)
def test_reduced_decode_scale_never_goes_below_min_side(size, min_side, expected):
    decoded = load_rgb(jpeg_bytes(photo_like(*size)), min_side=min_side)
    assert decoded.size == expected
    assert min(decoded.size) >= min_side or decoded.size == size


def test_odd_sizes_keep_the_short_side(tmp_path: Path):
    for w, h in [(1023, 769), (999, 2001), (4000, 257)]:
        img = load_rgb(jpeg_bytes(photo_like(w, h, seed=w)), min_side=128)
        assert min(img.size) >= 128
        assert img.size[0] / img.size[1] == pytest.approx(w / h, rel=0.02)


def test_png_and_small_images_decode_at_full_size():
    buf = io.BytesIO()
    photo_like(800, 600).save(buf, format="PNG")
    assert load_rgb(buf.getvalue(), min_side=64).size == (800, 600)  # no DCT scaling outside JPEG
    assert load_rgb(jpeg_bytes(photo_like(300, 200)), min_side=256).size == (300, 200)


def test_decode_sizes_leave_room_for_the_transforms():
    assert decode_min_side(224, train=False) == resize_size(224) == 256  # eval resizes to 256, crops 224
    assert decode_min_side(224, train=True) == 448  # a random crop of a quarter of the area is still >= 224 px
    img = load_rgb(jpeg_bytes(photo_like(1600, 1200)), min_side=decode_min_side(224, train=True))
    torch.manual_seed(0)
    assert train_transform(224)(img).shape == (3, 224, 224)
