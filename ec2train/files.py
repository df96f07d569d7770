"""Files written all or nothing: a temp file in the same folder, fsync, then os.replace; a full
disk is one line naming the folder. BackgroundWriter runs such writes in order in a thread."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import secrets
import shutil
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

from ec2train.errors import UserError


def atomic_write(path: str | Path, write: Callable[[Path], object]) -> Path:
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
        if free is not None and (is_disk_full(exc) or free < (1 << 20)):
            raise disk_full_error(f"cannot write {path.name} in {path.parent}", path.parent, free) from None
        raise


def human_bytes(n: int) -> str:
    """1.50 GiB, 3.2 MiB, 30 KiB."""
    if n >= 1 << 30:
        return f"{n / 2**30:.2f} GiB"
    return f"{n / 2**20:.1f} MiB" if n >= 1 << 20 else f"{n / 2**10:.0f} KiB"


def is_disk_full(exc: BaseException) -> bool:
    return isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)


def disk_full_error(what: str, folder: Path, free: int | None = None) -> UserError:
    """The one line for a full disk: `disk full: WHAT (N MiB free); free some space ...`, with the
    free space of `folder` (measured now unless given)."""
    if free is None:
        with contextlib.suppress(OSError):
            free = shutil.disk_usage(folder).free
    room = "free space unknown" if free is None else f"{free / 2**20:.1f} MiB free"
    return UserError(f"disk full: {what} ({room}); free some space or choose another output folder")


def _commit_or_undo(tmp_path: Path, path: Path) -> Path:
    with _undone_on_error(path, tmp_path):
        return _commit(tmp_path, path)


class BackgroundWriter:
    """Runs file writes one at a time, in order, in a background thread, so training goes on
    while a checkpoint (a large file) is pickled and fsynced.

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
