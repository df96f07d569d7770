"""What a fit shows while it runs: the progress bar and log lines (rank 0), and the
TensorBoard writer (rank 0, opened in the background)."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeRemainingColumn

# The per-epoch numbers fit plots, in TensorBoard's groups (train/..., valid/...) or alone.
SCALARS = (
    "train_loss",
    "train_acc1",
    "valid_loss",
    "valid_acc1",
    "valid_acc5",
    "lr",
    "lr_backbone",
    "images_per_second",
)


class Reporter:
    """Progress bar and log lines, on rank 0 only."""

    def __init__(self, console, enabled: bool):
        self.enabled = enabled and console is not None
        self.console = console
        self.progress: Progress | None = None
        self.task: TaskID | None = None

    def log(self, msg: str) -> None:
        if self.enabled:
            self.console.print(msg)

    def start_epoch(self, epoch: int, epochs: int, total: int) -> None:
        if not self.enabled:
            return
        progress = self.progress = Progress(
            TextColumn(f"epoch {epoch + 1}/{epochs}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]:.4f} acc {task.fields[acc]:.3f} {task.fields[ips]:.0f} img/s"),
            TimeRemainingColumn(),
            console=self.console,
            transient=False,
        )
        progress.start()
        self.task = progress.add_task("train", total=total, loss=0.0, acc=0.0, ips=0.0)
        self._t0, self._n, self._loss, self._acc = time.perf_counter(), 0, 0.0, 0.0

    def step(self, n: int, loss: float, acc: float) -> None:
        if not self.progress or self.task is None:
            return
        self._n += n
        self._loss += loss * n
        self._acc += acc * n
        ips = self._n / max(time.perf_counter() - self._t0, 1e-9)
        self.progress.update(self.task, advance=n, loss=self._loss / self._n, acc=self._acc / self._n, ips=ips)

    def end_epoch(self) -> None:
        if self.progress:
            self.progress.stop()
            self.progress = None


class TensorBoard:
    """TensorBoard on rank 0, created in a background thread: importing tensorboard is slow,
    and the first epoch need not wait for it."""

    def __init__(self, logdir: Path | None):
        self._writer: Any = None  # torch.utils.tensorboard.SummaryWriter, imported in the thread
        self._thread: threading.Thread | None = None
        if logdir is not None:
            self._thread = threading.Thread(target=self._open, args=(logdir,), name="ec2train-tensorboard", daemon=True)
            self._thread.start()

    def _open(self, logdir: Path) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self._writer = SummaryWriter(str(logdir))

    def get(self):
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        return self._writer

    def close(self) -> None:
        if self.get() is not None:
            self._writer.close()

    def log_epoch(self, record: dict[str, Any]) -> None:
        """An epoch's history record as scalars (train/loss, valid/acc1, lr, ...), flushed."""
        writer, epoch = self.get(), record["epoch"]
        for key in (k for k in SCALARS if k in record):
            group, _, name = key.partition("_")
            writer.add_scalar(f"{group}/{name}" if group in ("train", "valid") else key, record[key], epoch)
        writer.flush()
