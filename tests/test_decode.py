"""Decoding: reduced-scale JPEG decode (Pillow draft mode) that the model cannot tell apart, and the
one decode policy (allowed formats, size rule) that serving, training and `data` commands share."""

from __future__ import annotations

import io
import math
import os
from pathlib import Path

import pytest
import torch

from ec2train.preprocess import (
    MAX_ASPECT_RATIO,
    MAX_PIXELS,
    ImageDecodeError,
    decode_min_side,
    eval_transform,
    load_rgb,
    resize_size,
    size_problem,
    train_transform,
)
from tests.support.images import jpeg_bytes, photo_like, png_of_size


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


# ---------------------------------------------------------------- one decode policy everywhere (issue 13.5)

EPS = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n%%EndComments\nshowpage\n"


@pytest.fixture
def fake_ghostscript(tmp_path: Path, monkeypatch) -> Path:
    """A `gs` first on PATH that leaves a marker if anything runs it; returns the marker's path."""
    from PIL import EpsImagePlugin

    bin_dir, marker = tmp_path / "fake-bin", tmp_path / "ghostscript-ran"
    bin_dir.mkdir()
    gs = bin_dir / "gs"
    gs.write_text(f"#!/bin/sh\ntouch '{marker}'\nexit 1\n")
    gs.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setattr(EpsImagePlugin, "gs_binary", None)  # Pillow caches where it found gs
    return marker


def test_eps_named_jpg_is_bad_everywhere_without_running_ghostscript(fake_ghostscript: Path, tmp_path: Path):
    from ec2train.data import CorruptImageError, ImageDataset, check_dataset, make_demo_dataset
    from ec2train.prepare import prepare_dataset

    root = make_demo_dataset(tmp_path / "data", classes=2, per_class=2, size=32, eval_per_class=1)
    ghost = root / "train" / "001.Circle" / "x.jpg"
    ghost.write_bytes(EPS)

    report = check_dataset(root, decode=True)  # `ec2train data check`
    assert [c.split(": ", 1)[0] for c in report.corrupt] == [str(ghost)]
    assert "not a decodable image" in report.corrupt[0]
    with pytest.raises(CorruptImageError, match="x.jpg"):  # training
        ImageDataset([(ghost, 0)], transform=lambda img: img)[0]
    prepared = prepare_dataset(root, tmp_path / "prepared", size=32, workers=1)  # `ec2train data prepare`
    assert [c.split(": ", 1)[0] for c in prepared.corrupt] == [str(ghost)]
    assert not fake_ghostscript.exists(), "Pillow ran Ghostscript on an untrusted file"


@pytest.mark.fast
def test_data_prepare_lists_sizes_jpeg_cannot_hold_instead_of_crashing(tmp_path: Path):
    from ec2train.data import make_demo_dataset
    from ec2train.prepare import prepare_dataset

    root = make_demo_dataset(tmp_path / "data", classes=2, per_class=2, size=32, eval_per_class=1)
    strip = root / "train" / "002.Square" / "strip.png"
    strip.write_bytes(png_of_size(1, 70_000))  # JPEG holds at most 65,500 px a side
    report = prepare_dataset(root, tmp_path / "prepared", size=32, workers=1)
    assert len(report.corrupt) == 1 and report.corrupt[0].startswith(f"{strip}: image is 1x70000 pixels")
    assert report.written == report.images > 0


@pytest.mark.fast
def test_the_size_rule_refuses_every_size_jpeg_cannot_hold():
    # No side can exceed sqrt(MAX_PIXELS * MAX_ASPECT_RATIO) (w * h <= P and long <= R * short).
    assert math.isqrt(MAX_PIXELS * MAX_ASPECT_RATIO) < 65_500
    assert size_problem(1414, 28_280) is None  # close to the longest side allowed
    for w, h in ((65_501, 4_000), (1, 65_501), (65_501, 65_501)):
        assert size_problem(w, h) is not None


@pytest.mark.fast
@pytest.mark.parametrize(
    "w, h, allowed",
    [
        (224, 224, True),
        (20, 1, True),
        (21, 1, False),
        (4000, 199, False),
        (4000, 200, True),
        (6324, 6324, True),
        (6325, 6325, False),  # 40 Mpx
    ],
)
def test_size_rule(w, h, allowed):
    assert (size_problem(w, h) is None) == allowed
    assert (size_problem(h, w) is None) == allowed


@pytest.mark.fast
def test_decode_errors_never_show_python_reprs():
    for junk in (b"junk", b"GIF89a" + bytes(20), io.BytesIO(b"\x89PNG\r\n\x1a\n" + bytes(40))):
        with pytest.raises(ImageDecodeError) as exc:
            load_rgb(junk)
        assert " at 0x" not in str(exc.value) and "<_io" not in str(exc.value), exc.value


@pytest.mark.fast
@pytest.mark.parametrize("channels_last", [False, True])
def test_pixels_normalized_on_the_device_equal_the_float_transforms_bit_for_bit(tmp_path, channels_last):
    # Loader workers hand uint8 pixels over and StepContext.to_device normalizes the batch:
    # the tensors the model sees must be exactly those of ToTensor + Normalize per image, for
    # the train transform (same seed) and the eval one, with and without channels_last.
    from ec2train import hw
    from ec2train.loop import StepContext
    from ec2train.preprocess import eval_pixels, train_pixels

    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    imgs = [photo_like(50, 40 + i, seed=i) for i in range(3)]
    ctx = StepContext("cpu", hw.amp_policy("off", "cpu"), channels_last, normalization=(mean, std))
    for floats, pixels in (
        (train_transform(32, mean, std), train_pixels(32)),
        (eval_transform(32, mean, std), eval_pixels(32)),
    ):
        expected, batch = [], []
        for i, img in enumerate(imgs):
            torch.manual_seed(i)
            expected.append(floats(img))
            torch.manual_seed(i)
            batch.append(pixels(img))
        assert batch[0].dtype == torch.uint8 and batch[0].shape == (3, 32, 32)
        got, labels = ctx.to_device(torch.stack(batch), torch.tensor([0, 1, 2]))
        assert got.dtype == torch.float32 and got.is_contiguous(memory_format=torch.channels_last) == channels_last
        assert torch.equal(got, torch.stack(expected)) and labels.tolist() == [0, 1, 2]


@pytest.mark.fast
def test_a_uint8_batch_without_the_data_sets_normalization_is_refused():
    from ec2train import hw
    from ec2train.loop import StepContext

    with pytest.raises(RuntimeError, match="normalization"):
        StepContext("cpu", hw.amp_policy("off", "cpu"), False).to_device(
            torch.zeros(1, 3, 4, 4, dtype=torch.uint8), torch.zeros(1)
        )
