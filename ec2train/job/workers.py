"""The training processes of one node: their command, their environment, starting and stopping them.

The runner starts the node's `ec2train fit` processes itself, one per GPU, with the variables
torchrun would give them (RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR, ...): MASTER_ADDR is rank
0's private IP and MASTER_PORT the job's rendezvous port, where rank 0's process opens the
c10d store. No torchrun agent sits in between because the runner already is the node's agent:
it watches the other nodes and starts the next attempt itself. An agent of torchrun's would add
a second store and its own failure rules on top (an agent killed on the store's host takes the
others down, pytorch#67742), and it reports a worker's exit 75 (stopped by a spot notice, its
checkpoint saved) as a plain failure, exit 1: the runner needs the real code.

Each process starts in a session of its own (its loader workers with it), so the runner can
signal it as a group; it dies with the runner (PR_SET_PDEATHSIG), so a runner that vanishes
leaves no training process behind to write into the prefix.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import IO

from ec2train.job.spec import JobError
from ec2train.spot import EXIT_INTERRUPTED

NPROC_OPTION = "--nproc-per-node"
_NPROC_RE = re.compile(r"^(auto|[1-9][0-9]{0,2})$")
# What NCCL may use between nodes: anything but loopback and Docker's bridges (Nitro instances
# name their interface ens5, not eth0, so naming one breaks on some types).
NCCL_IFNAME = "^lo,docker"
PG_TIMEOUT_ENV = "EC2TRAIN_PG_TIMEOUT_SECONDS"  # read by ec2train.ddp.pg_timeout
PG_TIMEOUT_SECONDS = 1200  # a hung collective with every node alive (a GPU fault) ends after this
_PR_SET_PDEATHSIG = 1


def split_nproc(args: list[str]) -> tuple[str | None, list[str]]:
    """(the --nproc-per-node value or None, the arguments without it)."""
    value, out, skip = None, [], False
    for i, arg in enumerate(args):
        if skip:
            skip = False
        elif arg == NPROC_OPTION:
            value, skip = (args[i + 1] if i + 1 < len(args) else ""), True
        elif arg.startswith(NPROC_OPTION + "="):
            value = arg.split("=", 1)[1]
        else:
            out.append(arg)
    if value is not None and not _NPROC_RE.match(value):
        raise JobError(f"{NPROC_OPTION} {value!r}: use auto (one process per GPU) or a whole number")
    return value, out


def gpu_count(dev: Path = Path("/dev")) -> int:
    """The node's NVIDIA GPUs, from their device files (no torch, no CUDA context)."""
    return sum(1 for p in dev.glob("nvidia*") if re.fullmatch(r"nvidia\d+", p.name))


def processes_per_node(value: str | None, nodes: int, gpus: int) -> int:
    """--nproc-per-node: as given; auto, or unset on a multi-node job, one per GPU (one on a CPU box)."""
    if value is None and nodes == 1:
        return 1
    if value in (None, "auto"):
        return max(1, gpus)
    return int(value)


def worker_envs(
    base: Mapping[str, str],
    *,
    nodes: int,
    node_rank: int,
    nproc: int,
    master_addr: str,
    master_port: int,
    ifname: str | None,
    efa: bool,
) -> list[dict[str, str]]:
    """One environment per local process. A lone process gets `base` as is (a plain fit); its
    OMP_NUM_THREADS comes with `base` (threads.launch_env), as for every launcher."""
    if nodes * nproc == 1:
        return [dict(base)]
    common = {
        **base,
        "MASTER_ADDR": master_addr,
        "MASTER_PORT": str(master_port),
        "WORLD_SIZE": str(nodes * nproc),
        "LOCAL_WORLD_SIZE": str(nproc),
        "GROUP_RANK": str(node_rank),
        "GROUP_WORLD_SIZE": str(nodes),
    }
    common.setdefault(PG_TIMEOUT_ENV, str(PG_TIMEOUT_SECONDS))
    if nodes > 1:
        common.setdefault("NCCL_SOCKET_IFNAME", NCCL_IFNAME)
        if ifname:  # gloo (the CPU-side questions between steps) has no exclusion form: name it
            common.setdefault("GLOO_SOCKET_IFNAME", ifname)
        if efa:
            common.setdefault("FI_PROVIDER", "efa")
    return [{**common, "RANK": str(node_rank * nproc + local), "LOCAL_RANK": str(local)} for local in range(nproc)]


def _die_with_parent_fn():
    """A preexec function: the child gets SIGKILL when the runner dies (Linux), resolved before
    the fork so the child calls nothing that could need a lock."""
    try:
        prctl = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    return lambda: prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


def first_failure(codes: list[int | None]) -> tuple[int, int] | None:
    """(local rank, exit code) of the first process that ended with anything but 0 (done) or 75
    (stopped, checkpoint saved): a failure its siblings cannot outlast, as they wait for it in
    their next collective. None when there is none."""
    return next(((i, c) for i, c in enumerate(codes) if c is not None and c not in (0, EXIT_INTERRUPTED)), None)


class Workers:
    """The node's training processes for one attempt, when each ended, and their stop: SIGTERM
    (fit finishes its step and saves), then SIGKILL once the stop's grace is over. Safe to use
    from two threads (the runner's watch loop and its fence)."""

    def __init__(self, cmd: list[str], envs: list[dict[str, str]], log: IO, cwd: Path):
        preexec = _die_with_parent_fn() if sys.platform.startswith("linux") else None
        self.procs = [
            subprocess.Popen(
                cmd, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=cwd, start_new_session=True, preexec_fn=preexec
            )
            for env in envs
        ]
        self.failed_at: float | None = None  # when the first one exited non-zero (time.time())
        self.failure: tuple[int, int] | None = None  # the first (local rank, code) that was a failure
        self.kill_at: float | None = None  # time.monotonic() when what is left gets SIGKILL
        self._lock = threading.RLock()  # the SIGTERM handler may stop them while poll() holds it

    def poll(self) -> bool:
        """True when every process has ended; SIGKILLs them once a stop's grace is over."""
        with self._lock:
            codes = [p.poll() for p in self.procs]
            if self.failed_at is None and any(c not in (None, 0) for c in codes):
                self.failed_at = time.time()
            if self.failure is None:
                self.failure = first_failure(codes)
            if self.kill_at is not None and time.monotonic() >= self.kill_at:
                self.signal(signal.SIGKILL)
            return all(c is not None for c in codes)

    def stop(self, grace: float, term: bool = True) -> None:
        """SIGTERM now (unless not `term`: they are expected to end by themselves), SIGKILL after
        `grace` seconds; an earlier SIGKILL already set stays."""
        with self._lock:
            if term:
                self.signal(signal.SIGTERM)
            at = time.monotonic() + grace
            self.kill_at = at if self.kill_at is None else min(self.kill_at, at)

    @property
    def stopping(self) -> bool:
        return self.kill_at is not None

    def signal(self, signum: int) -> None:
        for p in self.procs:
            if p.poll() is None:
                try:
                    os.killpg(p.pid, signum)  # the process and its loader workers
                except ProcessLookupError:
                    pass

    @property
    def exit_codes(self) -> list[int | None]:
        return [p.poll() for p in self.procs]

    @property
    def exit_code(self) -> int | None:
        """The node's exit code: the first failure's (not that of a sibling killed after it),
        else the first that is not 0 (75: stopped), else 0."""
        if self.failure is not None:
            return self.failure[1]
        return next((c for c in self.exit_codes if c != 0), 0)
