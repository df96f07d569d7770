"""Hyperparameter search with Optuna over the same `fit` the user runs: `ec2train tune`.

Every trial is one `run.fit_run` call (the S3 mirror, the spot notice and the SIGTERM stop, as
`fit`) with a few settings changed, in its own output folder and TensorBoard run. Its per-epoch
valid accuracy feeds Optuna's MedianPruner through fit's on_epoch hook, so hopeless trials stop
after a few epochs instead of running to the end. The study lives in an RDB storage (a sqlite
file in the output folder by default), so a stopped search continues where it left off, and
parallel trials (one per GPU, each in its own process pinned with CUDA_VISIBLE_DEVICES) share it.

The parts: space (what is searched), study (storage, sampler, results), trial (one trial),
parallel (trial processes), search (`tune` itself).

Optuna (and SQLAlchemy, which it brings) is an optional dependency (`pip install 'ec2train[tune]'`),
imported inside functions (`require_optuna`) so a missing one is a one-line error.
"""

from ec2train.tune.parallel import STORAGE_ENV, loader_workers, plan_workers, visible_gpus, worker_count
from ec2train.tune.search import TuneResult, tune
from ec2train.tune.space import (
    SEARCHABLE,
    Param,
    TuneError,
    check_study_name,
    default_space,
    load_space,
    parse_duration,
)
from ec2train.tune.study import (
    BEST_FILE,
    STORAGE_FILE,
    TrialSetup,
    best_trial,
    counted_trials,
    default_storage,
    open_storage,
    require_optuna,
    trial_rows,
    write_best,
)
from ec2train.tune.trial import Objective, TrialDiverged, TrialStopped

__all__ = [
    "BEST_FILE",
    "SEARCHABLE",
    "STORAGE_ENV",
    "STORAGE_FILE",
    "Objective",
    "Param",
    "TrialDiverged",
    "TrialSetup",
    "TrialStopped",
    "TuneError",
    "TuneResult",
    "best_trial",
    "check_study_name",
    "counted_trials",
    "default_space",
    "default_storage",
    "load_space",
    "loader_workers",
    "open_storage",
    "parse_duration",
    "plan_workers",
    "require_optuna",
    "trial_rows",
    "tune",
    "visible_gpus",
    "write_best",
    "worker_count",
]
