"""The model.pth format (writing; reading lives in model.py so serving can use it),
atomic file writes and checkpoints.
"""

from __future__ import annotations

import json
import os
import platform
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch

from ec2train.errors import UserError
from ec2train.model import MODEL_FORMAT, ModelError, clean_state_dict

CHECKPOINT_FORMAT = "ec2train.checkpoint/1"


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Write through a temp file in the same folder, fsync, then os.replace: all or nothing."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        write(tmp_path)
        with open(tmp_path, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()
    return path


def atomic_torch_save(obj: Any, path: str | Path) -> Path:
    return atomic_write(path, lambda p: torch.save(obj, p))


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write(path, lambda p: p.write_text(text))


def atomic_write_json(path: str | Path, obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def versions() -> dict[str, str]:
    import torchvision

    from ec2train import __version__

    return {"ec2train": str(__version__), "torch": str(torch.__version__), "torchvision": str(torchvision.__version__), "python": platform.python_version()}


def model_payload(
    state_dict: dict[str, torch.Tensor],
    *,
    arch: str,
    class_names: list[str],
    image_size: int,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    metrics: dict[str, Any] | None = None,
    config: dict[str, Any] | None = None,
    class_folders: list[str] | None = None,
) -> dict[str, Any]:
    """The model file's dict: plain tensors, strings and numbers only (weights_only-loadable)."""
    return {
        "format": MODEL_FORMAT,
        "state_dict": {k: v.detach().cpu() for k, v in clean_state_dict(state_dict).items()},
        "arch": arch,
        "num_classes": len(class_names),
        "class_names": list(class_names),
        "class_folders": list(class_folders or class_names),
        "image_size": int(image_size),
        "mean": [float(x) for x in mean],
        "std": [float(x) for x in std],
        "metrics": json.loads(json.dumps(metrics or {})),
        "config": json.loads(json.dumps(config or {})),
        "versions": versions(),
    }


def save_model_file(path: str | Path, payload: dict[str, Any]) -> Path:
    return atomic_torch_save(payload, path)


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ModelError(f"cannot read checkpoint {path}: {str(exc).splitlines()[0][:200]}") from exc
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise ModelError(f"{path} is not an ec2train checkpoint; pass a last.pt written by `ec2train fit`")
    return ckpt


def write_confusion_png(path: str | Path, confusion: torch.Tensor, class_names: list[str]) -> Path:
    """A heat map of the row-normalised confusion matrix (rows: true class, columns: predicted)."""
    from PIL import Image, ImageDraw

    n = confusion.shape[0]
    cell = max(4, min(24, 800 // max(n, 1)))
    label_w = 140 if n <= 40 else 0
    img = Image.new("RGB", (label_w + n * cell + 1, label_w + n * cell + 1), "white")
    draw = ImageDraw.Draw(img)
    rows = confusion / confusion.sum(dim=1, keepdim=True).clamp(min=1)
    for i in range(n):
        for j in range(n):
            v = float(rows[i, j])
            shade = int(255 * (1 - v))
            color = (shade, shade, 255) if i == j else (255, shade, shade)
            x, y = label_w + j * cell, label_w + i * cell
            draw.rectangle([x, y, x + cell, y + cell], fill=color, outline=(220, 220, 220))
        if label_w:
            draw.text((2, label_w + i * cell + cell // 2 - 5), class_names[i][:22], fill="black")
    if label_w:
        draw.text((label_w, 4), "rows: true class, columns: predicted", fill="black")
    return atomic_write(path, lambda p: img.save(p, format="PNG"))


# ---------------------------------------------------------------- SageMaker model package

# The part of ec2train the SageMaker handler imports: torch, torchvision and Pillow only.
PACKAGE_MODULES = ("__init__", "errors", "hw", "model", "preprocess", "infer")
HANDLER_FILE = "inference.py"


def handler_source() -> Path:
    """The handler's source, shipped inside the ec2train package (serve/inference.py links to it)."""
    import ec2train

    return Path(ec2train.__file__).resolve().parent / "_serve" / HANDLER_FILE


def package_model(model_path: str | Path, out: str | Path) -> Path:
    """Write model.tar.gz in SageMaker's layout, atomically.

    model.pth at the top; code/inference.py (the handler) and code/ec2train/ (the import-free
    modules it needs). No code/requirements.txt: the AWS PyTorch inference container already
    has torch, torchvision and Pillow, and nothing else is imported. Entries have fixed
    owners, modes and times, so the same inputs give the same archive.
    """
    import gzip
    import tarfile

    import ec2train
    from ec2train.model import read_model_file

    model_path, out = Path(model_path), Path(out)
    if out.is_dir():
        raise UserError(f"--package {out} is a folder; give the archive's file name, e.g. {out / 'model.tar.gz'}")
    read_model_file(model_path)  # refuse a file the endpoint could not load, before uploading anything
    package_dir = Path(ec2train.__file__).resolve().parent
    members = [("model.pth", model_path), (f"code/{HANDLER_FILE}", handler_source())]
    members += [(f"code/ec2train/{name}.py", package_dir / f"{name}.py") for name in PACKAGE_MODULES]

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", compresslevel=6, mtime=0) as gz:
            with tarfile.open(fileobj=gz, mode="w", format=tarfile.PAX_FORMAT) as tar:
                for folder in ("code", "code/ec2train"):
                    info = tarfile.TarInfo(folder)
                    info.type, info.mode = tarfile.DIRTYPE, 0o755
                    tar.addfile(info)
                for name, src in members:
                    info = tarfile.TarInfo(name)
                    info.size, info.mode = src.stat().st_size, 0o644
                    with open(src, "rb") as f:
                        tar.addfile(info, f)

    return atomic_write(out, write)
