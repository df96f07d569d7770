"""The training loop: train one epoch, evaluate, fit. Reads top to bottom; no callbacks
beyond fit's two hooks (should_stop, on_epoch). Knows nothing of AWS: run.py adds that.

fit(cfg) trains on train/, picks the best epoch on valid/, tests it once on test/, and
writes model.pth, last.pt (every epoch), metrics.json and config.toml under cfg.output.
It reads as phases: device (make_runtime), loaders (make_data), model and optimizer
(trainer_for), resume (checkpoint.Resume, checkpoint.restore), epochs (_epochs, with
checkpoint.CheckpointSaver) and test (_test). perf.bench reuses the device phase and
make_trainer; evaluate.py reuses evaluate.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ec2train import ddp, hw
from ec2train import threads as thread_plans
from ec2train.checkpoint import (
    CONFIG_FILE,
    METRICS_FILE,
    MODEL_FILE,
    CheckpointSaver,
    Resume,
    ResumeError,
    Trainables,
    TrainState,
    finished,
    restore,
)
from ec2train.config import TrainConfig, to_toml
from ec2train.data import (
    ImageDataset,
    SplitSampler,
    TrainSampler,
    class_names,
    default_workers,
    eval_dataset,
    make_loader,
    require_dataset,
    scan_split,
    start_workers,
    train_dataset,
)
from ec2train.data.encoded import EncodedBatch, EncodedDataset
from ec2train.data.gpu import decode_batch, select_loader
from ec2train.errors import UserError, first_line
from ec2train.features import CACHE_DIR, FeatureSettings, feature_loaders
from ec2train.files import atomic_write_json, atomic_write_text
from ec2train.model import build_model, find_head, freeze_backbone, normalization_for
from ec2train.optim import backbone_lr, effective_lr, group_lrs, lr_lambda, make_optimizer, param_groups
from ec2train.plots import log_confusion
from ec2train.preprocess import normalize_pixels, pixel_stats
from ec2train.report import Reporter, TensorBoard
from ec2train.threads import ThreadTiming

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

    def reduced(self, device: str = "cpu") -> Meter:
        t = ddp.all_reduce_sum([self.loss, self.correct1, self.correct5, self.count], device)
        return Meter(*t.tolist())

    def summary(self) -> dict[str, float]:
        n = max(self.count, 1)
        return {"loss": self.loss / n, "acc1": self.correct1 / n, "acc5": self.correct5 / n, "images": int(self.count)}


def topk_hits(logits: torch.Tensor, target: torch.Tensor, ks: tuple[int, ...] = (1, 5)) -> torch.Tensor:
    """How many rows have their target among the top k logits, for each k: a float64 tensor on
    the logits' device, so that counting never waits for the GPU (a handful of small kernels)."""
    maxk = min(max(ks), logits.shape[1])
    # A target sits at most once in a row's top maxk: [j] counts rows with it in their top j + 1.
    within = logits.topk(maxk, dim=1).indices.eq(target.unsqueeze(1)).sum(0).cumsum(0)
    return torch.stack([within[min(k, maxk) - 1] for k in ks]).double()


# ---------------------------------------------------------------- one epoch


@dataclass
class StepContext:
    device: str
    amp: hw.AmpPolicy
    channels_last: bool
    scaler: Any = None  # torch.amp.GradScaler when amp.use_scaler
    # The data set's normalization: image batches come from the loader as uint8 pixels
    # (preprocess.train_pixels) and are normalized here, on the device.
    normalization: tuple[tuple[float, ...], tuple[float, ...]] | None = None
    _stats: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = field(default=None, init=False, repr=False)

    def autocast(self):
        return torch.autocast(device_type=self.device.split(":")[0], dtype=self.amp.dtype, enabled=self.amp.enabled)

    def to_device(self, images, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if isinstance(images, EncodedBatch):  # the GPU loader's: decoded and transformed here
            images = decode_batch(images, self.device)
        images = images.to(self.device, non_blocking=True)
        channels_last = self.channels_last and images.dim() == 4
        if images.dtype == torch.uint8:
            if self._stats is None:
                if self.normalization is None:
                    raise RuntimeError("uint8 image batches need StepContext(normalization=(mean, std))")
                self._stats = pixel_stats(*self.normalization, self.device)
            images = normalize_pixels(images, self._stats, channels_last)
        elif channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        return images, labels.to(self.device, non_blocking=True)


def set_train_mode(model: nn.Module, head: nn.Module, frozen: bool) -> None:
    """Frozen backbone: keep its BatchNorm statistics and dropout fixed (eval), train the head."""
    model.train(not frozen)
    head.train(True)


def _forward_training(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """model(images), with torch's BatchNorm complaint about a batch too small to train on
    (one value per channel: one image whose features are down to 1x1) as a one-line error."""
    try:
        return model(images)
    except ValueError as exc:
        if "Expected more than 1 value per channel" not in str(exc):
            raise
        raise UserError(
            f"a batch of {images.shape[0]} image(s) at {images.shape[-1]} px leaves BatchNorm one value per channel, "
            "which it cannot train on; use --batch-size 2 or more (8+ trains well), a larger --image-size, "
            "or --freeze-backbone to train the head only"
        ) from None


def train_one_epoch(
    model: nn.Module,
    loader,
    optimizer: torch.optim.Optimizer,
    scheduler,
    ctx: StepContext,
    label_smoothing: float = 0.0,
    on_step: Callable[[int, float, float], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    after_step: Callable[[], None] | None = None,
) -> tuple[Meter, bool]:
    """One pass over this rank's shard; returns (meter for this rank, stopped early).

    A step's loss and hits stay on the device, and are read (and given to on_step) once the next
    step is queued: reading them at once would make the CPU wait for the GPU every step, and the
    GPU then idles while the CPU queues the next one. after_step is called once per step, as
    soon as it is queued (on the CPU: done), for timing it."""
    meter = Meter()
    pending: tuple[int, torch.Tensor] | None = None

    def count(step: tuple[int, torch.Tensor]) -> None:
        n, stats = step
        loss_sum, c1, c5 = stats.tolist()
        meter.update(loss_sum, c1, c5, n)
        if on_step:
            on_step(n, loss_sum / n, c1 / n)

    for images, labels in loader:
        images, labels = ctx.to_device(images, labels)
        with ctx.autocast():
            logits = _forward_training(model, images)
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
        stats = torch.cat([loss.detach().double().reshape(1) * n, topk_hits(logits.detach(), labels)])
        if pending is not None:
            count(pending)
        pending = (n, stats)
        if after_step:
            after_step()
        if should_stop is not None and ddp.any_rank(should_stop()):
            count(pending)
            return meter, True
    if pending is not None:
        count(pending)
    return meter, False


@torch.inference_mode()
def evaluate(model: nn.Module, loader, ctx: StepContext, num_classes: int) -> tuple[dict[str, float], torch.Tensor]:
    """Exact metrics over the whole split (every image counted once across ranks) and the
    confusion matrix (rows: true class, columns: predicted). The sums stay on the device until
    the end: no batch waits for the GPU to finish the one before it."""
    model.eval()
    sums = torch.zeros(3, dtype=torch.float64, device=ctx.device)  # loss, top-1 hits, top-5 hits
    confusion = torch.zeros(num_classes * num_classes, dtype=torch.float64, device=ctx.device)
    count = 0
    for images, labels in loader:
        images, labels = ctx.to_device(images, labels)
        with ctx.autocast():
            logits = model(images).float()
        loss = F.cross_entropy(logits, labels, reduction="sum")
        sums += torch.cat([loss.double().reshape(1), topk_hits(logits, labels)])
        confusion += torch.bincount(labels * num_classes + logits.argmax(1), minlength=num_classes * num_classes)
        count += labels.shape[0]
    loss_sum, c1, c5 = sums.tolist()
    confusion = ddp.all_reduce_sum(confusion.reshape(num_classes, num_classes).cpu(), ctx.device)
    return Meter(loss_sum, c1, c5, count).reduced(ctx.device).summary(), confusion


# ---------------------------------------------------------------- the phases of fit


@dataclass
class Runtime:
    """Phase 1, device: where this process runs and how."""

    env: ddp.DistEnv
    device: str
    amp: hw.AmpPolicy
    sync_bn: bool
    workers: int
    pin_memory: bool
    threads: thread_plans.ThreadPlan
    tuner: thread_plans.ThreadTuner | None = None  # CPU training only: see threads.ThreadTuner

    @property
    def device_type(self) -> str:
        return self.device.split(":")[0]


def make_runtime(
    device: str, amp: str, workers: int, *, threads: int = 0, sync_bn: bool = False, env: ddp.DistEnv | None = None
) -> Runtime:
    """Device, AMP, loader workers and the CPU thread plan (applied here, before any torch work)."""
    env = env or ddp.env_from()
    dev = ddp.select_device(device, env.local_rank, hw.cuda_device_count())
    device_type = dev.split(":")[0]
    capability = hw.device_capability(dev)
    hw.configure_backends(device_type, capability)
    workers = workers if workers >= 0 else default_workers(thread_plans.available_cpus(), env.local_world_size)
    plan = thread_plans.apply_threads(thread_plans.plan_threads(env.local_world_size, workers, 0, threads))
    candidates = thread_plans.tuning_candidates(plan, device_type, env.world_size)
    return Runtime(
        env,
        dev,
        hw.amp_policy(amp, device_type, capability),
        ddp.use_sync_bn(sync_bn, device_type, env.world_size),
        workers,
        hw.use_pin_memory(device_type),
        plan,
        thread_plans.ThreadTuner(candidates) if len(candidates) > 1 else None,
    )


@dataclass
class Data:
    """Phase 2, loaders: the data set's classes, datasets, sampler and loaders."""

    class_folders: list[str]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    train_samples: list
    valid_samples: list
    test_samples: list
    train_ds: ImageDataset | EncodedDataset
    train_sampler: TrainSampler
    train_loader: Any
    eval_loader: Any  # valid then test, one set of workers (SplitSampler); `eval_split` picks one
    loader_choice: hw.LoaderChoice | None = None  # who decodes: the workers (cpu) or the device (gpu)

    def eval_split(self, split: str) -> Any:
        """The eval loader, reading `split` ("valid" or "test") from its next pass."""
        self.eval_loader.sampler.use(split)
        return self.eval_loader

    @property
    def class_names(self) -> list[str]:
        return class_names(self.class_folders)


def make_data(cfg: TrainConfig, rt: Runtime) -> Data:
    class_folders = require_dataset(cfg.data)
    mean, std = normalization_for(cfg.arch, cfg.weights)
    _, train_samples = scan_split(cfg.data, "train", class_folders)
    _, valid_samples = scan_split(cfg.data, "valid", class_folders)
    _, test_samples = scan_split(cfg.data, "test", class_folders)
    env = rt.env
    cpus = (thread_plans.available_cpus() or 1) // max(1, env.local_world_size)
    choice = select_loader(cfg.loader, rt.device, [p for p, _ in train_samples], cpus)
    on_device = choice.kind == "gpu"
    train_ds = train_dataset(train_samples, cfg.image_size, cfg.augment, on_device)
    sampler = TrainSampler(len(train_ds), env.rank, env.world_size, cfg.seed, batch_size=cfg.batch_size)
    train_loader = make_loader(train_ds, sampler, cfg.batch_size, rt.workers, rt.pin_memory)
    # The test pass reuses the valid pass's workers: a new set forked at the end would start and
    # decode its first batch beside the forward pass.
    eval_loader = make_loader(
        eval_dataset(valid_samples + test_samples, cfg.image_size, on_device),
        SplitSampler({"valid": len(valid_samples), "test": len(test_samples)}, env.rank, env.world_size),
        cfg.batch_size,
        rt.workers,
        rt.pin_memory,
    )
    # Before the model and optimizer fill the heap. With --cache-features the image train loader
    # is never read (the epochs read cached features), so its workers are not started.
    for loader in (eval_loader,) if cfg.cache_features else (train_loader, eval_loader):
        start_workers(loader)
    return Data(
        class_folders,
        mean,
        std,
        train_samples,
        valid_samples,
        test_samples,
        train_ds,
        sampler,
        train_loader,
        eval_loader,
        choice,
    )


@dataclass
class Trainer:
    """Phase 3, model and optimizer: the network (net), what steps (model: DDP/compiled), its head."""

    net: nn.Module
    model: nn.Module
    head_name: str
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    ctx: StepContext

    @property
    def head(self) -> nn.Module:
        return self.net.get_submodule(self.head_name)

    def parts(self) -> Trainables:
        return Trainables(self.net, self.optimizer, self.scheduler, self.ctx.scaler)


def make_trainer(
    rt: Runtime,
    cfg: TrainConfig,
    num_classes: int,
    lr_at_step: Callable[[int], float],
    normalization: tuple[tuple[float, ...], tuple[float, ...]] | None = None,
) -> Trainer:
    """cfg's network (seeded with cfg.seed), optimizer, lr schedule (lr_at_step: the factor per
    optimizer step) and step context on the runtime's device. With --cache-features only the head
    trains, from cached features: the network is then neither DDP-wrapped nor compiled.
    normalization: (mean, std) of the data set, for loaders that give uint8 pixels."""
    torch.manual_seed(cfg.seed)
    lr = effective_lr(cfg, rt.env.world_size)
    net = build_model(cfg.arch, num_classes, cfg.weights)
    head_name, _ = find_head(net)
    if cfg.frozen:
        freeze_backbone(net)
    use_cl = hw.use_channels_last(cfg.channels_last, rt.device_type, cfg.frozen)
    # Module.to takes memory_format, which its type stubs leave out.
    net = net.to(rt.device, memory_format=torch.channels_last) if use_cl else net.to(rt.device)  # type: ignore[call-overload]
    groups = param_groups(net, head_name, lr, backbone_lr(cfg, lr), cfg.weight_decay)
    opt = make_optimizer(cfg.optimizer, groups, lr, cfg.momentum, rt.device_type)
    scheduler = torch.optim.lr_scheduler.LambdaLR(opt, lr_at_step)
    scaler = torch.amp.GradScaler(rt.device_type) if rt.amp.use_scaler else None
    model = net if cfg.cache_features else ddp.wrap_model(net, rt.device, rt.sync_bn)
    if cfg.compile and not cfg.cache_features:
        model = torch.compile(model)
    return Trainer(net, model, head_name, opt, scheduler, StepContext(rt.device, rt.amp, use_cl, scaler, normalization))


def trainer_for(cfg: TrainConfig, rt: Runtime, data: Data) -> Trainer:
    """Phase 3 of fit: make_trainer for the data set's classes, steps per epoch and normalization."""
    schedule = lr_lambda(len(data.train_loader), cfg.epochs, cfg.warmup_epochs)
    return make_trainer(rt, cfg, len(data.class_folders), schedule, (data.mean, data.std))


@dataclass
class FitResult:
    output: Path
    model_path: Path
    logdir: Path
    metrics: dict[str, Any]
    history: list[dict[str, Any]] = field(default_factory=list)
    interrupted: bool = False
    already_finished: bool = False  # --resume of a finished run: nothing was trained or written
    stopped_by: str = ""  # with interrupted: what stopped it (run.fit_run says: a spot notice, SIGTERM, ...)


@dataclass
class FitSession:
    """Everything the epochs and the test phase share."""

    cfg: TrainConfig
    rt: Runtime
    data: Data
    tr: Trainer
    state: TrainState
    report: Reporter
    writer: TensorBoard
    step_model: nn.Module
    train_loader: Any
    valid_loader: Any
    saver: CheckpointSaver  # model.pth and last.pt (rank 0)

    @property
    def output(self) -> Path:
        return Path(self.cfg.output)

    @property
    def logdir(self) -> Path:
        return Path(self.cfg.logdir) / self.state.run_name


def fit(
    cfg: TrainConfig,
    *,
    console=None,
    should_stop: Callable[[], bool] | None = None,
    on_epoch: Callable[[int, dict[str, Any]], None] | None = None,
    resume: Resume | None = None,
) -> FitResult:
    """Train, validate every epoch, test the best epoch once, and export. See module doc.

    Resumes as `resume` decides (default: checkpoint.Resume.of(cfg), local files only; run.py
    passes one that fetched a remote checkpoint first). should_stop: polled after every step (a spot notice, SIGTERM); when it turns
    true on any rank, every rank stops, the last completed epoch's checkpoint stays, and the
    result has interrupted=True. on_epoch(epoch, record) runs on every rank after each epoch.
    """
    rt = make_runtime(cfg.device, cfg.amp, cfg.workers, threads=cfg.threads, sync_bn=cfg.sync_bn)
    Reporter(console, rt.env.is_main).log(rt.threads.describe())  # the header's first line
    ddp.setup(rt.env, rt.device)
    try:
        return _fit(cfg, rt, resume or Resume.of(cfg), console=console, should_stop=should_stop, on_epoch=on_epoch)
    finally:
        ddp.cleanup()


def _fit(cfg: TrainConfig, rt: Runtime, resume: Resume, *, console, should_stop, on_epoch) -> FitResult:
    t_start = time.perf_counter()
    report = Reporter(console, rt.env.is_main)
    resume.refuse_local_overwrite()
    data = make_data(cfg, rt)
    tr = trainer_for(cfg, rt, data)
    ckpt = resume.checkpoint(rt.env, cfg, data.class_folders)
    if ckpt is not None:
        if finished(ckpt, cfg) and ckpt.get("final_metrics"):
            return _already_finished(ckpt, report)
        state = restore(ckpt, tr.parts(), len(data.train_loader))
        report.log(
            f"resuming from {ckpt['source']}: {state.epoch} of {cfg.epochs} epochs done, "
            f"best valid acc {state.best_acc:.4f}"
        )
    else:
        state = TrainState.fresh(cfg.arch)
    session = _start_session(cfg, rt, data, tr, state, report)
    try:
        interrupted = _epochs(session, should_stop, on_epoch)
        if interrupted:
            session.saver.wait()  # the last checkpoint is on disk before fit returns
            return FitResult(
                session.output, session.output / MODEL_FILE, session.logdir, {}, state.history, interrupted=True
            )
        return _test(session, time.perf_counter() - t_start)  # tests while the last checkpoint is written
    finally:
        session.saver.close()  # also when a hook ends the run (a pruned trial): no leaked file or thread
        session.writer.close()


def _already_finished(ckpt: dict[str, Any], report: Reporter) -> FitResult:
    folder = Path(ckpt["source"]).parent
    metrics = ckpt["final_metrics"]
    report.log(
        f"{folder} holds a finished run ({ckpt['epoch']} epochs, test acc {metrics.get('test_acc1', float('nan')):.4f}); "
        f"its model is {folder / MODEL_FILE}. Nothing to do: another --output (or --resume never) trains anew."
    )
    logdir = Path(ckpt.get("config", {}).get("logdir", "runs")) / ckpt["run_name"]
    return FitResult(folder, folder / MODEL_FILE, logdir, metrics, ckpt["history"], already_finished=True)


def _start_session(
    cfg: TrainConfig, rt: Runtime, data: Data, tr: Trainer, state: TrainState, report: Reporter
) -> FitSession:
    """Open the logs, write config.toml, print the header; with --cache-features compute the
    backbone's features once so the epochs train the head from them."""
    output = Path(cfg.output)
    if rt.env.is_main:
        output.mkdir(parents=True, exist_ok=True)
        atomic_write_text(output / CONFIG_FILE, to_toml(cfg))
    writer = TensorBoard(Path(cfg.logdir) / state.run_name if rt.env.is_main else None, hparams=cfg.to_dict())
    env, lr = rt.env, group_lrs(tr.optimizer, peak=True)  # a resumed run is mid-schedule
    lrs = f"lr {lr['lr']:g}" + (
        f" (backbone {lr['lr_backbone']:g})" if lr.get("lr_backbone", lr["lr"]) != lr["lr"] else ""
    )
    report.log(
        f"{cfg.arch} on {rt.device} ({'frozen backbone' if cfg.frozen else 'full fine-tune'}), amp {rt.amp.name}, "
        f"{len(data.class_folders)} classes, {len(data.train_ds)} train / {len(data.valid_samples)} valid images\n"
        f"world size {env.world_size}, per-rank batch {cfg.batch_size}, global batch {cfg.batch_size * env.world_size}, "
        f"{lrs}, {rt.workers} loader workers per process{', SyncBatchNorm' if rt.sync_bn else ''}"
        + (f", {backend} process group" if (backend := ddp.backend_name()) else "")
        + (f"\n{data.loader_choice.why}" if data.loader_choice else "")
    )
    step_model, train_loader, valid_loader = tr.model, data.train_loader, data.eval_split("valid")
    if cfg.cache_features:
        fixed = {
            split: eval_dataset(samples, cfg.image_size)
            for split, samples in (("train", data.train_samples), ("valid", data.valid_samples))
        }
        settings = FeatureSettings(
            cfg.arch, cfg.image_size, data.mean, data.std, cfg.batch_size, rt.workers, rt.pin_memory, output / CACHE_DIR
        )
        step_model, train_loader, valid_loader = feature_loaders(
            tr.net, tr.head_name, fixed, data.train_sampler, tr.ctx, settings, report.log
        )
    saver = CheckpointSaver(
        output,
        tr.parts(),
        model_meta=dict(
            arch=cfg.arch,
            class_names=data.class_names,
            image_size=cfg.image_size,
            mean=data.mean,
            std=data.std,
            config=cfg.to_dict(),
            class_folders=data.class_folders,
        ),
        checkpoint_meta=dict(config=cfg.to_dict(), class_folders=data.class_folders, world_size=env.world_size),
        background=hw.background_work_helps(rt.device_type),
        enabled=env.is_main,
    )
    return FitSession(cfg, rt, data, tr, state, report, writer, step_model, train_loader, valid_loader, saver)


def _epochs(session: FitSession, should_stop, on_epoch) -> bool:
    """Phase 5: train and validate each remaining epoch; True when a stop request ended it."""
    cfg, state, tr = session.cfg, session.state, session.tr
    timing = ThreadTiming(session.rt.tuner, state.history)

    batches = None  # the next epoch's batches, when its workers were started early
    for epoch in range(state.epoch, cfg.epochs):
        if cfg.patience and state.stale_epochs >= cfg.patience:
            break
        if batches is None:
            batches = _epoch_batches(session, epoch)
        set_train_mode(session.step_model, tr.head, cfg.frozen)
        session.report.start_epoch(epoch, cfg.epochs, len(session.data.train_sampler))
        timing.epoch_start()
        t0 = time.perf_counter()
        meter, interrupted = train_one_epoch(
            session.step_model,
            batches,
            tr.optimizer,
            tr.scheduler,
            tr.ctx,
            cfg.label_smoothing,
            on_step=session.report.step,  # one step late: see train_one_epoch
            should_stop=should_stop,
            after_step=timing.step,  # the thread probe times each step as it ends
        )
        seconds = time.perf_counter() - t0
        session.report.end_epoch()
        if interrupted:
            session.report.log(f"stop requested during epoch {epoch + 1}: keeping the checkpoint of epoch {epoch}")
            return True
        timing.epoch_end()
        for note in timing.take_notes():
            session.report.log(note)
        record = _end_epoch(session, epoch + 1, meter, seconds, timing.threads())
        batches = _start_next_epoch(session, epoch + 1)
        if session.rt.env.is_main:
            session.writer.log_epoch(record)
        session.saver.save_epoch(state)  # rank 0: model.pth if this epoch is the best, and last.pt
        ddp.barrier()
        if on_epoch:
            session.saver.wait()  # the hook may read or upload the files (run.py's S3 mirror)
            on_epoch(epoch, record)
    return False


def _start_next_epoch(session: FitSession, epoch: int) -> Iterator | None:
    """The batches of `epoch`, if it will run, with its loader workers already at work: they
    decode its first batches while this epoch's checkpoint is written (one thread on the CPU),
    not beside its first step, which they would slow down (docs/performance.md)."""
    cfg = session.cfg
    if epoch >= cfg.epochs or (cfg.patience and session.state.stale_epochs >= cfg.patience):
        return None
    return _epoch_batches(session, epoch)


def _epoch_batches(session: FitSession, epoch: int) -> Iterator:
    """An iterator over `epoch`'s training batches (its shuffle), which starts the loader's work."""
    session.data.train_sampler.set_epoch(epoch)
    return iter(session.train_loader)


def _end_epoch(session: FitSession, epoch: int, meter: Meter, seconds: float, threads: int) -> dict[str, Any]:
    """Validate, count the epoch in the state, log it; returns its history record."""
    device = session.rt.device
    train = meter.reduced(device).summary()
    valid, _ = evaluate(session.step_model, session.valid_loader, session.tr.ctx, len(session.data.class_folders))
    ips = train["images"] / max(seconds, 1e-9)
    improved = session.state.record(epoch, valid["acc1"], session.tr.net, valid["loss"])
    record = {
        "epoch": epoch,
        "train_loss": train["loss"],
        "train_acc1": train["acc1"],
        "valid_loss": valid["loss"],
        "valid_acc1": valid["acc1"],
        "valid_acc5": valid["acc5"],
        **group_lrs(session.tr.optimizer),
        "images_per_second": ips,
        "seconds": seconds,
        "threads": threads,  # torch's intra-op threads from here on: a resumed run keeps them
        "images_per_rank": ddp.gather_counts(meter.count, device),
    }
    session.state.history.append(record)
    session.report.log(
        f"epoch {epoch}/{session.cfg.epochs}: train loss {train['loss']:.4f} acc {train['acc1']:.3f} | "
        f"valid loss {valid['loss']:.4f} acc {valid['acc1']:.3f} top5 {valid['acc5']:.3f} | "
        f"{ips:.0f} img/s{'  (best)' if improved else ''}"
    )
    return record


def _test(session: FitSession, setup_and_train_seconds: float) -> FitResult:
    """Phase 6: test the best epoch once (while the last epoch's files are still being written),
    write model.pth (with the metrics) and metrics.json."""
    cfg, rt, data, state = session.cfg, session.rt, session.data, session.state
    if state.best_model is None:
        raise ResumeError("no epoch finished, so there is no model to test")
    t0 = time.perf_counter()
    session.tr.net.load_state_dict(state.best_model)
    test, confusion = evaluate(session.tr.model, data.eval_split("test"), session.tr.ctx, len(data.class_folders))
    session.saver.wait()  # the last epoch's files are on disk, and model.pth below replaces theirs
    best = next((h for h in state.history if h["epoch"] == state.best_epoch), {})
    trained = state.history
    seconds = sum(h["seconds"] for h in trained)
    metrics = {
        "best_epoch": state.best_epoch,
        "valid_acc1": state.best_acc,
        "valid_acc5": best.get("valid_acc5"),
        "test_acc1": test["acc1"],
        "test_acc5": test["acc5"],
        "test_loss": test["loss"],
        "test_images": test["images"],
        "epochs_run": len(state.history),
        "stopped_early": len(state.history) < cfg.epochs,
        "wall_seconds": setup_and_train_seconds + time.perf_counter() - t0,
        "images_per_second": (sum(sum(h["images_per_rank"]) for h in trained) / seconds) if seconds else None,
        "world_size": rt.env.world_size,
        "global_batch": cfg.batch_size * rt.env.world_size,
    }
    session.saver.save_model(state.best_model, metrics)  # rank 0
    if rt.env.is_main:
        atomic_write_json(session.output / METRICS_FILE, {**metrics, "history": state.history})
        writer = session.writer.log_test(test, state.best_epoch)  # and the HParams tab's "success"
        try:  # a picture that cannot be drawn costs the picture, not the finished run
            missing = log_confusion(writer, confusion, data.class_names, step=state.best_epoch)
        except Exception as exc:
            missing = f"the confusion matrix was not drawn ({first_line(exc)}); model.pth and metrics.json are whole"
        if missing:
            session.report.log(f"note: {missing}")
    ddp.barrier()
    return FitResult(session.output, session.output / MODEL_FILE, session.logdir, metrics, state.history)
