"""Training commands: fit, evaluate, predict, archs, tune, bench."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import typer
from rich.columns import Columns
from rich.markup import escape
from rich.table import Table

from ec2train.cli._app import (
    DEFAULT_MODEL,
    LOADER_HELP,
    MODEL_HELP,
    THREADS_HELP,
    Amp,
    BenchLoaders,
    Device,
    Loader,
    Optim,
    SpotWatch,
    app,
    console,
    default_of,
    err_console,
    heavy_imports,
    setting,
    train_settings,
    use_thread_plan,
    value,
)
from ec2train.errors import UserError

# torch and the training modules are imported inside the commands: `ec2train --help` and the
# light commands start in a fraction of the time.

# ---------------------------------------------------------------- fit


# Long only in its signature (one parameter per option, defaults from TrainConfig); the body is short.
@app.command(context_settings={"allow_extra_args": False})
def fit(
    ctx: typer.Context,
    data: str | None = setting("data", "Data set root with train/ valid/ test/ class folders."),
    epochs: int | None = setting("epochs", "Epochs to train."),
    batch_size: int | None = setting("batch_size", "Images per step per process (global batch = this x processes)."),
    lr: float | None = setting("lr", "Peak learning rate of the head (cosine decay after warm-up)."),
    scale_lr: bool | None = setting(
        "scale_lr", "Multiply --lr by the number of processes (linear scaling rule).", "--scale-lr/--no-scale-lr"
    ),
    weight_decay: float | None = setting("weight_decay", "Decoupled weight decay (not on biases/norms)."),
    optimizer: Optim | None = setting("optimizer", "Optimizer."),
    momentum: float | None = setting("momentum", "SGD's (Nesterov) momentum; AdamW does not use it."),
    label_smoothing: float | None = setting("label_smoothing", "Label smoothing."),
    warmup_epochs: int | None = setting("warmup_epochs", "Linear warm-up epochs before cosine decay."),
    patience: int | None = setting(
        "patience", "Stop after this many epochs without a better valid accuracy; 0 = never."
    ),
    arch: str | None = setting("arch", "Any torchvision classification model (`ec2train archs`)."),
    weights: str | None = setting("weights", "imagenet | none | PATH to a .pth file."),
    freeze_backbone: bool | None = setting(
        "freeze_backbone",
        "Train the head only.",
        "--freeze-backbone/--no-freeze-backbone",
        shown="frozen with pretrained weights, else full training",
    ),
    backbone_lr_scale: float | None = setting(
        "backbone_lr_scale", "Backbone lr = lr x this when fine-tuning everything."
    ),
    image_size: int | None = setting("image_size", "Crop size in pixels."),
    augment: bool | None = setting("augment", "Random resized crop + flip for training.", "--augment/--no-augment"),
    workers: int | None = setting("workers", "Data loader workers per process; -1 = from the CPUs."),
    loader: Loader | None = setting("loader", LOADER_HELP),
    seed: int | None = setting("seed", "Random seed (same seed, same result on the same hardware)."),
    amp: Amp | None = setting("amp", "Mixed precision: auto = bf16 on A10G+, fp16 on T4, off on CPU."),
    device: Device | None = setting("device", "auto picks the GPU of this process when there is one."),
    channels_last: bool | None = setting(
        "channels_last",
        "NHWC memory format: on GPUs, and on the CPU with a frozen backbone.",
        "--channels-last/--no-channels-last",
    ),
    compile: bool | None = setting("compile", "torch.compile the model.", "--compile/--no-compile"),
    sync_bn: bool | None = setting(
        "sync_bn", "SyncBatchNorm across processes, for small per-GPU batches (CUDA only).", "--sync-bn/--no-sync-bn"
    ),
    cache_features: bool | None = setting(
        "cache_features",
        "With a frozen backbone: compute its features once (eval transform) and train the head from them; augmentation is off in this mode.",
        "--cache-features/--no-cache-features",
    ),
    output: str | None = setting("output", "Folder for model.pth, last.pt, metrics.json, config.toml."),
    logdir: str | None = setting("logdir", "TensorBoard log folder."),
    resume: str | None = setting(
        "resume",
        "auto (the checkpoint in --output, else under --s3-uri, if any) | never (start anew, replacing a run in --output) | PATH | s3://bucket/prefix/last.pt. Not given: a fresh start, refused when --output already holds a run.",
        shown="auto under torchrun, else a fresh start",
    ),
    s3_uri: str | None = setting(
        "s3_uri",
        "s3://bucket/prefix: upload model.pth, last.pt, config.toml, metrics.json and TensorBoard logs there every epoch and at exit (encrypted, verified).",
    ),
    kms_key: str | None = setting(
        "kms_key", "KMS key id/ARN/alias: SSE-KMS for --s3-uri uploads.", shown="SSE-S3, AES256"
    ),
    spot_watch: SpotWatch = typer.Option(
        "auto", help="Watch for spot interruption notices (IMDSv2): auto = when an instance metadata service answers."
    ),
    spot_poll_seconds: float = typer.Option(
        5.0, help="Seconds between spot notice polls (the notice comes 2 minutes ahead)."
    ),
    config: Path | None = typer.Option(
        None, help="TOML file of settings (keys as above with underscores); options given here override it."
    ),
    nproc_per_node: str | None = typer.Option(
        None, help="auto|N: start torchrun with N processes on this box (auto: one per GPU)."
    ),
    threads: int | None = setting("threads", THREADS_HELP, min=0),
):
    """Train on train/, pick the best epoch on valid/, test it once on test/, export model.pth.

    Exit status: 0 done; 2 bad input or settings (one line says what to fix); 75 stopped by a spot interruption notice or SIGTERM: the last completed epoch's checkpoint is saved (and in S3 with --s3-uri), run the same command with --resume auto to continue; 130 Ctrl-C: the first stops at the next step the same way (checkpoint kept, S3 flushed), a second one quits at once.
    """
    options = train_settings(locals())  # every option named like a TrainConfig field
    if nproc_per_node is not None:
        raise typer.Exit(_launch_torchrun(nproc_per_node, ctx.obj.argv if ctx.obj else tuple(sys.argv[1:])))
    from ec2train.config import resolve

    cfg = resolve(config, **options)
    try:
        with heavy_imports():
            from ec2train.run import fit_run  # torch: seconds, and Ctrl-C may come meanwhile

        result = fit_run(cfg, console=console, spot_watch=value(spot_watch), spot_poll_seconds=spot_poll_seconds)
    except KeyboardInterrupt as exc:  # typer would swallow it into a silent exit 130
        raise typer.Exit(_ctrl_c_exit(cfg.output, exc)) from None
    from ec2train import ddp
    from ec2train.run import interrupted_exit_status

    if result.interrupted:
        raise typer.Exit(interrupted_exit_status())
    if result.already_finished:
        return
    if ddp.env_from().is_main:
        print_fit_summary(result)


def _ctrl_c_exit(output: str, exc: KeyboardInterrupt) -> int:
    """Say where the run stands after Ctrl-C (rank 0); the exit status (130, see interrupted_exit_status).

    After a second Ctrl-C (anything but the clean StoppedByCtrlC) the process ends here: an S3
    upload still running in boto3's transfer threads would otherwise hold the interpreter's
    exit until it finished, and the user asked to quit now. Files are safe: every write is atomic.
    """
    from ec2train import ddp
    from ec2train.run import EXIT_CTRL_C, StoppedByCtrlC, interrupted_exit_status, interrupted_hint

    status = interrupted_exit_status(EXIT_CTRL_C)
    if ddp.env_from().is_main:
        err_console.print(interrupted_hint(output), highlight=False)
    if not isinstance(exc, StoppedByCtrlC):
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)
    return status


def _launch_torchrun(nproc_value: str, argv: tuple[str, ...]) -> int:
    """Run this same `fit` command line (argv: main()'s arguments) under torchrun; its exit status."""
    import signal
    import tempfile

    from ec2train import ddp, hw
    from ec2train.run import EXIT_FILE_ENV, launcher_status
    from ec2train.threads import THREADS_ENV, launch_env

    if ddp.under_torchrun():
        raise typer.BadParameter("--nproc-per-node is for starting torchrun; this process already runs under it")
    n = ddp.resolve_nproc(nproc_value, hw.cuda_device_count())
    args = ddp.strip_option(list(argv[argv.index("fit") + 1 :]), "--nproc-per-node")
    cmd = ddp.torchrun_command(sys.executable, n, args)
    env = launch_env(n)  # each rank's share of the cores, not torchrun's 1 thread (matters on the CPU)
    console.print(f"[dim]$ {THREADS_ENV}={env[THREADS_ENV]} {escape(' '.join(cmd))}[/dim]", soft_wrap=True)
    # torchrun starts each rank in a session of its own, so the terminal's Ctrl-C reaches only
    # this launcher and torchrun's agent. The agent ignores it (it would raise and SIGKILL the
    # ranks after a grace), and the launcher passes it to the ranks: each stops at its next step
    # as a lone fit does, and a second Ctrl-C quits at once. SIGTERM still goes through torchrun.
    env["PET_SIGNALS_TO_HANDLE"] = "SIGTERM,SIGHUP,SIGQUIT"
    with tempfile.TemporaryDirectory(prefix="ec2train-fit-") as tmp:
        exit_file = Path(tmp) / "exit-status"
        agent = subprocess.Popen(
            cmd,
            env={**env, EXIT_FILE_ENV: str(exit_file)},
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN),
        )
        previous = signal.signal(signal.SIGINT, lambda signum, frame: _pass_on(signum, agent.pid))
        try:
            status = agent.wait()
        finally:
            signal.signal(signal.SIGINT, previous)
        return launcher_status(status, exit_file.read_text() if exit_file.is_file() else None)


def _pass_on(signum: int, agent_pid: int) -> None:
    """Send `signum` to each rank torchrun's agent started (each leads a process group)."""
    for pid in _children(agent_pid):
        try:
            os.killpg(pid, signum)
        except OSError:
            pass  # it ended meanwhile


def _children(pid: int) -> list[int]:
    """The processes whose parent is `pid` (Linux /proc)."""
    kids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat[stat.rindex(")") + 2 :].split()[1]) == pid:
                kids.append(int(entry.name))
    return kids


def print_fit_summary(result) -> None:
    from ec2train.checkpoint import CHECKPOINT_FILE

    m = result.metrics
    table = Table(title="ec2train fit: done", show_header=False)
    table.add_column()
    table.add_column(overflow="fold")  # paths wrap whole onto the next line instead of ending in "…"
    table.add_row(
        "best epoch", f"{m['best_epoch']} of {m['epochs_run']}" + (" (early stop)" if m["stopped_early"] else "")
    )
    table.add_row("valid accuracy", f"{m['valid_acc1']:.4f} (top-5 {m['valid_acc5']:.4f})")
    table.add_row("test accuracy", f"{m['test_acc1']:.4f} (top-5 {m['test_acc5']:.4f}) on {m['test_images']} images")
    table.add_row("throughput", f"{m['images_per_second']:.0f} img/s, wall {m['wall_seconds']:.0f} s")
    table.add_row("model", str(result.model_path))
    table.add_row("checkpoint", f"{result.output / CHECKPOINT_FILE}  (continue with --resume auto)")
    table.add_row("metrics", str(result.output / "metrics.json"))
    table.add_row(
        "TensorBoard", f"tensorboard --logdir {result.logdir.parent}  (over SSH: ssh -L 6006:localhost:6006 ...)"
    )
    console.print(table)


# ---------------------------------------------------------------- evaluate / predict / archs


@app.command()
def evaluate(
    model: Path = typer.Option(DEFAULT_MODEL, help=MODEL_HELP),
    data: str = typer.Option(default_of("data"), help="Data set root."),
    split: str = typer.Option("test", help="train | valid | test."),
    batch_size: int = typer.Option(64, min=1),
    workers: int = typer.Option(0, min=0),
    threads: int = typer.Option(0, min=0, help=THREADS_HELP),
    device: Device = typer.Option("auto"),
    out: Path | None = typer.Option(
        None, help="Folder for evaluation.json, confusion.csv and confusion.png. [default: beside the model]"
    ),
):
    """Top-1, top-5 and per-class accuracy, and a confusion matrix (PNG and CSV)."""
    with heavy_imports():
        import torch

        from ec2train.evaluate import evaluate_model_file
        from ec2train.export import write_confusion_csv
        from ec2train.files import atomic_write_json
        from ec2train.names import printable
        from ec2train.plots import can_draw, confused_line, most_confused, write_confusion_png

    use_thread_plan(threads, workers)
    res = evaluate_model_file(model, data, split, batch_size, workers, value(device))
    out = out or model.parent
    names = res["class_names"]
    pairs = most_confused(res["confusion"], names, k=5)
    report = {k: v for k, v in res.items() if k != "confusion"}
    atomic_write_json(out / f"evaluation-{split}.json", {**report, "most_confused": [p._asdict() for p in pairs]})
    write_confusion_csv(out / f"confusion-{split}.csv", res["confusion"], names)
    missing = can_draw()
    if missing is None:
        write_confusion_png(out / f"confusion-{split}.png", torch.tensor(res["confusion"], dtype=torch.float64), names)
    table = Table(title=f"{split}: top-1 {res['acc1']:.4f}, top-5 {res['acc5']:.4f}, {res['images']} images")
    table.add_column("class")
    table.add_column("accuracy", justify="right")
    for name, acc in sorted(res["per_class_acc1"].items(), key=lambda kv: (kv[1] is None, kv[1])):
        table.add_row(escape(printable(name)), "n/a" if acc is None else f"{acc:.3f}")
    console.print(table)
    console.print(
        "most confused (true -> predicted):" if pairs else "no confusions: every image was predicted as its true class"
    )
    for pair in pairs:
        console.print(f"  {confused_line(pair)}", markup=False, highlight=False)
    written = f"confusion-{split}.csv" + (f" and confusion-{split}.png" if missing is None else "")
    console.print(f"wrote {out / f'evaluation-{split}.json'}, {written}", markup=False, highlight=False)
    if missing:
        console.print(f"note: {missing}", markup=False, highlight=False)


@app.command()
def predict(
    images: list[Path] = typer.Argument(
        ..., help="Image files (JPEG, PNG, ...) and folders: every image under a folder, recursively."
    ),
    model: Path = typer.Option(DEFAULT_MODEL, help=MODEL_HELP),
    top_k: int = typer.Option(5, min=1, help="How many classes to show per image."),
    as_json: bool = typer.Option(
        False,
        "--json",
        help='Print JSON instead of a table: an object for one image file, else a list; an unreadable file has "error" instead of "predictions".',
    ),
    csv_path: Path | None = typer.Option(
        None,
        "--csv",
        help="Also write a CSV file, one row per image: image, label, probability (top-1), top_k (JSON list of {label, index, probability}), error.",
    ),
    batch_size: int = typer.Option(32, min=1, help="Images per forward pass."),
    device: Device = typer.Option("auto", help="auto picks the GPU when there is one."),
    threads: int = typer.Option(0, min=0, help=THREADS_HELP),
):
    """Class names with probabilities for each image (folders: every image under them).

    Exit status: 0 every image answered; 1 some file could not be read (it is reported with its error, the others are answered); 2 bad input or settings.
    """
    with heavy_imports():
        from ec2train.infer import Predictor, default_device, image_files
        from ec2train.names import printable

    files = image_files(images)
    singles = not any(p.is_dir() for p in images)  # folders keep their per-file rows (and exit 1)
    if singles and not any(p.exists() for p in images):
        raise UserError(_nothing_readable([(str(p), "no such file") for p in images]))  # before loading the model
    predictor = Predictor(model, device=default_device() if value(device) == "auto" else value(device))
    use_thread_plan(
        threads, 0, quiet=True
    )  # after loading (a bad model file stays a one-line error); stdout is the answer
    answers = _predict_with_progress(predictor, files, top_k, batch_size)
    if singles and all(a.error for a in answers):
        raise UserError(_nothing_readable([(a.path, a.error) for a in answers]))
    if csv_path is not None:
        _write_predictions_csv(csv_path, answers)
    if as_json:
        docs = [a.as_dict() for a in answers]
        one = len(images) == 1 and images[0].is_file()
        print(json.dumps(docs[0] if one else docs, indent=2))
    else:
        _print_predictions(answers)
    failed = [a for a in answers if a.error]
    if failed:
        err_console.print(
            f"[bold red]{len(failed)} of {len(answers)} images could not be read[/bold red] "
            f"(first: {escape(printable(failed[0].path))}: {escape(printable(failed[0].error))})",
            highlight=False,
        )
        raise typer.Exit(1)


def _nothing_readable(failed: list[tuple[str, str]]) -> str:
    """One line for image files of which none could be read."""
    reasons = "; ".join(f"{path}: {why}" for path, why in failed[:3]) + ("; ..." if len(failed) > 3 else "")
    return reasons if len(failed) == 1 else f"none of the {len(failed)} images could be read: {reasons}"


def _predict_with_progress(predictor, files: list, top_k: int, batch_size: int) -> list:
    """predict_paths with a progress bar on stderr (stdout stays clean for --json)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from ec2train.infer import predict_paths

    columns = (TextColumn("predict"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, console=err_console, transient=True, disable=len(files) < 2) as progress:
        task = progress.add_task("predict", total=len(files))
        answers = []
        for answer in predict_paths(predictor, files, top_k, batch_size):
            answers.append(answer)
            progress.advance(task)
    return answers


def _write_predictions_csv(path: Path, answers: list) -> None:
    import csv
    import io

    from ec2train.files import atomic_write_text
    from ec2train.names import csv_cell

    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["image", "label", "probability", "top_k", "error"])
    for a in answers:
        top = a.predictions or []
        writer.writerow(
            [
                csv_cell(a.path),
                csv_cell(top[0]["label"]) if top else "",
                f"{top[0]['probability']:.6f}" if top else "",
                json.dumps(top) if top else "",
                csv_cell(a.error or ""),
            ]
        )
    atomic_write_text(path, buf.getvalue())


def _print_predictions(answers: list) -> None:
    """One image: its top-k table. Several: one row each, top-1 first and the runners-up after.
    Paths and labels are shown printable() and as text, whatever the model file or folder holds."""
    from ec2train.names import printable

    def shown(text: object) -> str:
        return escape(printable(text))

    if len(answers) == 1 and not answers[0].error:
        table = Table(title=shown(answers[0].path))
        table.add_column("class")
        table.add_column("probability", justify="right")
        for pred in answers[0].predictions:
            table.add_row(shown(pred["label"]), f"{pred['probability']:.4f}")
        console.print(table)
        return
    # Paths break after a "/" (a name is cut only when it alone is wider than the column).
    # The column gets a fixed width: rich would otherwise narrow it and fold names mid-word.
    path_width = max(24, (console.width - 13) // 2)  # 13: the borders and padding of 4 columns
    paths = [fold_path(printable(a.path), path_width) for a in answers]
    table = Table()
    for name in ("image", "class", "probability", "next"):
        width = min(path_width, max(len(line) for p in paths for line in p.splitlines())) if name == "image" else None
        table.add_column(name, justify="right" if name == "probability" else "left", overflow="fold", width=width)
    for a, path in zip(answers, paths):
        if a.error:
            table.add_row(escape(path), f"[red]error: {shown(a.error)}[/red]", "", "")
            continue
        top, *rest = a.predictions
        table.add_row(
            escape(path),
            shown(top["label"]),
            f"{top['probability']:.4f}",
            shown(", ".join(f"{printable(p['label'])} {p['probability']:.2f}" for p in rest)),
        )
    console.print(table)


def fold_path(path: str, width: int) -> str:
    """`path` on lines of at most `width` characters, broken after a "/", names kept whole."""
    lines = [""]
    for part in path.replace("/", "/\0").split("\0"):
        if lines[-1] and len(lines[-1]) + len(part) > width:
            lines.append("")
        lines[-1] += part
    return "\n".join(lines)


@app.command()
def archs():
    """List the torchvision architectures --arch accepts."""
    from ec2train.model import classification_archs

    # Columns fit the terminal's width: one long line was unreadable.
    console.print(Columns(classification_archs(), column_first=True, padding=(0, 2)), soft_wrap=False)


# ---------------------------------------------------------------- tune


# Long only in its signature (one parameter per option); the body resolves, calls tune.tune and prints.
@app.command()
def tune(
    data: str | None = setting("data", "Data set root with train/ valid/ test/ class folders."),
    trials: int = typer.Option(
        20, help="Trials the study should hold in all (a resumed study counts its earlier ones)."
    ),
    timeout: str | None = typer.Option(
        None, help="Start no new trial after this long: 90s, 30m, 2h, 1h30m (running ones finish)."
    ),
    study: str = typer.Option("ec2train", help="Study name; run the same command again to continue it."),
    storage: str | None = typer.Option(
        None, help="Optuna database URL, e.g. sqlite:///tune.db. [default: sqlite file in --output]"
    ),
    space: Path | None = typer.Option(
        None,
        help="TOML file of search ranges ([lr] low=1e-4 high=1e-1 log=true ...). [default: lr, batch size, weight decay, label smoothing]",
    ),
    epochs: int | None = setting("epochs", "Epochs per trial (and in best.toml).", shown="from --config, else {}"),
    output: Path | None = typer.Option(
        None, help="Folder for trial-N/ folders, study.db and best.toml. [default: tune/STUDY]"
    ),
    parallel: int | None = typer.Option(
        None, help="Trials at a time, each in its own process. [default: one per GPU, one on the CPU]"
    ),
    then_fit: bool = typer.Option(
        False, "--then-fit", help="Train the final model with best.toml when the search ends."
    ),
    prune: bool = typer.Option(
        True,
        "--prune/--no-prune",
        help="Stop trials whose valid accuracy is below the median of finished ones at the same epoch.",
    ),
    prune_startup_trials: int | None = typer.Option(
        None, help="Finished trials before pruning starts. [default: trials/4, at most 5]"
    ),
    prune_warmup_epochs: int = typer.Option(1, help="Epochs every trial runs before it may be pruned."),
    config: Path | None = typer.Option(
        None,
        help="TOML file of the fixed fit settings (as `fit --config`); its output/logdir get the final model, and with s3_uri each trial mirrors to S3_URI/trial-N/ and the final model to S3_URI/.",
    ),
    arch: str | None = setting("arch", "Architecture (fixed for the study)."),
    weights: str | None = setting("weights", "imagenet | none | PATH."),
    freeze_backbone: bool | None = setting(
        "freeze_backbone",
        "Train the head only.",
        "--freeze-backbone/--no-freeze-backbone",
        shown="frozen with pretrained weights",
    ),
    image_size: int | None = setting("image_size", "Crop size in pixels."),
    optimizer: Optim | None = setting("optimizer", "Optimizer."),
    workers: int | None = setting("workers", "Data loader workers per trial; -1 = share the CPUs."),
    threads: int | None = setting("threads", THREADS_HELP + " Per trial process.", min=0),
    device: Device | None = setting("device", "Device."),
    amp: Amp | None = setting("amp", "Mixed precision."),
    seed: int | None = setting("seed", "Seed of every trial's training and of the sampler."),
    logdir: str | None = setting("logdir", "TensorBoard folder; trials go to LOGDIR/tune-STUDY/."),
):
    """Search learning rate, batch size, weight decay and label smoothing with Optuna; prune hopeless trials."""
    options = train_settings(locals(), exclude=("output",))  # the study's folder, not a trial's
    from ec2train.config import resolve

    with heavy_imports():
        from ec2train.tune import parse_duration, require_optuna
        from ec2train.tune import tune as run_tune

    seconds = parse_duration(timeout) if timeout is not None else None
    base = resolve(config, **options)
    optuna = require_optuna()
    optuna.logging.set_verbosity(optuna.logging.ERROR)  # our own one line per trial event instead
    try:
        result = run_tune(
            base,
            trials=trials,
            timeout=seconds,
            study_name=study,
            storage=storage,
            space=space,
            output=output,
            parallel=parallel,
            prune=prune,
            prune_startup_trials=prune_startup_trials,
            prune_warmup_epochs=prune_warmup_epochs,
            then_fit=then_fit,
            console=console,
        )
    except KeyboardInterrupt:
        err_console.print(
            "interrupted; the finished trials are saved: run the same command again to continue the study"
        )
        raise typer.Exit(130) from None
    _report_tune(result)


def _report_tune(result) -> None:
    """What a study ended with: its table, then the best settings and how to train with them, or
    why there are none (stopped, or no trial completed), and the final fit's summary if it ran."""
    from ec2train.tune import TuneError
    from ec2train.tune.study import fit_command

    _print_tune_table(result)
    if result.stopped_by:
        err_console.print(
            f"[bold yellow]stopped by {escape(result.stopped_by)}[/bold yellow]: the running trial is not counted; "
            "run the same command to continue the study (with the default sqlite --storage, on this disk)",
            highlight=False,
        )
        raise typer.Exit(_interrupted_status())
    if result.best_file is None:
        errors = [r["error"] for r in result.rows if r["error"]]
        raise TuneError(
            f"no trial completed{f' (first error: {errors[0]})' if errors else ''}; fix it and run the same command again"
        )
    console.print(
        f"best: trial {result.best_number}, valid acc {result.best_value:.4f}; settings in {result.best_file}\n"
        f"train with them: {fit_command(result.best_file)}   (all GPUs: add --nproc-per-node auto)\n"
        f"compare trials: tensorboard --logdir {result.tb_root}   (HParams tab)"
    )
    if result.final is not None and result.final.interrupted:
        raise typer.Exit(_interrupted_status())  # fit_run has said where its checkpoint is
    if result.final is not None:
        print_fit_summary(result.final)


def _interrupted_status() -> int:
    from ec2train.run import interrupted_exit_status

    return interrupted_exit_status()


def _print_tune_table(result) -> None:
    colour = {"COMPLETE": "green", "PRUNED": "yellow", "FAIL": "red", "RUNNING": "cyan", "WAITING": "dim"}
    counts = {s: sum(r["state"] == s for r in result.rows) for s in ("COMPLETE", "PRUNED", "FAIL")}
    table = Table(
        title=f"study {result.study.study_name}: {len(result.rows)} trials, "
        f"{counts['COMPLETE']} complete, {counts['PRUNED']} pruned, {counts['FAIL']} failed"
    )
    for col in ("trial", "state", "valid acc", "epochs", "params"):
        table.add_column(col, justify="left" if col in ("state", "params") else "right")
    for r in sorted(result.rows, key=lambda r: r["number"]):
        params = ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in r["params"].items())
        note = f" [red]{escape(r['error'])}[/red]" if r["error"] else ""
        mark = " *" if r["number"] == result.best_number else ""
        acc = "-" if r["valid_acc1"] is None else f"{r['valid_acc1']:.4f}{mark}"
        table.add_row(
            str(r["number"]),
            f"[{colour.get(r['state'], 'white')}]{r['state']}[/]",
            acc,
            str(r["epochs"]),
            params + note,
        )
    console.print(table)


# ---------------------------------------------------------------- bench


@app.command()
def bench(
    data: str = typer.Option(default_of("data"), help="Data set root (its train/ split is read)."),
    arch: str = typer.Option(
        default_of("arch"), help="Architecture to time (random weights: speed does not depend on them)."
    ),
    batch_size: int = typer.Option(default_of("batch_size"), min=1, help="Images per step."),
    workers: int = typer.Option(
        default_of("workers"), min=-1, help="Loader workers; -1 = fit's default from the CPUs."
    ),
    threads: int = typer.Option(0, min=0, help=THREADS_HELP),
    device: Device = typer.Option(default_of("device")),
    image_size: int = typer.Option(default_of("image_size"), help="Crop size in pixels."),
    steps: int = typer.Option(20, min=1, help="Batches timed per measurement."),
    amp: Amp = typer.Option(default_of("amp"), help="Mixed precision, as in fit."),
    freeze_backbone: bool = typer.Option(
        True,
        "--freeze-backbone/--no-freeze-backbone",
        help="Time the frozen-backbone step (fit's default with pretrained weights).",
    ),
    loader: BenchLoaders = typer.Option(
        "both",
        help="The input pipelines to time: cpu (the loader workers decode), gpu (the workers read files, the device decodes: fit --loader gpu), or both.",
    ),
):
    """Images/s of the input pipeline (each loader), the training step and both; says which bounds the run and what to do."""
    with heavy_imports():
        from ec2train.perf import bench as run_bench

    r = run_bench(
        data,
        arch,
        batch_size,
        workers,
        value(device),
        image_size,
        steps,
        value(amp),
        freeze_backbone,
        threads=threads,
        log=lambda msg: err_console.print(f"[dim]{msg}[/dim]"),
        loaders=("cpu", "gpu") if value(loader) == "both" else (value(loader),),
    )
    table = Table(
        title=f"ec2train bench: {r.arch} on {r.device}, amp {r.amp}, batch {r.batch_size}, {r.image_size} px, {r.workers} workers"
    )
    table.add_column("measurement")
    table.add_column("images/s", justify="right")
    where = {"cpu": "cpu loader: workers decode + transform", "gpu": f"gpu loader: {r.device} decodes + transforms"}
    for kind, rates in r.loaders.items():
        table.add_row(f"input pipeline alone ({where[kind]})", f"{rates.pipeline_ips:.1f}")
    table.add_row(
        f"training step alone ({'frozen backbone' if r.frozen else 'full model'}, synthetic batches)",
        f"{r.step_ips:.1f}",
    )
    for kind, rates in r.loaders.items():
        table.add_row(f"end to end, {kind} loader", f"{rates.end_to_end_ips:.1f}")
    console.print(table)
    console.print(f"fit --loader auto here: {r.loader_why}", markup=False, highlight=False)
    console.print(
        f"bound by the [bold]{r.bound}[/bold] with the {r.loader} loader (training images: median short side {r.median_short_side} px)"
    )
    for line in r.advice:
        console.print(f"  - {line}")
