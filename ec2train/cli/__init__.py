"""The `ec2train` command: thin; parses options, calls library functions, prints with rich.

Each public module here holds one command group and registers it on `app` when imported:
train (fit, evaluate, predict, archs, tune, bench), data, serve (serve, export), deploy.
A new group is one new file: `cli/NAME.py` with `NAME_app = group("NAME", help=...)` from
`ec2train.cli._app` and `@NAME_app.command()` functions; main() finds it by itself.
"""

from __future__ import annotations

import importlib
import pkgutil
import sys

from rich.markup import escape

from ec2train.cli._app import Invocation, app, err_console
from ec2train.errors import UserError


def _register_commands() -> None:
    """Import every command module (train first: `fit` leads the help, the rest by name)."""
    names = sorted(m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_"))
    for name in sorted(names, key=lambda n: n != "train"):
        importlib.import_module(f"{__name__}.{name}")


_register_commands()


def _one_line(exc: BaseException) -> str:
    """A user error's message; for one re-raised from a DataLoader worker, its original line."""
    msg = str(exc).strip()
    if "Original Traceback" in msg:
        last = msg.splitlines()[-1]
        msg = last.split(": ", 1)[1] if ": " in last else last
    return msg.splitlines()[0] if msg else type(exc).__name__


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else list(argv)
    try:
        # The arguments travel in the context: `fit --nproc-per-node` relays them to torchrun.
        app(args=args, obj=Invocation(tuple(args)), standalone_mode=True)
    except UserError as exc:
        err_console.print(f"[bold red]error:[/bold red] {escape(_one_line(exc))}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except KeyboardInterrupt:
        # Inside a command typer turns Ctrl-C into exit 130 itself (fit says where its run
        # stands first); this is Ctrl-C outside one, such as while an error is printed.
        sys.exit(130)


if __name__ == "__main__":
    main()
