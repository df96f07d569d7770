"""Test images: photo-like ones with the structure that makes decoding and resizing costly, and
hand-made PNGs of any declared size (decompression bombs)."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
from PIL import Image, ImageDraw


def photo_like(width: int, height: int, seed: int = 0) -> Image.Image:
    """Gradients, hard-edged shapes, fine texture and noise: what makes a photo costly and a
    resize error visible (flat colour would hide both)."""
    rng = np.random.default_rng(seed)
    x = np.linspace(0, 1, width, dtype=np.float32)[None, :, None]
    y = np.linspace(0, 1, height, dtype=np.float32)[:, None, None]
    img = 40 + 160 * (0.6 * x + 0.4 * y) * rng.uniform(0.5, 1, 3).astype(np.float32)
    img = img + 25 * np.sin(x * 37 + y * 11) + 10 * np.sin(x * 300) * np.cos(y * 210)  # texture at several scales
    canvas = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(canvas)
    for _ in range(25):
        cx, cy, r = rng.uniform(0, width), rng.uniform(0, height), rng.uniform(15, 220)
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        if rng.random() < 0.5:
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=colour)
        else:
            draw.rectangle([cx - r, cy - r / 2, cx + r, cy + r / 2], outline=colour, width=int(rng.integers(2, 10)))
    arr = np.asarray(canvas, np.float32) + rng.normal(0, 6, (height, width, 3))
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


def jpeg_bytes(img: Image.Image, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def tiny_png() -> bytes:
    """A real 1x1 PNG."""
    ihdr = struct.pack(">IIBBBBB", 1, 1, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00\xff\x00\x00")
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", idat) + png_chunk(b"IEND", b"")


def png_of_size(width: int, height: int) -> bytes:
    """A valid all-black 1-bit PNG of any size that compresses to a few KB (a decompression bomb)."""
    rows = bytes(height * (1 + (width + 7) // 8))  # filter byte 0 + packed pixels, per row
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    idat = zlib.compress(rows, 9)
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", idat) + png_chunk(b"IEND", b"")


def jpeg_segment(marker: int, payload: bytes) -> bytes:
    return bytes([0xFF, marker]) + struct.pack(">H", len(payload) + 2) + payload


def many_scan_jpeg(width: int, height: int, scans: int, gap: bytes = b"") -> bytes:
    """A valid grey progressive JPEG with `scans` more scans than Pillow writes (a CPU bomb).
    `gap` goes between the table these scans use and the first of them: bytes that belong to no
    segment, which libjpeg skips (with a warning Pillow silences) before decoding every scan.

    Each extra scan refines all 63 AC coefficients of every block (Ss=1, Se=63, Ah=1, Al=0) and
    codes the whole image as end-of-band runs of 32,767 blocks (symbol EOB14: a 1-bit Huffman code
    and 14 extra bits), about 2 bytes per 32,767 blocks: a handful of bytes that make the decoder
    walk every coefficient of every block again. The base image is flat grey, so no coefficient
    needs a correction bit and the runs are all the data there is.
    """
    buf = io.BytesIO()
    Image.new("L", (width, height), 128).save(buf, format="JPEG", progressive=True, quality=90)
    base = buf.getvalue()
    assert base.endswith(b"\xff\xd9")
    # An AC table (class 1, id 3) whose one symbol, 0xE0 (EOB run of 2**14 + 14 bits), has code "0".
    table = jpeg_segment(0xC4, bytes([0x13, 1] + [0] * 15 + [0xE0]))
    bits, blocks = "", ((width + 7) // 8) * ((height + 7) // 8)
    while blocks > 0:  # a last run longer than the blocks left is harmless: the scan ends first
        run = min(max(blocks, 1 << 14), 32767)
        bits += "0" + format(run - (1 << 14), "014b")
        blocks -= run
    bits += "1" * (-len(bits) % 8)  # pad with 1 bits, as encoders do
    data = bytearray()
    for i in range(0, len(bits), 8):
        data.append(int(bits[i : i + 8], 2))
        if data[-1] == 0xFF:
            data.append(0)  # byte stuffing
    scan = jpeg_segment(0xDA, bytes([1, 1, 0x03, 1, 63, 0x10])) + bytes(data)
    return base[:-2] + table + gap + scan * scans + b"\xff\xd9"


# Bytes libjpeg skips between segments while it looks for the next marker: a stray byte, a
# stuffed 0xFF (FF 00, only meaningful in a scan's data), fill bytes, a restart marker and TEM
# (markers without a segment), and junk. many_scan_jpeg's `gap` takes each.
JPEG_STRAY_GAPS = {
    "stray byte": b"\x00",
    "stuffed FF": b"\xff\x00",
    "fill bytes": b"\xff\xff\xff",
    "restart marker": b"\xff\xd0",
    "TEM marker": b"\xff\x01",
    "junk": b"junk\xff\x00\xff\xd7 \x00",
}


def with_segments(jpeg: bytes, segments: bytes) -> bytes:
    """A JPEG with more bytes (segments, stray bytes) right after its first segment (APP0)."""
    first_end = 4 + int.from_bytes(jpeg[4:6], "big")
    return jpeg[:first_end] + segments + jpeg[first_end:]


def many_chunk_png(width: int, height: int, chunks: int, before_data: bool = False) -> bytes:
    """A valid grey PNG whose image data is split over `chunks` IDAT chunks, most of them empty;
    `before_data`: the empty chunks are unknown ancillary chunks before the image data instead
    (Pillow reads those, in Python, when it opens the file)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    idat = png_chunk(b"IDAT", zlib.compress(bytes(height * (1 + width)), 9))
    empty = [png_chunk(b"abCd" if before_data else b"IDAT", b"")] * max(0, chunks - 1)
    pieces = [*empty, idat] if before_data else [idat, *empty]
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + b"".join(pieces) + png_chunk(b"IEND", b"")


def header_flood_jpegs(total: int = 6_000_000) -> dict[str, bytes]:
    """Small JPEGs behind about `total` bytes of what Pillow's JPEG opener reads in Python, before
    the first scan: a byte or a segment at a time, or a table at a time."""
    plain = jpeg_bytes(photo_like(64, 48))
    table = bytes([0]) + bytes(range(1, 65))  # an 8-bit quantization table
    frame = struct.pack(">BHHB", 8, 48, 64, 3) + bytes(3 * 21_000)  # 21,000 components listed
    resource = b"8BIM" + struct.pack(">HBBI", 0x0404, 0, 0, 0)  # an empty Photoshop resource
    return {
        "fill bytes": b"\xff\xd8" + b"\xff" * total + plain[2:],
        "empty comments": b"\xff\xd8" + b"\xff\xfe\x00\x02" * (total // 4) + plain[2:],
        "quantization tables": with_segments(plain, jpeg_segment(0xDB, table * 1000) * (total // 65_000)),
        "frame headers": with_segments(plain, jpeg_segment(0xC0, frame) * (total // 63_000)),
        "Photoshop resources": with_segments(
            plain, jpeg_segment(0xED, b"Photoshop 3.0\x00" + resource * 5400) * (total // 64_800)
        ),
    }


def phone_like_jpeg() -> bytes:
    """A JPEG with the metadata phones write before the image: a 60 KB Exif block, an ICC profile
    in 16 segments and 3 MB of extended XMP (a depth map) in 48 more."""
    plain = jpeg_bytes(photo_like(640, 480))
    exif = b"Exif\x00\x00II*\x00\x08\x00\x00\x00" + bytes(60_000)
    icc = [b"ICC_PROFILE\x00" + bytes([k + 1, 16]) + bytes(60_000) for k in range(16)]
    xmp = [b"http://ns.adobe.com/xmp/extension/\x00" + bytes(range(256)) * 250 for _ in range(48)]
    segments = [jpeg_segment(0xE1, exif), *(jpeg_segment(0xE2, c) for c in icc), *(jpeg_segment(0xE1, x) for x in xmp)]
    return with_segments(plain, b"".join(segments))
