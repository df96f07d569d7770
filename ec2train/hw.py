"""Hardware decisions as small pure functions: given a device and its capability, what to do.

They run on CPU in the tests; on a GPU the trainer calls them with the real capability.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from statistics import median

import torch

from ec2train.errors import UserError


class HardwareError(UserError):
    """A requested mode the device cannot do."""


@dataclass(frozen=True)
class AmpPolicy:
    enabled: bool
    dtype: torch.dtype | None
    use_scaler: bool  # GradScaler: only for fp16, whose small exponent range underflows gradients

    @property
    def name(self) -> str:
        return {torch.float16: "fp16", torch.bfloat16: "bf16"}.get(self.dtype, "off") if self.enabled else "off"


def supports_bf16(capability: tuple[int, int] | None) -> bool:
    """bf16 tensor cores arrived with Ampere (sm_80): A10G (g5) yes, T4 (g4dn, sm_75) no."""
    return capability is not None and capability >= (8, 0)


def amp_policy(amp: str, device_type: str, capability: tuple[int, int] | None = None) -> AmpPolicy:
    """auto: bf16 on Ampere+, fp16 + GradScaler on older GPUs, off on CPU."""
    off = AmpPolicy(False, None, False)
    fp16 = AmpPolicy(True, torch.float16, True)
    bf16 = AmpPolicy(True, torch.bfloat16, False)
    if amp == "off":
        return off
    if device_type == "cuda":
        if amp == "auto":
            return bf16 if supports_bf16(capability) else fp16
        if amp == "fp16":
            return fp16
        if amp == "bf16":
            if not supports_bf16(capability):
                raise HardwareError(
                    f"--amp bf16 needs an Ampere or newer GPU (this one is sm_{capability[0]}{capability[1]}); use --amp fp16 or auto"
                    if capability
                    else "--amp bf16 needs a GPU that supports bf16"
                )
            return bf16
    else:
        if amp == "auto":
            return off
        if amp == "bf16":
            return bf16
        if amp == "fp16":
            raise HardwareError("--amp fp16 is for GPUs; on the CPU use --amp bf16 or off")
    raise HardwareError(f"--amp {amp}: must be auto, fp16, bf16 or off")


def use_channels_last(requested: bool, device_type: str, frozen: bool = False) -> bool:
    """NHWC feeds tensor-core convolutions on GPUs. On the CPU it helps where the backbone only
    runs forward (frozen: resnet18, batch 32, 2 threads, 32 px 38 ms against 64, 112 px 333
    against 467); a full fine-tune's step measured the same at 32 px and slower at 64 (630 ms
    against 542). Pure."""
    return requested and (device_type == "cuda" or (device_type == "cpu" and frozen))


def inference_channels_last(device_type: str) -> bool:
    """NHWC for inference (predict, serve, the SageMaker handler), on the GPU and on the CPU too:
    oneDNN's NHWC convolutions beat torch's NCHW path for a lone image (resnet18, 64 px, one
    thread: 17 ms against 27 ms) and at 224 px (batch 8: 471 ms against 614 ms). Pure."""
    return device_type in ("cuda", "cpu")


COMPILE_MODES = ("auto", "on", "off")


def compile_forward(mode: str, device_type: str) -> bool:
    """Whether a server compiles its forward pass (torch.compile, inductor, frozen weights, one
    static graph per batch size). auto: on the CPU, where the compiled resnet18 at 64 px took
    6.5-8.0 ms per image against eager's 10.8-14.4 at batch 4 and 10.6-13.5 against 15.0-18.6
    alone (one thread); off on GPUs until it has been measured there. Pure."""
    if mode not in COMPILE_MODES:
        raise UserError(f"--compile {mode}: must be auto, on or off")
    return mode == "on" or (mode == "auto" and device_type == "cpu")


def batch_buckets(max_batch: int) -> tuple[int, ...]:
    """The batch sizes a compiled forward pass is built for: the powers of two below max_batch,
    then max_batch. A pass of n images runs at the smallest bucket that holds n, padded: a static
    shape keeps the compiled kernels (a dynamic batch dimension measured no faster than eager),
    and at most ceil(log2(max_batch)) + 1 graphs are compiled. Pure."""
    if max_batch < 1:
        raise ValueError(f"max_batch must be at least 1, not {max_batch}")
    sizes = [1 << i for i in range(max_batch.bit_length()) if 1 << i < max_batch]
    return (*sizes, max_batch)


def bucket_for(n: int, buckets: tuple[int, ...]) -> int:
    """The smallest bucket that holds n images. Pure."""
    for size in buckets:
        if size >= n:
            return size
    raise ValueError(f"a batch of {n} is larger than the largest compiled batch size {buckets[-1]}")


def use_pin_memory(device_type: str) -> bool:
    return device_type == "cuda"


def optimizer_kernel(device_type: str, torch_version: tuple[int, int]) -> str:
    """How SGD and AdamW update the weights: "fused" (one kernel per parameter group) on CUDA,
    and on the CPU from torch 2.4, which added fused CPU kernels; else "foreach" (multi-tensor).
    On the CPU, resnet18's AdamW step took 14 ms fused against 70 ms foreach (2 threads; SGD:
    12 against 55), and a loop over every parameter 4x foreach. Pure."""
    if device_type == "cuda" or (device_type == "cpu" and torch_version >= (2, 4)):
        return "fused"
    return "foreach"


def torch_version() -> tuple[int, int]:
    major, minor = torch.__version__.split(".")[:2]
    return int(major), int("".join(c for c in minor if c.isdigit()) or 0)


def background_work_helps(device_type: str) -> bool:
    """Whether fit writes its checkpoints in a background thread. Yes
    when an accelerator trains: the CPU mostly waits for it. No on the CPU: the thread plan
    gives torch every core the loader leaves, and a busy extra thread stalls its OpenMP team
    (resnet18 frozen at 32 px on 2 cores: 1.0 s per epoch with last.pt written beside the
    training, 0.65 s with it written in between, in 0.2 s)."""
    return device_type != "cpu"


def cudnn_benchmark(device_type: str, fixed_input_size: bool = True) -> bool:
    """Let cuDNN pick the fastest kernels: worth it when input shapes do not change."""
    return device_type == "cuda" and fixed_input_size


def matmul_precision(device_type: str, capability: tuple[int, int] | None) -> str:
    """'high' lets fp32 matmuls use TF32 tensor cores (Ampere+: A10G, A100, H100) for layers
    that run outside autocast or with --amp off; convolutions already use TF32 by default."""
    return "high" if device_type == "cuda" and supports_bf16(capability) else "highest"


def configure_backends(device_type: str, capability: tuple[int, int] | None) -> None:
    """Apply the process-wide backend flags these decisions call for (once, at the start of fit)."""
    torch.backends.cudnn.benchmark = cudnn_benchmark(device_type)
    torch.set_float32_matmul_precision(matmul_precision(device_type, capability))


def device_capability(device: str) -> tuple[int, int] | None:
    if device.startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.get_device_capability(torch.device(device))
    return None


def cuda_device_count() -> int:
    """GPUs this process can see (0 without CUDA)."""
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


# ---------------------------------------------------------------- CPU threads
# torch's intra-op (OpenMP) pool defaults to every core of the box. Loader workers, the server's
# decode threads, other ranks and other programs want those cores too, and spinning OpenMP threads
# that are not all scheduled at once stall each other: on a 2-core box with one busy process a
# resnet18 step ran 6x slower with 2 threads than with 1. So the plan gives torch only the cores
# left after everything else this process starts.

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
    import os

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
    import math
    import os

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

    def env(self) -> dict[str, str]:
        """For a process this one starts with its own plan: its share of the cores."""
        return {THREADS_ENV: str(self.intra_op)}


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

    On the CPU one pass of a small batch cannot use many cores well (a resnet18 batch of 8 at
    64 px: 65 ms on one thread, 52 ms on two), and while it runs the next batch's requests only
    wait. Two lanes let a second batch start at once, and two one-thread passes use two cores
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

    A static plan cannot be right both ways on a small box: on an idle 2-core box a resnet18
    step ran 46 img/s with 2 threads and 35 with 1; beside one busy process, 17 with 2
    (spinning OpenMP threads collapse) and 37 with 1. So during the first epoch the candidates
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


def launcher_share_from_env(environ=None) -> int | None:
    import os

    value = (os.environ if environ is None else environ).get(THREADS_ENV, "")
    return int(value) if value.strip().isdigit() and int(value) > 0 else None


def plan_threads(
    procs: int = 1, workers: int = 0, decode_threads: int = 0, override: int = 0, lanes: int = 1
) -> ThreadPlan:
    """The plan for this process, from its CPUs and the launcher's OMP_NUM_THREADS."""
    return thread_plan(
        available_cpus(), procs, workers, decode_threads, override or 0, launcher_share_from_env(), lanes
    )


def apply_threads(plan: ThreadPlan) -> ThreadPlan:
    torch.set_num_threads(plan.intra_op)
    try:
        torch.set_num_interop_threads(plan.inter_op)
    except RuntimeError:  # only allowed once, before any inter-op work; the intra-op count is what matters
        pass
    return plan
