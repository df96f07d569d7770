"""The model.pth format (writing; reading lives in model.py so serving can use it), atomic
file writes, the SageMaker model package (`export --package`) and the confusion matrix CSV.
"""

from __future__ import annotations

import contextlib
import errno
import gzip
import json
import os
import platform
import secrets
import shutil
import tarfile
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
import torchvision

import ec2train
from ec2train.errors import UserError
from ec2train.model import MODEL_FILE, MODEL_FORMAT, clean_state_dict, read_model_file


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Write through a temp file in the same folder, fsync, then os.replace: all or nothing.

    The file gets the mode any new file gets (0666 less the umask). A full disk is one line
    naming the folder and its free space, whatever the writer raised (torch.save says
    "unexpected pos"); the temp file is always removed.
    """
    path, tmp_path = _new_temp(path)
    with _undone_on_error(path, tmp_path):
        write(tmp_path)
        _commit(tmp_path, path)
    return path


def _new_temp(path: str | Path) -> tuple[Path, Path]:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp_path = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    # os.open with 0o666 applies the umask as open() does; mkstemp would force 0600.
    os.close(os.open(tmp_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    return path, tmp_path


def _commit(tmp_path: Path, path: Path) -> Path:
    with open(tmp_path, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp_path, path)
    return path


@contextlib.contextmanager
def _undone_on_error(path: Path, tmp_path: Path):
    """On any error the temp file goes, and a full disk becomes the one-line UserError."""
    try:
        yield
    except BaseException as exc:
        # Measured before the temp file goes: that is the state the writer failed in.
        free = None
        if isinstance(exc, (OSError, RuntimeError)):
            with contextlib.suppress(OSError):  # unknown (the folder went away): the writer's error stands
                free = shutil.disk_usage(path.parent).free
        with contextlib.suppress(FileNotFoundError):
            tmp_path.unlink()
        full = isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)
        if free is not None and (full or free < (1 << 20)):
            raise UserError(
                f"disk full: cannot write {path.name} in {path.parent} ({free / 2**20:.1f} MiB free); "
                "free some space or choose another output folder"
            ) from None
        raise


def _commit_or_undo(tmp_path: Path, path: Path) -> Path:
    with _undone_on_error(path, tmp_path):
        return _commit(tmp_path, path)


class BackgroundWriter:
    """Runs file writes one at a time, in order, in a background thread, so training goes on
    while a checkpoint is pickled and fsynced (resnet18's last.pt: 134 MB, most of a second).

    Whoever submits must hand over a snapshot that later training steps do not change.
    `wait()` blocks until everything submitted is on disk and re-raises the first error (a
    full disk is still the one-line UserError; with background=False, a full disk while
    pickling raises it from `save` itself); `close()` waits and ends the thread.

    background=False (hw.background_work_helps: training on the CPU) keeps the CPU work in the
    caller's thread: `save` pickles into the temp file there (into the page cache, with no
    second copy in memory) and leaves the background thread the fsync and rename, which wait
    on the disk, not the CPU."""

    def __init__(self, background: bool = True):
        self.background = background
        self._pool: ThreadPoolExecutor | None = None
        self._pending: list[Future] = []

    def save(self, obj: Any, path: str | Path) -> None:
        """torch.save(obj) to path, atomically."""
        if self.background:
            self.submit(atomic_torch_save, obj, path)
        else:  # pickled into the temp file here (no second copy in memory); fsync and rename there
            path, tmp_path = _new_temp(path)
            with _undone_on_error(path, tmp_path):
                torch.save(obj, tmp_path)
            self.submit(_commit_or_undo, tmp_path, path)

    def submit(self, write: Callable[..., Any], *args: Any) -> None:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ec2train-save")
        self._pending.append(self._pool.submit(write, *args))

    def wait(self) -> None:
        pending, self._pending = self._pending, []
        for future in pending:
            future.result()

    def close(self) -> None:
        """Waits for what was submitted; errors are reported by `wait()`, not here (close runs
        in `finally`, where an error would hide the one that ended the run)."""
        pending, self._pending = self._pending, []
        for future in pending:
            future.exception()
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None


def atomic_torch_save(obj: Any, path: str | Path) -> Path:
    return atomic_write(path, lambda p: torch.save(obj, p))


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write(path, lambda p: p.write_text(text))


def atomic_write_json(path: str | Path, obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


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
PACKAGE_MODULES = ("__init__", "errors", "hw", "model", "preprocess", "infer")
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
    """The confusion matrix as CSV: a header of predicted names, then one row per true class."""
    lines = ["true\\predicted," + ",".join(json.dumps(n) for n in class_names)]
    lines += [json.dumps(n) + "," + ",".join(map(str, row)) for n, row in zip(class_names, confusion)]
    return atomic_write_text(path, "\n".join(lines) + "\n")
