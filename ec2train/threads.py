"""The CPU thread plan: how many CPUs this process may use (affinity mask, cgroup quota), and
how torch's threads share them with loader workers, decode threads, other processes and
concurrent forward passes. Every command asks `plan_threads` (the server `serve_thread_plan`,
launchers `launch_env`) and applies the answer with `apply_threads`; `ThreadTuner` and
`ThreadTiming` refine the count for CPU training by timing real steps.

torch's intra-op (OpenMP) pool defaults to every core of the box. Loader workers, the server's
decode threads, other ranks and other programs want those cores too, and spinning OpenMP threads
that are not all scheduled at once stall each other (docs/performance.md, "CPU threads"). So
the plan gives torch only the cores left after everything else this process starts.

Imports torch and the standard library only: the SageMaker model package ships this module.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from statistics import median
from typing import Any

import torch

from ec2train.hw import HardwareError

THREADS_ENV = "OMP_NUM_THREADS"  # set by launchers (torchrun, `fit --nproc-per-node`, tune) to a process's share


def parse_cgroup_quota(
    cpu_max: str | None = None, quota_us: str | None = None, period_us: str | None = None
) -> float | None:
    """CPUs a cgroup quota allows: v2 `cpu.max` ("150000 100000" -> 1.5, "max 100000" -> None)
    or v1 `cpu.cfs_quota_us` / `cpu.cfs_period_us` (-1: no limit). None when there is no limit."""
    try:
        if cpu_max is not None:
            quota, _, period = cpu_max.strip().partition(" ")
            if quota == "max":
                return None
            return int(quota) / int(period or 100000)
        if quota_us is not None and period_us is not None and int(quota_us) > 0:
            return int(quota_us) / int(period_us)
    except (ValueError, ZeroDivisionError):
        return None
    return None


def cgroup_cpu_quota(root: str = "/sys/fs/cgroup") -> float | None:
    """This process's container CPU limit (Docker --cpus, ECS/Kubernetes limits), if any."""

    def read(path: str) -> str | None:
        try:
            with open(os.path.join(root, path)) as f:
                return f.read()
        except OSError:
            return None

    v2 = read("cpu.max")
    if v2 is not None:
        return parse_cgroup_quota(cpu_max=v2)
    return parse_cgroup_quota(
        quota_us=read("cpu/cpu.cfs_quota_us") or read("cpu.cfs_quota_us"),
        period_us=read("cpu/cpu.cfs_period_us") or read("cpu.cfs_period_us"),
    )


def available_cpus() -> int:
    """CPUs this process may run on: its affinity mask, cut to its cgroup quota (rounded up)."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # macOS
        cpus = os.cpu_count() or 1
    quota = cgroup_cpu_quota()
    return max(1, min(cpus, math.ceil(quota)) if quota else cpus)


@dataclass(frozen=True)
class ThreadPlan:
    cpus: int  # CPUs this process may use (affinity, cgroup quota)
    share: int  # of them, this process's share: cpus / processes on the box, capped by OMP_NUM_THREADS
    procs: int
    workers: int  # loader worker processes (torch runs them with 1 thread each)
    decode_threads: int  # server threads that decode while a forward pass runs
    intra_op: int  # torch.set_num_threads
    inter_op: int  # torch.set_num_interop_threads (eager mode barely uses them)
    source: str  # "auto" or "--threads"
    lanes: int = 1  # forward passes run at once (the server), each with intra_op threads

    def describe(self) -> str:
        others = [f"{self.workers} loader worker{'s' * (self.workers != 1)}"] if self.workers else []
        others += (
            [f"{self.decode_threads} decode thread{'s' * (self.decode_threads != 1)}"] if self.decode_threads else []
        )
        why = f"{self.share} of {self.cpus} CPUs for this process ({self.procs} on the box)"
        why += f", {' + '.join(others)}" if others else ""
        if self.source != "auto":
            why = f"set by {self.source}"
        lanes = f" in each of {self.lanes} forward lanes" if self.lanes > 1 else ""
        return f"threads: torch {self.intra_op} intra-op{lanes}, {self.inter_op} inter-op ({why})"


def thread_plan(
    cpus: int,
    procs: int = 1,
    workers: int = 0,
    decode_threads: int = 0,
    override: int = 0,
    launcher_share: int | None = None,
    lanes: int = 1,
) -> ThreadPlan:
    """Torch's threads: this process's share of the CPUs minus its loader workers and decode
    threads, split between `lanes` concurrent forward passes, at least 1 each; `override`
    (--threads N, N > 0) wins. `launcher_share` is the OMP_NUM_THREADS a launcher (torchrun,
    tune) or the user gave this process: a cap on its share. Pure.

    Lanes of one thread each may together exceed what is left after the decode threads: a
    one-thread lane has no OpenMP team, so nothing spins waiting when the OS shares a core."""
    if override < 0:
        raise HardwareError(f"--threads {override}: use 0 (auto) or a positive number of threads")
    if workers < 0 or decode_threads < 0 or procs < 1 or lanes < 1:
        raise ValueError(
            f"thread_plan: workers {workers}, decode threads {decode_threads}, processes {procs}, lanes {lanes}"
        )
    cpus = max(1, cpus)
    share = max(1, cpus // procs)
    if launcher_share and launcher_share > 0:  # a launcher's (or the user's) OMP_NUM_THREADS caps the share
        share = min(share, launcher_share)
    intra = override or max(1, (share - workers - decode_threads) // lanes)
    source = "--threads" if override else "auto"
    return ThreadPlan(cpus, share, procs, workers, decode_threads, intra, 1, source, lanes)


def serve_lanes(share: int) -> int:
    """Forward passes a server process runs at once: two where it has two cores or more.

    On the CPU one pass of a small batch cannot use many cores well (a second thread barely
    shortens it), and while it runs the next batch's requests only wait. Two lanes let a second batch start at once, and two one-thread passes use two cores
    without an OpenMP team that collapses when another program takes a core. Pure."""
    return 2 if share >= 2 else 1


def serve_thread_plan(cpus: int, procs: int = 1, override: int = 0, launcher_share: int | None = None) -> ThreadPlan:
    """A server process's plan: one of `procs` workers, one decode thread, `serve_lanes` lanes. Pure."""
    share = thread_plan(cpus, procs, launcher_share=launcher_share).share
    return thread_plan(cpus, procs, 0, 1, override, launcher_share, serve_lanes(share))


def tuning_candidates(plan: ThreadPlan, device_type: str, world_size: int) -> tuple[int, ...]:
    """The thread counts `ThreadTuner` compares for CPU training: the plan's, and the share when
    loader workers took cores from it (a light loader leaves them idle), or half the share when
    they did not (another program may be using the box). Nothing to compare with --threads, on
    a GPU (torch's CPU threads barely matter there) or across DDP ranks (a rank's step time is
    the slowest rank's). Pure."""
    if plan.source != "auto" or device_type != "cpu" or world_size > 1:
        return (plan.intra_op,)
    other = plan.share if plan.intra_op < plan.share else max(1, plan.share // 2)
    return (plan.intra_op,) if other == plan.intra_op else (plan.intra_op, other)


@dataclass
class ThreadTuner:
    """Chooses torch's intra-op threads for CPU training by timing real steps (data wait
    included), not by guessing what else runs on the box.

    A static plan cannot be right both ways on a small box: on an idle box more threads step
    faster, beside one busy process fewer do (spinning OpenMP threads collapse; the figures are
    in docs/performance.md). So during the first epoch the candidates
    alternate step by step until each has `probe` timings, and the fastest median wins (the
    plan's count keeps its place unless another is `margin` faster; when after `probe - 1`
    rounds every step of one count is `clear` faster than every step of the others, the probe
    ends there: a short run pays for the slow count's extra step). The choice then holds for
    the rest of the run and is recorded with each epoch, so a resumed run takes it over and
    repeats the same arithmetic (a different thread count changes the float reduction order).
    Pure: `observe` is fed the times, `threads` says what to run next."""

    candidates: tuple[int, ...]
    probe: int = 3
    margin: float = 0.05
    clear: float = 0.2
    chosen: int = 0
    times: dict[int, list[float]] = field(default_factory=dict)
    schedule: list[int] = field(default_factory=list)

    def __post_init__(self):
        self.chosen = self.chosen or self.candidates[0]
        self.times = {c: [] for c in self.candidates}
        self.schedule = list(self.candidates) * self.probe if len(self.candidates) > 1 else []

    @property
    def probing(self) -> bool:
        return bool(self.schedule)

    def threads(self) -> int:
        """Threads for the next step."""
        return self.schedule[0] if self.schedule else self.chosen

    def observe(self, threads: int, seconds: float) -> int | None:
        """A step at `threads` took `seconds`; returns the new choice when the probe ends with one."""
        if not self.schedule or threads != self.schedule[0]:
            return None
        self.schedule.pop(0)
        self.times[threads].append(seconds)
        return self.settle() if not self.schedule or self._separated() else None

    def _separated(self) -> bool:
        """Each count has probe - 1 timings, and one count's slowest step beats every other
        count's fastest by `clear`."""
        if self.probe < 3 or any(len(t) < self.probe - 1 for t in self.times.values()):
            return False
        best = min(self.times, key=lambda c: max(self.times[c]))
        return all(max(self.times[best]) * (1 + self.clear) < min(t) for c, t in self.times.items() if c != best)

    def settle(self, threads: int | None = None) -> int | None:
        """Ends the probe: keeps `threads` (a resumed run's), or picks from the timings so far
        (the plan's count when a candidate has none). Returns the choice when it changed."""
        self.schedule = []
        before = self.chosen
        if threads in self.candidates:
            self.chosen = threads
        elif all(self.times.values()):
            speed = {c: median(t) for c, t in self.times.items()}
            best = min(speed, key=speed.__getitem__)
            if speed[best] < speed[self.chosen] * (1 - self.margin):
                self.chosen = best
        return self.chosen if self.chosen != before else None

    def describe(self) -> str:
        """The probe's timings: `1 thread 0.93 s/step, 2 threads 0.69 s/step`."""
        return ", ".join(
            f"{c} thread{'s' * (c != 1)} {median(t):.2f} s/step" for c, t in sorted(self.times.items()) if t
        )


def launcher_share_from_env(environ: Mapping[str, str] | None = None) -> int | None:
    """The OMP_NUM_THREADS a launcher (or the user) gave this process, when it is a positive number."""
    value = (os.environ if environ is None else environ).get(THREADS_ENV, "")
    return int(value) if value.strip().isdigit() and int(value) > 0 else None


def plan_threads(
    procs: int = 1, workers: int = 0, decode_threads: int = 0, override: int = 0, lanes: int = 1
) -> ThreadPlan:
    """The plan for this process, from its CPUs and the launcher's OMP_NUM_THREADS."""
    return thread_plan(
        available_cpus(), procs, workers, decode_threads, override or 0, launcher_share_from_env(), lanes
    )


def process_share(procs: int, cpus: int | None = None) -> int:
    """Each of `procs` processes' share of this box's CPUs (thread_plan's `share`)."""
    return thread_plan(available_cpus() if cpus is None else cpus, max(1, procs)).share


def launch_env(procs: int, environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment for `procs` processes this one starts side by side (torchrun's ranks,
    tune's parallel trials): each gets its share of the CPUs as OMP_NUM_THREADS, which its own
    plan then caps its threads at (torchrun would give each 1). A value the user set stays."""
    env = dict(os.environ if environ is None else environ)
    env.setdefault(THREADS_ENV, str(process_share(procs)))
    return env


def apply_threads(plan: ThreadPlan) -> ThreadPlan:
    """Give torch the plan's threads (the one place a process sets them)."""
    torch.set_num_threads(plan.intra_op)
    try:
        torch.set_num_interop_threads(plan.inter_op)
    except RuntimeError:  # only allowed once, before any inter-op work; the intra-op count is what matters
        pass
    return plan


class ThreadTiming:
    """Times fit's steps for a ThreadTuner and applies what it picks. A step is timed from the
    end of the previous one (so the wait for its batch counts); the first step of an epoch,
    which waits for the loader to start, is not timed. The probe ends with the first epoch
    trained; a resumed run takes the count its last epoch recorded (`history`)."""

    def __init__(self, tuner: ThreadTuner | None, history: list[dict[str, Any]]):
        self.tuner: ThreadTuner | None = tuner
        self.last: float | None = None
        self.applied = torch.get_num_threads()
        self.notes: list[str] = []
        if tuner is not None and history and history[-1].get("threads") in tuner.candidates:
            tuner.settle(history[-1]["threads"])

    def epoch_start(self) -> None:
        self.last = None
        self._apply()

    def step(self) -> None:
        if self.tuner is None or not self.tuner.probing:
            return
        now = time.perf_counter()
        if self.last is not None:
            self._note(self.tuner.observe(self.applied, now - self.last))
        self.last = now
        self._apply()

    def epoch_end(self) -> None:
        if self.tuner is not None and self.tuner.probing:
            self._note(self.tuner.settle())
        self._apply()

    def threads(self) -> int:
        return self.tuner.chosen if self.tuner is not None else torch.get_num_threads()

    def _note(self, picked: int | None) -> None:
        if picked and self.tuner is not None:
            self.notes.append(f"threads: torch {picked} intra-op from here on ({self.tuner.describe()})")

    def _apply(self) -> None:
        if self.tuner is not None and (n := self.tuner.threads()) != self.applied:
            torch.set_num_threads(n)
            self.applied = n

    def take_notes(self) -> list[str]:
        notes, self.notes = self.notes, []
        return notes
