"""`ec2train data ...`: create, fetch, check and prepare data sets."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.markup import escape
from rich.progress import (
    BarColumn,
    DownloadColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)
from rich.table import Table

from ec2train.cli._app import console, default_of, err_console, group

# ec2train.data and ec2train.prepare are imported inside the commands: they import torch, which
# `ec2train --help` must not pay for.

data_app = group("data", help="Create, fetch and check data sets in the dogImages layout.")


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
    from ec2train.data import SPLITS, check_dataset
    from ec2train.names import printable

    total = sum(1 for _ in directory.rglob("*") if _.is_file()) if directory.is_dir() else 0
    with Progress(console=err_console, transient=True) as progress:
        task = progress.add_task("decoding images", total=total)
        report = check_dataset(directory, decode=True, on_image=lambda: progress.advance(task))
    table = Table(title=escape(f"data set {printable(directory)}"))
    for col in ("split", "classes", "images", "empty classes"):
        table.add_column(col)
    for split in SPLITS:
        sr = report.splits.get(split)
        table.add_row(
            split, *(("-", "-", "-") if sr is None else (str(sr.classes), str(sr.images), str(len(sr.empty_classes))))
        )
    console.print(table)
    for problem in report.problems:  # names and paths are printable() already; markup in them is text
        err_console.print(f"[red]problem:[/red] {escape(problem)}", highlight=False)
    for bad in report.corrupt:
        err_console.print(f"[red]corrupt image:[/red] {escape(bad)}", highlight=False)
    if not report.ok:
        err_console.print(f"[red]{len(report.problems)} problems, {len(report.corrupt)} unreadable images[/red]")
        raise typer.Exit(1)
    console.print("[green]no problems found[/green]")


@data_app.command("fetch")
def data_fetch(
    url: str | None = typer.Option(
        None,
        help="https://, file:// or s3://bucket/key of a zip in the dogImages layout, or an s3://bucket/prefix/ folder of train/ valid/ test/. [default: the public dogImages.zip]",
    ),
    dest: Path = typer.Option(
        Path(default_of("data")), help="The data set folder to create (train/ valid/ test/ inside)."
    ),
    keep_archive: bool = typer.Option(False, help="Keep the downloaded zip."),
    sha256: str | None = typer.Option(None, help="Expected SHA-256 of the zip (hex); a mismatch deletes the download."),
):
    """Download, verify and unpack dogImages (resumes an interrupted download)."""
    from ec2train.data import DOG_IMAGES_URL, fetch_dataset

    columns = (
        "[progress.description]{task.description}",
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=err_console) as progress:
        task = progress.add_task("download", total=None)
        path = fetch_dataset(
            url or DOG_IMAGES_URL,
            dest,
            progress=lambda done, total: progress.update(task, completed=done, total=total),
            keep_archive=keep_archive,
            sha256=sha256,
        )
    console.print(f"data set ready in {path}; train with: ec2train fit --data {path}")


@data_app.command("split")
def data_split(
    src: Path = typer.Argument(..., help="Folder of class folders: SRC/<class>/<image>."),
    dst: Path = typer.Argument(..., help="New data set folder (train/ valid/ test/ inside); never overwritten."),
    valid: float = typer.Option(0.1, help="Share of each class for valid/."),
    test: float = typer.Option(0.1, help="Share of each class for test/."),
    seed: int = typer.Option(0, help="Shuffle seed; the same seed gives the same split."),
    copy: bool = typer.Option(False, "--copy", help="Copy the images instead of hard-linking them."),
):
    """Split a folder of class folders into train/ valid/ test/, stratified per class."""
    from ec2train.data import split_dataset

    result = split_dataset(src, dst, valid, test, seed, "copy" if copy else "link")
    sizes = ", ".join(f"{split} {sum(c.values())}" for split, c in result.counts.items())
    console.print(
        f"{dst}: {sizes} images in {len(result.counts['train'])} classes; train with: ec2train fit --data {dst}"
    )


@data_app.command("prepare")
def data_prepare(
    src: Path = typer.Argument(..., help="Data set root to copy (e.g. dogImages)."),
    dst: Path = typer.Argument(..., help="New folder for the resized copy (e.g. dogImages-256)."),
    size: int = typer.Option(256, help="Short side of the written images, in pixels (256 suits --image-size 224)."),
    workers: int | None = typer.Option(None, min=1, help="Processes. [default: one per CPU]"),
    quality: int = typer.Option(90, help="JPEG quality (1-95)."),
):
    """Write a resized copy of a data set (same layout; JPEG, short side --size) for fast epochs.

    Parallel over the CPUs; reruns skip finished images, so it is safe to interrupt. Train on
    it with `ec2train fit --data DST`. Images that cannot be decoded are listed; exit code 1.
    """
    from ec2train.names import printable
    from ec2train.prepare import check_arguments, prepare_dataset

    check_arguments(src, dst, size, quality)
    with Progress(
        TextColumn("resizing"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(), console=err_console
    ) as progress:
        task = progress.add_task("prepare", total=None)
        report = prepare_dataset(
            src,
            dst,
            size,
            workers,
            quality,
            on_total=lambda n: progress.update(task, total=n),
            on_done=lambda k: progress.advance(task, k),
        )
    console.print(
        f"{dst}: {report.written} images written, {report.skipped} already done, in {report.seconds:.1f} s; "
        f"train with: ec2train fit --data {dst}"
    )
    for bad in report.corrupt:
        err_console.print(f"[red]corrupt image (left out):[/red] {escape(printable(bad))}", highlight=False)
    if report.corrupt:
        err_console.print(f"[red]{len(report.corrupt)} source images could not be decoded[/red]")
        raise typer.Exit(1)
