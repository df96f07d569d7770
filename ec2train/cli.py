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


def _val(x):
    return x.value if isinstance(x, Enum) else x


# ---------------------------------------------------------------- fit

@app.command(context_settings={"allow_extra_args": False})
def fit(
    data: Optional[str] = typer.Option(None, help="Data set root with train/ valid/ test/ class folders. [default: dogImages]"),
    epochs: Optional[int] = typer.Option(None, help="Epochs to train. [default: 5]"),
    batch_size: Optional[int] = typer.Option(None, help="Images per step per process (global batch = this x processes). [default: 32]"),
    lr: Optional[float] = typer.Option(None, help="Peak learning rate of the head (cosine decay after warm-up). [default: 1e-3]"),
    scale_lr: Optional[bool] = typer.Option(None, "--scale-lr/--no-scale-lr", help="Multiply --lr by the number of processes (linear scaling rule). [default: off]"),
    weight_decay: Optional[float] = typer.Option(None, help="Decoupled weight decay (not on biases/norms). [default: 1e-4]"),
    optimizer: Optional[Optim] = typer.Option(None, help="Optimizer. [default: adamw]"),
    label_smoothing: Optional[float] = typer.Option(None, help="Label smoothing. [default: 0.1]"),
    warmup_epochs: Optional[int] = typer.Option(None, help="Linear warm-up epochs before cosine decay. [default: 0]"),
    patience: Optional[int] = typer.Option(None, help="Stop after this many epochs without a better valid accuracy; 0 = never. [default: 0]"),
    arch: Optional[str] = typer.Option(None, help="Any torchvision classification model (`ec2train archs`). [default: resnet50]"),
    weights: Optional[str] = typer.Option(None, help="imagenet | none | PATH to a .pth file. [default: imagenet]"),
    freeze_backbone: Optional[bool] = typer.Option(None, "--freeze-backbone/--no-freeze-backbone", help="Train the head only. [default: frozen with pretrained weights, else full training]"),
    backbone_lr_scale: Optional[float] = typer.Option(None, help="Backbone lr = lr x this when fine-tuning everything. [default: 0.1]"),
    image_size: Optional[int] = typer.Option(None, help="Crop size in pixels. [default: 224]"),
    augment: Optional[bool] = typer.Option(None, "--augment/--no-augment", help="Random resized crop + flip for training. [default: on]"),
    workers: Optional[int] = typer.Option(None, help="Data loader workers per process; -1 = from the CPUs. [default: -1]"),
    seed: Optional[int] = typer.Option(None, help="Random seed (same seed, same result on the same hardware). [default: 0]"),
    amp: Optional[Amp] = typer.Option(None, help="Mixed precision: auto = bf16 on A10G+, fp16 on T4, off on CPU. [default: auto]"),
    device: Optional[Device] = typer.Option(None, help="auto picks the GPU of this process when there is one. [default: auto]"),
    channels_last: Optional[bool] = typer.Option(None, "--channels-last/--no-channels-last", help="NHWC memory format on GPUs. [default: on]"),
    compile: Optional[bool] = typer.Option(None, "--compile/--no-compile", help="torch.compile the model. [default: off]"),
    sync_bn: Optional[bool] = typer.Option(None, "--sync-bn/--no-sync-bn", help="SyncBatchNorm across processes (small per-GPU batches). [default: off]"),
    output: Optional[str] = typer.Option(None, help="Folder for model.pth, last.pt, metrics.json, config.toml. [default: TrainedModels]"),
    logdir: Optional[str] = typer.Option(None, help="TensorBoard log folder. [default: runs]"),
    resume: Optional[str] = typer.Option(None, help="auto (newest checkpoint in --output, if any) | never | PATH. [default: auto under torchrun, else never]"),
    config: Optional[Path] = typer.Option(None, help="TOML file of settings (keys as above with underscores); options given here override it."),
    nproc_per_node: Optional[str] = typer.Option(None, help="auto|N: start torchrun with N processes on this box (auto: one per GPU)."),
):
    """Train on train/, pick the best epoch on valid/, test it once on test/, export model.pth."""
    if nproc_per_node is not None:
        _launch_torchrun(nproc_per_node)
        return
    from ec2train.config import resolve
    from ec2train.loop import fit as run_fit

    cfg = resolve(
        config,
        data=data, epochs=epochs, batch_size=batch_size, lr=lr, scale_lr=scale_lr, weight_decay=weight_decay,
        optimizer=_val(optimizer), label_smoothing=label_smoothing, warmup_epochs=warmup_epochs, patience=patience,
        arch=arch, weights=weights, freeze_backbone=freeze_backbone, backbone_lr_scale=backbone_lr_scale,
        image_size=image_size, augment=augment, workers=workers, seed=seed, amp=_val(amp), device=_val(device),
        channels_last=channels_last, compile=compile, sync_bn=sync_bn, output=output, logdir=logdir, resume=resume,
    )
    result = run_fit(cfg, console=console)
    from ec2train import ddp

    if ddp.env_from().is_main and not result.interrupted:
        _print_fit_summary(result)


def _launch_torchrun(nproc_value: str) -> None:
    import subprocess

    import torch

    from ec2train import ddp

    if ddp.under_torchrun():
        raise typer.BadParameter("--nproc-per-node is for starting torchrun; this process already runs under it")
    n = ddp.resolve_nproc(nproc_value, torch.cuda.device_count() if torch.cuda.is_available() else 0)
    args = ddp.strip_option(sys.argv[sys.argv.index("fit") + 1 :], "--nproc-per-node")
    cmd = ddp.torchrun_command(sys.executable, n, args)
    console.print(f"[dim]$ {' '.join(cmd)}[/dim]")
    raise typer.Exit(subprocess.call(cmd))


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
    out: Optional[Path] = typer.Option(None, help="Folder for evaluation.json, confusion.csv and confusion.png. [default: beside the model]"),
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
    package: Path = typer.Option(Path("model.tar.gz"), help="Where to write the SageMaker model package."),
    # --s3-uri (upload the package) belongs here.
):
    """Build model.tar.gz for SageMaker: model.pth plus code/inference.py and the modules it needs."""
    from ec2train.export import package_model

    path = package_model(model, package)
    console.print(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB): model.pth, code/inference.py, code/ec2train/")


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
    url: Optional[str] = typer.Option(None, help="https://, file:// or s3://bucket/key of a zip in the dogImages layout. [default: the public dogImages.zip]"),
    dest: Path = typer.Option(Path("."), help="Folder to unpack into."),
    keep_archive: bool = typer.Option(False, help="Keep the downloaded zip."),
):
    """Download, verify and unpack dogImages (resumes an interrupted download)."""
    from rich.progress import BarColumn, DownloadColumn, Progress, TransferSpeedColumn, TimeRemainingColumn

    from ec2train.data import DOG_IMAGES_URL, fetch_dataset

    with Progress("[progress.description]{task.description}", BarColumn(), DownloadColumn(), TransferSpeedColumn(), TimeRemainingColumn(), console=err_console) as progress:
        task = progress.add_task("download", total=None)
        path = fetch_dataset(url or DOG_IMAGES_URL, dest, progress=lambda done, total: progress.update(task, completed=done, total=total), keep_archive=keep_archive)
    console.print(f"data set ready in {path}; train with: ec2train fit --data {path}")


# ---------------------------------------------------------------- entry point

def _one_line(exc: BaseException) -> str:
    """A user error's message; for one re-raised from a DataLoader worker, its original line."""
    msg = str(exc).strip()
    if "Original Traceback" in msg:
        last = msg.splitlines()[-1]
        msg = last.split(": ", 1)[1] if ": " in last else last
    return msg.splitlines()[0] if msg else type(exc).__name__


def main(argv: list[str] | None = None) -> None:
    from ec2train.errors import UserError

    try:
        app(args=argv, standalone_mode=True)
    except UserError as exc:
        err_console.print(f"[bold red]error:[/bold red] {_one_line(exc)}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except KeyboardInterrupt:
        err_console.print("interrupted; the last completed epoch's checkpoint is intact (resume with --resume auto)")
        sys.exit(130)


if __name__ == "__main__":
    main()
