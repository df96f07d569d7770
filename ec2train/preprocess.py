"""Image decoding and the train/eval transforms: defined once, used by training and serving.

Imports only torch, torchvision and Pillow: this module ships inside the SageMaker model
package (`ec2train export --package`), where nothing else is installed.
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path
from typing import BinaryIO, Union

from PIL import Image
from torchvision import transforms as T

from ec2train.errors import UserError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Eval resizes the short side to image_size / CROP_RATIO, then center-crops image_size
# (torchvision's and timm's convention: 224 -> resize 256 -> crop 224).
CROP_RATIO = 0.875

Source = Union[str, Path, bytes, BinaryIO]
# Decoders allowed on untrusted bytes (the server, the SageMaker handler): the formats
# photos come in (JPEG's opener also returns phone cameras' MPO files). Nothing that can
# shell out (EPS runs Ghostscript) or that few people send.
SERVE_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP")


class ImageDecodeError(UserError):
    """The bytes or file are not a decodable image (or are a decompression bomb)."""


def resize_size(image_size: int) -> int:
    return int(round(image_size / CROP_RATIO))


def load_rgb(
    source: Source,
    min_side: int | None = None,
    max_pixels: int | None = None,
    formats: tuple[str, ...] | None = None,
) -> Image.Image:
    """Decode an image to RGB.

    With `min_side`, JPEGs are decoded at reduced scale (DCT scaling via Pillow's draft
    mode: 1/2, 1/4 or 1/8) as long as the short side stays >= min_side; for a 12 MP photo
    and a 224 px model this is several times faster and visually equivalent after resize.
    `max_pixels` refuses images larger than that before decoding (decompression bombs).
    `formats` limits which Pillow decoders may run (untrusted bytes: see SERVE_FORMATS).
    """
    try:
        fp = io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else source
        with Image.open(fp, formats=list(formats) if formats else None) as img:
            w, h = img.size
            if max_pixels is not None and w * h > max_pixels:
                raise ImageDecodeError(f"image is {w}x{h} pixels, more than the limit of {max_pixels}")
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
        # Pillow's own guard (its warning becomes an error under refuse_decompression_bombs()).
        raise ImageDecodeError(f"image has too many pixels (decompression bomb guard): {exc}") from exc
    except Exception as exc:  # malformed files make decoders raise many types; all mean "not an image"
        raise ImageDecodeError(f"not a decodable image: {type(exc).__name__}: {exc}") from exc


def refuse_decompression_bombs() -> None:
    """Make Pillow's DecompressionBombWarning an error in this process (idempotent).

    Pillow only warns between MAX_IMAGE_PIXELS and twice that; a server must refuse instead.
    Process-wide on purpose: warnings filters are global, and a per-call catch_warnings()
    is not thread-safe (the server decodes in threads).
    """
    warnings.filterwarnings("error", category=Image.DecompressionBombWarning)


def train_transform(image_size: int, mean=IMAGENET_MEAN, std=IMAGENET_STD, augment: bool = True):
    if not augment:
        return eval_transform(image_size, mean, std)
    return T.Compose(
        [
            T.RandomResizedCrop(image_size, antialias=True),
            T.RandomHorizontalFlip(),
            T.ToTensor(),
            T.Normalize(mean, std),
        ]
    )


def eval_transform(image_size: int, mean=IMAGENET_MEAN, std=IMAGENET_STD):
    return T.Compose(
        [
            T.Resize(resize_size(image_size), antialias=True),
            T.CenterCrop(image_size),
            T.ToTensor(),
            T.Normalize(mean, std),
        ]
    )


def decode_min_side(image_size: int, train: bool) -> int:
    """Smallest short side worth decoding: random crops may zoom in, so train keeps 2x."""
    return 2 * image_size if train else resize_size(image_size)
