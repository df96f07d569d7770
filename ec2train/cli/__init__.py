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
from typing import NoReturn

from rich.markup import escape

from ec2train.cli._app import Invocation, app, err_console
from ec2train.errors import UserError
from ec2train.names import printable


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
        err_console.print(
            f"[bold red]error:[/bold red] {escape(printable(_one_line(exc)))}", highlight=False, soft_wrap=True
        )
        sys.exit(2)
    except KeyboardInterrupt:
        # Inside a command typer turns Ctrl-C into exit 130 itself (fit says where its run
        # stands first); this is Ctrl-C outside one, such as while an error is printed.
        sys.exit(130)


def program() -> None:
    """The `ec2train` program (console script and `python -m ec2train`): main(), then a quick
    exit. Python's own exit tears down every module, and after torch and torchvision that
    takes seconds, which every command would pay (docs/performance.md). A
    finished command has closed its files and joined its threads, so the exit runs the atexit
    handlers (logging, multiprocessing's children) and ends the process. While a thread that
    Python would wait for is still running, the exit is Python's own."""
    try:
        main()
        code: int | str | None = 0
    except SystemExit as exc:
        code = exc.code
    quick_exit(code)


def quick_exit(code: int | str | None) -> NoReturn:
    import atexit
    import contextlib
    import os
    import threading

    if code is None or isinstance(code, int):
        status = code or 0
    else:  # sys.exit("message"): Python prints it and exits 1
        print(code, file=sys.stderr)
        status = 1
    waits = [t for t in threading.enumerate() if t is not threading.main_thread() and not t.daemon]
    run_exit_handlers = getattr(atexit, "_run_exitfuncs", None)
    if waits or run_exit_handlers is None:
        sys.exit(status)
    run_exit_handlers()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except ValueError:  # closed already
            pass
        except OSError as exc:  # a full disk or a closed pipe: output was lost, so no success (as Python: 120)
            status = status or 120
            with contextlib.suppress(OSError, ValueError):
                print(f"error: could not write the output: {exc}", file=sys.__stderr__, flush=True)
    os._exit(status)


if __name__ == "__main__":
    program()
