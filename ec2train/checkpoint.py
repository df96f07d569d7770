"""A run's files and its resume state: what fit writes under --output, and how it continues.

One owner for checkpoints: the file names (the model file's own name lives in model.py, which
serving ships alone); `Resume`, the one resume decision (local or S3, which processes read,
whether a fresh start may overwrite a checkpoint in S3); `CheckpointSaver`, the one saver
(last.pt every epoch and model.pth when the epoch is the best, in the background; the final
model.pth); and `restore`, the one restore, which puts a checkpoint back into the live model,
optimizer, schedule and scaler through their own load_state_dict.

A checkpoint holds everything an uninterrupted run would still have in memory (model,
optimizer, scheduler, scaler, RNG, counters, history), so a resumed run ends with bitwise the
same weights, and it is self-contained (last.pt alone resumes, e.g. on another node). The best
epoch's weights are stored once: when the last epoch is the best, they are the checkpoint's
model, not a second copy.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import re
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from datetime import datetime
from pathlib import Path
from typing import Any

import torch

from ec2train import ddp
from ec2train.errors import UserError, first_line
from ec2train.export import model_payload, save_model_file
from ec2train.files import BackgroundWriter
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
    "CheckpointSaver",
    "Resume",
    "ResumeError",
    "TrainState",
    "Trainables",
    "check_compatible",
    "finished",
    "load_checkpoint",
    "restore",
]


class ResumeError(UserError):
    """The checkpoint to resume from is missing or belongs to a different run."""


# ---------------------------------------------------------------- where to resume from


@dataclass(frozen=True)
class Resume:
    """The run's one resume decision, from --resume (`given`), --output, --s3-uri and whether
    torchrun started the process. Its `mode`: never, auto (the newest last.pt in --output, else
    under --s3-uri), a local path, or an s3:// address (downloaded into --output first)."""

    given: str
    output: Path
    s3_uri: str = ""
    torchrun: bool = False
    fetched: str | None = None  # the local copy of an s3:// --resume, once fetch_remote has it

    @classmethod
    def of(cls, cfg: Any, torchrun: bool | None = None) -> Resume:
        return cls(cfg.resume, Path(cfg.output), cfg.s3_uri, ddp.under_torchrun() if torchrun is None else torchrun)

    @property
    def mode(self) -> str:
        """'' is 'auto' under torchrun (so --max-restarts continues) and 'never' otherwise."""
        return self.given or ("auto" if self.torchrun else "never")

    def reads(self, env: Any) -> bool:
        """Whether this process looks for a checkpoint: rank 0, and in auto mode each node's local
        rank 0 too (after a restart, c10d may put rank 0 on a node without the checkpoint)."""
        return env.is_main or (self.mode == "auto" and env.local_rank == 0)

    def local_source(self) -> str | None:
        """The local checkpoint to resume from, or None for a fresh start."""
        mode = self.mode
        if mode == "never":
            return None
        if mode == "auto":
            local = self.output / CHECKPOINT_FILE
            return str(local) if local.is_file() else None
        if mode.startswith("s3://"):
            if self.fetched is None:
                raise ResumeError(f"--resume {mode}: S3 checkpoints are resumed through `ec2train fit` (run.fit_run)")
            return self.fetched
        if not Path(mode).is_file():
            raise ResumeError(
                f"--resume {mode}: no such checkpoint; use --resume auto to start fresh when there is none"
            )
        return mode

    def fetch_remote(self, env: Any, say: Callable[[str], None]) -> Resume:
        """Download the S3 checkpoint this run resumes from (with its model.pth) into --output, in
        the processes that read one: --resume s3://..., or auto with --s3-uri when --output has no
        last.pt (a fresh instance). Returns the decision that knows the local copy."""
        if not self.reads(env):
            return self
        from ec2train import s3  # s3 imports this module's names; only a remote resume needs it

        mode = self.mode
        if mode.startswith("s3://"):
            say(f"downloading {mode} into {self.output}")
            return dataclasses.replace(self, fetched=str(s3.download_run(mode, self.output)))
        if mode == "auto" and self.s3_uri and not (self.output / CHECKPOINT_FILE).is_file():
            found = s3.find_checkpoint(self.s3_uri)
            if found:
                say(f"no {CHECKPOINT_FILE} in {self.output}: downloading {found}")
                s3.download_run(found, self.output)
        return self

    def refuse_local_overwrite(self) -> None:
        """A run not told to resume must not silently replace the run in --output (its model.pth
        and last.pt): the user says which they want (under torchrun a restart resumes by itself)."""
        if self.given or self.torchrun:
            return
        held = [name for name in (MODEL_FILE, CHECKPOINT_FILE) if (self.output / name).is_file()]
        if held:
            raise ResumeError(
                f"{self.output} already holds a run ({' and '.join(held)}): continue it with --resume auto, "
                "replace it with --resume never, or train into another --output"
            )

    def refuse_overwrite(self, existing: str | None) -> None:
        """A run not told to resume must not silently overwrite the checkpoint `existing` under
        --s3-uri (under torchrun a restart resumes by itself)."""
        if existing and not self.given and not self.torchrun:
            raise ResumeError(
                f"{existing} already holds a run's checkpoint: continue it with --resume auto, "
                "or start over with --resume never (overwrites it) or another --s3-uri"
            )

    def checkpoint(self, env: Any, cfg: Any, class_folders: list[str]) -> dict[str, Any] | None:
        """The checkpoint every rank resumes from (None: a fresh start), read once and broadcast
        (nodes need no shared disk), and checked against this run's settings. Rank 0 decides,
        except in auto mode, where each node offers its own newest last.pt and the one with the
        most epochs wins."""
        offer = None
        if self.reads(env):
            path = self.local_source()
            offer = _with_final_metrics(load_checkpoint(path)) if path else None
        src = ddp.holder_of_newest(ddp.gather_counts(offer["epoch"] if offer else -1))
        if src is None:
            return None
        ckpt = ddp.broadcast_object(offer if env.rank == src else None, src=src)
        assert ckpt is not None  # src holds the newest checkpoint
        check_compatible(ckpt, cfg, class_folders)
        return ckpt


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ModelError(f"cannot read checkpoint {path}: {str(exc).splitlines()[0][:200]}") from exc
    if not isinstance(ckpt, dict) or ckpt.get("format") not in (CHECKPOINT_FORMAT, *OLD_FORMATS):
        raise ModelError(f"{path} is not an ec2train checkpoint; pass a last.pt written by `ec2train fit`")
    problem = _structure_problem(ckpt)
    if problem:
        raise ModelError(f"{path} is damaged ({problem}); use another --output or --resume never to start fresh")
    ckpt["source"] = str(path)
    return ckpt


# What restore reads, and the type each must have.
_CHECKPOINT_FIELDS: dict[str, type | tuple[type, ...]] = {
    "model": dict,
    "optimizer": dict,
    "scheduler": dict,
    "rng": dict,
    "run_name": str,
    "epoch": int,
    "best_acc": (int, float),
    "best_epoch": int,
    "stale_epochs": int,
    "history": list,
}


def _structure_problem(ckpt: dict[str, Any]) -> str | None:
    """Why a checkpoint dict cannot be restored (a missing or mistyped field), or None."""
    for key, kind in _CHECKPOINT_FIELDS.items():
        if key not in ckpt:
            return f"no {key!r}"
        if not isinstance(ckpt[key], kind) or isinstance(ckpt[key], bool):
            return f"{key!r} is of type {type(ckpt[key]).__name__}"
    if ckpt["epoch"] < 0:
        return "a negative 'epoch'"
    return None


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


def resume_schedule(scheduler: torch.optim.lr_scheduler.LambdaLR, saved: dict[str, Any], step: int) -> None:
    """Put the per-step lr schedule at `step` of THIS run (its lrs and steps per epoch: a resumed
    job may run with another world size than the one that wrote the checkpoint): the saved state,
    with this run's base lrs, one step before; the scheduler's own step() then sets every group's lr."""
    scheduler.load_state_dict({**saved, "base_lrs": list(scheduler.base_lrs), "last_epoch": step - 1})
    with warnings.catch_warnings():  # its order check is for training steps; this positions the schedule
        warnings.filterwarnings(
            "ignore", message=re.escape("Detected call of `lr_scheduler.step()`"), category=UserWarning
        )
        scheduler.step()


# What a resumed optimizer takes from this run, not the checkpoint: the lr (the schedule sets it)
# and the update kernel (the saving run's fused/foreach choice may not suit this box or torch).
THIS_RUNS_GROUP_KEYS = ("lr", "initial_lr", "fused", "foreach")


def with_this_runs_groups(saved: dict[str, Any], optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """A saved optimizer state whose parameter groups take THIS_RUNS_GROUP_KEYS from `optimizer`."""
    current = optimizer.state_dict()["param_groups"]
    groups = [
        {**old, **{k: new[k] for k in THIS_RUNS_GROUP_KEYS if k in new}}
        for old, new in zip(saved["param_groups"], current)
    ]
    return {**saved, "param_groups": groups}


def rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
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
    best_loss: float = float("inf")  # the best epoch's valid loss: breaks a tie on valid accuracy
    best_epoch: int = -1
    stale_epochs: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    best_model: dict[str, torch.Tensor] | None = field(default=None, repr=False)  # CPU copy of the best weights

    @classmethod
    def fresh(cls, arch: str) -> TrainState:
        return cls(run_name=f"{arch}-{datetime.now().strftime('%Y%m%d-%H%M%S')}")

    def record(self, epoch: int, valid_acc: float, net: torch.nn.Module, valid_loss: float = float("inf")) -> bool:
        """Count a finished epoch; True when it is the best so far (its weights are kept): a higher
        valid accuracy, or the same accuracy with a lower valid loss (small valid sets tie often,
        and the later epoch is then usually the better-calibrated one)."""
        self.epoch = epoch
        if valid_acc > self.best_acc or (valid_acc == self.best_acc and valid_loss < self.best_loss):
            self.best_acc, self.best_loss, self.best_epoch, self.stale_epochs = valid_acc, valid_loss, epoch, 0
            self.best_model = {k: v.detach().clone().cpu() for k, v in clean_state_dict(net.state_dict()).items()}
            return True
        self.stale_epochs += 1
        return False

    def counters(self) -> dict[str, Any]:
        """Everything but the best weights, copied (dataclasses.asdict would deep-copy those
        weights too, only to drop them)."""
        return {f.name: copy.deepcopy(getattr(self, f.name)) for f in fields(self) if f.name != "best_model"}


@dataclass
class Trainables:
    """The live objects a checkpoint saves and restores besides the counters (restored in place)."""

    net: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    scaler: Any = None  # torch.amp.GradScaler or None


def checkpoint_payload(state: TrainState, parts: Trainables, copies: bool = True, **meta: Any) -> dict[str, Any]:
    """last.pt's contents: weights, optimizer, schedule, scaler, RNG and counters (meta: config,
    classes, ...). copies: copied, so that it can be written while training goes on; without,
    the live tensors, for a caller that pickles them before the next step (fit on the CPU,
    where the copy would take time from training)."""
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
    torch.save stores it once: a frozen backbone is most of the model and never changes, so
    last.pt is about half the size. Only tensors on the same device are shared: on a
    GPU the best weights are a CPU copy, so nothing is. Loading gives tensors that share
    storage; restore copies them into the model, so nothing changes them in place."""
    if best is None:
        return None
    return {k: model[k] if k in model and _same(v, model[k]) else v for k, v in best.items()}


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and a.device == b.device and torch.equal(a, b)


def check_weights(ckpt: dict[str, Any], net: torch.nn.Module) -> None:
    """One line, not load_state_dict's list of every tensor, when a checkpoint's weights do not
    fit the model this run built (a last.pt edited by hand, or from another head or version)."""
    want = {k: tuple(v.shape) for k, v in clean_state_dict(net.state_dict()).items()}
    have = ckpt.get("model")
    if not isinstance(have, dict) or not all(isinstance(v, torch.Tensor) for v in have.values()):
        problem = "it holds no weights"
    else:
        got = {k: tuple(v.shape) for k, v in have.items()}
        missing, extra = sorted(want.keys() - got.keys()), sorted(got.keys() - want.keys())
        wrong = [k for k in want.keys() & got.keys() if want[k] != got[k]]
        if not (missing or extra or wrong):
            return
        if wrong:
            k = sorted(wrong)[0]
            problem = f"{len(wrong)} weights have another shape, e.g. {k} is {list(got[k])}, not {list(want[k])}"
        elif missing:
            problem = f"{len(missing)} weights are missing, e.g. {missing[0]}"
        else:
            problem = f"{len(extra)} weights are not this model's, e.g. {extra[0]}"
    raise ResumeError(
        f"{ckpt.get('source', 'the checkpoint')} does not fit this run's {ckpt.get('config', {}).get('arch', 'model')}: "
        f"{problem}; use another --output or --resume never to start fresh"
    )


def restore(ckpt: dict[str, Any], parts: Trainables, steps_per_epoch: int) -> TrainState:
    """The one restore: a checkpoint back into the live model, optimizer, schedule, scaler and
    RNG, in place, each through its own load_state_dict; returns the run's counters."""
    check_weights(ckpt, parts.net)
    parts.net.load_state_dict(ckpt["model"])
    try:
        parts.optimizer.load_state_dict(with_this_runs_groups(ckpt["optimizer"], parts.optimizer))
    except (ValueError, KeyError, TypeError) as exc:
        raise ResumeError(
            f"{ckpt.get('source', 'the checkpoint')}: its optimizer state does not fit this run's optimizer "
            f"({first_line(exc)}); use another --output or --resume never to start fresh"
        ) from None
    try:
        resume_schedule(parts.scheduler, ckpt["scheduler"], ckpt["epoch"] * steps_per_epoch)
        if parts.scaler is not None and ckpt.get("scaler"):
            parts.scaler.load_state_dict(ckpt["scaler"])
        set_rng_state(ckpt["rng"])
    except (KeyError, TypeError, ValueError, RuntimeError, IndexError) as exc:
        raise ResumeError(
            f"{ckpt.get('source', 'the checkpoint')} is damaged ({first_line(exc)}); "
            "use another --output or --resume never to start fresh"
        ) from None
    state = TrainState(
        run_name=ckpt["run_name"],
        epoch=ckpt["epoch"],
        best_acc=ckpt["best_acc"],
        best_loss=ckpt.get("best_loss", float("inf")),  # checkpoints written before the tie rule
        best_epoch=ckpt["best_epoch"],
        stale_epochs=ckpt["stale_epochs"],
        history=ckpt["history"],
    )
    state.best_model = ckpt.get("best_model")
    if state.best_model is None and state.best_epoch == state.epoch >= 1:
        state.best_model = ckpt["model"]  # the last epoch was the best: stored once, as the model
    return state


# ---------------------------------------------------------------- the saver


class CheckpointSaver:
    """The run's one saver; it writes on rank 0 (`enabled`), elsewhere every call is a no-op.

    After each epoch, `save_epoch` writes model.pth when the epoch is the best so far, then
    last.pt, from copies, in the background while the next epoch trains: one epoch's files at a
    time (the previous ones are on disk first). With background=False (hw.background_work_helps:
    training on the CPU) only the disk's part runs in the background. A crash meanwhile leaves
    the previous, whole checkpoint. `save_model` writes the final model.pth (with its metrics).

    model_meta: export.model_payload's settings (arch, class names, image size, normalization,
    config, class folders); checkpoint_meta: what last.pt carries besides the state (config,
    class folders, world size)."""

    def __init__(
        self,
        output: str | Path,
        parts: Trainables,
        *,
        model_meta: dict[str, Any],
        checkpoint_meta: dict[str, Any],
        background: bool = True,
        enabled: bool = True,
    ):
        self.output = Path(output)
        self.parts, self.model_meta, self.checkpoint_meta = parts, model_meta, checkpoint_meta
        self.enabled = enabled
        self._writer = BackgroundWriter(background)

    def model_file(self, state_dict: dict[str, torch.Tensor], metrics: dict[str, Any]) -> dict[str, Any]:
        return model_payload(state_dict, metrics=metrics, **self.model_meta)

    def save_epoch(self, state: TrainState) -> None:
        if not self.enabled:
            return
        self._writer.wait()
        if state.best_epoch == state.epoch and state.best_model is not None:  # this epoch is the best so far
            best = self.model_file(state.best_model, {"best_epoch": state.best_epoch, "valid_acc1": state.best_acc})
            self._writer.save(best, self.output / MODEL_FILE)
        # Copied unless written in this thread: then pickled right here, before the next step.
        checkpoint = checkpoint_payload(state, self.parts, copies=self._writer.background, **self.checkpoint_meta)
        self._writer.save(checkpoint, self.output / CHECKPOINT_FILE)

    def save_model(self, state_dict: dict[str, torch.Tensor], metrics: dict[str, Any]) -> None:
        """The final model.pth, once the epochs' files are on disk (it replaces theirs)."""
        self._writer.wait()
        if self.enabled:
            save_model_file(self.output / MODEL_FILE, self.model_file(state_dict, metrics))

    def wait(self) -> None:
        """Until everything queued is on disk; re-raises a write's error."""
        self._writer.wait()

    def close(self) -> None:
        self._writer.close()
