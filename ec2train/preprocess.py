"""Image decoding and the train/eval transforms: defined once, used by training and serving.

Imports only torch, torchvision and Pillow: this module ships inside the SageMaker model
package (`ec2train export --package`), where nothing else is installed.
"""

from __future__ import annotations

import io
import re
import warnings
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


class ImageDecodeError(UserError):
    """The bytes or file are not a decodable image (or are a decompression bomb)."""


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


def load_rgb(
    source: Source,
    min_side: int | None = None,
    max_pixels: int | None = MAX_PIXELS,
    formats: tuple[str, ...] = SAFE_FORMATS,
) -> Image.Image:
    """Decode an image to RGB under the decode policy above.

    With `min_side`, JPEGs are decoded at reduced scale (DCT scaling via Pillow's draft
    mode: 1/2, 1/4 or 1/8) as long as the short side stays >= min_side; for a 12 MP photo
    and a 224 px model this is several times faster and visually equivalent after resize.
    Sizes that `size_problem` refuses (decompression bombs, extreme aspect ratios) are refused
    from the header, before decoding. `formats` limits which Pillow decoders may run.
    """
    refuse_decompression_bombs()
    try:
        fp = io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else source
        with Image.open(fp, formats=list(formats)) as img:
            w, h = img.size
            problem = size_problem(w, h, max_pixels)
            if problem:
                raise ImageDecodeError(problem)
            # Pillow's own limit, checked here too: its warning depends on a process-wide filter
            # that anything else in the process (a test runner, a library) may reset.
            if Image.MAX_IMAGE_PIXELS and w * h > Image.MAX_IMAGE_PIXELS:
                raise ImageDecodeError(
                    f"image has too many pixels (decompression bomb guard): {w}x{h} is over {Image.MAX_IMAGE_PIXELS}"
                )
            # Scaled DCT decodes at 1/2, 1/4 or 1/8 only, so it helps once the short side is at
            # least twice min_side; draft() never goes below the requested size.
            if min_side and img.format in ("JPEG", "MPO") and min(w, h) >= 2 * min_side:
                scale = min_side / min(w, h)
                img.draft("RGB", (max(1, round(w * scale)), max(1, round(h * scale))))
            img.load()
            return img.convert("RGB")
    except ImageDecodeError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        # Pillow's own guard (its warning is an error here: see refuse_decompression_bombs()).
        raise ImageDecodeError(f"image has too many pixels (decompression bomb guard): {_clean(exc)}") from exc
    except UnidentifiedImageError:  # its message is the file object's repr: say what we allow instead
        raise ImageDecodeError(f"not a decodable image (not a {', '.join(formats)} file)") from None
    except Exception as exc:  # malformed files make decoders raise many types; all mean "not an image"
        raise ImageDecodeError(f"not a decodable image: {type(exc).__name__}: {_clean(exc)}") from exc


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
