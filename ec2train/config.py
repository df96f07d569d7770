"""Every training setting in one frozen dataclass; a TOML file plus CLI overrides resolve it."""

from __future__ import annotations

import dataclasses
import difflib
import json
import sys
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from ec2train.arch_sizes import check_image_size
from ec2train.errors import UserError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib


class ConfigError(UserError):
    """A setting is missing, unknown or out of range."""


# The allowed values of the choice settings: validate() checks them, the CLI offers them.
OPTIMIZERS = ("adamw", "sgd")
DEVICES = ("auto", "cpu", "cuda")
AMP_MODES = ("auto", "fp16", "bf16", "off")
LOADERS = ("auto", "cpu", "gpu")  # who decodes the images: hw.choose_loader (hw.LOADER_MODES, which imports torch)
CHOICES = {"optimizer": OPTIMIZERS, "device": DEVICES, "amp": AMP_MODES, "loader": LOADERS}


@dataclass(frozen=True)
class TrainConfig:
    # data and model
    data: str = "dogImages"
    arch: str = "resnet50"
    weights: str = "imagenet"  # imagenet | none | PATH
    freeze_backbone: bool | None = None  # None: freeze when starting from pretrained weights
    backbone_lr_scale: float = 0.1  # backbone lr = lr * this, when fine-tuning everything
    image_size: int = 224
    augment: bool = True
    # optimisation
    epochs: int = 5
    batch_size: int = 32  # per process; the global batch is batch_size * world size
    lr: float = 1e-3
    scale_lr: bool = False  # lr *= world size (linear scaling: --lr is tuned for one process's batch)
    optimizer: str = "adamw"  # adamw | sgd
    momentum: float = 0.9
    weight_decay: float = 1e-4
    label_smoothing: float = 0.1
    warmup_epochs: int = 0
    patience: int = 0  # stop after this many epochs without a better valid accuracy; 0 = never
    seed: int = 0
    # hardware
    device: str = "auto"  # auto | cpu | cuda
    amp: str = "auto"  # auto | fp16 | bf16 | off
    workers: int = -1  # -1: from the CPUs available per process
    loader: str = "auto"  # auto | cpu | gpu: who decodes and transforms the images (hw.choose_loader)
    threads: int = 0  # torch CPU threads per process; 0: hw.thread_plan decides (never more than the free cores)
    channels_last: bool = True  # applied on CUDA, and on the CPU to a frozen backbone (hw.use_channels_last)
    compile: bool = False
    sync_bn: bool = False
    cache_features: bool = False  # frozen backbone only: features computed once, no augmentation
    # outputs
    output: str = "TrainedModels"
    logdir: str = "runs"
    resume: str = ""  # "" | auto | PATH | s3://bucket/key
    s3_uri: str = ""
    kms_key: str = ""

    def __post_init__(self) -> None:
        self.validate()  # every TrainConfig is valid: checked once, where it is made

    def validate(self) -> TrainConfig:
        """Raise ConfigError naming the first setting out of range (and the fix); returns self."""

        def bad(name: str, why: str) -> ConfigError:
            return ConfigError(f"--{name.replace('_', '-')} {getattr(self, name)!r}: {why}")

        if self.epochs < 1:
            raise bad("epochs", "must be at least 1")
        if self.batch_size < 1:
            raise bad("batch_size", "must be at least 1")
        if not self.lr > 0:
            raise bad("lr", "must be greater than 0 (try 1e-3 for AdamW, 0.1 for SGD)")
        if self.lr >= 1:
            raise bad("lr", "is far too large; training diverges (try 1e-3 for AdamW, 0.1 for SGD)")
        if not 0 <= self.momentum < 1:
            raise bad("momentum", "must be in [0, 1) (0.9 is the usual choice)")
        if self.weight_decay < 0:
            raise bad("weight_decay", "must be 0 or more")
        if not 0 <= self.label_smoothing < 1:
            raise bad("label_smoothing", "must be in [0, 1)")
        if self.warmup_epochs < 0 or (self.warmup_epochs and self.warmup_epochs >= self.epochs):
            raise bad("warmup_epochs", "must be 0 or more and fewer than --epochs")
        if self.patience < 0:
            raise bad("patience", "must be 0 (off) or more")
        if not 0 < self.backbone_lr_scale <= 1:
            raise bad("backbone_lr_scale", "must be in (0, 1]")
        if self.image_size < 16 or self.image_size > 1024:
            raise bad("image_size", "must be between 16 and 1024 pixels")
        check_image_size(self.arch, self.image_size, self.weights)  # vit_b_16 takes 224 only, ...
        if self.workers < -1:
            raise bad("workers", "must be -1 (auto) or 0 or more")
        if self.threads < 0:
            raise bad("threads", "must be 0 (auto) or a positive number of threads")
        for name, allowed in CHOICES.items():
            if getattr(self, name) not in allowed:
                raise bad(name, f"must be one of {', '.join(allowed)}")
        if self.cache_features and not self.frozen:
            raise ConfigError(
                "--cache-features needs a frozen backbone (a backbone that trains changes its features every step); "
                "add --freeze-backbone, or drop --cache-features"
            )
        if self.s3_uri and not self.s3_uri.startswith("s3://"):
            raise bad("s3_uri", "must look like s3://bucket/prefix")
        return self

    @property
    def frozen(self) -> bool:
        """Whether the backbone is frozen: explicit, or by default only for pretrained weights."""
        if self.freeze_backbone is None:
            return self.weights != "none"
        return self.freeze_backbone

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


FIELDS = {f.name: f for f in fields(TrainConfig)}


def coerce_setting(name: str, value: Any) -> Any:
    """`value` (from TOML) as setting `name`'s type (an int is a valid float); ConfigError if it is not."""
    default = FIELDS[name].default
    if default is None or isinstance(default, bool):
        if not isinstance(value, bool):
            raise ConfigError(f"config key '{name}' must be true or false, not {value!r}")
        return value
    if isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, type(default)) or isinstance(value, bool):
        raise ConfigError(f"config key '{name}' must be a {type(default).__name__}, not {value!r}")
    return value


def read_toml(path: Path, option: str, error: type[UserError] = ConfigError) -> dict[str, Any]:
    """A TOML file's tables; a missing or malformed file is a one-line error naming the option."""
    try:
        return tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise error(f"{option} {path}: no such file") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise error(f"{option} {path}: not valid TOML ({exc})") from None


def load_toml(path: str | Path) -> dict[str, Any]:
    """Read settings from a TOML file (top level, or a [fit] table); unknown keys are errors."""
    path = Path(path)
    raw = read_toml(path, "--config")
    raw = raw.get("fit", raw)
    out = {}
    for key, value in raw.items():
        name = key.replace("-", "_")
        if name not in FIELDS:
            close = difflib.get_close_matches(name, FIELDS, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise ConfigError(f"--config {path}: unknown setting '{key}'{hint}")
        out[name] = coerce_setting(name, value)
    return out


def resolve(config_file: str | Path | None = None, **overrides: Any) -> TrainConfig:
    """Defaults < TOML file < explicit overrides (None means 'not given')."""
    values: dict[str, Any] = {}
    if config_file:
        values.update(load_toml(config_file))
    for name, value in overrides.items():
        if name not in FIELDS:
            raise ConfigError(f"unknown setting '{name}'")
        if value is not None:
            values[name] = value
    return TrainConfig(**values)


def to_toml(cfg: TrainConfig) -> str:
    """The resolved config as TOML that `ec2train fit --config` reads back."""
    lines = ["# Resolved ec2train fit settings; reuse with: ec2train fit --config this-file.toml", "[fit]"]
    for name, value in cfg.to_dict().items():
        if value is None:
            continue
        lines.append(f"{name} = {json.dumps(value) if not isinstance(value, bool) else str(value).lower()}")
    return "\n".join(lines) + "\n"
