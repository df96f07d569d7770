"""The GPU loader's device side: decode a batch's JPEGs on the training device and apply the
train or eval transform there (data/encoded.py is the workers' side).

The decoder is torchvision's: `torchvision.io.decode_jpeg(files, device=...)`, batched nvJPEG on
CUDA (the GPU's hardware JPEG engine where it has one) and libjpeg-turbo with device="cpu", so the
same code runs in the tests on the CPU. The transforms are the CPU loader's in tensor form: a
crop then an antialiased bilinear resize (RandomResizedCrop, Resize), CenterCrop, flip, rounded
back to uint8 pixels; StepContext.to_device then normalizes the batch as for the CPU loader.
"""

from __future__ import annotations

import functools
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torchvision.io import ImageReadMode, decode_jpeg, encode_jpeg
from torchvision.transforms.functional import pil_to_tensor

from ec2train import hw
from ec2train.data.encoded import EncodedBatch
from ec2train.data.loaders import undecodable
from ec2train.errors import first_line
from ec2train.preprocess import ImageDecodeError, load_rgb

# torchvision 0.29 marks its image decoders deprecated in favour of TorchCodec (which has an nvJPEG
# decoder too). They work, need no new dependency, and are what older torchvision builds have;
# device_decode is the one place to switch when they go.
warnings.filterwarnings("ignore", message="The image decoding and encoding capabilities of TorchVision")

# Pixels decoded by one decoder call: a batch of big photos is decoded a few at a time, so the
# decoded images of a batch never take more than about 3 bytes x this of device memory at once.
DECODE_PIXEL_BUDGET = 128_000_000
JPEG_SUFFIXES = (".jpg", ".jpeg")


def decode_chunks(pixels: list[int], budget: int = DECODE_PIXEL_BUDGET) -> list[list[int]]:
    """Consecutive groups of the files (by index) whose pixels add up to at most `budget`; a file
    bigger than the budget alone is a group of its own. Pure."""
    groups: list[list[int]] = []
    total = budget + 1
    for k, n in enumerate(pixels):
        if total + n > budget:
            groups.append([])
            total = 0
        groups[-1].append(k)
        total += n
    return groups


def resized_size(height: int, width: int, short: int) -> tuple[int, int]:
    """(height, width) after Resize(short): torchvision's rule (the long side truncated). Pure."""
    if width <= height:
        return int(short * height / width), short
    return short, int(short * width / height)


def _resize(image: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """A uint8 (3, H, W) image -> float (3, h, w): antialiased bilinear, as torchvision resizes
    (and as Pillow does for the CPU loader); an image already that size is kept, as Resize keeps it."""
    if tuple(image.shape[-2:]) == size:
        return image.float()
    return F.interpolate(image[None].float(), size=size, mode="bilinear", antialias=True, align_corners=False)[0]


def _train_pixels(image: torch.Tensor, box: tuple[int, int, int, int], size: int) -> torch.Tensor:
    top, left, height, width = box
    return _resize(image[:, top : top + height, left : left + width], (size, size))


def _eval_pixels(image: torch.Tensor, resize: int, size: int) -> torch.Tensor:
    height, width = resized_size(image.shape[-2], image.shape[-1], resize)
    top, left = int(round((height - size) / 2.0)), int(round((width - size) / 2.0))
    return _resize(image, (height, width))[:, top : top + size, left : left + size]


def _cpu_decode(batch: EncodedBatch, k: int, device) -> torch.Tensor:
    """File k decoded by the CPU loader's decoder: its picture, or its error naming the file."""
    try:
        image = load_rgb(batch.file(k).numpy().tobytes())
    except ImageDecodeError as exc:
        raise undecodable(batch.paths[k], exc) from None
    return pil_to_tensor(image).to(device, non_blocking=True)


@functools.cache
def _decode_stream(device: str) -> torch.cuda.Stream:
    return torch.cuda.Stream(device=torch.device(device))


def device_decode(files: list[torch.Tensor], device: str | torch.device) -> list[torch.Tensor]:
    """JPEG files (uint8 CPU tensors) decoded on `device` in one call: uint8 (3, H, W) each.

    On CUDA the call runs with a stream of its own as the current stream. torchvision's decoder
    allocates its output on the current stream and writes it from its own stream without waiting
    for the current one, so memory that the training stream has freed but still reads (kernels
    queued behind the step) could be handed to the decoder and overwritten (pytorch/vision PR
    9606 reproduces it on an H100; with another stream current, no corruption). The training
    stream then waits for the decode, and each image is marked as used by it, so its memory is
    not handed back to the decoder until the training stream is done with it."""
    if torch.device(device).type != "cuda":
        return decode_jpeg(files, mode=ImageReadMode.RGB, device=device)
    training = torch.cuda.current_stream(torch.device(device))
    with torch.cuda.stream(_decode_stream(str(device))):
        images = decode_jpeg(files, mode=ImageReadMode.RGB, device=device)
    training.wait_stream(_decode_stream(str(device)))
    for image in images:
        image.record_stream(training)
    return images


def _decode(batch: EncodedBatch, files: list[int], device) -> list[torch.Tensor]:
    """Files decoded on the device, all in one call; when that call fails, one by one, and a
    file the device decoder refuses (or decodes to another size than its header's) is decoded
    by the CPU loader's decoder instead, which keeps that loader's result or error."""
    images: list[torch.Tensor | None]
    try:
        images = list(device_decode([batch.file(k) for k in files], device))
    except RuntimeError:
        images = [None] * len(files)
    out = []
    for k, image in zip(files, images):
        width, height = batch.frames[k]
        if image is None:
            try:
                (image,) = device_decode([batch.file(k)], device)
            except RuntimeError:
                image = None
        if image is None or tuple(image.shape) != (3, height, width):
            image = _cpu_decode(batch, k, device)
        out.append(image)
    return out


def decode_batch(batch: EncodedBatch, device: str | torch.device) -> torch.Tensor:
    """The batch as uint8 pixels (N, 3, size, size) on `device`, in the batch's order: what the
    CPU loader's workers would have made of the same samples, decoded and transformed here.

    Nothing here waits for the device: host-to-device copies are non-blocking (a blocking copy
    from pageable memory would wait for the step before it to finish)."""
    size, n = batch.size, len(batch.encoded)
    resized = torch.empty((n, 3, size, size), dtype=torch.float32, device=device)
    for files in decode_chunks([w * h for w, h in batch.frames]):
        for k, image in zip(files, _decode(batch, files, device)):
            if batch.resize:
                resized[k] = _eval_pixels(image, batch.resize, size)
            else:
                resized[k] = _train_pixels(image, batch.boxes[k], size)
    if any(batch.flips):
        flip = torch.tensor(batch.flips).view(-1, 1, 1, 1).to(device, non_blocking=True)
        resized = torch.where(flip, resized.flip(-1), resized)
    pixels = resized.round_().clamp_(0, 255).to(torch.uint8)
    if not batch.decoded:
        return pixels
    out = torch.empty((len(batch), 3, size, size), dtype=torch.uint8, device=device)
    for places, part in ((batch.encoded, pixels), (batch.decoded, batch.pixels.to(device, non_blocking=True))):
        if places:
            out.index_copy_(0, torch.tensor(places).to(device, non_blocking=True), part)
    return out


@functools.cache
def device_decode_problem(device: str) -> str | None:
    """Why this torchvision cannot decode JPEGs on `device` (built without nvJPEG, older than
    0.19 and its batched decode, no CUDA), or None: a batch of one tiny JPEG decoded there, as
    decode_batch does it, once per device and process."""
    probe = encode_jpeg(torch.full((3, 16, 16), 128, dtype=torch.uint8))
    try:
        (image,) = device_decode([probe], device)
    except Exception as exc:  # an op missing from the build, a CUDA error: either means "cannot"
        return first_line(exc)
    return None if tuple(image.shape) == (3, 16, 16) else f"decoded a 16x16 JPEG to {tuple(image.shape)}"


def jpeg_share(paths: list[Path]) -> float:
    """The share of files named like JPEGs (0 for none). Pure."""
    return sum(Path(p).suffix.lower() in JPEG_SUFFIXES for p in paths) / len(paths) if paths else 0.0


def select_loader(requested: str, device: str, paths: list[Path], cpus_per_process: int) -> hw.LoaderChoice:
    """hw.choose_loader for this run; probes the device's JPEG decoder only when the choice is
    the GPU loader."""
    device_type = device.split(":")[0]
    share = jpeg_share(paths)
    choice = hw.choose_loader(requested, device_type, share, cpus_per_process)
    if choice.kind == "gpu" and (problem := device_decode_problem(device)):
        choice = hw.choose_loader(requested, device_type, share, cpus_per_process, decode_problem=problem)
    return choice
