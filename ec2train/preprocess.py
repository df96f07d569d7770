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
from collections.abc import Callable, Iterator
from dataclasses import dataclass
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
# lambda/image_rules.py applies the same rule (its own copy; tests/test_lambda.py checks they agree).
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
# Pillow's JPEG opener reads everything before the first scan in Python: a segment at a time, a
# byte at a time where bytes belong to no segment, and quantization tables, frame headers, Exif
# and Photoshop data an entry at a time. So a JPEG may have at most MAX_JPEG_SEGMENTS segments (the
# walk below is Python too), and before its first scan at most MAX_JPEG_STRAY_BYTES bytes outside
# segments and MAX_JPEG_PARSED_BYTES in the segments Pillow parses. Phones write a few dozen
# segments (megabytes of them in XMP and ICC data, which Pillow reads whole, in C).
MAX_JPEG_SEGMENTS = 1_000
MAX_JPEG_STRAY_BYTES = 4_096
MAX_JPEG_PARSED_BYTES = 256 * 1024
# Frame headers (SOF markers) by the kind of JPEG they start. Decoded: the Huffman-coded kinds
# web browsers decode. Arithmetic coding can code a scan of a whole image in a few bits (so the
# scan rule above would not bound its cost), and lossless and hierarchical JPEGs are rare outside
# medical imaging.
JPEG_FRAMES = {0xC0: "baseline", 0xC1: "extended sequential", 0xC2: "progressive", 0xC3: "lossless"}
JPEG_FRAMES.update({**dict.fromkeys((0xC5, 0xC6, 0xC7), "hierarchical"), 0xCB: "lossless"})
JPEG_FRAMES.update(dict.fromkeys((0xC9, 0xCA, 0xCD, 0xCE, 0xCF), "arithmetic-coded"))
JPEG_SEQUENTIAL = (0xC0, 0xC1)  # what the GPU loader's batched device decoder takes too
JPEG_DECODED = (*JPEG_SEQUENTIAL, 0xC2)
# The other segments libjpeg reads: tables (DHT, DAC, DQT), scans (SOS), DNL, DRI, APPn, COM.
# Every other marker ends its decode with an error (JPG, JPGn, DHP, EXP, a second SOI).
_JPEG_READ = {0xC4, 0xCC, 0xDA, 0xDB, 0xDC, 0xDD, *range(0xE0, 0xF0), 0xFE, *JPEG_FRAMES}
# A marker as libjpeg finds one: 0xFF and a byte from 0xC0 up that is not a restart marker (RSTn)
# or another 0xFF. It skips every other byte, with a warning (that Pillow silences): stray bytes
# between segments, fill bytes (FF FF), a scan's entropy-coded data with its stuffed bytes
# (FF 00) and restart markers, TEM (FF 01), and markers below 0xC0 inside a scan. One byte after
# 0xFF, never a repetition: `\xff+` backtracks quadratically on a run of 0xFF bytes.
_JPEG_MARKER = re.compile(rb"\xff[\xc0-\xcf\xd8-\xfe]")
# The regex tries every 0xFF, slowly where they are dense (fill bytes, stuffing, restarts): there,
# the walk looks for b"FM" in the bytes mapped to these classes instead (one pass of C each).
_MARKER_CLASSES = bytes.maketrans(
    bytes(range(256)),
    bytes(70 if b == 0xFF else 77 if _JPEG_MARKER.match(bytes((0xFF, b))) else 46 for b in range(256)),
)
# PNG: Pillow reads each chunk in Python, so a file of many empty chunks costs far more than its
# pixels. A PNG may have PNG_FREE_CHUNKS chunks and one more per PNG_BYTES_PER_CHUNK bytes
# (libpng writes chunks of 8 KB), and at most PNG_FREE_CHUNKS before its image data (Pillow reads
# those when it opens the file).
PNG_FREE_CHUNKS = 1_000
PNG_BYTES_PER_CHUNK = 512
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


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


@dataclass(frozen=True)
class JpegSegment:
    marker: int
    at: int  # where its 0xFF is
    end: int  # where its length says it ends (a scan's entropy-coded data starts there); SOI, EOI: at + 2
    skipped: int  # the bytes between the previous segment and this one (for a segment after a scan: its data)


def jpeg_segments(data) -> Iterator[JpegSegment]:
    """A JPEG's segments in order, found as libjpeg finds them (_JPEG_MARKER): to its first EOI
    (included: an MPO's later images are not decoded), the end of the data, or a segment whose
    length runs past it (included). Linear in len(data), in C but for a round of Python per segment."""
    at, next_marker = 2, _marker_finder(data)
    while (start := next_marker(at)) >= 0:
        marker = data[start + 1]
        if marker in (0xD8, 0xD9):  # SOI, EOI: no length
            yield JpegSegment(marker, start, start + 2, start - at)
            if marker == 0xD9:
                return
            at = start + 2
            continue
        if start + 4 > len(data):
            return
        end = start + 2 + int.from_bytes(data[start + 2 : start + 4], "big")
        yield JpegSegment(marker, start, end, start - at)
        at = max(end, start + 4)  # a length under 2 skips nothing more, in libjpeg as in Pillow


def _marker_finder(data) -> Callable[[int], int]:
    """at -> where the first marker at or after `at` starts (_JPEG_MARKER), or -1."""
    if data.count(b"\xff") * 64 <= len(data):  # photos: a 0xFF in 256 bytes, and a few markers

        def search(at: int) -> int:
            found = _JPEG_MARKER.search(data, at)
            return -1 if found is None else found.start()

        return search
    classes = data.translate(_MARKER_CLASSES)
    return lambda at: classes.find(b"FM", at)


def _pillow_parses(data, segment: JpegSegment) -> bool:
    """Whether Pillow's JPEG opener parses this segment's content in Python (see MAX_JPEG_PARSED_BYTES)."""
    marker, body = segment.marker, data[segment.at + 4 : segment.at + 18]
    return (
        marker == 0xDB
        or marker in JPEG_FRAMES
        or (marker == 0xE1 and body.startswith(b"Exif\x00\x00"))
        or (marker == 0xED and body.startswith(b"Photoshop 3.0\x00"))
    )


def jpeg_structure_problem(data) -> str | None:
    """Why a JPEG is refused from its markers, before Pillow opens it: a kind not decoded here, a
    marker libjpeg refuses, more scans than its size allows (jpeg_scan_limit), or more before its
    first scan than Pillow should read in Python (MAX_JPEG_SEGMENTS and the two after it). None
    otherwise; a damaged stream is left to the decoder. Walks the first image (jpeg_segments).
    lambda/image_rules.py applies the same rule (its own copy; tests/test_lambda.py checks they agree)."""
    scans, stray, parsed, limit, frame = 0, 0, 0, MAX_JPEG_SCANS, ""
    for segments, segment in enumerate(jpeg_segments(data), 1):
        marker = segment.marker
        if segments > MAX_JPEG_SEGMENTS:
            return f"JPEG has more than {MAX_JPEG_SEGMENTS} segments (photos have a few dozen); re-save it"
        if not scans:
            stray += segment.skipped
            parsed += segment.end - segment.at if _pillow_parses(data, segment) else 0
            if stray > MAX_JPEG_STRAY_BYTES:
                return f"JPEG has more than {MAX_JPEG_STRAY_BYTES} bytes outside its segments before its image data; re-save it"
            if parsed > MAX_JPEG_PARSED_BYTES:
                return (
                    f"JPEG has more than {MAX_JPEG_PARSED_BYTES // 1024} KB of tables, frame headers, Exif and "
                    "Photoshop data before its image data; re-save it"
                )
        if marker == 0xD9:
            return None
        if marker not in _JPEG_READ:
            return f"JPEG has a marker (0x{marker:X}) that JPEG decoders refuse: not a decodable image"
        if marker in JPEG_FRAMES and marker not in JPEG_DECODED:
            return f"{JPEG_FRAMES[marker]} JPEG: not decoded here (only baseline and progressive); re-save it"
        if marker in JPEG_DECODED and not frame and segment.at + 9 <= len(data):
            height, width = _u16(data, segment.at + 5), _u16(data, segment.at + 7)
            frame, limit = f"{width}x{height} pixels", jpeg_scan_limit(width, height)
        if marker == 0xDA:
            scans += 1
            if scans > limit:
                return (
                    f"JPEG has more than {limit} scans, the most allowed for {frame or 'its size'} (each scan "
                    "decodes the whole image again; photos have about 10); re-save it as a baseline JPEG"
                )
    return None


def _u16(data, at: int) -> int:
    return int.from_bytes(data[at : at + 2], "big")


def png_structure_problem(data) -> str | None:
    """Why a PNG is refused from its chunk headers, before Pillow opens it (more chunks than its
    size explains, or than Pillow should read before the image data), or None; a damaged stream is
    left to the decoder."""
    limit = PNG_FREE_CHUNKS + len(data) // PNG_BYTES_PER_CHUNK
    at, chunks, image_data = 8, 0, False
    while at + 8 <= len(data):
        chunks += 1
        kind = data[at + 4 : at + 8]
        image_data = image_data or kind == b"IDAT"
        if chunks > PNG_FREE_CHUNKS and not image_data:
            return f"PNG has more than {PNG_FREE_CHUNKS} chunks before its image data; re-save it"
        if chunks > limit:
            return (
                f"PNG has more than {limit} chunks for its {len(data)} bytes (a chunk for every "
                f"{PNG_BYTES_PER_CHUNK} bytes at most); re-save it"
            )
        if kind == b"IEND":
            return None
        at += 12 + int.from_bytes(data[at : at + 4], "big")
    return None


def structure_problem(data) -> str | None:
    """Why an image's structure would make opening or decoding it cost far more than its size, or
    None. The format from its first bytes, as Pillow's openers tell them (JPEG covers MPO)."""
    if data[:3] == b"\xff\xd8\xff":
        return jpeg_structure_problem(data)
    if data[:8] == PNG_SIGNATURE:
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
    quarters of it, so a flood of large images leaves room for ordinary ones; bytes taken with
    `large=False` (request bodies, taken as they arrive) never count as large. Every take is given
    back as it was taken (the same bytes, the same `large`). `on_idle`, if set, is called (in the
    thread that gave the last bytes back) when nothing is held any more after at least
    `idle_after` bytes were: the server gives freed memory back to the system then."""

    def __init__(self, total: int, idle_after: int = 64 * 1024 * 1024):
        if total < 1:
            raise UserError(f"memory budget must be >= 1 byte, got {total}")
        self.total, self.idle_after = total, idle_after
        self.used = self.large = self.peak = self._since_idle = 0
        self.on_idle: Callable[[], None] | None = None
        self._lock = threading.Lock()

    def _is_large(self, n: int, large: bool | None) -> bool:
        return n > self.total // 16 if large is None else large

    def fits(self, n: int) -> bool:
        """Whether n more bytes that are not large would fit now (nothing is taken)."""
        return self.used + n <= self.total

    def take(self, n: int, large: bool | None = None) -> bool:
        """Holds n more bytes if they fit; False (holding nothing) if not. `large`: None decides by n."""
        with self._lock:
            large = self._is_large(n, large)
            if self.used + n > self.total or (large and self.large + n > self.total * 3 // 4):
                return False
            self.used += n
            self.large += n if large else 0
            self.peak = max(self.peak, self.used)
            self._since_idle = max(self._since_idle, self.used)
            return True

    def give(self, n: int, large: bool | None = None) -> None:
        """Gives back n bytes taken with the same `large` (several takes of large=False may go back as one)."""
        with self._lock:
            self.used -= n
            self.large -= n if self._is_large(n, large) else 0
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

    Structures that `structure_problem` refuses (too many JPEG scans or PNG chunks, more than
    Pillow should read in Python) are refused from the bytes before Pillow opens them, and sizes
    that `size_problem` refuses (decompression bombs, extreme aspect ratios) from the header,
    before decoding. `formats` limits which Pillow decoders may run.
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
        # Read once, into memory: the structure rules read the bytes before Pillow opens them.
        if isinstance(source, (str, Path)):
            data = Path(source).read_bytes()
        elif isinstance(source, (bytes, bytearray, memoryview)):
            data = source
        else:
            data = source.read()
        problem = structure_problem(data)
        if problem:
            raise ImageDecodeError(problem)
        with Image.open(io.BytesIO(data), formats=list(formats)) as img:
            w, h = full_size = img.size
            _check_size(w, h, max_pixels)
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
