"""The GPU loader's worker side: workers read JPEG files and check their headers; the training
process decodes and transforms each batch on its device (data/gpu.py).

For a plain JPEG a worker reads the file, takes the frame size from the header (the decode
limits apply to it: preprocess.size_problem) and draws the sample's crop and flip from the
sample's seed with the CPU loader's own algorithm, draws and order (random_resized_crop_box), so
both loaders augment alike and a resumed run sees the same crops. Every other file (PNG and the
other formats, progressive or unusual JPEGs, big files, images the decode policy refuses) goes
the CPU loader's way in the worker: the same decode, transform and error.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.utils.data import Dataset

from ec2train.preprocess import (
    JPEG_FRAMES,
    JPEG_SEQUENTIAL,
    jpeg_segments,
    jpeg_structure_problem,
    resize_size,
    size_problem,
)

# The largest file the device decodes. Bigger ones go to the workers, which decode big photos at
# reduced scale (preprocess.load_rgb); and a batch's bytes cross to the training process in shared
# memory, so this bounds that at batch size x this, per batch in flight.
DEVICE_MAX_FILE_BYTES = 8 << 20
# The end-of-image marker is looked for in this many last bytes (after the first scan starts).
EOI_TAIL_BYTES = 1 << 16
RANDOM_CROP_SCALE = (0.08, 1.0)  # torchvision's RandomResizedCrop defaults, as preprocess uses them
RANDOM_CROP_RATIO = (3.0 / 4.0, 4.0 / 3.0)


@dataclass(frozen=True)
class JpegFrame:
    width: int
    height: int


def device_jpeg_frame(data: bytes) -> JpegFrame | None:
    """The frame size of a JPEG that the device decodes, or None: the workers decode it instead.

    Taken: a sequential Huffman JPEG (baseline or extended), 8-bit, with three YCbCr components
    in one interleaved first scan and an end-of-image marker. Left to the workers: progressive
    JPEGs (nvJPEG decodes those one at a time with its Huffman stage on the host, in the training
    process), greyscale and CMYK, JPEGs that may be RGB-coded (an Adobe marker that says so, or
    components named R, G, B: decoders differ on when they read them as RGB), MPO files (a
    phone's several pictures), and truncated files (no end marker: libjpeg refuses them, a
    decoder that pads them might not).
    Reads only the markers before the first scan (preprocess.jpeg_segments, as every JPEG rule
    does); stray bytes between them, too, leave the file to the workers. Pure.
    """
    n = len(data)
    if n < 4 or data[0] != 0xFF or data[1] != 0xD8:
        return None
    frame, adobe_transform = None, None
    for segment in jpeg_segments(data):
        marker, end = segment.marker, segment.end
        if segment.skipped or end > n or end < segment.at + 4:  # stray bytes, SOI, EOI, a bad length
            return None
        body = data[segment.at + 4 : end]
        if marker in JPEG_SEQUENTIAL:
            if frame is not None or len(body) < 15 or body[0] != 8 or body[5] != 3:
                return None
            height, width = int.from_bytes(body[1:3], "big"), int.from_bytes(body[3:5], "big")
            frame = (width, height, bytes(body[6:15:3]))
        elif marker in JPEG_FRAMES:
            return None  # progressive, lossless, hierarchical or arithmetic-coded
        elif marker == 0xE2 and body[:4] == b"MPF\x00":
            return None
        elif marker == 0xEE and body[:5] == b"Adobe" and len(body) >= 12:
            adobe_transform = body[11]
        elif marker == 0xDA:  # start of scan
            if frame is None or not body or body[0] != 3:
                return None
            width, height, ids = frame
            if (
                adobe_transform == 0
                or ids == b"RGB"
                or width < 1
                or height < 1
                or data.rfind(b"\xff\xd9", max(end, n - EOI_TAIL_BYTES)) < 0
            ):
                return None
            return JpegFrame(width, height)
    return None


def random_resized_crop_box(
    width: int,
    height: int,
    generator: torch.Generator | None,
    scale: tuple[float, float] = RANDOM_CROP_SCALE,
    ratio: tuple[float, float] = RANDOM_CROP_RATIO,
) -> tuple[int, int, int, int]:
    """(top, left, height, width) of a random resized crop: torchvision's
    RandomResizedCrop.get_params, step for step, drawing from `generator` (None: torch's global
    generator). Seeded as the CPU loader seeds its transforms, it draws the same numbers, so for
    an image of the same size the box is the same."""
    area = height * width
    log_ratio = torch.log(torch.tensor(ratio))
    for _ in range(10):
        target_area = area * torch.empty(1).uniform_(scale[0], scale[1], generator=generator).item()
        low, high = log_ratio[0].item(), log_ratio[1].item()
        aspect_ratio = torch.exp(torch.empty(1).uniform_(low, high, generator=generator)).item()
        w = int(round(math.sqrt(target_area * aspect_ratio)))
        h = int(round(math.sqrt(target_area / aspect_ratio)))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, size=(1,), generator=generator).item())
            left = int(torch.randint(0, width - w + 1, size=(1,), generator=generator).item())
            return top, left, h, w
    in_ratio = width / height  # the fallback: a central crop
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def random_flip(generator: torch.Generator | None) -> bool:
    """RandomHorizontalFlip's draw (p = 0.5), after the crop's, as in the CPU loader."""
    return bool(torch.rand(1, generator=generator) < 0.5)


@dataclass
class EncodedBatch:
    """A batch from the GPU loader's workers: the JPEG files to decode on the device, each with
    its crop (train) or the eval resize, and the samples the workers decoded themselves.
    data/gpu.decode_batch turns it into uint8 pixels (N, 3, size, size) on the device."""

    size: int  # the side of the square output
    resize: int  # eval: the short side is resized to this, then center-cropped; 0: train (boxes)
    data: torch.Tensor  # uint8: the files, one after the other (one shared-memory block)
    offsets: list[int]  # file k is data[offsets[k]:offsets[k + 1]]
    encoded: list[int]  # their places in the batch
    frames: list[tuple[int, int]]  # (width, height) from the headers
    boxes: list[tuple[int, int, int, int]]  # train: (top, left, height, width) in the full image
    flips: list[bool]
    paths: list[str]  # for errors
    pixels: torch.Tensor  # uint8 (k, 3, size, size): the samples the workers decoded
    decoded: list[int] = field(default_factory=list)  # their places in the batch

    def __len__(self) -> int:
        return len(self.encoded) + len(self.decoded)

    def file(self, k: int) -> torch.Tensor:
        return self.data[self.offsets[k] : self.offsets[k + 1]]


@dataclass
class _Encoded:
    data: bytes
    frame: JpegFrame
    box: tuple[int, int, int, int]
    flip: bool
    path: str


class EncodedDataset(Dataset):
    """The GPU loader's dataset: per sample, a JPEG's bytes and its crop (drawn here, from the
    sample's seed), or, for anything the device does not decode, `cpu`'s sample (the CPU
    loader's dataset: its decode, transform and errors). Batches come from `collate`."""

    def __init__(self, cpu, image_size: int, train: bool):
        self.cpu = cpu  # loaders.ImageDataset with the CPU loader's transform
        self.samples: Sequence[tuple[Path, int]] = cpu.samples
        self.image_size = image_size
        self.train = train

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, key):
        index, seed = key if isinstance(key, tuple) else (key, None)
        path, label = self.samples[index]
        found = read_device_jpeg(path)
        if found is None:
            return self.cpu[key]  # (uint8 pixels, label)
        data, frame = found
        box, flip = (0, 0, frame.height, frame.width), False
        if self.train:
            # The CPU loader seeds torch's global generator with the same seed: same draws.
            generator = torch.Generator().manual_seed(seed) if seed is not None else None
            box = random_resized_crop_box(frame.width, frame.height, generator)
            flip = random_flip(generator)
        return _Encoded(data, frame, box, flip, str(path)), label

    def collate(self, items: list) -> tuple[EncodedBatch, torch.Tensor]:
        """Runs in the worker: the files' bytes joined into one tensor (one shared-memory block
        to the training process, not one per file), the worker-decoded pixels stacked."""
        encoded = [k for k, (x, _) in enumerate(items) if isinstance(x, _Encoded)]
        decoded = [k for k, (x, _) in enumerate(items) if not isinstance(x, _Encoded)]
        files = [items[k][0] for k in encoded]
        offsets = [0]
        for f in files:
            offsets.append(offsets[-1] + len(f.data))
        data = torch.frombuffer(bytearray(b"".join(f.data for f in files)), dtype=torch.uint8) if files else None
        size = self.image_size
        pixels = (
            torch.stack([items[k][0] for k in decoded])
            if decoded
            else torch.empty((0, 3, size, size), dtype=torch.uint8)
        )
        batch = EncodedBatch(
            size=size,
            resize=0 if self.train else resize_size(size),
            data=data if data is not None else torch.empty(0, dtype=torch.uint8),
            offsets=offsets,
            encoded=encoded,
            frames=[(f.frame.width, f.frame.height) for f in files],
            boxes=[f.box for f in files],
            flips=[f.flip for f in files],
            paths=[f.path for f in files],
            pixels=pixels,
            decoded=decoded,
        )
        return batch, torch.tensor([label for _, label in items])


def read_device_jpeg(path: Path) -> tuple[bytes, JpegFrame] | None:
    """A file's bytes and frame when the device decodes it (device_jpeg_frame, at most
    DEVICE_MAX_FILE_BYTES, a size the decode policy allows), else None. An unreadable file is
    None too: the CPU loader's decode then gives its usual error."""
    try:
        with open(path, "rb") as f:
            head = f.read(2)
            if head != b"\xff\xd8":  # not a JPEG: read once, by the CPU loader's decoder
                return None
            data = head + f.read(DEVICE_MAX_FILE_BYTES - 1)
            if f.read(1):
                return None
    except OSError:
        return None
    frame = device_jpeg_frame(data)
    if frame is None or size_problem(frame.width, frame.height) is not None or jpeg_structure_problem(data):
        return None  # the CPU loader's decode refuses what the policy refuses, with the file's path
    return data, frame
