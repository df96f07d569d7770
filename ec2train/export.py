"""The model.pth format (writing; reading lives in model.py so serving can use it), the
SageMaker model package (`export --package`) and the confusion matrix CSV.
"""

from __future__ import annotations

import gzip
import json
import platform
import tarfile
from pathlib import Path
from typing import Any

import torch
import torchvision

import ec2train
from ec2train.errors import UserError
from ec2train.files import atomic_torch_save, atomic_write, atomic_write_text
from ec2train.model import MODEL_FILE, MODEL_FORMAT, clean_state_dict, read_model_file
from ec2train.names import csv_cell


def versions() -> dict[str, str]:
    return {
        "ec2train": str(ec2train.__version__),
        "torch": str(torch.__version__),
        "torchvision": str(torchvision.__version__),
        "python": platform.python_version(),
    }


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


# ---------------------------------------------------------------- SageMaker model package

# The part of ec2train the SageMaker handler imports: torch, torchvision and Pillow only.
PACKAGE_MODULES = ("__init__", "errors", "hw", "threads", "model", "preprocess", "infer")
HANDLER_FILE = "inference.py"


def handler_source() -> Path:
    """The handler's source, shipped inside the ec2train package (serve/inference.py links to it)."""
    return Path(ec2train.__file__).resolve().parent / "_serve" / HANDLER_FILE


def package_model(model_path: str | Path, out: str | Path) -> Path:
    """Write model.tar.gz in SageMaker's layout, atomically.

    model.pth at the top; code/inference.py (the handler) and code/ec2train/ (the import-free
    modules it needs). No code/requirements.txt: the AWS PyTorch inference container already
    has torch, torchvision and Pillow, and nothing else is imported. Entries have fixed
    owners, modes and times, so the same inputs give the same archive.
    """
    model_path, out = Path(model_path), Path(out)
    if out.is_dir():
        raise UserError(f"--package {out} is a folder; give the archive's file name, e.g. {out / 'model.tar.gz'}")
    read_model_file(model_path)  # refuse a file the endpoint could not load, before uploading anything
    package_dir = Path(ec2train.__file__).resolve().parent
    members = [(MODEL_FILE, model_path), (f"code/{HANDLER_FILE}", handler_source())]
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


def write_confusion_csv(path: str | Path, confusion: list[list[int]], class_names: list[str]) -> Path:
    """The confusion matrix as CSV: a header of predicted names, then one row per true class.
    Names are `names.csv_cell`s: one line each, and never taken for a spreadsheet formula."""
    import csv
    import io

    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["true\\predicted", *map(csv_cell, class_names)])
    writer.writerows([csv_cell(n), *row] for n, row in zip(class_names, confusion))
    return atomic_write_text(path, buf.getvalue())
