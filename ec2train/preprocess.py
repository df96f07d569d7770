"""Image decoding and the train/eval transforms: defined once, used by training and serving.

Imports only torch, torchvision and Pillow: this module ships inside the SageMaker model
package (`ec2train export --package`), where nothing else is installed.
"""

from __future__ import annotations

import contextlib
import io
import re
import threading
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

import torch
from PIL import Image, UnidentifiedImageError
from torchvision import transforms as T

from ec2train.errors import UserError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Eval resizes the short side to image_size / CROP_RATIO, then center-crops image_size
# (torchvision's and timm's convention: 224 -> resize 256 -> crop 224).
CROP_RATIO = 0.875

Source = str | Path | bytes | BinaryIO

# The decode policy, in one place, for every image we did not make ourselves: requests to the
# server and the SageMaker handler, and data sets (training, `data check`, `data prepare`).
# Decoders allowed: the formats photos come in (JPEG's opener also returns phone cameras' MPO
# files). Nothing that can shell out (EPS runs Ghostscript) or that few people send.
SAFE_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP")
# Refused from the header, before decoding: more pixels than this (decompression bombs) ...
MAX_PIXELS = 40_000_000
# ... or a long side more than this many times the short side. Eval resizes the short side to
# 256 px, so a 1 x 100,000 px strip (a 274-byte PNG) would become 256 x 25.6 M px: gigabytes.
# At 20:1 the resized image is at most 256 x 5,120 (16 MB as float), whatever the file says.
# lambda/safe_fetch.py applies the same rule (its own copy; tests/test_lambda.py checks they agree).
MAX_ASPECT_RATIO = 20
# Pillow's messages name the file object (`<_io.BytesIO object at 0x7f...>`): never show that.
_OBJECT_REPR = re.compile(r"<[^<>]*? at 0x[0-9a-fA-F]+>")


# Progressive JPEGs: each scan walks every block of the image, however few bytes it takes (an
# end-of-band run codes 32,767 blocks in two bytes), so a scan of a few dozen bytes costs as much
# CPU as a whole baseline decode of the image. A JPEG may have at most MAX_JPEG_SCANS scans, and
# at most MAX_SCAN_PIXELS / its pixels (16 at 40 MP, 53 at 12 MP); encoders write about 10.
# Counted from the markers before decoding (jpeg_structure_problem).
MAX_JPEG_SCANS = 100
MAX_SCAN_PIXELS = 16 * MAX_PIXELS
# The JPEG kinds decoded: the Huffman-coded ones web browsers decode. Arithmetic coding can code
# a scan of a whole image in a few bits (so the scan rule above would not bound its cost), and
# lossless and hierarchical JPEGs are rare outside medical imaging.
_JPEG_DECODED = {0xC0: "baseline", 0xC1: "extended sequential", 0xC2: "progressive"}
_JPEG_REFUSED = {0xC3: "lossless", **dict.fromkeys((0xC5, 0xC6, 0xC7), "hierarchical")}
_JPEG_REFUSED.update({m: "arithmetic-coded" for m in (0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF)})
# In entropy-coded data a 0xFF byte is followed by 0x00 (stuffing), a restart marker or another
# 0xFF (fill); anything else starts the next marker. One byte after 0xFF, never a repetition:
# `\xff+` backtracks quadratically on a run of 0xFF bytes.
_NEXT_MARKER = re.compile(rb"\xff[^\x00\xd0-\xd7\xff]")
# PNG: Pillow reads each chunk in Python, so a file of many empty chunks costs far more than its
# pixels. A PNG may have PNG_FREE_CHUNKS chunks and one more per PNG_BYTES_PER_CHUNK bytes
# (libpng writes chunks of 8 KB).
PNG_FREE_CHUNKS = 1_000
PNG_BYTES_PER_CHUNK = 512


class ImageDecodeError(UserError):
    """The bytes or file are not a decodable image (or are a decompression bomb)."""


class MemoryBusy(Exception):
    """A MemoryBudget has no room for this image now: the request may be retried (503), unlike a bad image."""


def resize_size(image_size: int) -> int:
    return int(round(image_size / CROP_RATIO))


def size_problem(width: int, height: int, max_pixels: int | None = MAX_PIXELS) -> str | None:
    """Why an image of this size (from its header) is refused before decoding, or None."""
    if width < 1 or height < 1:
        return f"image is {width}x{height} pixels: not an image"
    if max_pixels is not None and width * height > max_pixels:
        return f"image is {width}x{height} pixels, more than the limit of {max_pixels}"
    if max(width, height) > MAX_ASPECT_RATIO * min(width, height):
        return (
            f"image is {width}x{height} pixels: one side is more than {MAX_ASPECT_RATIO} times "
            "the other; crop it closer to the subject"
        )
    return None


def jpeg_scan_limit(width: int, height: int) -> int:
    """The most scans a JPEG of this size may have (MAX_JPEG_SCANS, fewer for large images)."""
    return max(1, min(MAX_JPEG_SCANS, MAX_SCAN_PIXELS // max(1, width * height)))


def jpeg_structure_problem(data) -> str | None:
    """Why a JPEG is refused from its markers, before decoding: a kind not decoded here, or more
    scans than its size allows (jpeg_scan_limit). None when neither; a malformed stream is left to
    the decoder. Walks the first image only, to its EOI (an MPO's later images are not decoded).
    lambda/safe_fetch.py applies the same rule (its own copy; tests/test_lambda.py checks they agree)."""
    size, at, scans, limit, frame = len(data), 2, 0, MAX_JPEG_SCANS, ""
    while at + 4 <= size:
        if data[at] != 0xFF:
            return None
        marker = data[at + 1]
        if marker == 0xFF:  # fill byte
            at += 1
            continue
        if marker == 0xD9:  # EOI
            return None
        if marker == 0x01 or 0xD0 <= marker <= 0xD8:  # no length field
            at += 2
            continue
        end = at + 2 + int.from_bytes(data[at + 2 : at + 4], "big")
        if marker in _JPEG_REFUSED:
            return f"{_JPEG_REFUSED[marker]} JPEG: not decoded here (only baseline and progressive); re-save it"
        if marker in _JPEG_DECODED and not frame and end <= size:
            height, width = int.from_bytes(data[at + 5 : at + 7], "big"), int.from_bytes(data[at + 7 : at + 9], "big")
            frame, limit = f"{width}x{height} pixels", jpeg_scan_limit(width, height)
        if marker == 0xDA:  # start of scan: its entropy-coded data runs to the next marker
            scans += 1
            if scans > limit:
                return (
                    f"JPEG has more than {limit} scans, the most allowed for {frame or 'its size'} (each scan "
                    "decodes the whole image again; photos have about 10); re-save it as a baseline JPEG"
                )
            found = _NEXT_MARKER.search(data, end)
            if found is None:
                return None
            at = found.start()
            continue
        at = end
    return None


def png_structure_problem(data) -> str | None:
    """Why a PNG is refused from its chunk headers, before decoding (more chunks than its size
    explains), or None; a malformed stream is left to the decoder."""
    limit = PNG_FREE_CHUNKS + len(data) // PNG_BYTES_PER_CHUNK
    at, chunks = 8, 0
    while at + 8 <= len(data):
        chunks += 1
        if chunks > limit:
            return (
                f"PNG has more than {limit} chunks for its {len(data)} bytes (a chunk for every "
                f"{PNG_BYTES_PER_CHUNK} bytes at most); re-save it"
            )
        if data[at + 4 : at + 8] == b"IEND":
            return None
        at += 12 + int.from_bytes(data[at : at + 4], "big")
    return None


def structure_problem(image_format: str | None, data) -> str | None:
    """Why an image's structure would make decoding it cost far more than its size, or None."""
    if image_format in ("JPEG", "MPO"):
        return jpeg_structure_problem(data)
    if image_format == "PNG":
        return png_structure_problem(data)
    return None


# Bytes a pixel takes in Pillow's memory by mode (4 for every mode not named).
_MODE_BYTES = {"1": 1, "L": 1, "P": 1, "I;16": 2, "I;16B": 2, "I;16L": 2}


def decode_bytes(img: Image.Image, full_size: tuple[int, int], reduce_by: int = 1) -> int:
    """An upper bound of the memory load_rgb takes to decode `img` (opened, after any draft) and
    turn it into RGB, reduced by `reduce_by` (_reduced_rgb); `full_size` is the header's size."""
    pixels, mode = img.size[0] * img.size[1], img.mode
    decoded = _MODE_BYTES.get(mode, 4)
    if reduce_by > 1:  # converted to one band or RGB, then a quarter of the pixels at most
        converted = 0 if mode in ("L", "RGB") else 1 if mode == "1" else 4
        total = pixels * (decoded + converted + 1)
    else:
        total = pixels * (decoded + (0 if mode == "RGB" else 4))
    total += full_size[0] * 512  # the decoders' row buffers
    if img.format == "WEBP":  # libwebp decodes into buffers of its own, then Pillow copies them
        total += pixels * 12
    if img.format in ("JPEG", "MPO") and img.info.get("progressive"):
        # A progressive decode holds every component's coefficients at full size, 2 bytes each
        # (fewer for subsampled components: `layer` is Pillow's (id, h, v, table) per component).
        layers = getattr(img, "layer", None) or [("", 1, 1, 0)] * len(img.getbands())
        h_max, v_max = max(c[1] for c in layers), max(c[2] for c in layers)
        total += sum(full_size[0] * h * full_size[1] * v * 2 // (h_max * v_max) for _, h, v, _ in layers)
    return total


class MemoryBudget:
    """Bytes that the images being decoded (and, in the server, the request bodies) hold at once.

    Thread-safe, and never blocks: a hold that does not fit raises MemoryBusy, which the server
    answers with 503. Holds of more than a sixteenth of the total together take at most three
    quarters of it, so a flood of large images leaves room for ordinary ones. `on_idle`, if set, is
    called (in the thread that gave the last bytes back) when nothing is held any more after at
    least `idle_after` bytes were: the server gives freed memory back to the system then."""

    def __init__(self, total: int, idle_after: int = 64 * 1024 * 1024):
        if total < 1:
            raise UserError(f"memory budget must be >= 1 byte, got {total}")
        self.total, self.idle_after = total, idle_after
        self.used = self.large = self.peak = self._since_idle = 0
        self.on_idle: Callable[[], None] | None = None
        self._lock = threading.Lock()

    def _is_large(self, n: int) -> bool:
        return n > self.total // 16

    def take(self, n: int) -> bool:
        """Holds n more bytes if they fit; False (holding nothing) if not."""
        with self._lock:
            large = self._is_large(n)
            if self.used + n > self.total or (large and self.large + n > self.total * 3 // 4):
                return False
            self.used += n
            self.large += n if large else 0
            self.peak = max(self.peak, self.used)
            self._since_idle = max(self._since_idle, self.used)
            return True

    def give(self, n: int) -> None:
        with self._lock:
            self.used -= n
            self.large -= n if self._is_large(n) else 0
            idle = self.used == 0 and self._since_idle >= self.idle_after
            if idle:
                self._since_idle = 0
        if idle and self.on_idle is not None:
            self.on_idle()

    @contextlib.contextmanager
    def hold(self, n: int, what: str = "this image"):
        if not self.take(n):
            raise MemoryBusy(
                f"no memory free for {what} now ({n // 2**20 + 1} MB of {self.total // 2**20} MB; "
                f"{self.used // 2**20} MB in use); retry in a moment"
            )
        try:
            yield
        finally:
            self.give(n)


def load_rgb(
    source: Source,
    min_side: int | None = None,
    max_pixels: int | None = MAX_PIXELS,
    formats: tuple[str, ...] = SAFE_FORMATS,
    budget: MemoryBudget | None = None,
) -> Image.Image:
    """Decode an image to RGB under the decode policy above.

    Sizes that `size_problem` refuses (decompression bombs, extreme aspect ratios) are refused
    from the header, and structures that `structure_problem` refuses (too many JPEG scans or PNG
    chunks) from the markers, before decoding. `formats` limits which Pillow decoders may run.
    With `min_side`, the image comes back with its short side between min_side and twice that
    when it was larger: JPEGs are decoded at reduced scale (DCT scaling via Pillow's draft mode:
    1/2, 1/4 or 1/8), other formats reduced (box filter, by a whole factor) right after decoding.
    For a 12 MP photo and a 224 px model this is several times faster and visually equivalent
    after resize.
    With `budget`, the decode's memory (decode_bytes) is held there while it runs: MemoryBusy if
    it does not fit.
    """
    refuse_decompression_bombs()
    try:
        # In memory (a file object is read: the structure check needs its bytes), or a path.
        path, data = None, None
        if isinstance(source, (str, Path)):
            path = source
        elif isinstance(source, (bytes, bytearray, memoryview)):
            data = source
        else:
            data = source.read()
        with Image.open(io.BytesIO(data) if data is not None else source, formats=list(formats)) as img:
            w, h = full_size = img.size
            _check_size(w, h, max_pixels)
            problem = structure_problem(img.format, data if data is not None else Path(str(path)).read_bytes())
            if problem:
                raise ImageDecodeError(problem)
            # Scaled DCT decodes at 1/2, 1/4 or 1/8 only, so it helps once the short side is at
            # least twice min_side; draft() never goes below the requested size.
            if min_side and img.format in ("JPEG", "MPO") and min(w, h) >= 2 * min_side:
                scale = min_side / min(w, h)
                img.draft("RGB", (max(1, round(w * scale)), max(1, round(h * scale))))
            reduce_by = min(img.size) // min_side if min_side and img.format not in ("JPEG", "MPO") else 1
            with budget.hold(decode_bytes(img, full_size, reduce_by)) if budget else contextlib.nullcontext():
                img.load()
                return _reduced_rgb(img, reduce_by)
    except (ImageDecodeError, MemoryBusy):
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        # Pillow's own guard (its warning is an error here: see refuse_decompression_bombs()).
        raise ImageDecodeError(f"image has too many pixels (decompression bomb guard): {_clean(exc)}") from exc
    except UnidentifiedImageError:  # its message is the file object's repr: say what we allow instead
        raise ImageDecodeError(f"not a decodable image (not a {', '.join(formats)} file)") from None
    except Exception as exc:  # malformed files make decoders raise many types; all mean "not an image"
        raise ImageDecodeError(f"not a decodable image: {type(exc).__name__}: {_clean(exc)}") from exc


def _check_size(w: int, h: int, max_pixels: int | None) -> None:
    problem = size_problem(w, h, max_pixels)
    if problem:
        raise ImageDecodeError(problem)
    # Pillow's own limit, checked here too: its warning depends on a process-wide filter
    # that anything else in the process (a test runner, a library) may reset.
    if Image.MAX_IMAGE_PIXELS and w * h > Image.MAX_IMAGE_PIXELS:
        raise ImageDecodeError(
            f"image has too many pixels (decompression bomb guard): {w}x{h} is over {Image.MAX_IMAGE_PIXELS}"
        )


def _reduced_rgb(img: Image.Image, reduce_by: int) -> Image.Image:
    """A decoded image as RGB, box-reduced by a whole factor (chosen so its short side stays >=
    min_side, as draft mode does while decoding a JPEG), so what follows works on a small image."""
    if reduce_by < 2:
        return img.convert("RGB")
    # Reduced in one band where there is one (a 1-bit or grey image), else as RGB; never a copy
    # of the full-size image for nothing (convert() to its own mode copies).
    target = "L" if img.mode in ("1", "L") else "RGB"
    return (img if img.mode == target else img.convert(target)).reduce(reduce_by).convert("RGB")


def _clean(exc: Exception) -> str:
    return _OBJECT_REPR.sub("the image", str(exc))


_bombs_refused = False


def refuse_decompression_bombs() -> None:
    """Make Pillow's DecompressionBombWarning an error in this process (once; load_rgb calls it).

    Pillow only warns between MAX_IMAGE_PIXELS and twice that; we refuse instead.
    Process-wide on purpose: warnings filters are global, and a per-call catch_warnings()
    is not thread-safe (the server decodes in threads). Each DataLoader worker process
    sets it on its first decode.
    """
    global _bombs_refused
    if not _bombs_refused:
        warnings.filterwarnings("error", category=Image.DecompressionBombWarning)
        _bombs_refused = True


def _train_steps(image_size: int, augment: bool = True) -> list:
    if not augment:
        return _eval_steps(image_size)
    return [T.RandomResizedCrop(image_size, antialias=True), T.RandomHorizontalFlip()]


def _eval_steps(image_size: int) -> list:
    return [T.Resize(resize_size(image_size), antialias=True), T.CenterCrop(image_size)]


def train_transform(image_size: int, mean=IMAGENET_MEAN, std=IMAGENET_STD, augment: bool = True):
    """PIL image -> normalized float tensor (random crop and flip when augment)."""
    return T.Compose([*_train_steps(image_size, augment), T.ToTensor(), T.Normalize(mean, std)])


def eval_transform(image_size: int, mean=IMAGENET_MEAN, std=IMAGENET_STD):
    """PIL image -> normalized float tensor: resize the short side, center crop (serving's too)."""
    return T.Compose([*_eval_steps(image_size), T.ToTensor(), T.Normalize(mean, std)])


def train_pixels(image_size: int, augment: bool = True):
    """train_transform without its last two steps: a uint8 (3, H, W) tensor. Loader workers
    return these and the training loop normalizes whole batches on the device
    (normalize_pixels): a quarter of the bytes between processes and to the GPU, and no
    per-image float work in the workers (1.1-1.4x less CPU per image: bench/bench_pixels.py)."""
    return T.Compose([*_train_steps(image_size, augment), T.PILToTensor()])


def eval_pixels(image_size: int):
    """eval_transform's uint8 counterpart (see train_pixels)."""
    return T.Compose([*_eval_steps(image_size), T.PILToTensor()])


def pixel_stats(mean, std, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(255, mean, std) as float32 tensors on the device, made once per loop: a tensor made
    from a list for a GPU every batch would make the CPU wait for the GPU. 255 is a tensor
    too: CUDA divides by a Python number as a multiplication by its reciprocal, one bit off
    ToTensor's division for about half of the 256 pixel values."""
    return (
        torch.full((), 255.0, dtype=torch.float32).to(device),
        torch.as_tensor(mean, dtype=torch.float32).view(1, -1, 1, 1).to(device),
        torch.as_tensor(std, dtype=torch.float32).view(1, -1, 1, 1).to(device),
    )


def normalize_pixels(
    images: torch.Tensor, stats: tuple[torch.Tensor, torch.Tensor, torch.Tensor], channels_last: bool
) -> torch.Tensor:
    """A uint8 (N, C, H, W) batch -> float32, exactly what T.ToTensor then T.Normalize give
    each image (the same operations, in the same order, all true divisions: equal bit for
    bit). stats: pixel_stats(mean, std, images.device)."""
    scale, mean, std = stats
    layout = torch.channels_last if channels_last else torch.contiguous_format
    return images.to(torch.float32, memory_format=layout).div_(scale).sub_(mean).div_(std)


def decode_min_side(image_size: int, train: bool) -> int:
    """Smallest short side worth decoding: random crops may zoom in, so train keeps 2x."""
    return 2 * image_size if train else resize_size(image_size)
