"""Trials side by side (--parallel, or one per GPU): each in a process of its own, pinned to its
GPU with CUDA_VISIBLE_DEVICES, sharing the study through its storage. One trial per process, so
a crash or CUDA error ends one trial, not the search. `python -m ec2train.tune` is that process."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rich.console import Console

from ec2train.data import default_workers
from ec2train.errors import UserError
from ec2train.files import atomic_write_text
from ec2train.spot import EXIT_INTERRUPTED
from ec2train.threads import launch_env
from ec2train.tune.space import TuneError
from ec2train.tune.study import TrialSetup, open_storage, require_optuna, sampler
from ec2train.tune.trial import Objective

SETUP_FILE = ".tune-trials-{pid}.json"
# The storage URL reaches trial processes through the environment, not argv or a file:
# a database URL may hold a password.
STORAGE_ENV = "EC2TRAIN_TUNE_STORAGE"


# ---------------------------------------------------------------- dispatch decisions (pure)


def visible_gpus(cuda_visible_devices: str | None, device_count: int) -> list[str]:
    """The GPU ids this process may hand out: CUDA_VISIBLE_DEVICES's entries, else 0..count-1."""
    if cuda_visible_devices is None:
        return [str(i) for i in range(device_count)]
    ids = [x.strip() for x in cuda_visible_devices.split(",") if x.strip()]
    return ids[:device_count]


def worker_count(parallel: int | None, gpus: list[str], device: str) -> int:
    """--parallel N, else one worker per GPU (one on a CPU box or with --device cpu)."""
    if parallel is not None:
        if parallel < 1:
            raise TuneError(f"--parallel {parallel}: must be at least 1")
        return parallel
    return 1 if device == "cpu" else max(1, len(gpus))


def plan_workers(workers: int, gpus: list[str], device: str) -> list[str | None]:
    """CUDA_VISIBLE_DEVICES for each worker: GPUs round-robin; None (inherit) on the CPU."""
    if device == "cpu" or not gpus:
        return [None] * workers
    return [gpus[i % len(gpus)] for i in range(workers)]


def loader_workers(requested: int, cpus: int, workers: int) -> int:
    """Data-loader processes per trial when trials share the box's CPUs."""
    return requested if requested >= 0 else default_workers(cpus, workers)


# ---------------------------------------------------------------- the dispatcher


class ParallelTrials:
    """Starts `to_run` trials in one slot per entry of `devices` (a thread each, starting trial
    processes one after another) until all have started or the deadline passes.

    A trial process that a spot notice or SIGTERM stopped exits 75: no slot starts another, and
    `stopped_by` says so. Each trial process watches for the notice itself. SIGTERM to this
    process starts no new trial (a second one ends it as usual); it is not passed on, since
    whatever sends it to a group (systemd at shutdown, a terminal's Ctrl-C) reaches the trial
    processes too, and a second SIGTERM would end them at once instead of at their next step."""

    def __init__(
        self,
        setup: TrialSetup,
        storage_url: str,
        to_run: int,
        devices: list[str | None],
        deadline: float | None,
        say: Callable[[str], None],
    ):
        self.setup, self.storage_url, self.devices, self.deadline, self.say = (
            setup,
            storage_url,
            devices,
            deadline,
            say,
        )
        self.stopped_by = ""
        self._left, self._seq = to_run, 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._procs: dict[int, subprocess.Popen] = {}

    def run(self) -> None:
        setup_file = atomic_write_text(self.setup.output / SETUP_FILE.format(pid=os.getpid()), self.setup.to_json())
        env = launch_env(len(self.devices), {**os.environ, STORAGE_ENV: self.storage_url})
        slots = [
            threading.Thread(target=self._slot, args=(i, device, setup_file, env), daemon=True)
            for i, device in enumerate(self.devices)
        ]
        previous = self._stop_on_sigterm()
        try:
            for t in slots:
                t.start()
            for t in slots:
                while t.is_alive():
                    t.join(0.5)
        except KeyboardInterrupt:
            self._stop.set()
            for t in slots:
                t.join(60)
            for proc in self._procs.values():  # started just as Ctrl-C came, so it never got it
                if proc.poll() is None:
                    proc.terminate()
            raise
        finally:
            if previous is not None:
                signal.signal(signal.SIGTERM, previous)
            setup_file.unlink(missing_ok=True)

    def _next(self) -> int | None:
        """The next trial's sequence number, or None when no more may start."""
        with self._lock:
            late = self.deadline is not None and time.monotonic() >= self.deadline
            if self._left <= 0 or late or self._stop.is_set():
                return None
            self._left -= 1
            self._seq += 1
            return self._seq

    def _slot(self, i: int, device: str | None, setup_file: Path, env: dict[str, str]) -> None:
        if device is not None:
            env = {**env, "CUDA_VISIBLE_DEVICES": device}
        label = f"[gpu {device}] " if device is not None else f"[worker {i}] "
        while (seq := self._next()) is not None:
            proc = subprocess.Popen([sys.executable, "-m", "ec2train.tune", str(setup_file), label, str(seq)], env=env)
            self._procs[i] = proc
            rc = proc.wait()
            if rc == EXIT_INTERRUPTED:
                self.stopped_by = self.stopped_by or "a spot interruption notice or SIGTERM"
                self._stop.set()
            elif rc not in (0, 130) and (self.stopped_by or not self._stop.is_set()):
                self._fail_orphans(proc.pid)  # killed before it could record its trial
                self.say(f"{label}trial process exited with code {rc}; its trial is recorded as failed")

    def _stop_on_sigterm(self) -> Any:
        """Install the SIGTERM handler (main thread only); returns the previous one, to restore."""
        if threading.current_thread() is not threading.main_thread():
            return None

        def on_sigterm(signum: int, frame: Any) -> None:
            self.stopped_by = "SIGTERM"
            self._stop.set()
            signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a second one ends this process

        return signal.signal(signal.SIGTERM, on_sigterm)

    def _fail_orphans(self, pid: int) -> None:
        """A trial process that died (OOM kill, segfault) leaves its trial RUNNING; record it as failed."""
        optuna = require_optuna()
        study = optuna.load_study(study_name=self.setup.study, storage=open_storage(self.storage_url))
        for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
            if t.user_attrs.get("pid") == pid:
                study.tell(t.number, state=optuna.trial.TrialState.FAIL)


def worker_main(argv: list[str]) -> int:
    """`python -m ec2train.tune SETUP_FILE LABEL SEQ`: run one trial of the study in this process.
    Exit status: 0, 2 bad input, 75 stopped by a spot notice or SIGTERM, 130 Ctrl-C."""
    console = Console(soft_wrap=True)
    try:
        optuna = require_optuna()
        optuna.logging.set_verbosity(optuna.logging.ERROR)
        setup_file, label, seq = argv
        setup = TrialSetup.from_json(Path(setup_file).read_text())
        study = optuna.load_study(
            study_name=setup.study,
            storage=open_storage(os.environ[STORAGE_ENV]),
            sampler=sampler([setup.base.seed, int(seq), os.getpid()]),
            pruner=setup.pruner(),
        )
        objective = Objective(setup, lambda msg: console.print(msg, highlight=False, markup=False), label)
        study.optimize(objective, n_trials=1, catch=(Exception,))
    except KeyboardInterrupt:
        return 130  # Optuna has recorded the trial as failed
    except UserError as exc:
        Console(stderr=True).print(f"[bold red]error:[/bold red] {exc}", highlight=False)
        return 2
    return EXIT_INTERRUPTED if objective.stopped_by else 0
