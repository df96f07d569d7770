"""The GPU loader (`fit --loader gpu`), run on the CPU device: the same code as on a GPU except
the decoder (libjpeg-turbo here, nvJPEG there: bench/gpu_check.py checks that part on a GPU).

Workers read JPEG files and check their headers, the training process decodes and transforms
the batch; every other file takes the CPU loader's path. What must hold: the same pixels as the
CPU loader within a stated tolerance, its errors, its crops from the same seeds, exact resume,
exact counts across ranks, and `auto` never choosing an unverified path."""

from __future__ import annotations

import io
import json
import math
import random
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image
from torchvision import transforms as T

from ec2train import hw
from ec2train.config import ConfigError, resolve
from ec2train.data import (
    CorruptImageError,
    EvalSampler,
    SplitSampler,
    TrainSampler,
    eval_dataset,
    make_loader,
    mix_seed,
    train_dataset,
)
from ec2train.data.encoded import (
    DEVICE_MAX_FILE_BYTES,
    EncodedDataset,
    JpegFrame,
    device_jpeg_frame,
    random_flip,
    random_resized_crop_box,
)
from ec2train.data.gpu import decode_batch, decode_chunks, device_decode_problem, jpeg_share, select_loader
from ec2train.loop import fit
from tests.support.cli import assert_one_line_error, cli_in_process
from tests.support.images import jpeg_bytes, photo_like
from tests.support.training import TINY_FIT, state_dicts_equal

# ---------------------------------------------------------------- JPEG bytes for the header rules


def _jpeg(width: int = 64, height: int = 48, seed: int = 0, **save) -> bytes:
    buf = io.BytesIO()
    photo_like(width, height, seed).save(buf, format="JPEG", quality=90, **save)
    return buf.getvalue()


def _segments(data: bytes) -> list[tuple[int, int, int]]:
    """(marker, start, end) of each segment before the first scan of a well-formed JPEG."""
    at, out = 2, []
    while data[at + 1] != 0xDA:
        end = at + 2 + int.from_bytes(data[at + 2 : at + 4], "big")
        out.append((data[at + 1], at, end))
        at = end
    return out


def _without(data: bytes, marker: int) -> bytes:
    for m, start, end in reversed(_segments(data)):
        if m == marker:
            data = data[:start] + data[end:]
    return data


def _with_segment(data: bytes, marker: int, body: bytes) -> bytes:
    return data[:2] + bytes([0xFF, marker]) + (len(body) + 2).to_bytes(2, "big") + body + data[2:]


def _patched_frame(data: bytes, **fields) -> bytes:
    """The frame header (SOF0) with fields replaced: marker, precision, height, width, ids."""
    (_, start, _) = next(s for s in _segments(data) if s[0] == 0xC0)
    out = bytearray(data)
    if "marker" in fields:
        out[start + 1] = fields["marker"]
    if "precision" in fields:
        out[start + 4] = fields["precision"]
    if "height" in fields:
        out[start + 5 : start + 7] = fields["height"].to_bytes(2, "big")
    if "width" in fields:
        out[start + 7 : start + 9] = fields["width"].to_bytes(2, "big")
    for k, cid in enumerate(fields.get("ids", b"")):
        out[start + 10 + 3 * k] = cid
    return bytes(out)


def _adobe(transform: int) -> bytes:
    return b"Adobe" + bytes([0, 100, 0, 0, 0, 0, transform])


def test_plain_jpegs_go_to_the_device_with_their_header_size():
    assert device_jpeg_frame(_jpeg(64, 48)) == JpegFrame(64, 48)
    assert device_jpeg_frame(_jpeg(31, 97, subsampling=0)) == JpegFrame(31, 97)  # 4:4:4, odd sizes
    assert device_jpeg_frame(_jpeg() + b"\x00" * 1000) == JpegFrame(64, 48)  # bytes after the end marker
    assert device_jpeg_frame(_with_segment(_jpeg(), 0xEE, _adobe(1))) == JpegFrame(64, 48)  # Adobe, YCbCr
    extended = _patched_frame(_jpeg(), marker=0xC1)  # extended sequential: same Huffman decode
    assert device_jpeg_frame(extended) == JpegFrame(64, 48)


@pytest.mark.parametrize(
    "why,data",
    [
        ("progressive", _jpeg(progressive=True)),
        ("greyscale", (lambda b: (photo_like(64, 48).convert("L").save(b, "JPEG"), b.getvalue())[1])(io.BytesIO())),
        ("CMYK", (lambda b: (photo_like(64, 48).convert("CMYK").save(b, "JPEG"), b.getvalue())[1])(io.BytesIO())),
        ("RGB-coded, Adobe marker", _with_segment(_jpeg(), 0xEE, _adobe(0))),
        ("RGB-coded, components R G B", _patched_frame(_jpeg(), ids=b"RGB")),
        ("12-bit", _patched_frame(_jpeg(), precision=12)),
        ("arithmetic-coded", _patched_frame(_jpeg(), marker=0xC9)),
        ("lossless", _patched_frame(_jpeg(), marker=0xC3)),
        ("MPO", _with_segment(_jpeg(), 0xE2, b"MPF\x00" + bytes(20))),
        ("truncated", _jpeg()[: len(_jpeg()) // 2]),
        ("no end marker", _jpeg()[:-2]),
        ("zero height (set by a DNL marker)", _patched_frame(_jpeg(), height=0)),
        ("PNG", (lambda b: (photo_like(8, 8).save(b, "PNG"), b.getvalue())[1])(io.BytesIO())),
        ("empty", b""),
        ("SOI only", b"\xff\xd8"),
    ],
)
def test_every_other_file_goes_to_the_workers(why, data):
    assert device_jpeg_frame(data) is None, why


def test_the_header_walk_answers_for_any_damage_without_raising():
    good = _jpeg(80, 60)
    rng = random.Random(0)
    for _ in range(3000):
        data = bytearray(good)
        for _ in range(rng.randint(1, 4)):
            kind, at = rng.random(), rng.randrange(len(data))
            if kind < 0.5:
                data[at] = rng.randrange(256)
            elif kind < 0.8:
                del data[at : at + rng.randint(1, 64)]
            else:
                data[at:at] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 8)))
        frame = device_jpeg_frame(bytes(data))
        assert frame is None or (frame.width > 0 and frame.height > 0)
    assert device_jpeg_frame(b"\xff\xd8" + b"\xff" * 1_000_000) is None  # fill bytes: a linear walk


# ---------------------------------------------------------------- the crops: the CPU loader's draws


@pytest.mark.parametrize("width,height", [(500, 400), (40, 40), (333, 500), (2000, 90), (90, 2000), (3, 2)])
def test_crop_box_and_flip_are_the_cpu_loaders_draws_from_the_same_seed(width, height):
    crop, flip = T.RandomResizedCrop(32), T.RandomHorizontalFlip()
    image = torch.empty((3, height, width), dtype=torch.uint8)
    for seed in range(40):
        torch.manual_seed(seed)
        expected = crop.get_params(image, crop.scale, crop.ratio), bool(torch.rand(1) < flip.p)
        generator = torch.Generator().manual_seed(seed)
        assert (random_resized_crop_box(width, height, generator), random_flip(generator)) == expected


# ---------------------------------------------------------------- pixels against the CPU loader


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> list[tuple[Path, int]]:
    """dogImages-sized photos (odd and portrait sizes too) and one big one, as JPEG files."""
    root = tmp_path_factory.mktemp("photos")
    sizes = [(500, 400), (400, 500), (333, 500), (500, 375), (1600, 1200)]
    samples = []
    for k, (w, h) in enumerate(sizes):
        path = root / f"photo{k}.jpg"
        path.write_bytes(jpeg_bytes(photo_like(w, h, k)))
        samples.append((path, k % 2))
    return samples


def _through_device(dataset: EncodedDataset, keys) -> torch.Tensor:
    batch, _ = dataset.collate([dataset[k] for k in keys])
    return decode_batch(batch, "cpu")


def _levels(a: torch.Tensor, b: torch.Tensor) -> tuple[int, float, float]:
    """(max, mean |difference|) in pixel levels and PSNR in dB."""
    d = a.float() - b.float()
    mse = d.pow(2).mean().item()
    return int(d.abs().max()), d.abs().mean().item(), (10 * math.log10(255**2 / mse) if mse else math.inf)


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_pixels_match_the_cpu_loader_within_one_level_where_it_decodes_at_full_scale(photos, train):
    # dogImages-sized photos at 224 px: the CPU loader decodes them at full scale (its short side
    # is under twice the size it needs), so only the resize's rounding differs (Pillow's fixed
    # point against torch's float), and train draws the same crop from the same seed.
    small = photos[:4]
    keys = [(k, mix_seed(7, 2, k)) for k in range(len(small))] if train else list(range(len(small)))
    cpu = train_dataset(small, 224, True) if train else eval_dataset(small, 224)
    dev = train_dataset(small, 224, True, on_device=True) if train else eval_dataset(small, 224, on_device=True)
    expected = torch.stack([cpu[k][0] for k in keys])
    worst, mean, _ = _levels(_through_device(dev, keys), expected)
    assert worst <= 1 and mean < 0.25, (worst, mean)


def test_big_photos_differ_only_by_the_cpu_loaders_reduced_scale_decode(photos):
    big = photos[4:]  # 1600x1200: the CPU loader decodes it at half scale for the 256 px eval resize
    dev = _through_device(eval_dataset(big, 224, on_device=True), [0])
    full_decode = eval_dataset(big, 224)
    full_decode.min_side = None  # the CPU loader's transform on a full-scale decode
    worst, _, _ = _levels(dev, full_decode[0][0][None])
    assert worst <= 1
    _, mean, psnr = _levels(dev, eval_dataset(big, 224)[0][0][None])
    assert mean < 1.0 and psnr > 40, (mean, psnr)  # the reduced-scale decode's own difference (tests/test_decode.py)


def test_a_mixed_batch_keeps_its_order_and_the_workers_decode_the_rest(tmp_path, photos):
    files = {
        "a.jpg": jpeg_bytes(photo_like(120, 90, 1)),
        "b.png": None,
        "c.jpg": _jpeg(100, 80, 3, progressive=True),
        "d.jpg": None,
        "e.jpg": jpeg_bytes(photo_like(90, 120, 5)),
    }
    photo_like(80, 100, 2).save(tmp_path / "b.png")
    photo_like(100, 100, 4).convert("L").save(tmp_path / "d.jpg")
    samples = []
    for k, (name, data) in enumerate(files.items()):
        if data is not None:
            (tmp_path / name).write_bytes(data)
        samples.append((tmp_path / name, k))
    cpu, dev = eval_dataset(samples, 64), eval_dataset(samples, 64, on_device=True)
    ((batch, labels),) = make_loader(dev, EvalSampler(len(dev)), 5, 1, False)  # through a worker process
    assert (batch.encoded, batch.decoded) == ([0, 4], [1, 2, 3])
    assert labels.tolist() == [0, 1, 2, 3, 4]
    pixels = decode_batch(batch, "cpu")
    expected = torch.stack([cpu[k][0] for k in range(5)])
    assert torch.equal(pixels[[1, 2, 3]], expected[[1, 2, 3]])  # the CPU loader's own result
    assert _levels(pixels, expected)[0] <= 1


def test_training_batches_through_workers_are_the_cpu_loaders_within_one_level(demo_data):
    from ec2train.data import scan_split

    _, samples = scan_split(demo_data, "train")
    samples = samples[::8]  # 24 images of 40 px: decoded at full scale by both loaders
    batches = {}
    for on_device in (False, True):
        ds = train_dataset(samples, 32, True, on_device)
        sampler = TrainSampler(len(ds), seed=3)
        sampler.set_epoch(1)
        batches[on_device] = [
            (decode_batch(x, "cpu") if on_device else x, y) for x, y in make_loader(ds, sampler, 8, 1, False)
        ]
    for (a, la), (b, lb) in zip(batches[False], batches[True]):
        assert torch.equal(la, lb)
        assert _levels(a, b)[0] <= 1


# ---------------------------------------------------------------- errors and bounds


def _damaged(photo: Path, tmp_path: Path) -> dict[str, Path]:
    """Files each loader must refuse with the CPU loader's error."""
    good = photo.read_bytes()
    files = {
        # frame, scan and end marker are all there, but no quantization tables: both decoders refuse it
        "no-tables.jpg": _without(good, 0xDB),
        "too-many-pixels.jpg": _patched_frame(good, width=8000, height=6000),  # 48 Mpx, from the header
        "strip.jpg": jpeg_bytes(photo_like(2100, 100)),  # 21:1
    }
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    return {name: tmp_path / name for name in files}


def test_damaged_and_refused_files_give_the_cpu_loaders_error(photos, tmp_path):
    for name, path in _damaged(photos[0][0], tmp_path).items():
        with pytest.raises(CorruptImageError) as cpu_error:
            eval_dataset([(path, 0)], 64)[0]
        with pytest.raises(CorruptImageError) as device_error:
            _through_device(eval_dataset([(path, 0)], 64, on_device=True), [0])
        assert str(device_error.value) == str(cpu_error.value), name
        assert str(path) in str(device_error.value)


def test_fit_with_the_gpu_loader_stops_on_a_damaged_jpeg_with_its_path(capsys, demo_data, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(demo_data, data)
    bad = data / "train" / "001.Circle" / "Circle_train_0003.jpg"
    bad.write_bytes(_without(bad.read_bytes(), 0xDB))  # decoded (and refused) by this process, not a worker
    code, _, err = cli_in_process(
        capsys, "fit", "--data", data, "--output", tmp_path / "out", "--logdir", tmp_path / "runs",
        "--arch", "resnet18", "--weights", "none", "--image-size", "32", "--epochs", "1",
        "--workers", "1", "--loader", "gpu",
    )  # fmt: skip
    assert_one_line_error(code, err, "cannot decode image", "Circle_train_0003.jpg", "data check")


def test_big_files_are_read_by_the_device_only_up_to_the_limit(photos, tmp_path):
    big = photos[0][0].read_bytes()
    padding = _with_segment(b"\xff\xd8", 0xEF, bytes(65_000))[2:]  # a metadata segment
    big = big[:2] + padding * (DEVICE_MAX_FILE_BYTES // len(padding) + 1) + big[2:]  # valid, over the limit
    (tmp_path / "big.jpg").write_bytes(big)
    samples = [(tmp_path / "big.jpg", 0)]
    dev = eval_dataset(samples, 64, on_device=True)
    sample, _ = dev[0]
    assert isinstance(sample, torch.Tensor)  # decoded by the worker, as by the CPU loader
    assert torch.equal(sample, eval_dataset(samples, 64)[0][0])


def test_a_batch_of_big_photos_is_decoded_a_few_at_a_time():
    assert decode_chunks([10, 10, 10], budget=25) == [[0, 1], [2]]
    assert decode_chunks([30, 5, 5, 30], budget=25) == [[0], [1, 2], [3]]  # too big alone: a call of its own
    assert decode_chunks([], budget=25) == []
    assert decode_chunks([1] * 64, budget=1000) == [list(range(64))]


# ---------------------------------------------------------------- the choice


GPU_BOX = dict(device_type="cuda", jpeg_share=1.0, cpus_per_process=4)


@pytest.mark.parametrize(
    "requested,box,verified,kind,needle",
    [
        ("cpu", GPU_BOX, True, "cpu", "--loader cpu"),
        ("gpu", GPU_BOX, False, "gpu", "the GPU decodes"),
        ("gpu", {**GPU_BOX, "jpeg_share": 0.75}, False, "gpu", "25% of the files are not JPEGs"),
        ("gpu", {**GPU_BOX, "device_type": "cpu"}, False, "gpu", "on the CPU"),
        ("auto", GPU_BOX, False, "cpu", "bench/gpu_check.py"),  # never an unverified default
        ("auto", GPU_BOX, True, "gpu", "4 CPUs for this GPU"),
        ("auto", {**GPU_BOX, "device_type": "cpu"}, True, "cpu", "no GPU"),
        ("auto", {**GPU_BOX, "jpeg_share": 0.2}, True, "cpu", "20% of the files are JPEGs"),
        ("auto", {**GPU_BOX, "cpus_per_process": 16}, True, "cpu", "16 CPUs"),
        ("auto", {**GPU_BOX, "cpus_per_process": hw.GPU_LOADER_MAX_CPUS}, True, "gpu", "the GPU decodes"),
    ],
)
def test_which_loader(requested, box, verified, kind, needle):
    choice = hw.choose_loader(requested, **box, verified=verified)
    assert choice.kind == kind and needle in choice.why


def test_a_device_that_cannot_decode_jpegs_is_an_error_when_asked_for_and_skipped_by_auto():
    with pytest.raises(hw.HardwareError, match="--loader gpu: torchvision cannot decode JPEGs on this device"):
        hw.choose_loader("gpu", **GPU_BOX, decode_problem="not compiled with nvJPEG")
    choice = hw.choose_loader("auto", **GPU_BOX, decode_problem="not compiled with nvJPEG", verified=True)
    assert choice.kind == "cpu" and "not compiled with nvJPEG" in choice.why
    assert hw.choose_loader("auto", **GPU_BOX).kind == "cpu"  # as shipped: not verified yet
    assert hw.GPU_LOADER_VERIFIED is False


def test_no_cuda_here_is_found_by_the_probe(monkeypatch, photos):
    paths = [p for p, _ in photos]
    assert device_decode_problem("cpu") is None
    assert device_decode_problem("cuda:0")  # this box has no CUDA device: the probe says why
    with pytest.raises(hw.HardwareError, match="--loader gpu: torchvision cannot decode JPEGs"):
        select_loader("gpu", "cuda:0", paths, 4)
    monkeypatch.setattr(hw, "GPU_LOADER_VERIFIED", True)  # as after a passing gpu_check
    choice = select_loader("auto", "cuda:0", paths, 4)
    assert choice.kind == "cpu" and "cannot decode JPEGs on the GPU" in choice.why
    assert select_loader("gpu", "cpu", paths, 4).kind == "gpu"


def test_jpeg_share_counts_jpeg_names():
    assert jpeg_share([Path("a.jpg"), Path("b.JPEG"), Path("c.png"), Path("d.webp")]) == 0.5
    assert jpeg_share([]) == 0.0


def test_the_loader_setting_is_checked_and_explained(capsys, demo_data, tmp_path):
    assert resolve(loader="gpu").loader == "gpu" and resolve().loader == "auto"
    toml = tmp_path / "c.toml"
    toml.write_text('[fit]\nloader = "fast"\n')
    with pytest.raises(ConfigError, match="--loader 'fast': must be one of auto, cpu, gpu"):
        resolve(toml)
    code, _, err = cli_in_process(capsys, "fit", "--data", demo_data, "--loader", "fast")
    assert code == 2 and "fast" in err and "Traceback" not in err
    code, out, _ = cli_in_process(capsys, "fit", "--help")
    text = " ".join(out.split())
    assert code == 0 and "bench/gpu_check.py" in text and "--loader gpu opts in" in text
    assert f"at most {hw.GPU_LOADER_MAX_CPUS} CPUs per GPU" in text


# ---------------------------------------------------------------- fit through the GPU loader


def test_training_through_the_gpu_loader_learns(demo_data, tmp_path):
    from rich.console import Console

    log = io.StringIO()
    cfg = resolve(
        data=str(demo_data), output=str(tmp_path / "out"), logdir=str(tmp_path / "runs"),
        **{**TINY_FIT, "workers": 1}, loader="gpu", threads=1,
    )  # fmt: skip
    result = fit(cfg, console=Console(file=log, width=300))
    assert "gpu loader (--loader gpu) on the CPU" in log.getvalue()
    assert result.metrics["valid_acc1"] >= 0.8 and result.metrics["test_acc1"] >= 0.7, result.metrics
    assert result.metrics["test_images"] == 4 * 12  # every test image, once
    history = json.loads((tmp_path / "out" / "metrics.json").read_text())["history"]
    assert history[-1]["train_loss"] < history[0]["train_loss"]


def test_resume_through_the_gpu_loader_is_exact(demo_data, tmp_path):
    def cfg(out: str, **kw):
        settings = {**TINY_FIT, "arch": "shufflenet_v2_x0_5", "epochs": 2, "workers": 1, "threads": 1, **kw}
        return resolve(
            data=str(demo_data), output=str(tmp_path / out), logdir=str(tmp_path / "runs"), loader="gpu", **settings
        )

    full = fit(cfg("full"))
    steps = {"n": 0}

    def stop_in_epoch_two() -> bool:
        steps["n"] += 1
        return steps["n"] == 12 + 5  # 12 steps per epoch (192 images / 16)

    assert fit(cfg("cut"), should_stop=stop_in_epoch_two).interrupted
    resumed = fit(cfg("cut", resume="auto"))
    a = torch.load(full.model_path, weights_only=True)
    b = torch.load(resumed.model_path, weights_only=True)
    assert state_dicts_equal(a["state_dict"], b["state_dict"])
    assert a["metrics"]["test_acc1"] == b["metrics"]["test_acc1"]


def test_eval_counts_every_image_once_across_ranks(demo_data):
    from ec2train.data import scan_split

    _, valid = scan_split(demo_data, "valid")
    _, test = scan_split(demo_data, "test")
    dataset = eval_dataset(valid + test, 32, on_device=True)
    seen = {}
    for split, samples in (("valid", valid), ("test", test)):
        images = []
        for rank in range(3):  # 48 images on 3 ranks, in batches of 5: uneven on purpose
            sampler = SplitSampler({"valid": len(valid), "test": len(test)}, rank, 3)
            sampler.use(split)
            for batch, labels in make_loader(dataset, sampler, 5, 0, False):
                images += list(decode_batch(batch, "cpu"))
                assert len(labels) == len(batch)
        seen[split] = images
        assert len(images) == len(samples)
        assert len({img.numpy().tobytes() for img in images}) == len(samples)  # each image once


def test_demo_images_are_all_decoded_on_the_device(demo_data):
    from ec2train.data import scan_split

    _, samples = scan_split(demo_data, "valid")
    dataset = eval_dataset(samples, 32, on_device=True)
    batch, _ = dataset.collate([dataset[k] for k in range(len(dataset))])
    assert batch.decoded == [] and len(batch.encoded) == len(samples)  # so the tests above test the device path
    Image.open(samples[0][0]).verify()
