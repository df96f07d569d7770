"""Ctrl-C on a real `ec2train fit` process: SIGINT sent to its whole process group, as a
terminal does (DataLoader workers get it too). The first stops at the next step, keeps the
last completed epoch's checkpoint and says so (exit 130); a second one quits at once, even
while the final S3 upload hangs."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from tests.support.aws import FaultyProxy

HINT = "interrupted; the last completed epoch's checkpoint is intact (resume with --resume auto)"
EPOCHS = 40  # far more than the tests wait for: the run must not end by itself first


class FitProcess:
    """`python -m ec2train fit ...` in a new process group; its output collected line by line."""

    def __init__(self, args: list[str], env: dict[str, str] | None = None):
        env = dict(os.environ if env is None else env, OMP_NUM_THREADS="1")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "ec2train", "fit", *args],
            env=env,
            text=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line)

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def wait_for(self, ready, what: str, timeout: float = 300) -> None:
        """Poll (no fixed sleeps: the box may be slow) until ready() or fail with the output."""
        deadline = time.monotonic() + timeout
        while not ready():
            assert self.proc.poll() is None, f"fit ended (exit {self.proc.returncode}) before {what}:\n{self.output}"
            assert time.monotonic() < deadline, f"no {what} after {timeout} s:\n{self.output}"
            time.sleep(0.05)

    def ctrl_c(self) -> None:
        os.killpg(self.proc.pid, signal.SIGINT)  # the whole group, as a terminal sends it

    def finish(self, timeout: float = 240) -> int:
        try:
            code = self.proc.wait(timeout=timeout)
        finally:
            if self.proc.poll() is None:
                os.killpg(self.proc.pid, signal.SIGKILL)
        self._reader.join(timeout=30)
        return code

    def group_gone(self, timeout: float = 30) -> bool:
        """True once no process of the group (the DataLoader workers included) is left."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                os.killpg(self.proc.pid, 0)
            except ProcessLookupError:
                return True
            time.sleep(0.1)
        return False


def _children(pid: int) -> list[int]:
    from ec2train.cli.train import _children as children

    return children(pid)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def fit_args(data: Path, tmp: Path, workers: int) -> list[str]:
    return [
        "--data",
        str(data),
        "--output",
        str(tmp / "out"),
        "--logdir",
        str(tmp / "runs"),
        "--arch",
        "resnet18",
        "--weights",
        "none",
        "--image-size",
        "32",
        "--batch-size",
        "16",
        "--epochs",
        str(EPOCHS),
        "--workers",
        str(workers),
        "--spot-watch",
        "off",
    ]


@pytest.mark.parametrize("workers, nproc", [(0, 0), (1, 0), (0, 2)])
def test_ctrl_c_stops_at_the_next_step_keeps_the_checkpoint_and_says_how_to_resume(demo_data, tmp_path, workers, nproc):
    """Also with --nproc-per-node 2: torchrun's ranks stop at their step the same way, and the
    launcher waits for them and exits 130 (not torchrun's 1, nor at once)."""
    fit = FitProcess(fit_args(demo_data, tmp_path, workers) + (["--nproc-per-node", str(nproc)] if nproc else []))
    ckpt = tmp_path / "out" / "last.pt"
    try:
        fit.wait_for(ckpt.exists, "epoch 1's checkpoint")  # epoch 2 is under way
        ranks = [p for agent in _children(fit.proc.pid) for p in _children(agent)]
        assert len(ranks) == nproc, ranks
        fit.ctrl_c()
        code = fit.finish()
        # torchrun's ranks lead sessions of their own: the launcher waited for every one of them.
        assert not [p for p in ranks if _alive(p)], "ranks outlived the launcher"
    finally:
        if fit.proc.poll() is None:
            os.killpg(fit.proc.pid, signal.SIGKILL)
    output, text = fit.output, " ".join(fit.output.split())
    print(output)
    assert code == 130, output
    assert HINT in text and "Traceback" not in output, output
    assert "DataLoader worker" not in output, output  # the workers ignored the terminal's Ctrl-C
    state = torch.load(ckpt, map_location="cpu", weights_only=True)  # intact, loadable as --resume reads it
    assert 1 <= state["epoch"] < EPOCHS
    assert (
        f"stopped by Ctrl-C: {state['epoch']} of {EPOCHS} epochs done, the checkpoint of epoch {state['epoch']} is in"
        in text
    )
    assert not list(ckpt.parent.glob("*.tmp*")), list(ckpt.parent.iterdir())  # no half-written file left
    assert fit.group_gone(), "DataLoader workers outlived the run"


def test_a_second_ctrl_c_quits_at_once_even_while_the_final_s3_upload_hangs(aws, demo_data, tmp_path):
    from ec2train import aws as aws_mod

    aws_mod.client("s3").create_bucket(Bucket="ec2train-ctrl-c")
    proxy = FaultyProxy(aws)
    # Every upload of last.pt hangs for 10 minutes: the flush after the first Ctrl-C cannot end.
    proxy.delay = (lambda method, path: method == "PUT" and "last.pt" in path, 600.0)
    fit = FitProcess(
        [*fit_args(demo_data, tmp_path, 0), "--s3-uri", "s3://ec2train-ctrl-c/run"],
        env=dict(os.environ, AWS_ENDPOINT_URL=proxy.url),
    )
    try:
        fit.wait_for((tmp_path / "out" / "last.pt").exists, "epoch 1's checkpoint")
        fit.ctrl_c()
        fit.wait_for(lambda: "Ctrl-C again to skip" in fit.output, "the final upload")
        t0 = time.monotonic()
        fit.ctrl_c()
        code = fit.finish(timeout=120)
        took = time.monotonic() - t0
    finally:
        if fit.proc.poll() is None:
            os.killpg(fit.proc.pid, signal.SIGKILL)
        proxy.close()
    output = fit.output
    print(output)
    assert code == 130, output
    assert HINT in " ".join(output.split()) and "Traceback" not in output, output
    # "At once": nothing waits for the hung upload (a generous bound for a loaded 2-core box).
    assert took < 30, f"{took:.1f} s after the second Ctrl-C:\n{output}"
