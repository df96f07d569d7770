"""`ec2train data prepare SRC DST`: a resized copy of a data set, decoded once instead of every epoch.

Every image under SRC is written to the same relative path under DST as a JPEG whose short
side is `size` (smaller images are re-encoded at their size, never enlarged); other files are
left out. Work is spread over processes. Each output is written atomically (temp file, then
os.replace) and stamped with its source's mtime, so a rerun skips what is done and an
interrupted run leaves no half-written image. A marker file, written last, records that DST
is complete. Sources that cannot be decoded are listed, not fatal.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from ec2train.data import IMAGE_EXTS, DataError
from ec2train.files import atomic_write, atomic_write_json
from ec2train.preprocess import ImageDecodeError, load_rgb
from ec2train.threads import available_cpus

MARKER = ".ec2train-prepared.json"
FORMAT = "ec2train.prepared/1"


@dataclass
class PrepareReport:
    dst: Path
    written: int = 0
    skipped: int = 0  # already done by an earlier run
    corrupt: list[str] = field(default_factory=list)  # "path: reason"
    seconds: float = 0.0

    @property
    def images(self) -> int:
        return self.written + self.skipped

    @property
    def ok(self) -> bool:
        return not self.corrupt


def _is_image(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTS and not path.name.startswith(".")


def plan(src: Path, dst: Path) -> list[tuple[Path, Path]]:
    """(source, output) pairs in a stable order; outputs keep the layout, as .jpg files."""
    pairs: list[tuple[Path, Path]] = []
    taken: set[Path] = set()
    for path in sorted(src.rglob("*")):
        rel = path.relative_to(src)
        if any(part.startswith(".") for part in rel.parts) or not path.is_file() or not _is_image(path):
            continue
        out = dst / (rel if rel.suffix.lower() in (".jpg", ".jpeg") else rel.with_suffix(".jpg"))
        if out in taken:  # a.png next to a.jpg: keep both
            out = dst / rel.with_name(rel.name + ".jpg")
        taken.add(out)
        pairs.append((path, out))
    return pairs


def is_done(src: Path, out: Path) -> bool:
    """An output exists only complete (atomic write) and carries its source's mtime."""
    try:
        return out.stat().st_mtime_ns == src.stat().st_mtime_ns
    except FileNotFoundError:
        return False


def prepare_one(src: Path, out: Path, size: int, quality: int) -> str | None:
    """Decode at reduced scale, resize the short side to `size`, write JPEG atomically.
    Returns None, or why the source cannot be decoded. The decode policy (preprocess.py) also
    refuses every size JPEG cannot hold (a side over 65,500 px), so the write cannot fail on it."""
    try:
        img = load_rgb(src, min_side=size)
    except ImageDecodeError as exc:
        return str(exc)
    w, h = img.size
    st = src.stat()
    # A JPEG that is small enough already is copied as is: re-encoding would only lose quality.
    copy = min(w, h) <= size and src.suffix.lower() in (".jpg", ".jpeg")
    if min(w, h) > size:
        scale = size / min(w, h)
        img = img.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.Resampling.LANCZOS)

    def write(tmp: Path) -> None:
        if copy:
            shutil.copyfile(src, tmp)
        else:
            img.save(tmp, format="JPEG", quality=quality)
        os.utime(tmp, ns=(st.st_atime_ns, st.st_mtime_ns))

    atomic_write(out, write)
    return None


def _prepare_chunk(chunk: list[tuple[str, str]], size: int, quality: int) -> list[tuple[str, str | None]]:
    return [(s, prepare_one(Path(s), Path(o), size, quality)) for s, o in chunk]


def _read_marker(dst: Path) -> dict | None:
    try:
        return json.loads((dst / MARKER).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def _write_marker(dst: Path, info: dict) -> None:
    atomic_write_json(dst / MARKER, {"format": FORMAT, **info})


def check_arguments(src: str | Path, dst: str | Path, size: int, quality: int) -> None:
    """Every reason not to start, before any work (and before a progress bar appears)."""
    src, dst = Path(src), Path(dst)
    if not src.is_dir():
        raise DataError(f"source folder {src} does not exist; pass the data set root (e.g. dogImages)")
    if not 32 <= size <= 4096:
        raise DataError(f"--size {size}: must be between 32 and 4096 pixels (256 suits --image-size 224)")
    if not 1 <= quality <= 95:
        raise DataError(f"--quality {quality}: must be between 1 and 95")
    if dst.resolve() == src.resolve() or src.resolve() in dst.resolve().parents:
        raise DataError(f"destination {dst} is inside the source {src}; pick a folder outside it")
    params = {"size": size, "quality": quality}
    marker = _read_marker(dst)
    if dst.exists() and not (dst.is_dir() and (marker is not None or not any(dst.iterdir()))):
        raise DataError(f"{dst} exists and is not a prepared data set; pick a new or empty folder")
    if marker is not None and marker.get("params") != params:
        raise DataError(
            f"{dst} was prepared with {_as_options(marker.get('params'))}, not {_as_options(params)}; "
            "pick another folder or delete it"
        )


def _as_options(params: Any) -> str:
    """{'size': 256, 'quality': 90} as the options that set them: --size 256 --quality 90."""
    if not isinstance(params, dict):
        return "unknown settings"
    return " ".join(f"--{k} {v}" for k, v in sorted(params.items()))


def prepare_dataset(
    src: str | Path,
    dst: str | Path,
    size: int = 256,
    workers: int | None = None,
    quality: int = 90,
    on_total: Callable[[int], None] | None = None,
    on_done: Callable[[int], None] | None = None,
) -> PrepareReport:
    """Write DST: every image of SRC, short side `size`, as JPEG. Idempotent and resumable.

    on_total(n) is called once with the number of images to write; on_done(k) after each k.
    """
    src, dst = Path(src), Path(dst)
    check_arguments(src, dst, size, quality)
    params = {"size": size, "quality": quality}
    t0 = time.perf_counter()
    pairs = plan(src, dst)
    if not pairs:
        raise DataError(f"no images under {src}; expected {src}/{{train,valid,test}}/<class>/<image>")
    # Written first: a rerun after an interruption recognises DST as ours ("complete": false).
    _write_marker(dst, {"params": params, "source": str(src.resolve()), "complete": False})
    for folder in src.rglob("*"):  # the layout, empty class folders included
        rel = folder.relative_to(src)
        if folder.is_dir() and not any(part.startswith(".") for part in rel.parts):
            (dst / rel).mkdir(parents=True, exist_ok=True)
    for stale in dst.rglob(".*.tmp"):  # temp files of a run that was killed outright
        stale.unlink(missing_ok=True)
    todo = [(s, o) for s, o in pairs if not is_done(s, o)]
    report = PrepareReport(dst=dst, skipped=len(pairs) - len(todo))
    if on_total:
        on_total(len(todo))
    workers = max(1, workers or available_cpus())
    # Chunks amortise inter-process overhead; small enough to keep the progress bar moving.
    chunk = max(1, min(32, len(todo) // (workers * 8) or 1))
    chunks = [[(str(s), str(o)) for s, o in todo[i : i + chunk]] for i in range(0, len(todo), chunk)]
    if workers == 1 or len(chunks) <= 1:
        results = (_prepare_chunk(c, size, quality) for c in chunks)
        _collect(results, report, on_done)
    else:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            try:
                _collect(
                    pool.map(_prepare_chunk, chunks, [size] * len(chunks), [quality] * len(chunks)), report, on_done
                )
            except BaseException:  # Ctrl-C: drop the queued work; finished files stay done
                pool.shutdown(wait=True, cancel_futures=True)
                raise
    report.seconds = time.perf_counter() - t0
    _write_marker(
        dst,
        {
            "params": params,
            "source": str(src.resolve()),
            "complete": True,
            "images": report.images,
            "corrupt": report.corrupt,
        },
    )
    return report


def _collect(results, report: PrepareReport, on_done: Callable[[int], None] | None) -> None:
    for batch in results:
        for src, error in batch:
            if error is None:
                report.written += 1
            else:
                report.corrupt.append(f"{src}: {error}")
        if on_done:
            on_done(len(batch))
