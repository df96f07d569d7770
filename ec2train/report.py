"""What a fit shows while it runs: the progress bar and log lines (rank 0), and the
TensorBoard writer (rank 0, opened in the background)."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeRemainingColumn

# TensorBoard, laid out as Keras writes it: RUN/train and RUN/validation hold the same tags, so
# the dashboard draws train and valid of one metric on one chart, and the best epoch's test
# accuracy is a point on the accuracy chart (RUN/test). Tag groups sort the learning curves
# ("epoch/...") before the optimizer's and the throughput's. Hyperparameters go to the HParams
# tab only (a session in RUN itself): no one-point charts among the curves.
TRAIN, VALID, TEST = "train", "validation", "test"
CURVES = {  # history record key: (sub-run, tag)
    "train_loss": (TRAIN, "epoch/loss"),
    "train_acc1": (TRAIN, "epoch/accuracy"),
    "valid_loss": (VALID, "epoch/loss"),
    "valid_acc1": (VALID, "epoch/accuracy"),
    "valid_acc5": (VALID, "epoch/top5_accuracy"),
    "lr": (TRAIN, "optimizer/lr"),
    "lr_backbone": (TRAIN, "optimizer/lr_backbone"),  # only when it differs from lr
    "images_per_second": (TRAIN, "throughput/images_per_second"),
}
# The HParams tab's metrics: (tag, sub-run, column title); a metric's value is its last point.
HPARAM_METRICS = (
    ("epoch/accuracy", VALID, "valid accuracy (last epoch)"),
    ("epoch/loss", VALID, "valid loss (last epoch)"),
    ("epoch/accuracy", TEST, "test accuracy (best epoch)"),
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
    """TensorBoard on rank 0 (see CURVES for the layout), opened in a background thread: importing
    tensorboard is slow, and the first epoch need not wait for it. `hparams`: the run's
    settings, written when it opens so that runs stopped early (a pruned trial) are in the HParams
    tab too; a run that finishes is marked a success there."""

    def __init__(self, logdir: Path | None, hparams: dict[str, Any] | None = None):
        self._writers: dict[str, Any] = {}
        self._thread = None
        self._logdir = logdir
        if logdir is not None:
            self._thread = threading.Thread(
                target=self._open, args=(logdir, hparams or {}), name="ec2train-tensorboard", daemon=True
            )
            self._thread.start()

    def _open(self, logdir: Path, hparams: dict[str, Any]) -> None:
        from torch.utils.tensorboard import SummaryWriter

        writers: dict[str, Any] = {name: SummaryWriter(str(logdir / name)) for name in (TRAIN, VALID)}
        if hparams:
            writers[""] = SummaryWriter(str(logdir))
            events: Any = writers[""].file_writer
            events.add_summary(hparams_experiment(HPARAM_METRICS, hparams))
            events.add_summary(hparams_session_start(hparams))
        self._writers = writers

    def writer(self, run: str):
        """The SummaryWriter of sub-run `run` (train, validation, test; "" for RUN itself), or None."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._logdir is None:
            return None
        if run not in self._writers:
            from torch.utils.tensorboard import SummaryWriter

            self._writers[run] = SummaryWriter(str(self._logdir / run) if run else str(self._logdir))
        return self._writers[run]

    def close(self) -> None:
        self.writer(TRAIN)  # waits for the opening thread
        for writer in self._writers.values():
            writer.close()

    def log_epoch(self, record: dict[str, Any]) -> None:
        """An epoch's history record as points on the train and validation curves, flushed."""
        if self._logdir is None:
            return
        for key, (run, tag) in CURVES.items():
            if key in record and not (key == "lr_backbone" and record[key] == record.get("lr")):
                self.writer(run).add_scalar(tag, record[key], record["epoch"])
        for run in (TRAIN, VALID):
            self.writer(run).flush()

    def log_test(self, test: dict[str, float], best_epoch: int) -> Any:
        """The best epoch's test accuracy and loss, at that epoch; returns the test sub-run's
        writer (for the confusion matrix), marking the run a success in the HParams tab."""
        writer = self.writer(TEST)
        if writer is None:
            return None
        writer.add_scalar("epoch/accuracy", test["acc1"], best_epoch)
        writer.add_scalar("epoch/loss", test["loss"], best_epoch)
        writer.flush()
        root = self.writer("")
        root.file_writer.add_summary(hparams_session_end())
        root.flush()
        return writer


def hparams_experiment(metrics: tuple[tuple[str, str, str], ...], hparams: dict[str, Any]):
    """The HParams tab's columns: the settings (typed) and the metrics, read from the sub-runs' curves."""
    from tensorboard.compat.proto.summary_pb2 import Summary
    from tensorboard.plugins.hparams import api_pb2, metadata, plugin_data_pb2

    def kind(value: Any) -> int:
        if isinstance(value, bool):
            return api_pb2.DATA_TYPE_BOOL
        return api_pb2.DATA_TYPE_FLOAT64 if isinstance(value, (int, float)) else api_pb2.DATA_TYPE_STRING

    experiment = api_pb2.Experiment(
        hparam_infos=[api_pb2.HParamInfo(name=k, type=kind(v)) for k, v in _shown(hparams).items()],
        metric_infos=[
            api_pb2.MetricInfo(name=api_pb2.MetricName(tag=tag, group=group), display_name=title)
            for tag, group, title in metrics
        ],
    )
    data = plugin_data_pb2.HParamsPluginData(experiment=experiment, version=metadata.PLUGIN_DATA_VERSION)
    return Summary(value=[Summary.Value(tag=metadata.EXPERIMENT_TAG, metadata=metadata.create_summary_metadata(data))])


def hparams_session_start(hparams: dict[str, Any]):
    from tensorboard.plugins.hparams import summary_v2

    return summary_v2.hparams_pb(_shown(hparams))


def hparams_session_end():
    import time

    from tensorboard.compat.proto.summary_pb2 import Summary
    from tensorboard.plugins.hparams import api_pb2, metadata, plugin_data_pb2

    end = plugin_data_pb2.SessionEndInfo(status=api_pb2.STATUS_SUCCESS, end_time_secs=time.time())
    data = plugin_data_pb2.HParamsPluginData(session_end_info=end, version=metadata.PLUGIN_DATA_VERSION)
    return Summary(
        value=[Summary.Value(tag=metadata.SESSION_END_INFO_TAG, metadata=metadata.create_summary_metadata(data))]
    )


def _shown(hparams: dict[str, Any]) -> dict[str, Any]:
    """The settings the HParams tab can show: numbers, strings and booleans (None: not set)."""
    return {k: v for k, v in hparams.items() if isinstance(v, (bool, int, float, str))}
