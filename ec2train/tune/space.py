"""What a study searches: the searchable settings, one parameter's range or choices, the
default space and a TOML space file; and the small parsers of the tune command's options."""

from __future__ import annotations

import dataclasses
import difflib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ec2train.config import ConfigError, TrainConfig, coerce_setting, read_toml
from ec2train.errors import UserError

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


class TuneError(UserError):
    """A bad search space, storage, timeout or study; the message names the fix."""


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
        assert self.low is not None and self.high is not None  # a range: load_space gives both
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
        dataclasses.replace(base, **{name: value})  # TrainConfig checks itself
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
