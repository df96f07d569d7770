"""What every command module shares: the typer app, the consoles, choice enums, option builders."""

from __future__ import annotations

import contextlib
import difflib
import gc
from collections.abc import Iterator
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeAlias

import typer
from rich.console import Console
from typer.core import TyperCommand

from ec2train.config import AMP_MODES, DEVICES, FIELDS, LOADERS, OPTIMIZERS
from ec2train.spot import WATCH_MODES

console = Console(soft_wrap=True)
err_console = Console(stderr=True, soft_wrap=True)


@contextlib.contextmanager
def heavy_imports() -> Iterator[None]:
    """Import torch and the modules that use it with Python's cycle collector paused, then
    freeze what the imports built. Otherwise the collector scans torch's millions of new
    objects during the import and again afterwards (docs/performance.md has the cost); frozen,
    they are never scanned again (and DataLoader workers forked later share their pages
    untouched)."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        gc.freeze()
        if enabled:
            gc.enable()


@dataclass(frozen=True)
class Invocation:
    """What main() was called with, handed to commands as typer's ctx.obj."""

    argv: tuple[str, ...]


class SuggestingCommand(TyperCommand):
    """Suggests the options closest to a misspelt one, compared without their leading dashes.

    click compares whole strings, so the shared "--" made `--epoch` also suggest `--spot-watch`.
    """

    def parse_args(self, ctx: Any, args: list[str]) -> list[str]:
        try:
            return super().parse_args(ctx, args)
        except Exception as exc:  # click's NoSuchOption, matched by its fields: typer may vendor click
            name = getattr(exc, "option_name", None)
            if isinstance(name, str) and name.startswith("--") and hasattr(exc, "possibilities"):
                names = [
                    o[2:] for p in self.get_params(ctx) for o in (*p.opts, *p.secondary_opts) if o.startswith("--")
                ]
                exc.possibilities = ["--" + n for n in difflib.get_close_matches(name[2:], names)]
            raise


class App(typer.Typer):
    """A typer app whose commands suggest the closest option for a typo."""

    def command(self, *args: Any, **kwargs: Any) -> Any:
        kwargs.setdefault("cls", SuggestingCommand)
        return super().command(*args, **kwargs)


# Plain (click) help, not rich panels: at 80 columns rich squeezed option names to `--no-freeze-bac…`.
app = App(
    help="Train image classifiers on EC2 GPU boxes in plain PyTorch, and ship them to a secure endpoint.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)


def group(name: str, help: str) -> App:
    """A command group (`ec2train NAME ...`) added to the app."""
    sub = App(help=help, no_args_is_help=True, rich_markup_mode=None)
    app.add_typer(sub, name=name)
    return sub


def _choices(name: str, values: tuple[str, ...]) -> type[Enum]:
    return Enum(name, [(v, v) for v in values], type=str)  # type: ignore[return-value]


if TYPE_CHECKING:  # the checker sees enums; the values come from the tuples below
    Amp: TypeAlias = Enum
    Compile: TypeAlias = Enum
    Device: TypeAlias = Enum
    Loader: TypeAlias = Enum
    BenchLoaders: TypeAlias = Enum
    Optim: TypeAlias = Enum
    SpotWatch: TypeAlias = Enum
else:
    Amp = _choices("Amp", AMP_MODES)
    Compile = _choices("Compile", ("auto", "on", "off"))  # hw.COMPILE_MODES (hw imports torch; --help must not)
    Device = _choices("Device", DEVICES)
    Loader = _choices("Loader", LOADERS)
    BenchLoaders = _choices("BenchLoaders", ("both", "cpu", "gpu"))
    Optim = _choices("Optim", OPTIMIZERS)
    SpotWatch = _choices("SpotWatch", WATCH_MODES)


MODEL_HELP = "Model file written by `ec2train fit`."
LOADER_HELP = (
    "Who decodes and augments the images. cpu: the loader workers (decode, random crop, resize). "
    "gpu: the workers only read the files and check their headers; the GPU decodes each batch's JPEGs "
    "(nvJPEG) and crops, flips and resizes them (other files are still decoded by the workers); for a "
    "GPU box with few CPUs (4 vCPUs per GPU on g4dn/g5.xlarge). auto: cpu until bench/gpu_check.py "
    "has passed with the GPU loader on a GPU (it has not yet: --loader gpu opts in), then gpu on a CUDA "
    "box with JPEG data and at most 8 CPUs per GPU."
)
THREADS_HELP = (
    "Torch CPU threads per process; 0 = the thread plan: this process's share of the CPUs less its "
    "loader workers or decode thread (docs/performance.md)."
)
DEFAULT_MODEL = Path(str(FIELDS["output"].default), "model.pth")  # where fit puts the model with its defaults


def value(x: Any) -> Any:
    """An enum option's plain value (None stays None)."""
    return x.value if isinstance(x, Enum) else x


def train_settings(options: dict[str, Any], exclude: tuple[str, ...] = ()) -> dict[str, Any]:
    """The TrainConfig settings among a command's options (pass its locals() first thing), enum
    choices as their plain values, for config.resolve: each option named like a field is one."""
    return {name: value(v) for name, v in options.items() if name in FIELDS and name not in exclude}


def default_of(name: str) -> Any:
    """TrainConfig's default for a setting: the one place defaults are written."""
    return FIELDS[name].default


def _shown(default: Any) -> str:
    if isinstance(default, bool):
        return "on" if default else "off"
    if isinstance(default, float):
        return f"{default:g}"
    return "" if default is None else str(default)


def setting(name: str, help: str, *flags: str, shown: str = "{}", **kwargs: Any) -> Any:
    """An option for TrainConfig's field `name`, default None (not given: --config, then the dataclass).

    Its help ends with the dataclass default; `shown` words it, with {} standing for the value.
    """
    text = shown.format(_shown(default_of(name)))
    return typer.Option(None, *flags, help=f"{help} [default: {text}]" if text else help, **kwargs)


def use_thread_plan(threads: int, workers: int, quiet: bool = False) -> None:
    """evaluate/predict: apply this process's thread plan (threads.plan_threads) and show it on stderr."""
    from ec2train.threads import apply_threads, plan_threads

    plan = apply_threads(plan_threads(workers=workers, override=threads))
    if not quiet:
        err_console.print(f"[dim]{plan.describe()}[/dim]")
