"""`tune()`: run (or continue) a study until it holds the trials asked for, one at a time in this
process or side by side in trial processes; write best.toml; optionally train the final model."""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ec2train import hw, run
from ec2train.checkpoint import Resume
from ec2train.config import TrainConfig, resolve
from ec2train.data import require_dataset
from ec2train.threads import available_cpus
from ec2train.tune.parallel import ParallelTrials, loader_workers, plan_workers, visible_gpus, worker_count
from ec2train.tune.space import Param, TuneError, check_study_name, load_space
from ec2train.tune.study import (
    BEST_FILE,
    TrialSetup,
    counted_trials,
    default_storage,
    open_study,
    require_optuna,
    shown_url,
    trial_rows,
    write_best,
)
from ec2train.tune.trial import Objective


@dataclass
class TuneResult:
    study: Any
    rows: list[dict[str, Any]]
    best_file: Path | None  # None when no trial completed
    best_value: float | None
    best_number: int | None
    final: Any = None  # loop.FitResult of --then-fit
    storage: str = ""
    tb_root: Path | None = None
    stopped_by: str = ""  # a spot notice or SIGTERM stopped the study: the same command continues it


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

    base: the fixed fit settings (its output/logdir are where --then-fit writes the final model;
    with s3_uri, trial N mirrors to S3_URI/trial-N/ and the final model to S3_URI/).
    timeout: seconds after which no new trial starts (running ones finish).
    Every trial, and --then-fit, runs through run.fit_run: a spot notice or SIGTERM stops the
    running trial (not counted) and the study (result.stopped_by).
    """
    require_optuna()
    base = _checked(base, study_name, trials, prune_warmup_epochs)
    if then_fit:  # before the study, not after hours of trials
        Resume.of(base, torchrun=False).refuse_local_overwrite()
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
    setup = TrialSetup(
        study_name,
        trial_base,
        params,
        output.resolve(),
        (Path(base.logdir) / f"tune-{study_name}").resolve(),
        prune,
        startup,
        prune_warmup_epochs,
    )

    study = open_study(study_name, storage_url, base, params, setup)
    started = counted_trials(study)
    to_run = max(0, trials - started)
    devices = plan_workers(n_workers, gpus, base.device)
    say(
        f"study '{study_name}' in {shown_url(storage_url)}: {started} trials so far, "
        + (
            f"running {to_run} more ({_side_by_side(n_workers, devices)})"
            if to_run
            else f"none to run: --trials counts the study's trials in all, so --trials {started + trials} runs {trials} more"
        )
    )
    say("searching " + "; ".join(p.describe() for p in params))
    stopped_by = _run_trials(study, setup, storage_url, to_run, devices, timeout, say) if to_run else ""

    trial = write_best(study, base, output / BEST_FILE)
    result = TuneResult(
        study,
        trial_rows(study),
        output / BEST_FILE if trial else None,
        trial.value if trial else None,
        trial.number if trial else None,
        storage=storage_url,
        tb_root=setup.tb_root,
        stopped_by=stopped_by,
    )
    if then_fit and not stopped_by:
        result.final = _fit_best(result, study_name, console, say)
    return result


def _run_trials(
    study: Any,
    setup: TrialSetup,
    storage_url: str,
    to_run: int,
    devices: list[str | None],
    timeout: float | None,
    say: Callable[[str], None],
) -> str:
    """The trials, here one after another or in trial processes side by side; returns what
    stopped the study early ("" when nothing did)."""
    if len(devices) == 1:
        objective = Objective(setup, say)
        study.optimize(objective, n_trials=to_run, timeout=timeout, catch=(Exception,), gc_after_trial=True)
        return objective.stopped_by
    deadline = time.monotonic() + timeout if timeout else None
    trials = ParallelTrials(setup, storage_url, to_run, devices, deadline, say)
    trials.run()
    return trials.stopped_by


def _side_by_side(n_workers: int, devices: list) -> str:
    where = "one at a time" if n_workers == 1 else f"{n_workers} at a time"
    return where + (f", on GPUs {','.join(devices)}" if n_workers > 1 and devices[0] is not None else "")


def _checked(base: TrainConfig, study_name: str, trials: int, prune_warmup_epochs: int) -> TrainConfig:
    """The study's settings, checked up front, not once per trial (base was checked when it was made)."""
    check_study_name(study_name)
    if trials < 1:
        raise TuneError(f"--trials {trials}: must be at least 1")
    if prune_warmup_epochs < 0:
        raise TuneError(f"--prune-warmup-epochs {prune_warmup_epochs}: must be 0 or more")
    require_dataset(base.data)
    return base


def _fit_best(result: TuneResult, study_name: str, console: Any, say: Callable[[str], None]) -> Any:
    """--then-fit: train the final model with the best settings, through the same wrapper as `fit`."""
    if result.best_file is None:
        raise TuneError(
            f"--then-fit: no trial of study '{study_name}' completed, so there are no best settings to train"
        )
    say(f"training the final model with {result.best_file}")
    # Read back the file just written: the final model is exactly what `fit --config best.toml` trains.
    return run.fit_run(resolve(result.best_file), console=console)
