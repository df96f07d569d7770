"""Hyperparameter search with Optuna over the same `fit` the user runs: `ec2train tune`.

Every trial is one `loop.fit` call with a few settings changed, in its own output folder
and TensorBoard run. Its per-epoch valid accuracy feeds Optuna's MedianPruner through
fit's on_epoch hook, so hopeless trials stop after a few epochs instead of running to the
end. The study lives in an RDB storage (a sqlite file in the output folder by default), so
a stopped search continues where it left off, and parallel trials (one per GPU, each in
its own process pinned with CUDA_VISIBLE_DEVICES) share it.

Optuna (and SQLAlchemy, which it brings) is an optional dependency (`pip install 'ec2train[tune]'`),
imported inside functions (`require_optuna`) so a missing one is a one-line error; tensorboard is
imported where it writes, as in loop.py.
"""

from __future__ import annotations

import dataclasses
import difflib
import gc
import json
import math
import os
import re
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console

from ec2train import hw, loop
from ec2train.checkpoint import CHECKPOINT_FILE
from ec2train.config import ConfigError, TrainConfig, coerce_setting, read_toml, resolve, to_toml
from ec2train.data import default_workers, require_dataset
from ec2train.errors import UserError, first_line
from ec2train.export import atomic_write_text
from ec2train.hw import available_cpus

BEST_FILE = "best.toml"
STORAGE_FILE = "study.db"
JOB_FILE = ".tune-job-{pid}.json"
# The storage URL reaches worker processes through the environment, not argv or a file:
# a database URL may hold a password.
STORAGE_ENV = "EC2TRAIN_TUNE_STORAGE"

# What a space file may search, and each setting's type (str and bool take choices only).
SEARCHABLE: dict[str, type] = {
    "lr": float,
    "weight_decay": float,
    "label_smoothing": float,
    "momentum": float,
    "backbone_lr_scale": float,
    "batch_size": int,
    "warmup_epochs": int,
    "image_size": int,
    "optimizer": str,
    "arch": str,
    "augment": bool,
    "freeze_backbone": bool,
}
# Settings that may differ between runs of one study without making its trials incomparable.
_RUN_LOCAL = {"data", "output", "logdir", "resume", "s3_uri", "kms_key", "device", "workers", "compile", "amp"}


class TuneError(UserError):
    """A bad search space, storage, timeout or study; the message names the fix."""


def require_optuna():
    """The optuna module, or a TuneError saying how to install it (it is an optional dependency)."""
    try:
        import optuna
    except ImportError:
        raise TuneError("ec2train tune needs Optuna, which is not installed: pip install 'ec2train[tune]'") from None
    return optuna


# ---------------------------------------------------------------- small parsers

_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)([smhd])")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(text: str) -> float:
    """'90s', '30m', '2h', '1h30m' or plain seconds ('600') -> seconds."""
    t = text.strip().lower().replace(" ", "")
    if re.fullmatch(r"\d+(?:\.\d+)?", t):
        seconds = float(t)
    elif t and _DURATION_PART.sub("", t) == "":
        seconds = sum(float(n) * _UNIT_SECONDS[u] for n, u in _DURATION_PART.findall(t))
    else:
        raise TuneError(f"--timeout {text!r}: not a duration; use e.g. 90s, 30m, 2h or 1h30m")
    if seconds <= 0:
        raise TuneError(f"--timeout {text!r}: must be longer than zero")
    return seconds


def check_study_name(name: str) -> str:
    # The name becomes folder names (output, TensorBoard), so keep it path-safe.
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}", name):
        raise TuneError(f"--study {name!r}: use letters, digits, '.', '_' or '-' (up to 100 characters)")
    return name


# ---------------------------------------------------------------- search space


@dataclass(frozen=True)
class Param:
    """One searched setting: a range (low/high, optionally log scale or stepped) or choices."""

    name: str
    low: float | int | None = None
    high: float | int | None = None
    log: bool = False
    step: float | int | None = None
    choices: tuple | None = None

    def suggest(self, trial) -> Any:
        if self.choices is not None:
            return trial.suggest_categorical(self.name, list(self.choices))
        if SEARCHABLE[self.name] is int:
            return trial.suggest_int(self.name, int(self.low), int(self.high), step=int(self.step or 1), log=self.log)
        return trial.suggest_float(self.name, float(self.low), float(self.high), step=self.step, log=self.log)

    def describe(self) -> str:
        if self.choices is not None:
            return f"{self.name} in {list(self.choices)}"
        scale = " (log)" if self.log else (f" step {self.step}" if self.step else "")
        return f"{self.name} {self.low:g}..{self.high:g}{scale}"


def default_space(base: TrainConfig) -> list[Param]:
    """lr (log), batch size (choices), weight decay (log) and label smoothing."""
    # SGD wants learning rates about 100x those of AdamW.
    lr_low, lr_high = (1e-3, 0.3) if base.optimizer == "sgd" else (1e-5, 1e-2)
    return [
        Param("lr", lr_low, lr_high, log=True),
        Param("batch_size", choices=(16, 32, 64)),
        Param("weight_decay", 1e-6, 1e-1, log=True),
        Param("label_smoothing", 0.0, 0.2),
    ]


def _check_value(where: str, name: str, value: Any, base: TrainConfig) -> None:
    """A searched value must be a valid fit setting on its own (same rules as `fit`)."""
    try:
        dataclasses.replace(base, **{name: value}).validate()
    except ConfigError as exc:
        raise TuneError(f"{where}: {exc}") from None


def _number(where: str, key: str, value: Any, kind: type) -> float | int:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TuneError(f"{where}: {key} must be a number, not {value!r}")
    if kind is int:
        if not isinstance(value, int):
            raise TuneError(f"{where}: {key} must be a whole number, not {value!r}")
        return value
    return float(value)


def _param_from_table(where: str, name: str, table: dict[str, Any], base: TrainConfig) -> Param:
    kind = SEARCHABLE[name]
    unknown = sorted(set(table) - {"low", "high", "log", "step", "choices"})
    if unknown:
        raise TuneError(f"{where}: unknown key '{unknown[0]}'; use low, high, log, step or choices")
    if "choices" in table:
        if len(table) > 1:
            raise TuneError(f"{where}: give either choices = [...] or low/high, not both")
        raw = table["choices"]
        if not isinstance(raw, list) or not raw:
            raise TuneError(f"{where}: choices must be a non-empty list, e.g. choices = [16, 32, 64]")
        try:
            values = tuple(coerce_setting(name, v) for v in raw)
        except ConfigError as exc:
            raise TuneError(f"{where}: {exc}") from None
        if len(set(values)) != len(values):
            raise TuneError(f"{where}: choices {raw} repeat a value; list each value once")
        for v in values:
            _check_value(where, name, v, base)
        return Param(name, choices=values)
    if kind in (str, bool):
        raise TuneError(f"{where}: {name} takes choices = [...], not a range")
    if "low" not in table or "high" not in table:
        raise TuneError(f"{where}: give low and high (or choices = [...])")
    low, high = _number(where, "low", table["low"], kind), _number(where, "high", table["high"], kind)
    log = table.get("log", False)
    if not isinstance(log, bool):
        raise TuneError(f"{where}: log must be true or false, not {log!r}")
    if not low < high:
        raise TuneError(f"{where}: low {low:g} must be below high {high:g} (to fix one value use choices = [{low:g}])")
    if log and low <= 0:
        raise TuneError(f"{where}: log = true needs low > 0, not {low:g}")
    step = table.get("step")
    if step is not None:
        step = _number(where, "step", step, kind)
        if log:
            raise TuneError(f"{where}: step cannot be combined with log = true; drop one")
        if step <= 0 or step > high - low:
            raise TuneError(f"{where}: step {step:g} must be above 0 and at most high - low")
    _check_value(where, name, low, base)
    _check_value(where, name, high, base)
    return Param(name, low, high, log, step)


def load_space(path: str | Path | None, base: TrainConfig) -> list[Param]:
    """The default space, with the parameters named in a TOML space file replaced by its tables.

    [lr]
    low = 1e-4
    high = 1e-1
    log = true
    [batch_size]
    choices = [16, 32, 64]
    """
    space = {p.name: p for p in default_space(base)}
    if path is None:
        return list(space.values())
    path = Path(path)
    raw = read_toml(path, "--space", TuneError)
    for key, table in raw.items():
        name = key.replace("-", "_")
        if name not in SEARCHABLE:
            close = difflib.get_close_matches(name, SEARCHABLE, n=1, cutoff=0.5)
            hint = f"did you mean '{close[0]}'? " if close else ""
            raise TuneError(f"--space {path}: unknown parameter '{key}'; {hint}searchable: {', '.join(SEARCHABLE)}")
        if not isinstance(table, dict):
            raise TuneError(f"--space {path}: '{key}' must be a table, e.g. [{key}] then low = ... and high = ...")
        space[name] = _param_from_table(f"--space {path} [{key}]", name, table, base)
    return list(space.values())


# ---------------------------------------------------------------- parallel dispatch (pure)


def visible_gpus(cuda_visible_devices: str | None, device_count: int) -> list[str]:
    """The GPU ids this process may hand out: CUDA_VISIBLE_DEVICES's entries, else 0..count-1."""
    if cuda_visible_devices is None:
        return [str(i) for i in range(device_count)]
    ids = [x.strip() for x in cuda_visible_devices.split(",") if x.strip()]
    return ids[:device_count]


def worker_count(parallel: int | None, gpus: list[str], device: str) -> int:
    """--parallel N, else one worker per GPU (one on a CPU box or with --device cpu)."""
    if parallel is not None:
        if parallel < 1:
            raise TuneError(f"--parallel {parallel}: must be at least 1")
        return parallel
    return 1 if device == "cpu" else max(1, len(gpus))


def plan_workers(workers: int, gpus: list[str], device: str) -> list[str | None]:
    """CUDA_VISIBLE_DEVICES for each worker: GPUs round-robin; None (inherit) on the CPU."""
    if device == "cpu" or not gpus:
        return [None] * workers
    return [gpus[i % len(gpus)] for i in range(workers)]


def loader_workers(requested: int, cpus: int, workers: int) -> int:
    """Data-loader processes per trial when trials share the box's CPUs."""
    return requested if requested >= 0 else default_workers(cpus, workers)


# ---------------------------------------------------------------- storage and study


def default_storage(output: Path) -> str:
    return f"sqlite:///{(output / STORAGE_FILE).resolve()}"


def shown_url(url: str) -> str:
    """The storage URL without its password, for logs."""
    try:
        from sqlalchemy.engine import make_url

        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # not a URL SQLAlchemy parses: show only its scheme
        return url.split("://", 1)[0] + "://..."


def open_storage(url: str):
    """An Optuna RDBStorage: heartbeats mark trials of a killed run as failed; sqlite waits for its lock."""
    optuna = require_optuna()
    if "://" not in url:
        raise TuneError(f"--storage {url!r}: not a database URL; use e.g. sqlite:///tune.db")
    kwargs: dict[str, Any] = {}
    if url.startswith("sqlite"):
        # Parallel trials write to one file: wait for its lock instead of failing with 'database is locked'.
        kwargs["engine_kwargs"] = {"connect_args": {"timeout": 60}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        try:
            return optuna.storages.RDBStorage(url, heartbeat_interval=60, grace_period=180, **kwargs)
        except Exception as exc:  # SQLAlchemy raises many kinds; all mean "cannot use this storage"
            msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise TuneError(
                f"--storage {shown_url(url)}: cannot open it ({msg}); check the URL and that its folder exists"
            ) from None


def _comparable(cfg: TrainConfig, searched: set[str]) -> dict[str, Any]:
    return {k: v for k, v in cfg.to_dict().items() if k not in _RUN_LOCAL and k not in searched}


def check_study_base(study, base: TrainConfig, space: list[Param]) -> None:
    """A resumed study must keep its fixed settings, or old and new trials are not comparable."""
    searched = {p.name for p in space} | set(study.user_attrs.get("ec2train_searched", []))
    old = study.user_attrs.get("ec2train_base")
    if old is not None:
        new = _comparable(base, searched)
        for key, value in new.items():
            if key in old and old[key] != value:
                raise TuneError(
                    f"study '{study.study_name}' was run with {key}={old[key]!r}, this run asks for {value!r}: "
                    "its trials would not be comparable; keep the setting or use another --study"
                )
    study.set_user_attr("ec2train_base", _comparable(base, searched))
    study.set_user_attr("ec2train_searched", sorted(searched))


# ---------------------------------------------------------------- one trial


@dataclass
class Job:
    """Everything a trial needs, also written as JSON for worker processes."""

    study: str
    base: TrainConfig
    space: list[Param]
    output: Path
    tb_root: Path  # <logdir>/tune-<study>
    prune: bool = True
    prune_startup_trials: int = 5
    prune_warmup_epochs: int = 1

    def to_json(self) -> str:
        return json.dumps(
            {
                "study": self.study,
                "base": self.base.to_dict(),
                "space": [dataclasses.asdict(p) for p in self.space],
                "output": str(self.output),
                "tb_root": str(self.tb_root),
                "prune": self.prune,
                "prune_startup_trials": self.prune_startup_trials,
                "prune_warmup_epochs": self.prune_warmup_epochs,
            }
        )

    @classmethod
    def from_json(cls, text: str) -> Job:
        d = json.loads(text)
        space = [
            Param(**{**p, "choices": tuple(p["choices"]) if p["choices"] is not None else None}) for p in d["space"]
        ]
        return cls(
            d["study"],
            TrainConfig(**d["base"]),
            space,
            Path(d["output"]),
            Path(d["tb_root"]),
            d["prune"],
            d["prune_startup_trials"],
            d["prune_warmup_epochs"],
        )

    def pruner(self):
        optuna = require_optuna()
        if not self.prune:
            return optuna.pruners.NopPruner()
        # Steps are 1-based epochs; a trial is first judged after prune_warmup_epochs + 1 epochs.
        return optuna.pruners.MedianPruner(
            n_startup_trials=self.prune_startup_trials, n_warmup_steps=self.prune_warmup_epochs + 1
        )


def sampler(seed_parts: list[int]):
    """TPE, seeded per process and per run so a resumed or parallel run does not redraw the same trials."""
    optuna = require_optuna()
    seed = int(np.random.SeedSequence(seed_parts).generate_state(1)[0])
    # constant_liar: running trials count as bad guesses, so parallel workers spread out.
    return optuna.samplers.TPESampler(seed=seed, constant_liar=True)


class TrialDiverged(RuntimeError):
    """The training loss went NaN or infinite: the trial is a failure, not a low score."""


def _fmt_params(params: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items())


def write_trial_hparams(
    logdir: Path, params: dict[str, Any], state: str, valid_acc1: float, epochs: int, space: list[Param]
) -> None:
    """One TensorBoard hparams entry per trial, so the HParams tab compares every trial, pruned ones too."""
    from torch.utils.tensorboard import SummaryWriter

    discrete = {p.name: list(p.choices) for p in space if p.choices is not None and p.name in params}
    discrete["state"] = ["COMPLETE", "PRUNED"]
    with SummaryWriter(str(logdir)) as w:
        w.add_hparams(
            {**params, "state": state},
            {"hparam/valid_acc1": valid_acc1, "hparam/epochs": epochs},
            hparam_domain_discrete=discrete,
            run_name=".",
        )


def make_objective(job: Job, say: Callable[[str], None], worker: str = "") -> Callable:
    """The Optuna objective: one `loop.fit` with the trial's settings; returns the best valid accuracy."""
    optuna = require_optuna()

    def objective(trial) -> float:
        # Free the previous trial's model before building the next one (matters on a GPU).
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        trial.set_user_attr("pid", os.getpid())
        if worker:
            trial.set_user_attr("worker", worker)
        n = trial.number
        tb_dir = job.tb_root / f"trial-{n}"
        best = {"acc": float("nan"), "epochs": 0}
        params: dict[str, Any] = {}

        def on_epoch(epoch: int, record: dict[str, Any]) -> None:
            if not math.isfinite(record["train_loss"]):
                raise TrialDiverged(f"train loss is {record['train_loss']} at epoch {record['epoch']} (lr too high?)")
            acc = record["valid_acc1"]
            best["acc"] = acc if math.isnan(best["acc"]) else max(best["acc"], acc)
            best["epochs"] = record["epoch"]
            trial.report(acc, record["epoch"])
            say(f"{worker}trial {n} epoch {record['epoch']}/{cfg.epochs}: valid acc {acc:.4f}")
            # After the last epoch there is nothing left to save: let the trial complete.
            if record["epoch"] < cfg.epochs and trial.should_prune():
                raise optuna.TrialPruned(
                    f"valid acc {best['acc']:.4f} after {record['epoch']} epochs is below the median"
                )

        state = "INTERRUPTED"
        try:
            params = {p.name: p.suggest(trial) for p in job.space}
            cfg = dataclasses.replace(
                job.base, **params, output=str(job.output / f"trial-{n}"), logdir=str(tb_dir), resume="never"
            ).validate()
            say(f"{worker}trial {n} started: {_fmt_params(params)}")
            result = loop.fit(cfg, on_epoch=on_epoch)  # looked up per call: tests replace loop.fit
            state = "COMPLETE"
        except optuna.TrialPruned:
            state = "PRUNED"
            raise
        except Exception as exc:
            state = "FAIL"
            trial.set_user_attr("error", first_line(exc))
            raise
        finally:
            # Trials never resume, and a big model's last.pt per trial only fills the disk.
            (job.output / f"trial-{n}" / CHECKPOINT_FILE).unlink(missing_ok=True)
            trial.set_user_attr("epochs", best["epochs"])
            if state == "INTERRUPTED":  # Ctrl-C: Optuna records it as failed; do not count it
                trial.set_user_attr("interrupted", True)
                trial.set_user_attr("error", "interrupted; not counted toward --trials")
            if state in ("COMPLETE", "PRUNED"):
                write_trial_hparams(tb_dir, params, state, best["acc"], best["epochs"], job.space)
            if state == "FAIL":
                say(f"{worker}trial {n} failed: {trial.user_attrs.get('error', '')}")
            elif state == "PRUNED":
                say(f"{worker}trial {n} pruned after epoch {best['epochs']} (best valid acc {best['acc']:.4f})")
        trial.set_user_attr("test_acc1", result.metrics["test_acc1"])
        say(f"{worker}trial {n} complete: valid acc {result.metrics['valid_acc1']:.4f}")
        return result.metrics["valid_acc1"]

    return objective


# ---------------------------------------------------------------- results


def trial_rows(study) -> list[dict[str, Any]]:
    """One dict per trial: number, state, params, valid_acc1 (best so far for pruned), epochs, error."""
    rows = []
    for t in study.get_trials(deepcopy=False):
        acc = (
            t.value if t.value is not None else (max(t.intermediate_values.values()) if t.intermediate_values else None)
        )
        rows.append(
            {
                "number": t.number,
                "state": t.state.name,
                "params": dict(t.params),
                "valid_acc1": acc,
                "epochs": len(t.intermediate_values),
                "error": t.user_attrs.get("error", ""),
            }
        )
    return rows


def best_trial(study):
    """The complete trial with the highest valid accuracy (the earliest on a tie), or None."""
    optuna = require_optuna()
    done = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    return max(done, key=lambda t: (t.value, -t.number)) if done else None


def write_best(study, base: TrainConfig, path: Path) -> tuple[TrainConfig, Any] | None:
    """best.toml: the fixed settings plus the best trial's parameters, as `fit --config` reads them."""
    trial = best_trial(study)
    if trial is None:
        return None
    cfg = dataclasses.replace(base, **trial.params).validate()
    header = (
        f"# Best of ec2train tune study '{study.study_name}': trial {trial.number}, "
        f"valid acc {trial.value:.4f} after {len(trial.intermediate_values)} epochs.\n"
        f"# Searched: {_fmt_params(trial.params)}\n"
    )
    atomic_write_text(path, header + to_toml(cfg))
    return cfg, trial


@dataclass
class TuneResult:
    study: Any
    rows: list[dict[str, Any]]
    best_config: TrainConfig | None  # None when no trial completed
    best_file: Path | None
    best_value: float | None
    best_number: int | None
    final: Any = None  # loop.FitResult of --then-fit
    storage: str = ""
    tb_root: Path | None = None
    worker_exits: list[int] = field(default_factory=list)


# ---------------------------------------------------------------- the search


# Over 80 lines with the formatter's one-argument-per-line calls; the steps (study, trials, then_fit) are named helpers.
def tune(
    base: TrainConfig,
    *,
    trials: int = 20,
    timeout: float | None = None,
    study_name: str = "ec2train",
    storage: str | None = None,
    space: list[Param] | str | Path | None = None,
    output: str | Path | None = None,
    parallel: int | None = None,
    prune: bool = True,
    prune_startup_trials: int | None = None,
    prune_warmup_epochs: int = 1,
    then_fit: bool = False,
    console=None,
) -> TuneResult:
    """Run (or continue) a study until it holds `trials` trials, write best.toml, optionally fit it.

    base: the fixed fit settings (its output/logdir are where --then-fit writes the final model).
    timeout: seconds after which no new trial starts (running ones finish).
    """
    optuna = require_optuna()
    base = _checked(base, study_name, trials, prune_warmup_epochs)
    params = space if isinstance(space, list) else load_space(space, base)
    output = Path(output) if output is not None else Path("tune") / study_name
    output.mkdir(parents=True, exist_ok=True)
    storage_url = storage or default_storage(output)
    say = (lambda msg: console.print(msg, highlight=False, markup=False)) if console is not None else (lambda msg: None)

    gpus = visible_gpus(os.environ.get("CUDA_VISIBLE_DEVICES"), hw.cuda_device_count())
    n_workers = worker_count(parallel, gpus, base.device)
    # Trials side by side share the CPUs for data loading; best.toml keeps the user's setting.
    trial_base = dataclasses.replace(base, workers=loader_workers(base.workers, available_cpus(), n_workers))
    startup = prune_startup_trials if prune_startup_trials is not None else min(5, max(1, trials // 4))
    job = Job(
        study_name,
        trial_base,
        params,
        output.resolve(),
        (Path(base.logdir) / f"tune-{study_name}").resolve(),
        prune,
        startup,
        prune_warmup_epochs,
    )

    study = _open_study(optuna, study_name, storage_url, base, params, job)
    started = counted_trials(study)
    to_run = max(0, trials - started)
    devices = plan_workers(n_workers, gpus, base.device)
    say(
        f"study '{study_name}' in {shown_url(storage_url)}: {started} trials so far, "
        f"running {to_run} more ({_side_by_side(n_workers, devices)})"
    )
    say("searching " + "; ".join(p.describe() for p in params))
    deadline = time.monotonic() + timeout if timeout else None

    exits: list[int] = []
    if to_run:
        if n_workers == 1:
            study.optimize(
                make_objective(job, say), n_trials=to_run, timeout=timeout, catch=(Exception,), gc_after_trial=True
            )
        else:
            exits = _run_parallel(job, storage_url, to_run, devices, deadline, say)

    cfg, trial = write_best(study, base, output / BEST_FILE) or (None, None)
    result = TuneResult(
        study,
        trial_rows(study),
        cfg,
        output / BEST_FILE if cfg else None,
        trial.value if trial else None,
        trial.number if trial else None,
        storage=storage_url,
        tb_root=job.tb_root,
        worker_exits=exits,
    )
    if then_fit:
        result.final = _fit_best(result, study_name, console, say)
    return result


def _side_by_side(n_workers: int, devices: list) -> str:
    where = "one at a time" if n_workers == 1 else f"{n_workers} at a time"
    return where + (f", on GPUs {','.join(devices)}" if n_workers > 1 and devices[0] is not None else "")


def _checked(base: TrainConfig, study_name: str, trials: int, prune_warmup_epochs: int) -> TrainConfig:
    """The settings, validated once, up front, not once per trial."""
    base = base.validate()
    check_study_name(study_name)
    if trials < 1:
        raise TuneError(f"--trials {trials}: must be at least 1")
    if prune_warmup_epochs < 0:
        raise TuneError(f"--prune-warmup-epochs {prune_warmup_epochs}: must be 0 or more")
    require_dataset(base.data)
    return base


def _open_study(optuna, study_name: str, storage_url: str, base: TrainConfig, params: list[Param], job: Job):
    """Create or load the study; refuse one made for another purpose or with other fixed settings."""
    rdb = open_storage(storage_url)
    study = optuna.create_study(
        study_name=study_name,
        storage=rdb,
        direction="maximize",
        load_if_exists=True,
        sampler=sampler([base.seed, len_trials(rdb, study_name)]),
        pruner=job.pruner(),
    )
    if study.direction != optuna.study.StudyDirection.MAXIMIZE:
        raise TuneError(
            f"study '{study_name}' maximises nothing (it was made elsewhere to minimise); use another --study"
        )
    check_study_base(study, base, params)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)  # trials of a killed run whose heartbeat stopped
    return study


def _fit_best(result: TuneResult, study_name: str, console, say: Callable[[str], None]) -> Any:
    """--then-fit: train the final model with the best settings."""
    if result.best_file is None:
        raise TuneError(
            f"--then-fit: no trial of study '{study_name}' completed, so there are no best settings to train"
        )
    say(f"training the final model with {result.best_file}")
    # Read back the file just written: the final model is exactly what `fit --config best.toml` trains.
    return loop.fit(resolve(result.best_file), console=console)


def counted_trials(study) -> int:
    """Trials that count toward --trials: all started ones except those stopped by Ctrl-C.
    (WAITING ones, e.g. enqueued by hand, are run by the next trials started, so they are not added.)"""
    optuna = require_optuna()
    TS = optuna.trial.TrialState
    return sum(
        not t.user_attrs.get("interrupted")
        for t in study.get_trials(deepcopy=False, states=(TS.COMPLETE, TS.PRUNED, TS.FAIL, TS.RUNNING))
    )


def len_trials(storage, study_name: str) -> int:
    """How many trials the study holds already (0 for a new one): seeds a resumed run differently."""
    try:
        study_id = storage.get_study_id_from_name(study_name)
    except KeyError:
        return 0
    return len(storage.get_all_trials(study_id, deepcopy=False))


# ---------------------------------------------------------------- parallel workers


def _run_parallel(
    job: Job,
    storage_url: str,
    to_run: int,
    devices: list[str | None],
    deadline: float | None,
    say: Callable[[str], None],
) -> list[int]:
    """One thread per worker slot; each starts trial processes one after another (one trial per process,
    so a crash or CUDA error ends one trial, not the search) until `to_run` trials have started."""
    optuna = require_optuna()
    job_file = atomic_write_text(job.output / JOB_FILE.format(pid=os.getpid()), job.to_json())
    lock = threading.Lock()
    state = {"left": to_run, "seq": 0}
    exits: list[int] = []
    stop = threading.Event()
    procs: dict[int, subprocess.Popen] = {}
    cpus_per_worker = max(1, (os.cpu_count() or 1) // len(devices))

    def slot(i: int, device: str | None) -> None:
        env = dict(os.environ)
        env[STORAGE_ENV] = storage_url
        if device is not None:
            env["CUDA_VISIBLE_DEVICES"] = device
        else:
            # CPU trials side by side: split the cores instead of each taking all of them.
            env.setdefault("OMP_NUM_THREADS", str(cpus_per_worker))
        label = f"[gpu {device}] " if device is not None else f"[worker {i}] "
        while not stop.is_set():
            with lock:
                if state["left"] <= 0 or (deadline is not None and time.monotonic() >= deadline):
                    return
                state["left"] -= 1
                state["seq"] += 1
                seq = state["seq"]
            cmd = [sys.executable, "-m", "ec2train.tune", str(job_file), label, str(seq)]
            proc = subprocess.Popen(cmd, env=env)
            procs[i] = proc
            rc = proc.wait()
            with lock:
                exits.append(rc)
            if rc not in (0, 130) and not stop.is_set():
                _fail_orphans(optuna, job, storage_url, proc.pid)
                say(f"{label}trial process exited with code {rc}; its trial is recorded as failed")

    threads = [threading.Thread(target=slot, args=(i, d), daemon=True) for i, d in enumerate(devices)]
    for t in threads:
        t.start()
    try:
        for t in threads:
            while t.is_alive():
                t.join(0.5)
    except KeyboardInterrupt:
        # The trial processes got the same Ctrl-C; they record their trials as failed and exit.
        stop.set()
        for t in threads:
            t.join(60)
        for proc in procs.values():  # started just as Ctrl-C came, so it never got it
            if proc.poll() is None:
                proc.terminate()
        raise
    finally:
        job_file.unlink(missing_ok=True)
    return exits


def _fail_orphans(optuna, job: Job, storage_url: str, pid: int) -> None:
    """A trial process that died (OOM kill, segfault) leaves its trial RUNNING; record it as failed."""
    study = optuna.load_study(study_name=job.study, storage=open_storage(storage_url))
    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        if t.user_attrs.get("pid") == pid:
            study.tell(t.number, state=optuna.trial.TrialState.FAIL)


def _worker_main(argv: list[str]) -> int:
    """`python -m ec2train.tune JOB_FILE LABEL SEQ`: run one trial of the study in this process."""
    console = Console(soft_wrap=True)
    try:
        optuna = require_optuna()
        optuna.logging.set_verbosity(optuna.logging.ERROR)
        job_file, label, seq = argv
        job = Job.from_json(Path(job_file).read_text())
        study = optuna.load_study(
            study_name=job.study,
            storage=open_storage(os.environ[STORAGE_ENV]),
            sampler=sampler([job.base.seed, int(seq), os.getpid()]),
            pruner=job.pruner(),
        )
        say = lambda msg: console.print(msg, highlight=False, markup=False)  # noqa: E731
        study.optimize(make_objective(job, say, label), n_trials=1, catch=(Exception,))
    except KeyboardInterrupt:
        return 130  # Optuna has recorded the trial as failed
    except UserError as exc:
        Console(stderr=True).print(f"[bold red]error:[/bold red] {exc}", highlight=False)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(_worker_main(sys.argv[1:]))
