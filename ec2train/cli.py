"""The `ec2train` command: thin; parses options, calls library functions, prints with rich."""

from __future__ import annotations

import json
import os
import sys
from enum import Enum
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console
from rich.table import Table

app = typer.Typer(
    help="Train image classifiers on EC2 GPU boxes in plain PyTorch, and ship them to a secure endpoint.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)
data_app = typer.Typer(help="Create, fetch and check data sets in the dogImages layout.", no_args_is_help=True)
app.add_typer(data_app, name="data")

console = Console(soft_wrap=True)
err_console = Console(stderr=True, soft_wrap=True)


class Amp(str, Enum):
    auto = "auto"
    fp16 = "fp16"
    bf16 = "bf16"
    off = "off"


class Device(str, Enum):
    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"


class Optim(str, Enum):
    adamw = "adamw"
    sgd = "sgd"


class SpotWatch(str, Enum):
    auto = "auto"
    on = "on"
    off = "off"


def _val(x):
    return x.value if isinstance(x, Enum) else x


# ---------------------------------------------------------------- fit

@app.command(context_settings={"allow_extra_args": False})
def fit(
    data: Optional[str] = typer.Option(None, help="Data set root with train/ valid/ test/ class folders. \\[default: dogImages]"),
    epochs: Optional[int] = typer.Option(None, help="Epochs to train. \\[default: 5]"),
    batch_size: Optional[int] = typer.Option(None, help="Images per step per process (global batch = this x processes). \\[default: 32]"),
    lr: Optional[float] = typer.Option(None, help="Peak learning rate of the head (cosine decay after warm-up). \\[default: 1e-3]"),
    scale_lr: Optional[bool] = typer.Option(None, "--scale-lr/--no-scale-lr", help="Multiply --lr by the number of processes (linear scaling rule). \\[default: off]"),
    weight_decay: Optional[float] = typer.Option(None, help="Decoupled weight decay (not on biases/norms). \\[default: 1e-4]"),
    optimizer: Optional[Optim] = typer.Option(None, help="Optimizer. \\[default: adamw]"),
    label_smoothing: Optional[float] = typer.Option(None, help="Label smoothing. \\[default: 0.1]"),
    warmup_epochs: Optional[int] = typer.Option(None, help="Linear warm-up epochs before cosine decay. \\[default: 0]"),
    patience: Optional[int] = typer.Option(None, help="Stop after this many epochs without a better valid accuracy; 0 = never. \\[default: 0]"),
    arch: Optional[str] = typer.Option(None, help="Any torchvision classification model (`ec2train archs`). \\[default: resnet50]"),
    weights: Optional[str] = typer.Option(None, help="imagenet | none | PATH to a .pth file. \\[default: imagenet]"),
    freeze_backbone: Optional[bool] = typer.Option(None, "--freeze-backbone/--no-freeze-backbone", help="Train the head only. \\[default: frozen with pretrained weights, else full training]"),
    backbone_lr_scale: Optional[float] = typer.Option(None, help="Backbone lr = lr x this when fine-tuning everything. \\[default: 0.1]"),
    image_size: Optional[int] = typer.Option(None, help="Crop size in pixels. \\[default: 224]"),
    augment: Optional[bool] = typer.Option(None, "--augment/--no-augment", help="Random resized crop + flip for training. \\[default: on]"),
    workers: Optional[int] = typer.Option(None, help="Data loader workers per process; -1 = from the CPUs. \\[default: -1]"),
    seed: Optional[int] = typer.Option(None, help="Random seed (same seed, same result on the same hardware). \\[default: 0]"),
    amp: Optional[Amp] = typer.Option(None, help="Mixed precision: auto = bf16 on A10G+, fp16 on T4, off on CPU. \\[default: auto]"),
    device: Optional[Device] = typer.Option(None, help="auto picks the GPU of this process when there is one. \\[default: auto]"),
    channels_last: Optional[bool] = typer.Option(None, "--channels-last/--no-channels-last", help="NHWC memory format on GPUs. \\[default: on]"),
    compile: Optional[bool] = typer.Option(None, "--compile/--no-compile", help="torch.compile the model. \\[default: off]"),
    sync_bn: Optional[bool] = typer.Option(None, "--sync-bn/--no-sync-bn", help="SyncBatchNorm across processes, for small per-GPU batches (CUDA only). \\[default: off]"),
    cache_features: Optional[bool] = typer.Option(None, "--cache-features/--no-cache-features", help="With a frozen backbone: compute its features once (eval transform) and train the head from them; augmentation is off in this mode. \\[default: off]"),
    output: Optional[str] = typer.Option(None, help="Folder for model.pth, last.pt, metrics.json, config.toml. \\[default: TrainedModels]"),
    logdir: Optional[str] = typer.Option(None, help="TensorBoard log folder. \\[default: runs]"),
    resume: Optional[str] = typer.Option(None, help="auto (the checkpoint in --output, else under --s3-uri, if any) | never | PATH | s3://bucket/prefix/last.pt. \\[default: auto under torchrun, else never]"),
    s3_uri: Optional[str] = typer.Option(None, help="s3://bucket/prefix: upload model.pth, last.pt, config.toml, metrics.json and TensorBoard logs there every epoch and at exit (encrypted, verified)."),
    kms_key: Optional[str] = typer.Option(None, help="KMS key id/ARN/alias: SSE-KMS for --s3-uri uploads (default: SSE-S3, AES256)."),
    spot_watch: SpotWatch = typer.Option(SpotWatch.auto, help="Watch for spot interruption notices (IMDSv2): auto = when an instance metadata service answers."),
    spot_poll_seconds: float = typer.Option(5.0, help="Seconds between spot notice polls (the notice comes 2 minutes ahead)."),
    config: Optional[Path] = typer.Option(None, help="TOML file of settings (keys as above with underscores); options given here override it."),
    nproc_per_node: Optional[str] = typer.Option(None, help="auto|N: start torchrun with N processes on this box (auto: one per GPU)."),
):
    """Train on train/, pick the best epoch on valid/, test it once on test/, export model.pth.

    Exit status: 0 done; 2 bad input or settings (one line says what to fix); 75 stopped by a spot interruption notice: the last completed epoch's checkpoint is saved (and in S3 with --s3-uri), run the same command with --resume auto to continue; 130 Ctrl-C.
    """
    if nproc_per_node is not None:
        _launch_torchrun(nproc_per_node)
        return
    from ec2train.config import resolve
    from ec2train.spot import interrupted_exit_status, safe_fit

    cfg = resolve(
        config,
        data=data, epochs=epochs, batch_size=batch_size, lr=lr, scale_lr=scale_lr, weight_decay=weight_decay,
        optimizer=_val(optimizer), label_smoothing=label_smoothing, warmup_epochs=warmup_epochs, patience=patience,
        arch=arch, weights=weights, freeze_backbone=freeze_backbone, backbone_lr_scale=backbone_lr_scale,
        image_size=image_size, augment=augment, workers=workers, seed=seed, amp=_val(amp), device=_val(device),
        channels_last=channels_last, compile=compile, sync_bn=sync_bn, output=output, logdir=logdir, resume=resume,
        s3_uri=s3_uri, kms_key=kms_key, cache_features=cache_features,
    )
    result = safe_fit(cfg, console=console, spot_watch=_val(spot_watch), spot_poll_seconds=spot_poll_seconds)
    from ec2train import ddp

    if result.interrupted:
        raise typer.Exit(interrupted_exit_status())
    if ddp.env_from().is_main:
        _print_fit_summary(result)


def _launch_torchrun(nproc_value: str) -> None:
    import subprocess

    import torch

    from ec2train import ddp
    from ec2train.data import available_cpus

    if ddp.under_torchrun():
        raise typer.BadParameter("--nproc-per-node is for starting torchrun; this process already runs under it")
    n = ddp.resolve_nproc(nproc_value, torch.cuda.device_count() if torch.cuda.is_available() else 0)
    argv = _ARGV or sys.argv[1:]
    args = ddp.strip_option(argv[argv.index("fit") + 1 :], "--nproc-per-node")
    cmd = ddp.torchrun_command(sys.executable, n, args)
    env = dict(os.environ)
    # torchrun would set 1 thread per process; share this box's cores instead (matters on CPU).
    env.setdefault("OMP_NUM_THREADS", str(ddp.threads_per_process(available_cpus(), n)))
    console.print(f"[dim]$ OMP_NUM_THREADS={env['OMP_NUM_THREADS']} {' '.join(cmd)}[/dim]", soft_wrap=True)
    raise typer.Exit(subprocess.call(cmd, env=env))


def _print_fit_summary(result) -> None:
    m = result.metrics
    table = Table(title="ec2train fit: done", show_header=False)
    table.add_row("best epoch", f"{m['best_epoch']} of {m['epochs_run']}" + (" (early stop)" if m["stopped_early"] else ""))
    table.add_row("valid accuracy", f"{m['valid_acc1']:.4f} (top-5 {m['valid_acc5']:.4f})")
    table.add_row("test accuracy", f"{m['test_acc1']:.4f} (top-5 {m['test_acc5']:.4f}) on {m['test_images']} images")
    table.add_row("throughput", f"{m['images_per_second']:.0f} img/s, wall {m['wall_seconds']:.0f} s")
    table.add_row("model", str(result.model_path))
    table.add_row("metrics", str(result.output / "metrics.json"))
    table.add_row("TensorBoard", f"tensorboard --logdir {result.logdir.parent}  (over SSH: ssh -L 6006:localhost:6006 ...)")
    console.print(table)


# ---------------------------------------------------------------- evaluate / predict / archs

@app.command()
def evaluate(
    model: Path = typer.Option(Path("TrainedModels/model.pth"), help="Model file written by `ec2train fit`."),
    data: str = typer.Option("dogImages", help="Data set root."),
    split: str = typer.Option("test", help="train | valid | test."),
    batch_size: int = typer.Option(64, min=1),
    workers: int = typer.Option(0, min=0),
    device: Device = typer.Option(Device.auto),
    out: Optional[Path] = typer.Option(None, help="Folder for evaluation.json, confusion.csv and confusion.png. \\[default: beside the model]"),
):
    """Top-1, top-5 and per-class accuracy, and a confusion matrix (PNG and CSV)."""
    from ec2train.export import atomic_write_json, atomic_write_text, write_confusion_png
    from ec2train.loop import evaluate_model_file

    import torch

    res = evaluate_model_file(model, data, split, batch_size, workers, _val(device))
    out = out or model.parent
    names = res["class_names"]
    atomic_write_json(out / f"evaluation-{split}.json", {k: v for k, v in res.items() if k != "confusion"})
    csv = "true\\predicted," + ",".join(json.dumps(n) for n in names) + "\n"
    csv += "".join(json.dumps(n) + "," + ",".join(map(str, row)) + "\n" for n, row in zip(names, res["confusion"]))
    atomic_write_text(out / f"confusion-{split}.csv", csv)
    write_confusion_png(out / f"confusion-{split}.png", torch.tensor(res["confusion"], dtype=torch.float64), names)
    table = Table(title=f"{split}: top-1 {res['acc1']:.4f}, top-5 {res['acc5']:.4f}, {res['images']} images")
    table.add_column("class")
    table.add_column("accuracy", justify="right")
    for name, acc in sorted(res["per_class_acc1"].items(), key=lambda kv: (kv[1] is None, kv[1])):
        table.add_row(name, "n/a" if acc is None else f"{acc:.3f}")
    console.print(table)
    console.print(f"wrote {out / f'evaluation-{split}.json'}, confusion-{split}.csv and confusion-{split}.png")


@app.command()
def predict(
    images: List[Path] = typer.Argument(..., help="Image files (JPEG, PNG, ...)."),
    model: Path = typer.Option(Path("TrainedModels/model.pth"), help="Model file written by `ec2train fit`."),
    top_k: int = typer.Option(5, min=1, help="How many classes to show per image."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
):
    """Class names with probabilities for each image."""
    from ec2train.infer import Predictor
    from ec2train.preprocess import ImageDecodeError

    for p in images:
        if not p.is_file():
            raise typer.BadParameter(f"no such image file: {p}", param_hint="IMAGES")
    predictor = Predictor(model)
    results = []
    for p in images:
        try:
            results.append({"image": str(p), "predictions": predictor.predict([p], top_k)[0]})
        except ImageDecodeError as exc:
            raise ImageDecodeError(f"{p}: {exc}") from None
    if as_json:
        print(json.dumps(results if len(results) > 1 else results[0], indent=2))
        return
    for r in results:
        table = Table(title=r["image"])
        table.add_column("class")
        table.add_column("probability", justify="right")
        for pred in r["predictions"]:
            table.add_row(pred["label"], f"{pred['probability']:.4f}")
        console.print(table)


@app.command()
def archs():
    """List the torchvision architectures --arch accepts."""
    from ec2train.model import classification_archs

    console.print(" ".join(classification_archs()))


# ---------------------------------------------------------------- tune

@app.command()
def tune(
    data: Optional[str] = typer.Option(None, help="Data set root with train/ valid/ test/ class folders. \\[default: dogImages]"),
    trials: int = typer.Option(20, help="Trials the study should hold in all (a resumed study counts its earlier ones)."),
    timeout: Optional[str] = typer.Option(None, help="Start no new trial after this long: 90s, 30m, 2h, 1h30m (running ones finish)."),
    study: str = typer.Option("ec2train", help="Study name; run the same command again to continue it."),
    storage: Optional[str] = typer.Option(None, help="Optuna database URL, e.g. sqlite:///tune.db. \\[default: sqlite file in --output]"),
    space: Optional[Path] = typer.Option(None, help="TOML file of search ranges (\\[lr] low=1e-4 high=1e-1 log=true ...). \\[default: lr, batch size, weight decay, label smoothing]"),
    epochs: Optional[int] = typer.Option(None, help="Epochs per trial (and in best.toml). \\[default: from --config, else 5]"),
    output: Optional[Path] = typer.Option(None, help="Folder for trial-N/ folders, study.db and best.toml. \\[default: tune/STUDY]"),
    parallel: Optional[int] = typer.Option(None, help="Trials at a time, each in its own process. \\[default: one per GPU, one on the CPU]"),
    then_fit: bool = typer.Option(False, "--then-fit", help="Train the final model with best.toml when the search ends."),
    prune: bool = typer.Option(True, "--prune/--no-prune", help="Stop trials whose valid accuracy is below the median of finished ones at the same epoch."),
    prune_startup_trials: Optional[int] = typer.Option(None, help="Finished trials before pruning starts. \\[default: trials/4, at most 5]"),
    prune_warmup_epochs: int = typer.Option(1, help="Epochs every trial runs before it may be pruned."),
    config: Optional[Path] = typer.Option(None, help="TOML file of the fixed fit settings (as `fit --config`); its output/logdir get the final model."),
    arch: Optional[str] = typer.Option(None, help="Architecture (fixed for the study). \\[default: resnet50]"),
    weights: Optional[str] = typer.Option(None, help="imagenet | none | PATH. \\[default: imagenet]"),
    freeze_backbone: Optional[bool] = typer.Option(None, "--freeze-backbone/--no-freeze-backbone", help="Train the head only. \\[default: frozen with pretrained weights]"),
    image_size: Optional[int] = typer.Option(None, help="Crop size in pixels. \\[default: 224]"),
    optimizer: Optional[Optim] = typer.Option(None, help="Optimizer. \\[default: adamw]"),
    workers: Optional[int] = typer.Option(None, help="Data loader workers per trial; -1 = share the CPUs. \\[default: -1]"),
    device: Optional[Device] = typer.Option(None, help="auto | cpu | cuda. \\[default: auto]"),
    amp: Optional[Amp] = typer.Option(None, help="Mixed precision. \\[default: auto]"),
    seed: Optional[int] = typer.Option(None, help="Seed of every trial's training and of the sampler. \\[default: 0]"),
    logdir: Optional[str] = typer.Option(None, help="TensorBoard folder; trials go to LOGDIR/tune-STUDY/. \\[default: runs]"),
):
    """Search learning rate, batch size, weight decay and label smoothing with Optuna; prune hopeless trials."""
    from ec2train.config import resolve
    from ec2train.tune import _optuna, parse_duration, tune as run_tune

    seconds = parse_duration(timeout) if timeout is not None else None
    base = resolve(
        config, data=data, epochs=epochs, arch=arch, weights=weights, freeze_backbone=freeze_backbone,
        image_size=image_size, optimizer=_val(optimizer), workers=workers, device=_val(device), amp=_val(amp),
        seed=seed, logdir=logdir,
    )
    optuna = _optuna()
    optuna.logging.set_verbosity(optuna.logging.ERROR)  # our own one line per trial event instead
    try:
        result = run_tune(
            base, trials=trials, timeout=seconds, study_name=study, storage=storage, space=space, output=output,
            parallel=parallel, prune=prune, prune_startup_trials=prune_startup_trials,
            prune_warmup_epochs=prune_warmup_epochs, then_fit=then_fit, console=console,
        )
    except KeyboardInterrupt:
        err_console.print("interrupted; the finished trials are saved: run the same command again to continue the study")
        raise typer.Exit(130)
    _print_tune_table(result)
    if result.best_file is None:
        from ec2train.tune import TuneError

        errors = [r["error"] for r in result.rows if r["error"]]
        raise TuneError(f"no trial completed{f' (first error: {errors[0]})' if errors else ''}; fix it and run the same command again")
    console.print(
        f"best: trial {result.best_number}, valid acc {result.best_value:.4f}; settings in {result.best_file}\n"
        f"train with them: ec2train fit --config {result.best_file}   (all GPUs: add --nproc-per-node auto)\n"
        f"compare trials: tensorboard --logdir {result.tb_root}   (HParams tab)"
    )
    if result.final is not None:
        _print_fit_summary(result.final)


def _print_tune_table(result) -> None:
    from rich.markup import escape

    colour = {"COMPLETE": "green", "PRUNED": "yellow", "FAIL": "red", "RUNNING": "cyan", "WAITING": "dim"}
    counts = {s: sum(r["state"] == s for r in result.rows) for s in ("COMPLETE", "PRUNED", "FAIL")}
    table = Table(title=f"study {result.study.study_name}: {len(result.rows)} trials, "
                  f"{counts['COMPLETE']} complete, {counts['PRUNED']} pruned, {counts['FAIL']} failed")
    for col, justify in (("trial", "right"), ("state", "left"), ("valid acc", "right"), ("epochs", "right"), ("params", "left")):
        table.add_column(col, justify=justify)
    for r in sorted(result.rows, key=lambda r: r["number"]):
        params = ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in r["params"].items())
        note = f" [red]{escape(r['error'])}[/red]" if r["error"] else ""
        mark = " *" if r["number"] == result.best_number else ""
        acc = "-" if r["valid_acc1"] is None else f"{r['valid_acc1']:.4f}{mark}"
        table.add_row(str(r["number"]), f"[{colour.get(r['state'], 'white')}]{r['state']}[/]", acc, str(r["epochs"]), params + note)
    console.print(table)
# ---------------------------------------------------------------- serve / export

@app.command()
def serve(
    model: Path = typer.Option(Path("TrainedModels/model.pth"), help="Model file written by `ec2train fit`."),
    host: str = typer.Option("127.0.0.1", help="Address to listen on (0.0.0.0 exposes it to the network)."),
    port: int = typer.Option(8080, min=1, max=65535),
    max_batch: int = typer.Option(8, min=1, help="Most requests grouped into one forward pass; 1 turns batching off."),
    max_wait_ms: float = typer.Option(5.0, min=0, help="How long a batch may wait for requests still being decoded."),
    workers: int = typer.Option(1, min=1, help="Server processes (each loads the model and batches on its own)."),
    threads: Optional[int] = typer.Option(None, min=1, help="Torch CPU threads per process. [default: torch's choice]"),
    log_level: str = typer.Option("info", help="uvicorn log level: warning hides the access log."),
):
    """Serve a model over HTTP like the SageMaker endpoint: GET /ping, POST /invocations."""
    from ec2train.server import run

    run(model, host=host, port=port, max_batch=max_batch, max_wait_ms=max_wait_ms, workers=workers, threads=threads, log_level=log_level)


@app.command()
def export(
    model: Path = typer.Option(Path("TrainedModels/model.pth"), help="Model file written by `ec2train fit`."),
    package: Optional[Path] = typer.Option(None, help="Write the SageMaker model package here (e.g. model.tar.gz)."),
    s3_uri: Optional[str] = typer.Option(None, help="Upload to s3://bucket/prefix (prefix/model.pth, or prefix/<package name> with --package) or to s3://bucket/key."),
    kms_key: Optional[str] = typer.Option(None, help="KMS key id/ARN/alias for SSE-KMS. \\[default: SSE-S3, AES256]"),
):
    """Build model.tar.gz for SageMaker (model.pth + code/inference.py) and/or upload to S3, encrypted and verified."""
    from ec2train.errors import UserError

    if package is None and s3_uri is None:
        raise UserError("export needs --package model.tar.gz, --s3-uri s3://bucket/prefix, or both")
    if package is not None:
        from ec2train.export import package_model

        path = package_model(model, package)
        console.print(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB): model.pth, code/inference.py, code/ec2train/")
    if s3_uri is not None:
        from ec2train import s3

        if package is None:
            uri = s3.export_to_s3(model, s3_uri, kms_key)
        else:
            target = s3.parse_uri(s3_uri)
            target = target if target.key.endswith((".tar.gz", ".tgz")) else target.child(package.name)
            uri = s3.upload_file(package, target, kms_key)
        console.print(f"uploaded to {uri}")


# ---------------------------------------------------------------- data

@data_app.command("demo")
def data_demo(
    directory: Path = typer.Argument(Path("demo-data"), help="Where to write the data set."),
    classes: int = typer.Option(4, help="Number of classes (2-8)."),
    per_class: int = typer.Option(60, help="Training images per class (valid and test get a quarter each)."),
    size: int = typer.Option(64, help="Image side in pixels."),
    seed: int = typer.Option(0),
    force: bool = typer.Option(False, help="Replace an existing folder."),
):
    """Write a small learnable data set (shapes and colours) in the dogImages layout."""
    from ec2train.data import make_demo_dataset

    root = make_demo_dataset(directory, classes, per_class, size, seed, force=force)
    console.print(f"demo data set ready in {root} ({classes} classes, {per_class} training images each)")


@data_app.command("check")
def data_check(directory: Path = typer.Argument(..., help="Data set root.")):
    """Per-split image and class counts, and every problem found (decodes every image)."""
    from rich.progress import Progress

    from ec2train.data import SPLITS, check_dataset

    total = sum(1 for _ in directory.rglob("*") if _.is_file()) if directory.is_dir() else 0
    with Progress(console=err_console, transient=True) as progress:
        task = progress.add_task("decoding images", total=total)
        report = check_dataset(directory, decode=True, on_image=lambda: progress.advance(task))
    table = Table(title=f"data set {directory}")
    for col in ("split", "classes", "images", "empty classes"):
        table.add_column(col)
    for split in SPLITS:
        sr = report.splits.get(split)
        table.add_row(split, *(("-", "-", "-") if sr is None else (str(sr.classes), str(sr.images), str(len(sr.empty_classes)))))
    console.print(table)
    for problem in report.problems:
        err_console.print(f"[red]problem:[/red] {problem}")
    for bad in report.corrupt:
        err_console.print(f"[red]corrupt image:[/red] {bad}")
    if not report.ok:
        err_console.print(f"[red]{len(report.problems)} problems, {len(report.corrupt)} unreadable images[/red]")
        raise typer.Exit(1)
    console.print("[green]no problems found[/green]")


@data_app.command("fetch")
def data_fetch(
    url: Optional[str] = typer.Option(None, help="https://, file:// or s3://bucket/key of a zip in the dogImages layout, or an s3://bucket/prefix/ folder of train/ valid/ test/. \\[default: the public dogImages.zip]"),
    dest: Path = typer.Option(Path("dogImages"), help="The data set folder to create (train/ valid/ test/ inside)."),
    keep_archive: bool = typer.Option(False, help="Keep the downloaded zip."),
):
    """Download, verify and unpack dogImages (resumes an interrupted download)."""
    from rich.progress import BarColumn, DownloadColumn, Progress, TransferSpeedColumn, TimeRemainingColumn

    from ec2train.data import DOG_IMAGES_URL, fetch_dataset

    with Progress("[progress.description]{task.description}", BarColumn(), DownloadColumn(), TransferSpeedColumn(), TimeRemainingColumn(), console=err_console) as progress:
        task = progress.add_task("download", total=None)
        path = fetch_dataset(url or DOG_IMAGES_URL, dest, progress=lambda done, total: progress.update(task, completed=done, total=total), keep_archive=keep_archive)
    console.print(f"data set ready in {path}; train with: ec2train fit --data {path}")


# ---------------------------------------------------------------- performance: data prepare, bench

@data_app.command("prepare")
def data_prepare(
    src: Path = typer.Argument(..., help="Data set root to copy (e.g. dogImages)."),
    dst: Path = typer.Argument(..., help="New folder for the resized copy (e.g. dogImages-256)."),
    size: int = typer.Option(256, help="Short side of the written images, in pixels (256 suits --image-size 224)."),
    workers: Optional[int] = typer.Option(None, min=1, help="Processes. [default: one per CPU]"),
    quality: int = typer.Option(90, help="JPEG quality (1-95)."),
):
    """Write a resized copy of a data set (same layout; JPEG, short side --size) for fast epochs.

    Parallel over the CPUs; reruns skip finished images, so it is safe to interrupt. Train on
    it with `ec2train fit --data DST`. Images that cannot be decoded are listed; exit code 1.
    """
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from ec2train.prepare import check_arguments, prepare_dataset

    check_arguments(src, dst, size, quality)
    with Progress(TextColumn("resizing"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(), console=err_console) as progress:
        task = progress.add_task("prepare", total=None)
        report = prepare_dataset(
            src, dst, size, workers, quality,
            on_total=lambda n: progress.update(task, total=n),
            on_done=lambda k: progress.advance(task, k),
        )
    console.print(
        f"{dst}: {report.written} images written, {report.skipped} already done, in {report.seconds:.1f} s; "
        f"train with: ec2train fit --data {dst}"
    )
    for bad in report.corrupt:
        err_console.print(f"[red]corrupt image (left out):[/red] {bad}", highlight=False)
    if report.corrupt:
        err_console.print(f"[red]{len(report.corrupt)} source images could not be decoded[/red]")
        raise typer.Exit(1)


@app.command()
def bench(
    data: str = typer.Option("dogImages", help="Data set root (its train/ split is read)."),
    arch: str = typer.Option("resnet50", help="Architecture to time (random weights: speed does not depend on them)."),
    batch_size: int = typer.Option(32, min=1, help="Images per step."),
    workers: int = typer.Option(-1, min=-1, help="Loader workers; -1 = fit's default from the CPUs."),
    device: Device = typer.Option(Device.auto),
    image_size: int = typer.Option(224, help="Crop size in pixels."),
    steps: int = typer.Option(20, min=1, help="Batches timed per measurement."),
    amp: Amp = typer.Option(Amp.auto, help="Mixed precision, as in fit."),
    freeze_backbone: bool = typer.Option(True, "--freeze-backbone/--no-freeze-backbone", help="Time the frozen-backbone step (fit's default with pretrained weights)."),
):
    """Images/s of the input pipeline, the training step and both; says which bounds the run and what to do."""
    from ec2train.perf import bench as run_bench

    r = run_bench(
        data, arch, batch_size, workers, _val(device), image_size, steps, _val(amp), freeze_backbone,
        log=lambda msg: err_console.print(f"[dim]{msg}[/dim]"),
    )
    table = Table(title=f"ec2train bench: {r.arch} on {r.device}, amp {r.amp}, batch {r.batch_size}, {r.image_size} px, {r.workers} workers")
    table.add_column("measurement")
    table.add_column("images/s", justify="right")
    table.add_row("input pipeline alone (decode + transform)", f"{r.pipeline_ips:.1f}")
    table.add_row(f"training step alone ({'frozen backbone' if r.frozen else 'full model'}, synthetic batches)", f"{r.step_ips:.1f}")
    table.add_row("end to end", f"{r.end_to_end_ips:.1f}")
    console.print(table)
    console.print(f"bound by the [bold]{r.bound}[/bold] (training images: median short side {r.median_short_side} px)")
    for line in r.advice:
        console.print(f"  - {line}")


# ---------------------------------------------------------------- deploy (SageMaker endpoint, autoscaling, Lambda)

deploy_app = typer.Typer(
    help="Serve a model.tar.gz on a SageMaker endpoint, autoscale it, put a Lambda in front, and remove it all.",
    no_args_is_help=True,
)
app.add_typer(deploy_app, name="deploy")
from ec2train.job.commands import job_app  # noqa: E402 - issue 16; the lead moves it into ec2train/cli/
app.add_typer(job_app, name="job")

_REGION_HELP = "AWS region. \\[default: from your AWS configuration]"
_DRY_RUN_HELP = "Print every request (service, operation, parameters, policy documents) and send none."


@deploy_app.command("endpoint")
def deploy_endpoint_cmd(
    name: str = typer.Option(..., help="Endpoint name (letters, digits, hyphens; up to 63)."),
    role: str = typer.Option(..., help="ARN of the SageMaker execution role that reads the model from S3."),
    model_data: Optional[str] = typer.Option(None, help="s3://bucket/key/model.tar.gz made by `ec2train export --package`."),
    model: Optional[Path] = typer.Option(None, help="A model.pth to package and upload to --s3-uri first (instead of --model-data)."),
    s3_uri: Optional[str] = typer.Option(None, help="Where --model's package goes: s3://bucket/prefix (model.tar.gz is added)."),
    kms_key: Optional[str] = typer.Option(None, help="KMS key for the --model upload. \\[default: SSE-S3]"),
    instance_type: Optional[str] = typer.Option(None, help="Real-time endpoint on this instance type, e.g. ml.g4dn.xlarge (GPU) or ml.m5.large (CPU)."),
    instance_count: int = typer.Option(1, help="Instances behind a real-time endpoint."),
    serverless: bool = typer.Option(False, "--serverless", help="Serverless endpoint (CPU, billed per request) instead of instances."),
    memory: int = typer.Option(2048, help="Serverless memory in MB: 1024-6144 in steps of 1024."),
    max_concurrency: int = typer.Option(5, help="Serverless concurrent requests (1-200)."),
    image_uri: Optional[str] = typer.Option(None, help="Container image to serve with. \\[default: the AWS PyTorch inference image for the region]"),
    region: Optional[str] = typer.Option(None, help=_REGION_HELP),
    wait: bool = typer.Option(True, "--wait/--no-wait", help="Wait until the endpoint is InService."),
    wait_timeout: int = typer.Option(1800, help="Seconds to wait for InService before giving up (the endpoint keeps starting)."),
    dry_run: bool = typer.Option(False, "--dry-run", help=_DRY_RUN_HELP),
):
    """Create or update a SageMaker endpoint serving a model.tar.gz with the PyTorch inference container."""
    from ec2train.deploy import DeployError, EndpointSpec, deploy_endpoint, package_and_upload

    if (model_data is None) == (model is None):
        raise DeployError("give exactly one of --model-data s3://.../model.tar.gz and --model PATH (with --s3-uri)")
    if model is not None:
        if not s3_uri:
            raise DeployError("--model needs --s3-uri s3://bucket/prefix to upload the package to")
        model_data = package_and_upload(model, s3_uri, kms_key=kms_key, dry_run=dry_run, console=console)
    spec = EndpointSpec(name=name, role_arn=role, model_data=model_data, instance_type=instance_type, instance_count=instance_count,
                        serverless=serverless, memory_mb=memory, max_concurrency=max_concurrency, image_uri=image_uri)
    out = deploy_endpoint(spec, region=region, dry_run=dry_run, wait=wait, wait_timeout=wait_timeout, console=console)
    if dry_run:
        return
    console.print(f"endpoint [bold]{name}[/bold] in {out['region']}: {out['status']} (image {out['image']})", highlight=False, soft_wrap=True)
    if not wait:
        console.print(f"follow it with: ec2train deploy status --name {name}", highlight=False)
    console.print(f"next: ec2train deploy lambda --endpoint {name}", highlight=False)
    console.print(f"[yellow]it bills until you run: ec2train deploy delete --name {name}[/yellow]", highlight=False)


@deploy_app.command("autoscale")
def deploy_autoscale_cmd(
    name: str = typer.Option(..., help="Endpoint name."),
    min_capacity: int = typer.Option(1, "--min", help="Fewest instances."),
    max_capacity: int = typer.Option(4, "--max", help="Most instances."),
    target_invocations: float = typer.Option(70.0, help="Target invocations per instance per minute."),
    scale_in_cooldown: int = typer.Option(300, help="Seconds between scale-ins."),
    scale_out_cooldown: int = typer.Option(60, help="Seconds between scale-outs."),
    region: Optional[str] = typer.Option(None, help=_REGION_HELP),
    dry_run: bool = typer.Option(False, "--dry-run", help=_DRY_RUN_HELP),
):
    """Target-tracking autoscaling on invocations per instance (instance endpoints only)."""
    from ec2train.deploy import autoscale

    autoscale(name, min_capacity=min_capacity, max_capacity=max_capacity, target_invocations=target_invocations,
              scale_in_cooldown=scale_in_cooldown, scale_out_cooldown=scale_out_cooldown, region=region, dry_run=dry_run, console=console)
    if not dry_run:
        console.print(f"endpoint {name} scales between {min_capacity} and {max_capacity} instances at {target_invocations:g} invocations/instance/minute", highlight=False)


@deploy_app.command("lambda")
def deploy_lambda_cmd(
    endpoint: str = typer.Option(..., help="The SageMaker endpoint the function calls (and the only one it may call)."),
    function_name: Optional[str] = typer.Option(None, help="Function name. \\[default: ec2train-ENDPOINT]"),
    reserved_concurrency: int = typer.Option(10, help="Concurrency reserved for (and capping) the function; 0 removes the reservation."),
    provisioned_concurrency: Optional[int] = typer.Option(None, help="Warm instances on the alias (billed per hour); 0 removes them."),
    alias: str = typer.Option("live", help="Alias pointing at the published version; call the function through it."),
    memory: int = typer.Option(256, help="Memory in MB (also scales its CPU)."),
    timeout: int = typer.Option(30, help="Seconds per request (URL fetch + endpoint call)."),
    allow_http: bool = typer.Option(False, "--allow-http", help="Also fetch http:// URLs (https only by default)."),
    max_image_bytes: Optional[int] = typer.Option(None, help="Image size cap. \\[default: the function's 5.5 MB; 3.5 MB for a serverless endpoint]"),
    architecture: str = typer.Option("arm64", help="arm64 (cheaper) or x86_64."),
    log_retention_days: int = typer.Option(30, help="Days its logs are kept."),
    code_dir: Optional[Path] = typer.Option(None, help="Folder with handler.py. \\[default: the repository's lambda/]"),
    account_id: Optional[str] = typer.Option(None, help="Expected AWS account (checked; fills the ARNs of a --dry-run)."),
    region: Optional[str] = typer.Option(None, help=_REGION_HELP),
    dry_run: bool = typer.Option(False, "--dry-run", help=_DRY_RUN_HELP),
):
    """Deploy the Lambda front door with a role that may only invoke this endpoint and write its own logs."""
    from ec2train.deploy import LambdaSpec, default_function_name, deploy_lambda

    spec = LambdaSpec(endpoint=endpoint, function_name=function_name or default_function_name(endpoint), alias=alias, memory_mb=memory,
                      timeout_s=timeout, reserved_concurrency=reserved_concurrency, provisioned_concurrency=provisioned_concurrency,
                      allow_http=allow_http, max_image_bytes=max_image_bytes, architecture=architecture, log_retention_days=log_retention_days)
    out = deploy_lambda(spec, code_dir=code_dir, region=region, account_id=account_id, dry_run=dry_run, console=console)
    if not dry_run:
        console.print(f"function {out['function_arn']} -> version {out['version']} (role {out['role']})", highlight=False)


@deploy_app.command("status")
def deploy_status_cmd(
    name: str = typer.Option(..., help="Endpoint name."),
    lambda_name: Optional[str] = typer.Option(None, help="Function to report on. \\[default: ec2train-NAME]"),
    region: Optional[str] = typer.Option(None, help=_REGION_HELP),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of tables."),
    dry_run: bool = typer.Option(False, "--dry-run", help=_DRY_RUN_HELP),
):
    """Endpoint status, variants and instances, autoscaling, the Lambda, and what is billing."""
    from ec2train.deploy import deployment_status

    st = deployment_status(name, function_name=lambda_name, region=region, dry_run=dry_run, console=console)
    if dry_run:
        return
    if as_json:
        print(json.dumps(st, indent=2, default=str))
        return
    ep = st["endpoint"]
    if ep is None:
        console.print(f"endpoint {name}: not found", highlight=False)
    else:
        table = Table(title=f"endpoint {name}", show_header=False)
        table.add_row("status", ep["status"] + (f" ({ep['failure_reason']})" if ep.get("failure_reason") else ""))
        table.add_row("created", str(ep["created"]))
        table.add_row("configuration", ep["config"])
        for v in ep["variants"]:
            if "serverless" in v:
                sc = v["serverless"]
                table.add_row(f"variant {v['name']}", f"serverless, {sc.get('MemorySizeInMB')} MB, max concurrency {sc.get('MaxConcurrency')}")
            else:
                table.add_row(f"variant {v['name']}", f"{v['instance_type']}: {v['current_instances']} running, {v['desired_instances']} desired")
        sc = st["autoscaling"]
        if sc:
            pol = "; ".join(f"{p['name']}: {p.get('target')} {p.get('metric')} (in {p.get('scale_in_cooldown')} s, out {p.get('scale_out_cooldown')} s)" for p in sc["policies"])
            table.add_row("autoscaling", f"{sc['min']}-{sc['max']} instances; {pol or 'no policy'}")
        else:
            table.add_row("autoscaling", "off")
        console.print(table)
    fn = st["lambda"]
    if fn:
        table = Table(title=f"Lambda {fn['name']}", show_header=False)
        table.add_row("state", f"{fn['state']} ({fn['runtime']}, {fn['memory_mb']} MB, {fn['timeout_s']} s)")
        table.add_row("reserved concurrency", str(fn["reserved_concurrency"]))
        table.add_row("aliases", ", ".join(f"{a} -> {v}" for a, v in fn["aliases"].items()) or "none")
        pc = fn["provisioned_concurrency"]
        table.add_row("provisioned concurrency", "unknown (not readable here)" if pc is None else (", ".join(f"{q}: {n}" for q, n in pc.items()) or "none"))
        console.print(table)
    for line in st["billing"]:
        console.print(f"[yellow]billing:[/yellow] {line}", highlight=False, soft_wrap=True)


@deploy_app.command("delete")
def deploy_delete_cmd(
    name: str = typer.Option(..., help="Endpoint name."),
    lambda_name: Optional[str] = typer.Option(None, help="The Lambda function to remove too. \\[default: ec2train-NAME, if ec2train made it]"),
    force: bool = typer.Option(False, "--force", help="Also delete an endpoint that ec2train did not create."),
    region: Optional[str] = typer.Option(None, help=_REGION_HELP),
    dry_run: bool = typer.Option(False, "--dry-run", help=_DRY_RUN_HELP),
):
    """Remove the Lambda (alias, role, log group), autoscaling, endpoint, configurations and models."""
    from ec2train.deploy import delete_deployment

    out = delete_deployment(name, function_name=lambda_name, region=region, force=force, dry_run=dry_run, console=console)
    if not dry_run:
        console.print(f"nothing of {name} is left running" if out else "", highlight=False)


# ---------------------------------------------------------------- entry point

def _one_line(exc: BaseException) -> str:
    """A user error's message; for one re-raised from a DataLoader worker, its original line."""
    msg = str(exc).strip()
    if "Original Traceback" in msg:
        last = msg.splitlines()[-1]
        msg = last.split(": ", 1)[1] if ": " in last else last
    return msg.splitlines()[0] if msg else type(exc).__name__


_ARGV: list[str] = []  # the arguments main() was given (sys.argv[1:] by default); the launcher relays them


def main(argv: list[str] | None = None) -> None:
    from ec2train.errors import UserError

    _ARGV[:] = sys.argv[1:] if argv is None else argv
    try:
        app(args=argv, standalone_mode=True)
    except UserError as exc:
        from rich.markup import escape

        err_console.print(f"[bold red]error:[/bold red] {escape(_one_line(exc))}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except KeyboardInterrupt:
        err_console.print("interrupted; the last completed epoch's checkpoint is intact (resume with --resume auto)")
        sys.exit(130)


if __name__ == "__main__":
    main()
