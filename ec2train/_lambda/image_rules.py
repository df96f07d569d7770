"""The endpoint's rules on image size and structure, applied before invoking it: a copy of
ec2train/preprocess.py's (this zip has only its own files; tests/test_lambda.py checks that both
copies give the same answers). The function never decodes an image: it reads headers and markers.

Standard library only: this file ships in the Lambda zip.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator

# --------------------------------------------------------------------------- image sniffing

_BMP_DIB_SIZES = {12, 40, 52, 56, 64, 108, 124}


def sniff_image(data: bytes) -> str | None:
    """The image format from the magic bytes, or None. Decoding is the endpoint's job."""
    if data.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if data[:6] in (b"GIF87a", b"GIF89a"):
        return "gif"
    if len(data) >= 12 and data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    if len(data) >= 26 and data[:2] == b"BM" and int.from_bytes(data[14:18], "little") in _BMP_DIB_SIZES:
        return "bmp"
    return None


# --------------------------------------------------------------------------- image size rule

# The endpoint's decode rule, applied here from the header before invoking it. A copy of
# ec2train/preprocess.py's constants (this zip has only its own files); tests/test_lambda.py
# checks that both copies agree. An image whose size cannot be read here is passed on: the
# endpoint applies the same rule with Pillow's parsers.
MAX_PIXELS = 40_000_000
MAX_ASPECT_RATIO = 20


def size_problem(width: int, height: int) -> str | None:
    """Why an image of this size is refused (the endpoint's wording), or None."""
    if width * height > MAX_PIXELS:
        return f"image is {width}x{height} pixels, more than the limit of {MAX_PIXELS}"
    if max(width, height) > MAX_ASPECT_RATIO * min(width, height):
        return (
            f"image is {width}x{height} pixels: one side is more than {MAX_ASPECT_RATIO} times "
            "the other; crop it closer to the subject"
        )
    return None


# The endpoint's rules on JPEG scans and segments and PNG chunks (ec2train/preprocess.py's
# structure_problem, copied like the size rule above): every scan of a progressive JPEG decodes the
# whole image again, Pillow reads what comes before the first scan in Python, and each PNG chunk
# costs the decoder a round of Python, however few bytes any of them takes.
MAX_JPEG_SCANS = 100
MAX_SCAN_PIXELS = 16 * MAX_PIXELS
MAX_JPEG_SEGMENTS = 1_000
MAX_JPEG_STRAY_BYTES = 4_096
MAX_JPEG_PARSED_BYTES = 256 * 1024
PNG_FREE_CHUNKS = 1_000
PNG_BYTES_PER_CHUNK = 512
JPEG_FRAMES = {0xC0: "baseline", 0xC1: "extended sequential", 0xC2: "progressive", 0xC3: "lossless"}
JPEG_FRAMES.update({**dict.fromkeys((0xC5, 0xC6, 0xC7), "hierarchical"), 0xCB: "lossless"})
JPEG_FRAMES.update(dict.fromkeys((0xC9, 0xCA, 0xCD, 0xCE, 0xCF), "arithmetic-coded"))
JPEG_DECODED = (0xC0, 0xC1, 0xC2)
_JPEG_READ = {0xC4, 0xCC, 0xDA, 0xDB, 0xDC, 0xDD, *range(0xE0, 0xF0), 0xFE, *JPEG_FRAMES}
# A marker as libjpeg finds one; it skips every other byte (never `\xff+`: quadratic on 0xFF runs).
_JPEG_MARKER = re.compile(rb"\xff[\xc0-\xcf\xd8-\xfe]")
_MARKER_CLASSES = bytes.maketrans(
    bytes(range(256)),
    bytes(70 if b == 0xFF else 77 if _JPEG_MARKER.match(bytes((0xFF, b))) else 46 for b in range(256)),
)


def _jpeg_scan_limit(width: int, height: int) -> int:
    return max(1, min(MAX_JPEG_SCANS, MAX_SCAN_PIXELS // max(1, width * height)))


def _marker_finder(data: bytes) -> Callable[[int], int]:
    if data.count(b"\xff") * 64 <= len(data):

        def search(at: int) -> int:
            found = _JPEG_MARKER.search(data, at)
            return -1 if found is None else found.start()

        return search
    classes = data.translate(_MARKER_CLASSES)  # dense 0xFF: the regex would try each
    return lambda at: classes.find(b"FM", at)


def _jpeg_segments(data: bytes) -> Iterator[tuple[int, int, int, int]]:
    """(marker, at, end, bytes skipped before it) for each segment, to the first EOI."""
    at, next_marker = 2, _marker_finder(data)
    while (start := next_marker(at)) >= 0:
        marker = data[start + 1]
        if marker in (0xD8, 0xD9):
            yield marker, start, start + 2, start - at
            if marker == 0xD9:
                return
            at = start + 2
            continue
        if start + 4 > len(data):
            return
        end = start + 2 + int.from_bytes(data[start + 2 : start + 4], "big")
        yield marker, start, end, start - at
        at = max(end, start + 4)


def _pillow_parses(data: bytes, marker: int, at: int) -> bool:
    body = data[at + 4 : at + 18]
    return (
        marker == 0xDB
        or marker in JPEG_FRAMES
        or (marker == 0xE1 and body.startswith(b"Exif\x00\x00"))
        or (marker == 0xED and body.startswith(b"Photoshop 3.0\x00"))
    )


def _jpeg_structure_problem(data: bytes) -> str | None:
    scans, stray, parsed, limit, frame = 0, 0, 0, MAX_JPEG_SCANS, ""
    for segments, (marker, at, end, skipped) in enumerate(_jpeg_segments(data), 1):
        if segments > MAX_JPEG_SEGMENTS:
            return f"JPEG has more than {MAX_JPEG_SEGMENTS} segments (photos have a few dozen); re-save it"
        if not scans:
            stray += skipped
            parsed += end - at if _pillow_parses(data, marker, at) else 0
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
        if marker in JPEG_DECODED and not frame and at + 9 <= len(data):
            height, width = int.from_bytes(data[at + 5 : at + 7], "big"), int.from_bytes(data[at + 7 : at + 9], "big")
            frame, limit = f"{width}x{height} pixels", _jpeg_scan_limit(width, height)
        if marker == 0xDA:
            scans += 1
            if scans > limit:
                return (
                    f"JPEG has more than {limit} scans, the most allowed for {frame or 'its size'} (each scan "
                    "decodes the whole image again; photos have about 10); re-save it as a baseline JPEG"
                )
    return None


def _png_structure_problem(data: bytes) -> str | None:
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


def structure_problem(data: bytes) -> str | None:
    """Why the endpoint would refuse this image's structure before decoding it, or None."""
    kind = sniff_image(data)
    if kind == "jpeg":
        return _jpeg_structure_problem(data)
    if kind == "png":
        return _png_structure_problem(data)
    return None


def _jpeg_size(data: bytes) -> tuple[int, int] | None:
    """Width and height from the first frame header (baseline, progressive, lossless...)."""
    for marker, at, end, _ in _jpeg_segments(data):
        if marker in JPEG_FRAMES:
            if end > len(data) or end < at + 9:
                return None
            return int.from_bytes(data[at + 7 : at + 9], "big"), int.from_bytes(data[at + 5 : at + 7], "big")
    return None


def _webp_size(data: bytes) -> tuple[int, int] | None:
    chunk = data[12:16]
    if chunk == b"VP8X" and len(data) >= 30:  # extended: the canvas size
        return 1 + int.from_bytes(data[24:27], "little"), 1 + int.from_bytes(data[27:30], "little")
    if chunk == b"VP8L" and len(data) >= 25 and data[20] == 0x2F:  # lossless: 14-bit sides - 1
        bits = int.from_bytes(data[21:25], "little")
        return 1 + (bits & 0x3FFF), 1 + ((bits >> 14) & 0x3FFF)
    if chunk == b"VP8 " and len(data) >= 30 and data[23:26] == b"\x9d\x01\x2a":  # lossy key frame
        return int.from_bytes(data[26:28], "little") & 0x3FFF, int.from_bytes(data[28:30], "little") & 0x3FFF
    return None


def _bmp_size(data: bytes) -> tuple[int, int]:
    if int.from_bytes(data[14:18], "little") == 12:  # OS/2 header: unsigned 16-bit sides
        return int.from_bytes(data[18:20], "little"), int.from_bytes(data[20:22], "little")
    # A negative height means rows stored top-down.
    return int.from_bytes(data[18:22], "little", signed=True), abs(int.from_bytes(data[22:26], "little", signed=True))


def image_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) from the header of a JPEG, PNG, GIF, WebP or BMP; None if unreadable."""
    kind = sniff_image(data)
    size = None
    if kind == "jpeg":
        size = _jpeg_size(data)
    elif kind == "png" and data[12:16] == b"IHDR" and len(data) >= 24:
        size = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    elif kind == "gif" and len(data) >= 10:  # the logical screen, as Pillow reports it
        size = int.from_bytes(data[6:8], "little"), int.from_bytes(data[8:10], "little")
    elif kind == "webp":
        size = _webp_size(data)
    elif kind == "bmp":
        size = _bmp_size(data)
    return size if size is not None and min(size) >= 1 else None
