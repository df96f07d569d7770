"""The base of every error that is the user's to fix: the CLI prints it as one line and exits 2.

Standard library only, because it ships inside the SageMaker model package with model.py.
"""

import shlex
import sys


class UserError(ValueError):
    """Bad input, settings, files or environment; the message names the problem and the fix."""


def first_line(exc: BaseException) -> str:
    """An exception as one line, "Type: the first line of its message", for errors and logs
    that must stay one line (a compiler's or a database's message can span pages)."""
    msg = str(exc).strip()
    return f"{type(exc).__name__}: {msg.splitlines()[0] if msg else ''}".rstrip(": ")


def pip_install(*requirements: str) -> str:
    """The command that installs `requirements` into the Python running ec2train: a bare `pip`
    is whichever comes first on PATH, often another Python's."""
    return " ".join([shlex.quote(sys.executable), "-m", "pip", "install", *map(shlex.quote, requirements)])
