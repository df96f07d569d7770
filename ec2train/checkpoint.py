"""A run's files and its resume state: what fit writes under --output, and how it continues.

One place for the file names (the model file's own name lives in model.py, which serving
ships alone), the checkpoint format (last.pt), and `TrainState`, the counters that go with
the weights. A checkpoint holds everything an uninterrupted run would still have in memory
(model, optimizer, scheduler, scaler, RNG, counters, history), so a resumed run ends with
bitwise the same weights, and it is self-contained (last.pt alone resumes, e.g. on another
node). The best epoch's weights are stored once: when the last epoch is the best, they are
the checkpoint's model, not a second copy (a third of resnet18's last.pt with AdamW).

Nothing here knows about S3: `run.py` downloads a remote checkpoint into --output first.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field, fields
from datetime import datetime
from pathlib import Path
from typing import Any

import torch

from ec2train import ddp
from ec2train.errors import UserError
from ec2train.model import MODEL_FILE, ModelError, clean_state_dict

CHECKPOINT_FILE = "last.pt"
METRICS_FILE = "metrics.json"
CONFIG_FILE = "config.toml"
# What fit leaves in its output folder, small first (the order S3 mirrors them in).
RUN_FILES = (CONFIG_FILE, METRICS_FILE, MODEL_FILE, CHECKPOINT_FILE)
# /2: best_model is None when it would repeat the model (the last epoch was the best).
CHECKPOINT_FORMAT = "ec2train.checkpoint/2"
OLD_FORMATS = ("ec2train.checkpoint/1",)

__all__ = [
    "CHECKPOINT_FILE",
    "CHECKPOINT_FORMAT",
    "CONFIG_FILE",
    "METRICS_FILE",
    "MODEL_FILE",
    "RUN_FILES",
    "ResumeError",
    "TrainState",
    "agreed_checkpoint",
    "check_compatible",
    "load_checkpoint",
    "resume_mode",
    "resume_source",
]


class ResumeError(UserError):
    """The checkpoint to resume from is missing or belongs to a different run."""


# ---------------------------------------------------------------- where to resume from


def resume_mode(resume: str, torchrun: bool) -> str:
    """'' is 'auto' under torchrun (so --max-restarts continues) and 'never' otherwise."""
    return resume or ("auto" if torchrun else "never")


def resume_source(resume: str, output: Path, torchrun: bool) -> str | None:
    """The local checkpoint to resume from, None for a fresh start, or an s3:// address as given
    (run.py downloads those; fit only ever reads local files)."""
    mode = resume_mode(resume, torchrun)
    if mode == "never":
        return None
    if mode == "auto":
        local = Path(output) / CHECKPOINT_FILE
        return str(local) if local.is_file() else None
    if not mode.startswith("s3://") and not Path(mode).is_file():
        raise ResumeError(f"--resume {mode}: no such checkpoint; use --resume auto to start fresh when there is none")
    return mode


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ModelError(f"cannot read checkpoint {path}: {str(exc).splitlines()[0][:200]}") from exc
    if not isinstance(ckpt, dict) or ckpt.get("format") not in (CHECKPOINT_FORMAT, *OLD_FORMATS):
        raise ModelError(f"{path} is not an ec2train checkpoint; pass a last.pt written by `ec2train fit`")
    ckpt["source"] = str(path)
    return ckpt


def fetch_checkpoint(source: str) -> dict[str, Any]:
    """A local checkpoint, loaded (an s3:// one must be downloaded first: see run.py)."""
    if source.startswith("s3://"):
        raise ResumeError(f"--resume {source}: S3 checkpoints are resumed through `ec2train fit` (run.fit_run)")
    return load_checkpoint(source)


def agreed_checkpoint(resume: str, output: Path, env: Any) -> dict[str, Any] | None:
    """The checkpoint every rank resumes from (None: a fresh start), read once and broadcast,
    so nodes need no shared disk. Rank 0 decides, except in auto mode, where each node offers
    its own newest last.pt and the one with the most epochs wins: after a restart, c10d may
    put rank 0 on another node (it orders nodes by host name), one without the checkpoint."""
    torchrun = ddp.under_torchrun()
    auto = resume_mode(resume, torchrun) == "auto"
    offer = None
    if env.is_main or (auto and env.local_rank == 0):
        path = resume_source(resume, Path(output), torchrun)
        offer = _with_final_metrics(fetch_checkpoint(path)) if path else None
    src = ddp.holder_of_newest(ddp.gather_counts(offer["epoch"] if offer else -1))
    if src is None:
        return None
    return ddp.broadcast_object(offer if env.rank == src else None, src=src)


def _with_final_metrics(ckpt: dict[str, Any]) -> dict[str, Any]:
    """Attach the metrics.json beside the checkpoint when it describes the same, tested run
    (a finished run is then reported, not trained or tested again)."""
    path = Path(ckpt["source"]).parent / METRICS_FILE
    try:
        metrics = json.loads(path.read_text())
    except (OSError, ValueError):
        return ckpt
    if isinstance(metrics, dict) and metrics.get("history") == ckpt.get("history"):
        ckpt["final_metrics"] = {k: v for k, v in metrics.items() if k != "history"}
    return ckpt


def check_compatible(ckpt: dict[str, Any], cfg: Any, class_folders: list[str]) -> None:
    old = ckpt.get("config", {})
    for key in ("arch", "image_size"):
        if old.get(key) != getattr(cfg, key):
            raise ResumeError(
                f"the checkpoint was trained with {key}={old.get(key)!r}, this run asks for {getattr(cfg, key)!r}; "
                "use another --output or --resume never to start fresh"
            )
    if ckpt.get("class_folders") != class_folders:
        raise ResumeError(
            "the checkpoint's classes differ from this data set's; use another --output or --resume never"
        )


def finished(ckpt: dict[str, Any], cfg: Any) -> bool:
    """Whether the checkpoint's run trained all its epochs (or stopped on patience).

    A finished run asked for more epochs is refused: its cosine schedule already reached zero,
    and stretching it over more epochs would jump the lr back up mid-way.
    """
    done, stale = ckpt["epoch"], ckpt.get("stale_epochs", 0)
    old = ckpt.get("config", {})
    old_epochs, patience = old.get("epochs", cfg.epochs), old.get("patience", 0)
    over = done >= old_epochs or bool(patience and stale >= patience)
    if over and cfg.epochs > done and not (cfg.patience and stale >= cfg.patience):
        raise ResumeError(
            f"{ckpt.get('source', 'the checkpoint')} is a finished run ({done} of {old_epochs} epochs, its lr schedule "
            f"already ended); --epochs {cfg.epochs} cannot extend it. Train a new run: another --output, or --resume never"
        )
    return over or done >= cfg.epochs


def seek_schedule(scheduler: torch.optim.lr_scheduler.LambdaLR, step: int) -> None:
    """Put the per-step lr schedule at `step` of THIS run (its lr and steps per epoch): a resumed
    job may run with another world size than the one that wrote the checkpoint."""
    scheduler.last_epoch = step
    for group, base, f in zip(scheduler.optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas):
        group["initial_lr"] = base
        group["lr"] = base * f(step)
    scheduler._last_lr = [group["lr"] for group in scheduler.optimizer.param_groups]


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ---------------------------------------------------------------- the state that goes with the weights


@dataclass
class TrainState:
    """The counters of a run: where it is, its best epoch so far, and its history."""

    run_name: str
    epoch: int = 0  # epochs completed
    best_acc: float = -1.0
    best_epoch: int = -1
    stale_epochs: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    best_model: dict[str, torch.Tensor] | None = field(default=None, repr=False)  # CPU copy of the best weights

    @classmethod
    def fresh(cls, arch: str) -> TrainState:
        return cls(run_name=f"{arch}-{datetime.now().strftime('%Y%m%d-%H%M%S')}")

    def record(self, epoch: int, valid_acc: float, net: torch.nn.Module) -> bool:
        """Count a finished epoch; True when it is the best so far (its weights are kept)."""
        self.epoch = epoch
        if valid_acc > self.best_acc:
            self.best_acc, self.best_epoch, self.stale_epochs = valid_acc, epoch, 0
            self.best_model = {k: v.detach().clone().cpu() for k, v in clean_state_dict(net.state_dict()).items()}
            return True
        self.stale_epochs += 1
        return False

    def counters(self) -> dict[str, Any]:
        """Everything but the best weights, copied (dataclasses.asdict would deep-copy those
        weights too, only to drop them: 45 MB for resnet18)."""
        return {f.name: copy.deepcopy(getattr(self, f.name)) for f in fields(self) if f.name != "best_model"}


@dataclass
class Trainables:
    """What a checkpoint restores besides the counters."""

    net: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    scaler: Any = None  # torch.amp.GradScaler or None


def checkpoint_payload(state: TrainState, parts: Trainables, copies: bool = True, **meta: Any) -> dict[str, Any]:
    """last.pt's contents: weights, optimizer, schedule, scaler, RNG and counters (meta: config,
    classes, ...). copies: copied, so that it can be written while training goes on; without,
    the live tensors, for a caller that pickles them before the next step (fit on the CPU:
    copying resnet18's weights and AdamW state cost 0.04-0.08 s a save there)."""
    # Frozen parameters are never stepped: they are taken as they are, the rest copied.
    frozen = {p.data_ptr() for p in parts.net.parameters() if not p.requires_grad}
    model = {
        k: v.detach() if not copies or v.data_ptr() in frozen else v.detach().clone()
        for k, v in clean_state_dict(parts.net.state_dict()).items()
    }
    snapshot = copy.deepcopy if copies else _as_is
    return {
        "format": CHECKPOINT_FORMAT,
        **state.counters(),
        "model": model,
        # The best weights once: when this epoch is the best they are "model" already. They are
        # a copy already, replaced (never changed in place) when an epoch does better.
        "best_model": None if state.best_epoch == state.epoch else shared_where_equal(state.best_model, model),
        "optimizer": snapshot(parts.optimizer.state_dict()),
        "scheduler": snapshot(parts.scheduler.state_dict()),
        "scaler": snapshot(parts.scaler.state_dict()) if parts.scaler is not None else None,
        "rng": rng_state(),
        **copy.deepcopy(meta),
    }


def _as_is(obj: Any) -> Any:
    return obj


def shared_where_equal(best: dict[str, torch.Tensor] | None, model: dict[str, torch.Tensor]) -> dict | None:
    """The best weights with every tensor that equals the current one replaced by it, so that
    torch.save stores it once: a frozen backbone is most of the model and never changes, and
    resnet18's last.pt is then 45 MB, not 90. Only tensors on the same device are shared: on a
    GPU the best weights are a CPU copy, so nothing is. Loading gives tensors that share
    storage; restore copies them into the model, so nothing changes them in place."""
    if best is None:
        return None
    return {k: model[k] if k in model and _same(v, model[k]) else v for k, v in best.items()}


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and a.device == b.device and torch.equal(a, b)


def restore(ckpt: dict[str, Any], parts: Trainables, steps_per_epoch: int) -> TrainState:
    """Load a checkpoint into the model, optimizer, schedule, scaler and RNG; returns its counters."""
    parts.net.load_state_dict(ckpt["model"])
    parts.optimizer.load_state_dict(ckpt["optimizer"])
    for group in parts.optimizer.param_groups:  # load_state_dict brings back the saving run's kernel choice
        for kernel in ("fused", "foreach"):
            if kernel in parts.optimizer.defaults:
                group[kernel] = parts.optimizer.defaults[kernel]
    seek_schedule(parts.scheduler, ckpt["epoch"] * steps_per_epoch)
    if parts.scaler is not None and ckpt.get("scaler"):
        parts.scaler.load_state_dict(ckpt["scaler"])
    set_rng_state(ckpt["rng"])
    state = TrainState(
        run_name=ckpt["run_name"],
        epoch=ckpt["epoch"],
        best_acc=ckpt["best_acc"],
        best_epoch=ckpt["best_epoch"],
        stale_epochs=ckpt["stale_epochs"],
        history=ckpt["history"],
    )
    state.best_model = ckpt.get("best_model")
    if state.best_model is None and state.best_epoch == state.epoch >= 1:
        state.best_model = ckpt["model"]  # the last epoch was the best: stored once, as the model
    return state
