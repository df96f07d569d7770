"""One trial: one `run.fit_run` (the wrapper every training path goes through: S3 mirror, spot
notice and SIGTERM stop) with the trial's settings, reported to Optuna epoch by epoch so the
pruner can stop it, and recorded (state, error) whatever ends it. Its TensorBoard run is fit's:
its settings are in the HParams tab from its first epoch on, so pruned trials are there too."""

from __future__ import annotations

import gc
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from ec2train import run
from ec2train.checkpoint import CHECKPOINT_FILE
from ec2train.errors import first_line
from ec2train.tune.study import TrialSetup, fmt_params, require_optuna


class TrialDiverged(RuntimeError):
    """The training loss went NaN or infinite: the trial is a failure, not a low score."""


class TrialStopped(RuntimeError):
    """A spot interruption notice or SIGTERM stopped the trial: it is not counted, and the study stops."""


@dataclass
class TrialProgress:
    """A running trial's best valid accuracy; `on_epoch` (fit's hook) reports each epoch to
    Optuna and prunes a trial below the median."""

    trial: Any  # optuna.Trial
    name: str  # "[worker 0] trial 3", as the log lines say it
    say: Callable[[str], None]
    epochs: int = 0  # the trial's --epochs
    best: float = math.nan
    done: int = 0  # epochs finished

    def on_epoch(self, epoch: int, record: dict[str, Any]) -> None:
        if not math.isfinite(record["train_loss"]):
            raise TrialDiverged(f"train loss is {record['train_loss']} at epoch {record['epoch']} (lr too high?)")
        acc = record["valid_acc1"]
        self.best = acc if math.isnan(self.best) else max(self.best, acc)
        self.done = record["epoch"]
        self.trial.report(acc, record["epoch"])
        self.say(f"{self.name} epoch {record['epoch']}/{self.epochs}: valid acc {acc:.4f}")
        # After the last epoch there is nothing left to save: let the trial complete.
        if record["epoch"] < self.epochs and self.trial.should_prune():
            raise require_optuna().TrialPruned(
                f"valid acc {self.best:.4f} after {record['epoch']} epochs is below the median"
            )


class Objective:
    """The Optuna objective: a trial's settings, one `run.fit_run`, the best valid accuracy.

    When a spot notice or SIGTERM stops a trial, `stopped_by` says what, the trial is recorded
    as interrupted (not counted toward --trials) and the study stops: the same command later
    continues it."""

    def __init__(self, setup: TrialSetup, say: Callable[[str], None], worker: str = ""):
        self.setup, self.say, self.worker = setup, say, worker
        self.stopped_by = ""

    def __call__(self, trial: Any) -> float:
        optuna = require_optuna()
        self._start(trial)
        progress = TrialProgress(trial, f"{self.worker}trial {trial.number}", self.say)
        state, params = "INTERRUPTED", {}
        try:
            params = {p.name: p.suggest(trial) for p in self.setup.space}
            cfg = self.setup.trial_config(trial.number, params)
            progress.epochs = cfg.epochs
            self.say(f"{progress.name} started: {fmt_params(params)}")
            result = run.fit_run(cfg, on_epoch=progress.on_epoch)  # looked up per call: tests replace it
            if result.interrupted:
                self.stopped_by = result.stopped_by
                trial.study.stop()
                raise TrialStopped(f"stopped by {result.stopped_by}; not counted toward --trials")
            state = "COMPLETE"
        except TrialStopped:
            raise
        except optuna.TrialPruned:
            state = "PRUNED"
            raise
        except Exception as exc:
            state = "FAIL"
            trial.set_user_attr("error", first_line(exc))
            raise
        finally:
            self._record(trial, state, params, progress)
        trial.set_user_attr("test_acc1", result.metrics["test_acc1"])
        self.say(f"{progress.name} complete: valid acc {result.metrics['valid_acc1']:.4f}")
        return result.metrics["valid_acc1"]

    def _start(self, trial: Any) -> None:
        # Free the previous trial's model before building the next one (matters on a GPU).
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        trial.set_user_attr("pid", os.getpid())
        if self.worker:
            trial.set_user_attr("worker", self.worker)

    def _record(self, trial: Any, state: str, params: dict[str, Any], progress: TrialProgress) -> None:
        """What a trial leaves, however it ended: its epochs, and for a stopped one why it does not count."""
        name = f"trial-{trial.number}"
        # Trials never resume, and a big model's last.pt per trial only fills the disk.
        (self.setup.output / name / CHECKPOINT_FILE).unlink(missing_ok=True)
        trial.set_user_attr("epochs", progress.done)
        if state == "INTERRUPTED":  # Ctrl-C, a spot notice or SIGTERM: Optuna records it as failed; do not count it
            trial.set_user_attr("interrupted", True)
            why = f"stopped by {self.stopped_by}" if self.stopped_by else "interrupted"
            trial.set_user_attr("error", f"{why}; not counted toward --trials")
            if self.stopped_by:  # (Ctrl-C: the command says so itself)
                self.say(f"{progress.name} {why}: not counted toward --trials")
        if state == "FAIL":
            self.say(f"{progress.name} failed: {trial.user_attrs.get('error', '')}")
        elif state == "PRUNED":
            self.say(f"{progress.name} pruned after epoch {progress.done} (best valid acc {progress.best:.4f})")
