"""Decoding: reduced-scale JPEG decode (Pillow draft mode) that the model cannot tell apart, and the
one decode policy (allowed formats, size rule) that serving, training and `data` commands share."""

from __future__ import annotations

import io
import math
import os
import time
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
from tests.support.images import (
    JPEG_STRAY_GAPS,
    header_flood_jpegs,
    jpeg_bytes,
    jpeg_segment,
    many_chunk_png,
    many_scan_jpeg,
    phone_like_jpeg,
    photo_like,
    png_of_size,
    with_segments,
)


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


def test_small_images_decode_at_full_size():
    buf = io.BytesIO()
    photo_like(500, 300).save(buf, format="PNG")
    assert load_rgb(buf.getvalue(), min_side=256).size == (500, 300)  # under twice min_side: nothing to gain
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


# ---------------------------------------------------------------- decode cost from the structure (issue 26.1)


def _cpu_seconds(fn) -> float:
    started = time.process_time()
    fn()
    return time.process_time() - started


def test_a_jpeg_with_thousands_of_scans_is_refused_before_decoding():
    # Issue 26.1: each extra scan is a few bytes and makes the decoder walk the whole image again;
    # this 44 KB file took about 8 s of CPU to decode (and got a 200 from the server).
    hostile = many_scan_jpeg(2000, 2000, 2000)
    assert len(hostile) < 50_000
    for min_side in (None, 256):  # full decode (data check) and the reduced one (serving, training)
        with pytest.raises(ImageDecodeError, match="JPEG has more than 100 scans, the most allowed for 2000x2000"):
            load_rgb(hostile, min_side=min_side)
        took = _cpu_seconds(lambda side=min_side: pytest.raises(ImageDecodeError, load_rgb, hostile, min_side=side))
        print(f"2000 scans of 2000x2000 px ({len(hostile)} bytes): refused in {took * 1000:.1f} ms of CPU")
        assert took < 0.25  # measured: under 1 ms


def test_the_scan_limit_follows_the_image_size_and_ordinary_jpegs_pass():
    from ec2train.preprocess import MAX_JPEG_SCANS, jpeg_scan_limit, jpeg_structure_problem

    assert MAX_JPEG_SCANS == jpeg_scan_limit(64, 64) == jpeg_scan_limit(2529, 2529) == 100
    assert jpeg_scan_limit(4000, 3000) == 53 and jpeg_scan_limit(7300, 5470) == 16  # 12 MP, 40 MP
    # Pillow writes 6 scans for a grey progressive JPEG: 94 more reach the limit, 95 pass it.
    assert load_rgb(many_scan_jpeg(64, 64, 94)).size == (64, 64)
    assert "more than 100 scans" in jpeg_structure_problem(many_scan_jpeg(64, 64, 95))
    assert jpeg_structure_problem(many_scan_jpeg(2000, 1400, 2)) is None  # 8 scans of 2.8 MP
    photo = photo_like(900, 600)
    for options in ({}, {"progressive": True}, {"progressive": True, "subsampling": 0}):
        data = _encode(photo, "JPEG", quality=90, **options)
        assert jpeg_structure_problem(data) is None and load_rgb(data).size == (900, 600)
    # An MPO's second image is not decoded, so its scans do not count; a truncated file is the decoder's.
    base = _encode(photo, "JPEG", progressive=True)
    assert jpeg_structure_problem(base + many_scan_jpeg(64, 64, 200)) is None
    assert jpeg_structure_problem(base[: len(base) // 2]) is None


def test_arithmetic_coded_and_lossless_jpegs_are_refused():
    from ec2train.preprocess import jpeg_structure_problem

    data = _encode(photo_like(64, 48), "JPEG", progressive=True)
    sof = data.index(b"\xff\xc2")
    for marker, kind in ((0xCA, "arithmetic-coded"), (0xC3, "lossless")):
        patched = data[: sof + 1] + bytes([marker]) + data[sof + 2 :]
        assert jpeg_structure_problem(patched).startswith(f"{kind} JPEG: not decoded here")
        with pytest.raises(ImageDecodeError, match=kind):
            load_rgb(patched)


def test_a_png_of_empty_chunks_is_refused_before_decoding():
    from ec2train.preprocess import png_structure_problem

    hostile = many_chunk_png(1000, 1000, 400_000)  # 4.8 MB: Pillow took about 1.5 s of CPU
    with pytest.raises(ImageDecodeError, match="PNG has more than 10377 chunks for its 4801037 bytes"):
        load_rgb(hostile)
    took = _cpu_seconds(lambda: pytest.raises(ImageDecodeError, load_rgb, hostile))
    print(f"a PNG of 400,000 chunks ({len(hostile)} bytes): refused in {took * 1000:.1f} ms of CPU")
    assert took < 0.25  # measured: about 10 ms
    assert load_rgb(many_chunk_png(100, 100, 1000)).size == (100, 100)  # the free 1,000
    photo = _encode(photo_like(900, 600), "PNG")
    assert png_structure_problem(photo) is None


def test_hostile_files_in_training_data_are_bad_files_with_their_paths(tmp_path: Path):
    from ec2train.data import CorruptImageError, ImageDataset, check_dataset, make_demo_dataset

    root = make_demo_dataset(tmp_path / "data", classes=2, per_class=2, size=32, eval_per_class=1)
    scans = root / "train" / "001.Circle" / "scans.jpg"
    scans.write_bytes(many_scan_jpeg(2000, 2000, 2000))
    chunks = root / "train" / "002.Square" / "chunks.png"
    chunks.write_bytes(many_chunk_png(1000, 1000, 20_000))
    report = check_dataset(root, decode=True)  # `ec2train data check`
    assert sorted(c.split(": ", 1)[0] for c in report.corrupt) == sorted([str(scans), str(chunks)])
    with pytest.raises(CorruptImageError, match=r"scans\.jpg \(JPEG has more than 100 scans"):  # training
        ImageDataset([(scans, 0)], transform=lambda img: img, min_side=64)[0]


def _encode(img, fmt: str, **options) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **options)
    return buf.getvalue()


def test_other_formats_are_reduced_right_after_decoding_and_look_the_same():
    photo = photo_like(1600, 1200)
    png = _encode(photo, "PNG")
    reduced = load_rgb(png, min_side=256)
    assert reduced.size == (400, 300)  # a quarter: the short side stays >= 256
    to_pixels = lambda img: eval_transform(224, (0, 0, 0), (1 / 255,) * 3)(img)  # noqa: E731
    assert psnr(to_pixels(load_rgb(png)), to_pixels(reduced)) > 30
    grey = _encode(photo.convert("1"), "PNG")
    assert load_rgb(grey, min_side=256).size == (400, 300) and load_rgb(grey, min_side=256).mode == "RGB"


def test_the_gpu_loader_leaves_a_jpeg_of_too_many_scans_to_the_cpu_loaders_refusal(tmp_path: Path):
    # The device decodes plain baseline JPEGs by their header; scans appended after the first one
    # must not get past the rule there either: such a file goes to the CPU loader, which refuses it.
    from ec2train.data.encoded import read_device_jpeg

    plain = jpeg_bytes(photo_like(64, 48))
    scan = plain[plain.index(b"\xff\xda") : -2]
    path = tmp_path / "scans.jpg"
    path.write_bytes(plain[:-2] + scan * 200 + b"\xff\xd9")
    (tmp_path / "plain.jpg").write_bytes(plain)
    assert read_device_jpeg(tmp_path / "plain.jpg") is not None
    assert read_device_jpeg(path) is None
    with pytest.raises(ImageDecodeError, match="JPEG has more than 100 scans"):
        load_rgb(path, min_side=64)


# ---------------------------------------------------------------- the structure rules, as libjpeg and Pillow read files


@pytest.mark.parametrize("gap", JPEG_STRAY_GAPS, ids=list(JPEG_STRAY_GAPS))
def test_bytes_between_segments_do_not_hide_the_scans_after_them(gap):
    # libjpeg skips bytes that belong to no segment (warning, silenced by Pillow) and decodes every
    # scan after them: with one such byte before them, 1,600 scans of 1024x1024 px (23 KB) cost
    # 1.43 s of CPU and decoded, as the walk stopped at the byte and let the file through.
    from ec2train.preprocess import jpeg_structure_problem

    hostile = many_scan_jpeg(1024, 1024, 1600, gap=JPEG_STRAY_GAPS[gap])
    assert "JPEG has more than 100 scans" in (jpeg_structure_problem(hostile) or "")
    took = _cpu_seconds(lambda: pytest.raises(ImageDecodeError, load_rgb, hostile, min_side=256))
    assert took < 0.25, took  # measured: under 1 ms
    # The same bytes before a number of scans that is allowed: the file decodes.
    assert load_rgb(many_scan_jpeg(64, 64, 90, gap=JPEG_STRAY_GAPS[gap])).size == (64, 64)


@pytest.mark.parametrize(
    "shape", ["fill bytes", "empty comments", "quantization tables", "frame headers", "Photoshop resources"]
)
def test_what_pillow_reads_in_python_before_the_first_scan_is_bounded_before_it_opens_the_file(shape):
    # Pillow's JPEG opener walks the markers before the first scan in Python, a byte, a segment or
    # a table at a time: 6 MB of fill bytes before a small JPEG took 4.4 s of CPU and decoded
    # (200), 1.5 M empty comments 3.8 s, 6 MB of quantization tables 0.43 s, of frame headers
    # 0.68 s, of Photoshop resources 0.35 s. The rule reads the bytes before Pillow does.
    from ec2train.preprocess import jpeg_structure_problem

    hostile = header_flood_jpegs()[shape]
    assert len(hostile) > 5_000_000
    problem = jpeg_structure_problem(hostile)
    assert problem and problem.startswith("JPEG has more than"), problem
    took = _cpu_seconds(lambda: pytest.raises(ImageDecodeError, load_rgb, hostile, min_side=256))
    print(f"{shape} ({len(hostile)} bytes): refused in {took * 1000:.1f} ms of CPU")
    assert took < 0.1, took  # measured: 1-10 ms
    with pytest.raises(ImageDecodeError, match=problem.split(" (")[0]):
        load_rgb(hostile)


def test_what_phones_write_before_the_image_passes():
    from ec2train.preprocess import jpeg_structure_problem

    phone = phone_like_jpeg()
    assert len(phone) > 4_000_000
    assert jpeg_structure_problem(phone) is None
    assert load_rgb(phone, min_side=256).size == (640, 480)
    comments = with_segments(jpeg_bytes(photo_like(64, 48)), jpeg_segment(0xFE, b"made by hand") * 900)
    assert load_rgb(comments).size == (64, 48)  # 900 comments: within the 1,000 segments allowed


def test_markers_the_decoder_refuses_are_refused_before_pillow_reads_past_them():
    # Pillow's opener takes JPG and JPGn markers (0xC8, 0xF0-0xFD) as markers without a segment and
    # reads on byte by byte; libjpeg refuses them. A rule that skipped their "segments" would let
    # Pillow read whatever those hide.
    from ec2train.preprocess import jpeg_structure_problem

    plain = jpeg_bytes(photo_like(64, 48))
    for marker in (0xC8, 0xF0, 0xFD, 0xD8):
        hostile = with_segments(plain, bytes([0xFF, marker]) + b"\xff\xff" + b"\xff" * 100_000)
        assert jpeg_structure_problem(hostile).startswith(f"JPEG has a marker (0x{marker:X})"), marker
        with pytest.raises(ImageDecodeError, match="has a marker"):
            load_rgb(hostile)


def test_the_jpeg_walk_is_linear_and_cheap_on_the_worst_files():
    # The rule must cost far less than the decode it guards: a 6 MB body is one C regex pass, plus
    # at most 1,000 segments of Python.
    from ec2train.preprocess import jpeg_structure_problem

    plain = jpeg_bytes(photo_like(64, 48))
    scan_at = plain.index(b"\xff\xda")
    scan_end = scan_at + 2 + int.from_bytes(plain[scan_at + 2 : scan_at + 4], "big")
    worst = {
        "stuffed FF in a scan": plain[:scan_end] + b"\xff\x00" * 3_000_000 + plain[scan_end:],
        "restarts in a scan": plain[:scan_end] + b"\xff\xd0" * 3_000_000 + plain[scan_end:],
        "fill bytes in a scan": plain[:scan_end] + b"\xff" * 6_000_000 + plain[scan_end:],
        "1,000 segments": with_segments(plain, jpeg_segment(0xFE, b"") * 995),
    }
    for name, data in worst.items():
        took = min(_cpu_seconds(lambda d=data: jpeg_structure_problem(d)) for _ in range(3))
        print(f"walk of {name} ({len(data)} bytes): {took * 1000:.1f} ms")
        assert took < 0.1, (name, took)  # measured: 3-12 ms (a 12 MP photo decodes in 50-170 ms)


def test_a_png_of_chunks_before_its_image_data_is_refused_before_pillow_opens_it():
    # Pillow reads every chunk before the image data, in Python, when it opens the file: 400,000
    # unknown chunks there (4.8 MB) took 1.75 s of CPU before the chunk rule (run after opening)
    # refused the file.
    from ec2train.preprocess import png_structure_problem

    hostile = many_chunk_png(100, 100, 400_000, before_data=True)
    with pytest.raises(ImageDecodeError, match="PNG has more than 1000 chunks before its image data"):
        load_rgb(hostile)
    took = _cpu_seconds(lambda: pytest.raises(ImageDecodeError, load_rgb, hostile))
    print(f"a PNG of 400,000 chunks before its data ({len(hostile)} bytes): refused in {took * 1000:.1f} ms")
    assert took < 0.1, took
    assert png_structure_problem(many_chunk_png(100, 100, 999, before_data=True)) is None
    assert load_rgb(many_chunk_png(100, 100, 999, before_data=True)).size == (100, 100)


@pytest.mark.timeout(30)  # a second read of the pipe would wait for ever
def test_a_path_is_read_once(tmp_path: Path):
    # `ec2train predict <(curl ...)`: a path that can be read only once (a pipe) decodes.
    import threading

    fifo = tmp_path / "image.jpg"
    os.mkfifo(fifo)
    jpeg = jpeg_bytes(photo_like(64, 48))
    writer = threading.Thread(target=fifo.write_bytes, args=(jpeg,), daemon=True)
    writer.start()
    try:
        assert load_rgb(fifo).size == (64, 48)
    finally:
        writer.join(10)  # it finishes once its bytes are read (on a loaded box, a moment after)
        if writer.is_alive():  # never read: open the other end (without waiting) so it can finish
            os.close(os.open(fifo, os.O_RDONLY | os.O_NONBLOCK))
            writer.join(10)


@pytest.mark.fast
def test_both_ways_of_finding_markers_agree():
    # Where 0xFF bytes are dense the walk finds markers in a translated copy instead of with the
    # regex: the same answer, from every offset, on strings of the bytes that matter.
    import random

    from ec2train import preprocess

    rng = random.Random(0)
    alphabet = [0xFF] * 6 + [0x00, 0x01, 0x80, 0xC4, 0xC8, 0xD0, 0xD7, 0xD8, 0xD9, 0xDA, 0xE1, 0xFE]
    for _ in range(2000):
        data = bytes(rng.choice(alphabet) for _ in range(rng.randint(0, 40)))
        classes = data.translate(preprocess._MARKER_CLASSES)
        for at in range(len(data) + 1):
            found = preprocess._JPEG_MARKER.search(data, at)
            assert classes.find(b"FM", at) == (found.start() if found else -1), (data, at)
