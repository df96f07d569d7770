"""The study: its storage (an RDB, a sqlite file by default), its sampler and pruner, the fixed
settings its trials share (TrialSetup), and its results (rows, best trial, best.toml)."""

from __future__ import annotations

import dataclasses
import json
import re
import urllib.parse
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ec2train.config import TrainConfig, to_toml
from ec2train.errors import pip_install
from ec2train.files import atomic_write_text
from ec2train.s3 import parse_uri
from ec2train.tune.space import Param, TuneError

BEST_FILE = "best.toml"
STORAGE_FILE = "study.db"
# Settings that may differ between runs of one study without making its trials incomparable.
_RUN_LOCAL = {"data", "output", "logdir", "resume", "s3_uri", "kms_key", "device", "workers", "compile", "amp"}


def require_optuna():
    """The optuna module, or a TuneError saying how to install it (it is an optional dependency)."""
    try:
        import optuna
    except ImportError:
        raise TuneError(
            f"ec2train tune needs Optuna, which is not installed: {pip_install('ec2train[tune]')}"
        ) from None
    return optuna


def default_storage(output: Path) -> str:
    return f"sqlite:///{(output / STORAGE_FILE).resolve()}"


# Query parameters whose values are credentials (password, sslpassword, passwd, pwd, api_key,
# access_token, secret, auth, ...): matched on the decoded name.
_SECRET_PARAM = re.compile(r"pass|pwd|secret|token|key|auth|credential|signature", re.IGNORECASE)
MASK = "***"


def _masked(url: str) -> tuple[str, list[str]]:
    """(the URL with every credential part replaced by ***, the secrets it held)."""
    scheme, sep, rest = url.partition("://")
    head = scheme + sep if sep else ""
    rest = rest if sep else url
    secrets: list[str] = []
    at = rest.rfind("@")  # the last @: a password may hold one ("user:pa@ss@host")
    user, colon, password = rest[: max(at, 0)].partition(":")
    if at >= 0 and not any(c in user for c in "/?#"):  # else the @ is in the path or query
        if colon:
            secrets.append(password)
            user += ":" + MASK
        head, rest = f"{head}{user}@", rest[at + 1 :]
    path, question, query = rest.partition("?")
    parts = re.split(r"([&;])", query)
    for i in range(0, len(parts), 2):
        key, eq, value = parts[i].partition("=")
        if eq and value and _SECRET_PARAM.search(urllib.parse.unquote(key)):
            secrets.append(value)
            parts[i] = f"{key}={MASK}"
    return head + path + question + "".join(parts), [s for s in secrets if s]


def shown_url(url: str) -> str:
    """The storage URL for logs and errors: the password, and every query parameter that looks
    like a credential, replaced by ***."""
    return _masked(url)[0]


def _without_secrets(message: str, url: str) -> str:
    """An error message about `url` with the URL masked; if a secret still shows (a driver
    quoting part of it), only the message's kind."""
    shown, secrets = _masked(url)
    message = message.replace(url, shown)
    if any(secret in message or urllib.parse.unquote(secret) in message for secret in secrets):
        return "the message quotes the URL's credentials, so it is not shown"
    return message


def open_storage(url: str):
    """An Optuna RDBStorage: heartbeats mark trials of a killed run as failed; sqlite waits for its lock."""
    optuna = require_optuna()
    if "://" not in url:
        raise TuneError(f"--storage {shown_url(url)}: not a database URL; use e.g. sqlite:///tune.db")
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
            msg = _without_secrets(msg, url)
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


@dataclass
class TrialSetup:
    """Everything a trial needs, also written as JSON for trial processes (--parallel)."""

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
    def from_json(cls, text: str) -> TrialSetup:
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

    def trial_config(self, number: int, params: dict[str, Any]) -> TrainConfig:
        """Trial `number`'s fit settings: the base with its parameters, in its own folder, TensorBoard
        run and (with s3_uri) S3 prefix; trials never resume."""
        name = f"trial-{number}"
        s3_uri = str(parse_uri(self.base.s3_uri).child(name)) if self.base.s3_uri else ""
        return dataclasses.replace(
            self.base,
            **params,
            output=str(self.output / name),
            logdir=str(self.tb_root / name),
            resume="never",
            s3_uri=s3_uri,
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


def open_study(study_name: str, storage_url: str, base: TrainConfig, params: list[Param], setup: TrialSetup):
    """Create or load the study; refuse one made for another purpose or with other fixed settings."""
    optuna = require_optuna()
    rdb = open_storage(storage_url)
    study = optuna.create_study(
        study_name=study_name,
        storage=rdb,
        direction="maximize",
        load_if_exists=True,
        sampler=sampler([base.seed, len_trials(rdb, study_name)]),
        pruner=setup.pruner(),
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


def write_best(study, base: TrainConfig, path: Path) -> Any:
    """best.toml: the fixed settings plus the best trial's parameters, as `fit --config` reads them.
    Returns that trial (None when no trial completed: nothing is written)."""
    trial = best_trial(study)
    if trial is None:
        return None
    cfg = dataclasses.replace(base, **trial.params)
    header = (
        f"# Best of ec2train tune study '{study.study_name}': trial {trial.number}, "
        f"valid acc {trial.value:.4f} after {len(trial.intermediate_values)} epochs.\n"
        f"# Searched: {fmt_params(trial.params)}\n"
    )
    atomic_write_text(path, header + to_toml(cfg))
    return trial


def fit_command(best_file: Path) -> str:
    """The `ec2train fit` line that trains with best.toml. Its output is the study's fit --output
    (TrainedModels by default), which fit refuses to replace when it holds a run: then the line
    names a free folder beside it, so it works as printed."""
    from ec2train.checkpoint import CHECKPOINT_FILE, MODEL_FILE
    from ec2train.config import resolve

    line = f"ec2train fit --config {best_file}"
    output = Path(resolve(best_file).output)

    def holds_run(folder: Path) -> bool:
        return any((folder / name).is_file() for name in (MODEL_FILE, CHECKPOINT_FILE))

    if not holds_run(output):
        return line
    free = next(
        folder
        for n in range(1, 1000)
        if not holds_run(folder := output.with_name(f"{output.name}-tuned{'' if n == 1 else f'-{n}'}"))
    )
    return f"{line} --output {free}"


def fmt_params(params: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items())
