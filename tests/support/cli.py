"""The real CLI, run as a subprocess or in this process, and its one-line error contract."""

from __future__ import annotations

import subprocess
import sys

import pytest


def run_cli(*args: str, timeout: float = 300, env: dict | None = None, cwd=None) -> subprocess.CompletedProcess:
    """Run the real entry point (`python -m ec2train ...`) in a subprocess."""
    return subprocess.run(
        [sys.executable, "-m", "ec2train", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        cwd=cwd,
    )


def cli_in_process(capsys, *args: str) -> tuple[int, str, str]:
    """Run ec2train.cli.main in this process; returns (exit code, stdout, stderr)."""
    from ec2train.cli import main

    with pytest.raises(SystemExit) as exc:
        main([str(a) for a in args])
    out = capsys.readouterr()
    code = exc.value.code if isinstance(exc.value.code, int) else (0 if exc.value.code is None else 1)
    return code, out.out, out.err


def assert_one_line_error(code: int, err: str, *needles: str) -> None:
    assert code == 2, err
    assert "Traceback" not in err, err
    text = " ".join(err.split())
    assert text.startswith("error:"), err
    for needle in needles:
        assert needle.lower() in text.lower(), (needle, err)


class Quiet:
    """A console that prints nothing (for library calls that take one)."""

    def print(self, *a, **k):
        pass

    out = status = print
