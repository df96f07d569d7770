"""The training loop: train one epoch, evaluate, fit. Reads top to bottom; no callbacks.

fit(cfg) trains on train/, picks the best epoch on valid/, tests it once on test/, and
writes model.pth, last.pt (every epoch), metrics.json and config.toml under cfg.output.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from ec2train import ddp, hw
from ec2train.config import TrainConfig, to_toml
from ec2train.errors import UserError
from ec2train.data import (
    EvalSampler,
    ImageDataset,
    TrainSampler,
    available_cpus,
    class_name,
    default_workers,
    make_loader,
    require_dataset,
    scan_split,
)
from ec2train.export import (
    CHECKPOINT_FORMAT,
    atomic_torch_save,
    atomic_write_json,
    atomic_write_text,
    load_checkpoint,
    model_payload,
    save_model_file,
)
from ec2train.model import ModelError, build_model, clean_state_dict, find_head, freeze_backbone, normalization_for
from ec2train.preprocess import decode_min_side, eval_transform, train_transform

MODEL_FILE = "model.pth"
CHECKPOINT_FILE = "last.pt"
METRICS_FILE = "metrics.json"
CONFIG_FILE = "config.toml"


class ResumeError(UserError):
    """The checkpoint to resume from is missing or belongs to a different run."""


# ---------------------------------------------------------------- metrics

@dataclass
class Meter:
    """Sums over images (not batches), reduced exactly across ranks."""

    loss: float = 0.0
    correct1: float = 0.0
    correct5: float = 0.0
    count: float = 0.0

    def update(self, loss_sum: float, correct1: float, correct5: float, n: int) -> None:
        self.loss += loss_sum
        self.correct1 += correct1
        self.correct5 += correct5
        self.count += n

    def reduced(self, device: str = "cpu") -> "Meter":
        t = ddp.all_reduce_sum([self.loss, self.correct1, self.correct5, self.count], device)
        return Meter(*t.tolist())

    def summary(self) -> dict[str, float]:
        n = max(self.count, 1)
        return {"loss": self.loss / n, "acc1": self.correct1 / n, "acc5": self.correct5 / n, "images": int(self.count)}


def topk_correct(logits: torch.Tensor, target: torch.Tensor, ks: tuple[int, ...] = (1, 5)) -> list[float]:
    maxk = min(max(ks), logits.shape[1])
    pred = logits.topk(maxk, dim=1).indices
    hit = pred.eq(target.unsqueeze(1))
    return [hit[:, : min(k, maxk)].any(dim=1).sum().item() for k in ks]


# ---------------------------------------------------------------- one epoch

@dataclass
class StepContext:
    device: str
    amp: hw.AmpPolicy
    channels_last: bool
    scaler: Any = None  # torch.amp.GradScaler when amp.use_scaler

    def autocast(self):
        return torch.autocast(device_type=self.device.split(":")[0], dtype=self.amp.dtype, enabled=self.amp.enabled)

    def to_device(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        images = images.to(self.device, non_blocking=True)
        if self.channels_last and images.dim() == 4:
            images = images.contiguous(memory_format=torch.channels_last)
        return images, labels.to(self.device, non_blocking=True)


def set_train_mode(model: nn.Module, head: nn.Module, frozen: bool) -> None:
    """Frozen backbone: keep its BatchNorm statistics and dropout fixed (eval), train the head."""
    model.train(not frozen)
    head.train(True)


def train_one_epoch(
    model: nn.Module,
    loader,
    optimizer: torch.optim.Optimizer,
    scheduler,
    ctx: StepContext,
    label_smoothing: float = 0.0,
    on_step: Callable[[int, float, float], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> tuple[Meter, bool]:
    """One pass over this rank's shard; returns (meter for this rank, stopped early)."""
    meter = Meter()
    for images, labels in loader:
        images, labels = ctx.to_device(images, labels)
        with ctx.autocast():
            logits = model(images)
            loss = F.cross_entropy(logits.float(), labels, label_smoothing=label_smoothing)
        optimizer.zero_grad(set_to_none=True)
        if ctx.scaler is not None:
            ctx.scaler.scale(loss).backward()
            ctx.scaler.step(optimizer)
            ctx.scaler.update()
        else:
            loss.backward()
            optimizer.step()
        scheduler.step()
        n = labels.shape[0]
        c1, c5 = topk_correct(logits.detach(), labels)
        meter.update(loss.item() * n, c1, c5, n)
        if on_step:
            on_step(n, loss.item(), c1 / n)
        if should_stop is not None and ddp.any_rank(should_stop(), ctx.device):
            return meter, True
    return meter, False


@torch.inference_mode()
def evaluate(model: nn.Module, loader, ctx: StepContext, num_classes: int) -> tuple[dict[str, float], torch.Tensor]:
    """Exact metrics over the whole split (every image counted once across ranks) and the
    confusion matrix (rows: true class, columns: predicted)."""
    model.eval()
    meter = Meter()
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.float64)
    for images, labels in loader:
        images, labels = ctx.to_device(images, labels)
        with ctx.autocast():
            logits = model(images).float()
        loss = F.cross_entropy(logits, labels, reduction="sum")
        c1, c5 = topk_correct(logits, labels)
        meter.update(loss.item(), c1, c5, labels.shape[0])
        idx = labels.cpu() * num_classes + logits.argmax(1).cpu()
        confusion += torch.bincount(idx, minlength=num_classes * num_classes).reshape(num_classes, num_classes)
    confusion = ddp.all_reduce_sum(confusion, ctx.device)
    return meter.reduced(ctx.device).summary(), confusion


# ---------------------------------------------------------------- set-up pieces

def lr_lambda(steps_per_epoch: int, epochs: int, warmup_epochs: int) -> Callable[[int], float]:
    """Linear warm-up, then cosine decay to zero, per optimizer step."""
    total = max(1, steps_per_epoch * epochs)
    warm = steps_per_epoch * warmup_epochs

    def f(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        progress = (step - warm) / max(1, total - warm)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return f


def param_groups(model: nn.Module, head_name: str, lr: float, backbone_lr: float, weight_decay: float) -> list[dict]:
    """Head at lr, backbone at backbone_lr; no weight decay on biases and norm weights."""
    groups: dict[tuple[bool, bool], list] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        is_head = name.startswith(head_name + ".")
        decay = p.ndim > 1
        groups.setdefault((is_head, decay), []).append(p)
    return [
        {"params": ps, "lr": lr if is_head else backbone_lr, "weight_decay": weight_decay if decay else 0.0}
        for (is_head, decay), ps in groups.items()
    ]


def make_optimizer(cfg: TrainConfig, groups: list[dict]) -> torch.optim.Optimizer:
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=True)
    return torch.optim.AdamW(groups, lr=cfg.lr)


def effective_lr(cfg: TrainConfig, world_size: int) -> float:
    """--scale-lr: --lr is meant for one process's batch; multiply by the number of processes."""
    return cfg.lr * world_size if cfg.scale_lr else cfg.lr


def resume_source(resume: str, output: Path, torchrun: bool, s3_uri: str = "") -> str | None:
    """Which checkpoint to resume from: None for a fresh start.

    '' is 'auto' under torchrun (so --max-restarts continues) and 'never' otherwise.
    auto: output/last.pt, else <s3_uri>/last.pt (a fresh instance with an empty disk).
    """
    mode = resume or ("auto" if torchrun else "never")
    if mode == "never":
        return None
    if mode == "auto":
        local = output / CHECKPOINT_FILE
        if local.is_file():  # written before it is uploaded, so never older than the S3 copy
            return str(local)
        if s3_uri:
            from ec2train import s3

            return s3.find_checkpoint(s3_uri)
        return None
    if not mode.startswith("s3://") and not Path(mode).is_file():
        raise ResumeError(f"--resume {mode}: no such checkpoint; use --resume auto to start fresh when there is none")
    return mode


def fetch_checkpoint(source: str, output: Path | None = None) -> dict[str, Any]:
    """Load a checkpoint; an s3:// one is downloaded into output first (with its model.pth)."""
    if source.startswith("s3://"):
        from ec2train import s3

        if output is None:
            import tempfile

            with tempfile.TemporaryDirectory() as tmp:
                return load_checkpoint(s3.download_run(source, tmp))
        source = str(s3.download_run(source, output))
    return load_checkpoint(source)


def agreed_checkpoint(
    resume: str, output: Path, env: ddp.DistEnv, s3_uri: str = ""
) -> tuple[str | None, dict[str, Any] | None]:
    """(source, checkpoint) that every rank resumes from, read once and broadcast, so nodes need no
    shared disk. Rank 0 decides, except in auto mode, where each node offers its own newest last.pt
    and the one with the most epochs wins: after a restart, c10d may put rank 0 on another node
    (it orders nodes by host name), one without the checkpoint."""
    torchrun = ddp.under_torchrun()
    auto = (resume or ("auto" if torchrun else "never")) == "auto"
    offer = None
    if env.is_main or (auto and env.local_rank == 0):
        path = resume_source(resume, output, torchrun, s3_uri)
        offer = (path, fetch_checkpoint(path, output)) if path else None
    src = ddp.holder_of_newest(ddp.gather_counts(offer[1]["epoch"] if offer else -1))
    if src is None:
        return None, None
    return ddp.broadcast_object(offer if env.rank == src else None, src=src)


def seek_schedule(scheduler: torch.optim.lr_scheduler.LambdaLR, step: int) -> None:
    """Put the per-step lr schedule at `step` of THIS run (its lr and steps per epoch): a resumed
    job may run with another world size than the one that wrote the checkpoint."""
    scheduler.last_epoch = step
    for group, base, f in zip(scheduler.optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas):
        group["initial_lr"] = base
        group["lr"] = base * f(step)
    scheduler._last_lr = [group["lr"] for group in scheduler.optimizer.param_groups]


def check_compatible(ckpt: dict[str, Any], cfg: TrainConfig, class_folders: list[str]) -> None:
    old = ckpt.get("config", {})
    for key in ("arch", "image_size"):
        if old.get(key) != getattr(cfg, key):
            raise ResumeError(
                f"the checkpoint was trained with {key}={old.get(key)!r}, this run asks for {getattr(cfg, key)!r}; "
                "use another --output or --resume never to start fresh"
            )
    if ckpt.get("class_folders") != class_folders:
        raise ResumeError("the checkpoint's classes differ from this data set's; use another --output or --resume never")


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ---------------------------------------------------------------- fit

@dataclass
class FitResult:
    output: Path
    model_path: Path
    logdir: Path
    metrics: dict[str, Any]
    history: list[dict[str, Any]] = field(default_factory=list)
    interrupted: bool = False


class _Reporter:
    """Progress bar and log lines, on rank 0 only."""

    def __init__(self, console, enabled: bool):
        self.enabled = enabled and console is not None
        self.console = console
        self.progress = None
        self.task = None

    def log(self, msg: str) -> None:
        if self.enabled:
            self.console.print(msg)

    def start_epoch(self, epoch: int, epochs: int, total: int) -> None:
        if not self.enabled:
            return
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.progress = Progress(
            TextColumn(f"epoch {epoch + 1}/{epochs}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]:.4f} acc {task.fields[acc]:.3f} {task.fields[ips]:.0f} img/s"),
            TimeRemainingColumn(),
            console=self.console,
            transient=False,
        )
        self.progress.start()
        self.task = self.progress.add_task("train", total=total, loss=0.0, acc=0.0, ips=0.0)
        self._t0, self._n, self._loss, self._acc = time.perf_counter(), 0, 0.0, 0.0

    def step(self, n: int, loss: float, acc: float) -> None:
        if not self.progress:
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


def fit(
    cfg: TrainConfig,
    *,
    console=None,
    should_stop: Callable[[], bool] | None = None,
    on_epoch: Callable[[int, dict[str, Any]], None] | None = None,
) -> FitResult:
    """Train, validate every epoch, test the best epoch once, and export. See module doc.

    should_stop: polled after every step (e.g. a spot interruption notice); when it turns
    true on any rank, every rank stops, the last completed epoch's checkpoint stays, and the
    result has interrupted=True. on_epoch(epoch, record) runs on every rank after each epoch.
    """
    cfg = cfg.validate()
    env = ddp.env_from()
    threads = hw.apply_threads(hw.fit_thread_plan(cfg.threads, cfg.workers, env.local_world_size))
    _Reporter(console, env.is_main).log(threads.describe())  # the header's first line
    device = ddp.select_device(cfg.device, env.local_rank, torch.cuda.device_count() if torch.cuda.is_available() else 0)
    device_type = device.split(":")[0]
    amp = hw.amp_policy(cfg.amp, device_type, hw.device_capability(device))
    sync_bn = ddp.use_sync_bn(cfg.sync_bn, device_type, env.world_size)
    ddp.setup(env, device)
    try:
        return _fit(cfg, env, device, amp, sync_bn, console, should_stop, on_epoch)
    finally:
        ddp.cleanup()


def _fit(cfg, env, device, amp, sync_bn, console, should_stop, on_epoch) -> FitResult:
    t_start = time.perf_counter()
    device_type = device.split(":")[0]
    output = Path(cfg.output)
    report = _Reporter(console, env.is_main)
    hw.configure_backends(device_type, hw.device_capability(device))

    # ---- data
    class_folders = require_dataset(cfg.data)
    class_names = [class_name(f) for f in class_folders]
    num_classes = len(class_folders)
    mean, std = normalization_for(cfg.arch, cfg.weights)
    _, train_samples = scan_split(cfg.data, "train", class_folders)
    _, valid_samples = scan_split(cfg.data, "valid", class_folders)
    train_ds = ImageDataset(
        train_samples, train_transform(cfg.image_size, mean, std, cfg.augment), decode_min_side(cfg.image_size, cfg.augment)
    )
    valid_ds = ImageDataset(valid_samples, eval_transform(cfg.image_size, mean, std), decode_min_side(cfg.image_size, False))
    workers = cfg.workers if cfg.workers >= 0 else default_workers(available_cpus(), env.local_world_size)
    pin = hw.use_pin_memory(device_type)
    train_sampler = TrainSampler(len(train_ds), env.rank, env.world_size, cfg.seed)
    train_loader = make_loader(train_ds, train_sampler, cfg.batch_size, workers, pin)
    valid_loader = make_loader(valid_ds, EvalSampler(len(valid_ds), env.rank, env.world_size), cfg.batch_size, workers, pin)

    # ---- model
    torch.manual_seed(cfg.seed)
    net = build_model(cfg.arch, num_classes, cfg.weights)
    head_name, _ = find_head(net)
    if cfg.frozen:
        freeze_backbone(net)
    channels_last = hw.use_channels_last(cfg.channels_last, device_type)
    net = net.to(device, memory_format=torch.channels_last) if channels_last else net.to(device)
    lr = effective_lr(cfg, env.world_size)
    optimizer = make_optimizer(cfg, param_groups(net, head_name, lr, lr * cfg.backbone_lr_scale, cfg.weight_decay))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(len(train_loader), cfg.epochs, cfg.warmup_epochs))
    scaler = torch.amp.GradScaler(device_type) if amp.use_scaler else None
    ctx = StepContext(device, amp, channels_last, scaler)
    # With --cache-features only the head trains (features.py wraps it); the full model only tests.
    model = net if cfg.cache_features else ddp.wrap_model(net, device, sync_bn)
    if cfg.compile and not cfg.cache_features:
        model = torch.compile(model)
    head = net.get_submodule(head_name)

    # ---- resume
    start_epoch, best_acc, best_epoch, stale, history = 0, -1.0, -1, 0, []
    best_state: dict[str, torch.Tensor] | None = None
    run_name = f"{cfg.arch}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"
    source, ckpt = agreed_checkpoint(cfg.resume, output, env, cfg.s3_uri)
    if ckpt:
        check_compatible(ckpt, cfg, class_folders)
        net.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        seek_schedule(scheduler, ckpt["epoch"] * len(train_loader))
        if scaler is not None and ckpt.get("scaler"):
            scaler.load_state_dict(ckpt["scaler"])
        set_rng_state(ckpt["rng"])
        start_epoch, best_acc, best_epoch = ckpt["epoch"], ckpt["best_acc"], ckpt["best_epoch"]
        stale, history, run_name = ckpt["stale_epochs"], ckpt["history"], ckpt["run_name"]
        best_state = ckpt["best_model"]
        report.log(f"resuming from {source}: {start_epoch} of {cfg.epochs} epochs done, best valid acc {best_acc:.4f}")

    logdir = Path(cfg.logdir) / run_name
    writer = None
    if env.is_main:
        from torch.utils.tensorboard import SummaryWriter

        output.mkdir(parents=True, exist_ok=True)
        writer = SummaryWriter(str(logdir))
        atomic_write_text(output / CONFIG_FILE, to_toml(cfg))
    report.log(
        f"{cfg.arch} on {device} ({'frozen backbone' if cfg.frozen else 'full fine-tune'}), amp {amp.name}, "
        f"{num_classes} classes, {len(train_ds)} train / {len(valid_ds)} valid images\n"
        f"world size {env.world_size}, per-rank batch {cfg.batch_size}, global batch {cfg.batch_size * env.world_size}, "
        f"lr {lr:g}, {workers} loader workers per process{', SyncBatchNorm' if sync_bn else ''}"
    )

    # ---- frozen backbone fast path: features computed once, the head trains from them
    step_model = model
    if cfg.cache_features:
        from ec2train.features import CACHE_DIR, feature_loaders

        fixed = {split: ImageDataset(samples, eval_transform(cfg.image_size, mean, std), decode_min_side(cfg.image_size, False))
                 for split, samples in (("train", train_samples), ("valid", valid_samples))}
        step_model, train_loader, valid_loader = feature_loaders(
            net, head_name, fixed, train_sampler, ctx, arch=cfg.arch, image_size=cfg.image_size, mean=mean, std=std,
            batch_size=cfg.batch_size, workers=workers, pin_memory=pin, cache_dir=output / CACHE_DIR, log=report.log,
        )

    def payload(state, metrics):
        return model_payload(
            state, arch=cfg.arch, class_names=class_names, image_size=cfg.image_size, mean=mean, std=std,
            metrics=metrics, config=cfg.to_dict(), class_folders=class_folders,
        )

    # ---- epochs
    interrupted = False
    train_images, train_seconds = 0, 0.0
    for epoch in range(start_epoch, cfg.epochs):
        if cfg.patience and stale >= cfg.patience:
            break
        train_sampler.set_epoch(epoch)
        set_train_mode(step_model, head, cfg.frozen)
        report.start_epoch(epoch, cfg.epochs, len(train_sampler))
        t0 = time.perf_counter()
        meter, interrupted = train_one_epoch(
            step_model, train_loader, optimizer, scheduler, ctx, cfg.label_smoothing, report.step, should_stop
        )
        seconds = time.perf_counter() - t0
        report.end_epoch()
        if interrupted:
            report.log(f"stop requested during epoch {epoch + 1}: keeping the checkpoint of epoch {epoch}")
            break
        train = meter.reduced(device).summary()
        valid, _ = evaluate(step_model, valid_loader, ctx, num_classes)
        ips = train["images"] / max(seconds, 1e-9)
        train_images, train_seconds = train_images + train["images"], train_seconds + seconds
        improved = valid["acc1"] > best_acc
        if improved:
            best_acc, best_epoch, stale = valid["acc1"], epoch + 1, 0
            best_state = {k: v.detach().clone().cpu() for k, v in clean_state_dict(net.state_dict()).items()}
        else:
            stale += 1
        record = {
            "epoch": epoch + 1, "train_loss": train["loss"], "train_acc1": train["acc1"], "valid_loss": valid["loss"],
            "valid_acc1": valid["acc1"], "valid_acc5": valid["acc5"], "lr": optimizer.param_groups[0]["lr"],
            "images_per_second": ips, "seconds": seconds, "images_per_rank": ddp.gather_counts(meter.count, device),
        }
        history.append(record)
        report.log(
            f"epoch {epoch + 1}/{cfg.epochs}: train loss {train['loss']:.4f} acc {train['acc1']:.3f} | "
            f"valid loss {valid['loss']:.4f} acc {valid['acc1']:.3f} top5 {valid['acc5']:.3f} | "
            f"{ips:.0f} img/s{'  (best)' if improved else ''}"
        )
        if env.is_main:
            for key in ("train_loss", "train_acc1", "valid_loss", "valid_acc1", "valid_acc5", "lr", "images_per_second"):
                group, _, name = key.partition("_")
                writer.add_scalar(f"{group}/{name}" if group in ("train", "valid") else key, record[key], epoch + 1)
            writer.flush()
            if improved:
                save_model_file(output / MODEL_FILE, payload(best_state, {"best_epoch": best_epoch, "valid_acc1": best_acc}))
            atomic_torch_save(
                {
                    "format": CHECKPOINT_FORMAT, "epoch": epoch + 1, "model": clean_state_dict(net.state_dict()),
                    "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                    "scaler": scaler.state_dict() if scaler is not None else None, "best_acc": best_acc,
                    "best_epoch": best_epoch, "best_model": best_state, "stale_epochs": stale, "history": history,
                    "rng": rng_state(), "config": cfg.to_dict(), "class_folders": class_folders, "run_name": run_name,
                    "world_size": env.world_size,
                },
                output / CHECKPOINT_FILE,
            )
        ddp.barrier()
        if on_epoch:
            try:
                on_epoch(epoch, record)
            except BaseException:
                # The hook may end the run (a pruned tuning trial): do not leak the writer's file and thread.
                if writer:
                    writer.close()
                raise

    if interrupted:
        if writer:
            writer.close()
        return FitResult(output, output / MODEL_FILE, logdir, {}, history, interrupted=True)

    # ---- test the best epoch once
    if best_state is None:
        raise ResumeError("no epoch finished, so there is no model to test")
    net.load_state_dict(best_state)
    _, test_samples = scan_split(cfg.data, "test", class_folders)
    test_ds = ImageDataset(test_samples, eval_transform(cfg.image_size, mean, std), decode_min_side(cfg.image_size, False))
    test_loader = make_loader(test_ds, EvalSampler(len(test_ds), env.rank, env.world_size), cfg.batch_size, 0, pin)
    test, _ = evaluate(model, test_loader, ctx, num_classes)
    best = next((h for h in history if h["epoch"] == best_epoch), {})
    wall = time.perf_counter() - t_start
    metrics = {
        "best_epoch": best_epoch,
        "valid_acc1": best_acc,
        "valid_acc5": best.get("valid_acc5"),
        "test_acc1": test["acc1"],
        "test_acc5": test["acc5"],
        "test_loss": test["loss"],
        "test_images": test["images"],
        "epochs_run": len(history),
        "stopped_early": len(history) < cfg.epochs,
        "wall_seconds": wall,
        "images_per_second": train_images / train_seconds if train_seconds else None,
        "world_size": env.world_size,
        "global_batch": cfg.batch_size * env.world_size,
    }
    if env.is_main:
        save_model_file(output / MODEL_FILE, payload(best_state, metrics))
        atomic_write_json(output / METRICS_FILE, {**metrics, "history": history})
        hparams = {k: v for k, v in cfg.to_dict().items() if isinstance(v, (int, float, str, bool))}
        writer.add_hparams(hparams, {"hparam/test_acc1": test["acc1"], "hparam/valid_acc1": best_acc}, run_name=".")
        writer.close()
    ddp.barrier()
    return FitResult(output, output / MODEL_FILE, logdir, metrics, history)


# ---------------------------------------------------------------- evaluate a model file

def evaluate_model_file(
    model_path: str | Path,
    data: str | Path,
    split: str = "test",
    batch_size: int = 64,
    workers: int = 0,
    device: str = "auto",
) -> dict[str, Any]:
    """Top-1/top-5, per-class accuracy and the confusion matrix of a model file on one split."""
    from ec2train.model import model_from_file

    net, meta = model_from_file(model_path)
    folders = meta.get("class_folders") or meta["class_names"]
    found, samples = scan_split(data, split)
    if sorted(found) != sorted(folders):
        raise UserError(
            f"the classes in {Path(data) / split} differ from the model's {len(folders)} classes; "
            "evaluate on the data set the model was trained on"
        )
    _, samples = scan_split(data, split, folders)
    dev = ddp.select_device(device, 0, torch.cuda.device_count() if torch.cuda.is_available() else 0)
    ctx = StepContext(dev, hw.amp_policy("off", dev.split(":")[0]), False)
    ds = ImageDataset(
        samples, eval_transform(meta["image_size"], meta["mean"], meta["std"]), decode_min_side(meta["image_size"], False)
    )
    loader = make_loader(ds, EvalSampler(len(ds)), batch_size, workers, hw.use_pin_memory(dev.split(":")[0]))
    summary, confusion = evaluate(net.to(dev), loader, ctx, meta["num_classes"])
    totals = confusion.sum(dim=1)
    per_class = {
        name: (float(confusion[i, i] / totals[i]) if totals[i] else None) for i, name in enumerate(meta["class_names"])
    }
    return {"split": split, **summary, "per_class_acc1": per_class, "confusion": confusion.long().tolist(), "class_names": meta["class_names"]}
