"""`ec2train bench`: what bounds a training run, the input pipeline or the training step?

Measurements with fit's own parts: the real training step alone on synthetic tensors already on
the device (with the AMP policy, channels_last, GradScaler), and for each loader (cpu: the
workers decode and transform; gpu: the workers read files, the device decodes and transforms)
the loader alone (images/s up to the step's input) and loader and step together. The slower of
the step and the loader fit uses bounds the run; the advice says what to change.
"""

from __future__ import annotations

import itertools
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image

from ec2train import ddp
from ec2train.arch_sizes import check_image_size
from ec2train.config import TrainConfig
from ec2train.data import TrainSampler, make_loader, require_dataset, scan_split, train_dataset
from ec2train.data.gpu import device_decode_problem, select_loader
from ec2train.errors import UserError
from ec2train.loop import make_runtime, make_trainer, set_train_mode, train_one_epoch
from ec2train.preprocess import IMAGENET_MEAN, IMAGENET_STD, resize_size
from ec2train.threads import available_cpus


@dataclass
class LoaderRates:
    pipeline_ips: float  # the loader alone, batches up to the step's input on the device
    end_to_end_ips: float  # loader + step, as fit runs them


@dataclass
class BenchResult:
    device: str
    amp: str
    arch: str
    batch_size: int
    image_size: int
    workers: int
    frozen: bool
    step_ips: float  # the training step alone (synthetic tensors on the device)
    loaders: dict[str, LoaderRates]  # "cpu" (workers decode), "gpu" (the device decodes): those measured
    loader: str  # the one fit would use here with --loader auto, if measured (else the first)
    loader_why: str  # hw.choose_loader's reason
    median_short_side: int  # of the training images, in pixels
    bound: str = ""  # "input pipeline" | "training step", with `loader`
    advice: list[str] = field(default_factory=list)

    @property
    def pipeline_ips(self) -> float:
        return self.loaders[self.loader].pipeline_ips

    @property
    def end_to_end_ips(self) -> float:
        return self.loaders[self.loader].end_to_end_ips


def verdict(
    pipeline_ips: float,
    step_ips: float,
    end_to_end_ips: float,
    *,
    device_type: str,
    amp: str,
    channels_last: bool,
    frozen: bool,
    workers: int,
    cpus: int,
    median_short_side: int,
    image_size: int,
    gpu_loader_ips: float | None = None,
) -> tuple[str, list[str]]:
    """Which side bounds the run (the rates are the CPU loader's, or the loader fit uses), and
    what to do about it, in order of payoff. gpu_loader_ips: the GPU loader's pipeline rate,
    when the others are the CPU loader's. Pure."""
    advice: list[str] = []
    if pipeline_ips < step_ips:
        bound = "input pipeline"
        if frozen:
            advice.append(
                "--cache-features: the backbone is frozen, so its features can be computed once; the epochs then "
                "skip decoding and the backbone entirely (augmentation is off in that mode)"
            )
        if gpu_loader_ips is not None and gpu_loader_ips > 1.2 * pipeline_ips:
            advice.append(
                f"--loader gpu: the GPU decodes and augments the JPEGs ({gpu_loader_ips:.0f} img/s here against "
                f"{pipeline_ips:.0f} from the loader workers)"
            )
        if median_short_side >= 2 * resize_size(image_size):
            size = resize_size(image_size)
            advice.append(
                f"`ec2train data prepare DATA DATA-{size} --size {size}` once, then `fit --data DATA-{size}`: the images' "
                f"short side is about {median_short_side} px, and most of every decode is thrown away at {image_size} px"
            )
        if workers < max(0, cpus - 1):
            advice.append(
                f"more loader workers: --workers {cpus - 1} (now {workers}; this process can use {cpus} CPUs)"
            )
        advice.append("an instance with more vCPUs per GPU (e.g. g5.2xlarge: 8 vCPUs) if the above is not enough")
    else:
        bound = "training step"
        if device_type == "cpu":
            advice.append("the step runs on the CPU: train on a GPU instance (g4dn/g5) with --device auto")
        else:
            if amp == "off":
                advice.append("--amp auto: bf16 on A10G (g5) and newer, fp16 with loss scaling on T4 (g4dn)")
            if not channels_last:
                advice.append("--channels-last: tensor-core convolutions want NHWC")
            advice.append("--compile: torch.compile fuses kernels (minutes of compile time; pays off on long runs)")
        if frozen:
            advice.append(
                "--cache-features: with a frozen backbone, its forward pass runs once per image instead of every epoch"
            )
        advice.append("a smaller --arch or --image-size, or more GPUs (`fit --nproc-per-node auto`)")
    if end_to_end_ips < 0.7 * min(pipeline_ips, step_ips):
        advice.append(
            f"end to end ({end_to_end_ips:.0f} img/s) is well below both parts: the loader workers and the step compete "
            "for the same CPU cores; try fewer --workers or a GPU"
        )
    return bound, advice


def median_short_side(samples, limit: int = 200) -> int:
    """Median short side of (up to `limit`, evenly spread) images, reading headers only."""
    step = max(1, len(samples) // limit)
    sides = []
    for path, _ in samples[::step][:limit]:
        try:
            with Image.open(path) as img:
                sides.append(min(img.size))
        except OSError:
            continue
    return int(statistics.median(sides)) if sides else 0


def _batches(loader, sampler: TrainSampler) -> Iterator:
    """Batches forever, a new epoch's order each pass (small data sets still time `steps` batches)."""
    for epoch in itertools.count():
        sampler.set_epoch(epoch)
        yield from loader


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize(torch.device(device))


# Long with the formatter's one-argument-per-line calls; each timing is a named helper below.
def bench(
    data: str | Path,
    arch: str = "resnet50",
    batch_size: int = 32,
    workers: int = -1,
    device: str = "auto",
    image_size: int = 224,
    steps: int = 20,
    amp: str = "auto",
    frozen: bool = True,
    channels_last: bool = True,
    threads: int = 0,
    log: Callable[[str], None] = lambda _msg: None,
    loaders: tuple[str, ...] = ("cpu", "gpu"),
) -> BenchResult:
    """Images/s of fit's input pipeline with each of `loaders` (cpu: the workers decode; gpu: the
    device decodes), the training step, and both together, on DATA's train split."""
    if steps < 1 or batch_size < 1:
        raise UserError("--steps and --batch-size must be at least 1")
    if not 16 <= image_size <= 1024:
        raise UserError(f"--image-size {image_size}: must be between 16 and 1024 pixels")
    check_image_size(arch, image_size)  # random weights, as fit builds with --weights none
    if not loaders or any(kind not in ("cpu", "gpu") for kind in loaders):
        raise UserError(f"--loader {','.join(loaders)}: must be cpu, gpu or both")
    # fit's own phases (device, loaders, model and optimizer), one process, constant lr.
    rt = make_runtime(device, amp, workers, threads=threads, env=ddp.DistEnv())
    dev, device_type, policy, workers = rt.device, rt.device_type, rt.amp, rt.workers
    classes = require_dataset(data, ("train",))
    _, samples = scan_split(data, "train", classes)
    cpus = available_cpus()
    log(rt.threads.describe())  # as fit would run
    auto = select_loader("auto", dev, [p for p, _ in samples], cpus)
    loaders = _decodable(loaders, dev, log)
    tr = _trainer(rt, arch, len(classes), frozen, channels_last)

    # The step is timed first, before loader workers exist, so they do not compete with it for the CPU.
    log(f"training step: {arch} on {dev}, amp {policy.name}, synthetic batches")
    step_ips = _time_step(tr, len(classes), batch_size, image_size, steps)
    rates = {}
    for kind in loaders:  # one loader's workers at a time
        dataset = train_dataset(samples, image_size, True, on_device=kind == "gpu")
        sampler = TrainSampler(len(dataset))
        loader = make_loader(dataset, sampler, batch_size, workers, rt.pin_memory)
        log(f"{kind} loader: {workers} workers, {steps} batches of {batch_size}, alone and then with the step")
        pipeline_ips = _time_pipeline(tr.ctx, loader, sampler, steps)
        rates[kind] = LoaderRates(pipeline_ips, _time_end_to_end(tr, loader, sampler, steps))
        del loader  # stop the workers

    short = median_short_side(samples)
    used = auto.kind if auto.kind in rates else loaders[0]
    bound, advice = verdict(
        rates[used].pipeline_ips,
        step_ips,
        rates[used].end_to_end_ips,
        device_type=device_type,
        amp=policy.name,
        channels_last=tr.ctx.channels_last,
        frozen=frozen,
        workers=workers,
        cpus=cpus,
        median_short_side=short,
        image_size=image_size,
        gpu_loader_ips=rates["gpu"].pipeline_ips if used == "cpu" and "gpu" in rates else None,
    )
    return BenchResult(
        dev,
        policy.name,
        arch,
        batch_size,
        image_size,
        workers,
        frozen,
        step_ips,
        rates,
        used,
        auto.why,
        short,
        bound,
        advice,
    )


def _decodable(loaders: tuple[str, ...], device: str, log: Callable[[str], None]) -> tuple[str, ...]:
    """The loaders to time: without the GPU loader where torchvision cannot decode JPEGs on the
    device (a one-line error when it is the only one asked for)."""
    if "gpu" not in loaders or not (problem := device_decode_problem(device)):
        return loaders
    if loaders == ("gpu",):
        raise UserError(f"--loader gpu: torchvision cannot decode JPEGs on {device} ({problem})")
    log(f"gpu loader left out: torchvision cannot decode JPEGs on {device} ({problem})")
    return tuple(kind for kind in loaders if kind != "gpu")


def _trainer(rt, arch: str, num_classes: int, frozen: bool, channels_last: bool):
    """fit's model and optimizer (random weights: speed does not depend on them), constant lr."""
    cfg = TrainConfig(arch=arch, weights="none", freeze_backbone=frozen, channels_last=channels_last)
    tr = make_trainer(rt, cfg, num_classes, lambda _step: 1.0, (IMAGENET_MEAN, IMAGENET_STD))
    set_train_mode(tr.net, tr.head, frozen)
    return tr


def _time_step(tr, num_classes: int, batch_size: int, image_size: int, steps: int) -> float:
    """Images/s of the training step alone, on one synthetic batch already on the device (uint8
    pixels, as the loader gives them: the step normalizes them, as in fit)."""
    dev = tr.ctx.device
    x = torch.randint(0, 256, (batch_size, 3, image_size, image_size), dtype=torch.uint8, device=dev)
    y = torch.randint(0, num_classes, (batch_size,), device=dev)
    train_one_epoch(tr.net, [(x, y)] * 2, tr.optimizer, tr.scheduler, tr.ctx)  # warm-up
    _sync(dev)
    t0 = time.perf_counter()
    train_one_epoch(tr.net, [(x, y)] * steps, tr.optimizer, tr.scheduler, tr.ctx)
    _sync(dev)
    return steps * batch_size / (time.perf_counter() - t0)


def _time_pipeline(ctx, loader, sampler: TrainSampler, steps: int) -> float:
    """Images/s the loader delivers with no training step to feed, up to the step's input:
    batches on the device, normalized (the GPU loader's decoded and transformed there first)."""
    batches = _batches(loader, sampler)
    ctx.to_device(*next(batches))  # worker start-up (and the device decoder's) is not throughput
    _sync(ctx.device)
    t0 = time.perf_counter()
    n = 0
    for images, labels in itertools.islice(batches, steps):
        ctx.to_device(images, labels)
        n += len(labels)
    _sync(ctx.device)
    return n / (time.perf_counter() - t0)


def _time_end_to_end(tr, loader, sampler: TrainSampler, steps: int) -> float:
    """Images/s of loader + step together, as fit runs them (a new pass: nothing prefetched)."""
    batches = _batches(loader, sampler)
    next(batches)
    t0 = time.perf_counter()
    meter, _ = train_one_epoch(tr.net, itertools.islice(batches, steps), tr.optimizer, tr.scheduler, tr.ctx)
    _sync(tr.ctx.device)
    return meter.count / (time.perf_counter() - t0)
