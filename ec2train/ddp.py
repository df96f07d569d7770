"""Everything rank-aware lives here: torchrun's environment, process groups, devices,
reductions and the rank-0 helpers. The rest of ec2train asks these helpers, never RANK.
"""

from __future__ import annotations

import datetime
import inspect
import os
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from ec2train.errors import UserError
from ec2train.hw import HardwareError
from ec2train.netif import interface_names, interface_to

T = TypeVar("T")
# Rank 0 may spend minutes on evaluation, test and uploads while the others wait.
BARRIER_TIMEOUT = datetime.timedelta(minutes=60)
# A job's runner sets a shorter one (ec2train.job.workers): it notices a lost node itself within
# a minute or two, so this bounds only a collective that hangs while every node is alive.
PG_TIMEOUT_ENV = "EC2TRAIN_PG_TIMEOUT_SECONDS"


def pg_timeout(environ: Mapping[str, str] | None = None) -> datetime.timedelta:
    """The process groups' timeout: BARRIER_TIMEOUT unless EC2TRAIN_PG_TIMEOUT_SECONDS says otherwise."""
    e = os.environ if environ is None else environ
    try:
        seconds = float(e.get(PG_TIMEOUT_ENV, ""))
    except ValueError:
        return BARRIER_TIMEOUT
    return datetime.timedelta(seconds=seconds) if seconds > 0 else BARRIER_TIMEOUT


@dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    local_world_size: int = 1

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def env_from(environ: dict[str, str] | None = None) -> DistEnv:
    """torchrun's RANK/LOCAL_RANK/WORLD_SIZE/LOCAL_WORLD_SIZE, or a single process."""
    e = os.environ if environ is None else environ
    if "RANK" not in e or "WORLD_SIZE" not in e:
        return DistEnv()
    return DistEnv(
        rank=int(e["RANK"]),
        local_rank=int(e.get("LOCAL_RANK", 0)),
        world_size=int(e["WORLD_SIZE"]),
        local_world_size=int(e.get("LOCAL_WORLD_SIZE", e["WORLD_SIZE"])),
    )


def under_torchrun(environ: dict[str, str] | None = None) -> bool:
    e = os.environ if environ is None else environ
    return "TORCHELASTIC_RUN_ID" in e or ("RANK" in e and "WORLD_SIZE" in e)


def select_device(requested: str, local_rank: int, cuda_count: int) -> str:
    """'cuda:<local_rank>' or 'cpu'. Pure: the caller passes torch.cuda.device_count()."""
    if requested == "cpu":
        return "cpu"
    if cuda_count == 0:
        if requested == "cuda":
            raise UserError(
                "--device cuda but no CUDA GPU is visible (check `nvidia-smi` and that the "
                "DLAMI's PyTorch env is active); use --device cpu to train on the CPU"
            )
        return "cpu"
    if local_rank >= cuda_count:
        raise UserError(f"LOCAL_RANK {local_rank} but only {cuda_count} GPUs: lower --nproc-per-node")
    return f"cuda:{local_rank}"


def backend_for(device: str) -> str:
    return "nccl" if device.startswith("cuda") else "gloo"


def restart_namespace(environ: dict[str, str] | None = None) -> str | None:
    """A store prefix that keeps a restarted worker group away from the dead one's keys, or None.

    Since torch 2.4, torchrun's c10d rendezvous lends its workers one TCPStore for the whole job
    (TORCHELASTIC_USE_AGENT_STORE=True) and torch no longer prefixes keys per restart, so after
    `--max-restarts` a new worker can read a dead worker's address and fail to connect
    (pytorch/pytorch#135712). TORCHELASTIC_RESTART_COUNT is the same on every rank only when one
    agent runs them all, so that is the case fixed here; see restart_warning for several nodes.
    """
    e = os.environ if environ is None else environ
    if e.get("TORCHELASTIC_USE_AGENT_STORE") != "True" or e.get("GROUP_WORLD_SIZE", "1") != "1":
        return None
    return f"ec2train/attempt_{e.get('TORCHELASTIC_RESTART_COUNT', '0')}"


def restart_warning(environ: dict[str, str] | None = None) -> str | None:
    """Several nodes, --max-restarts and the shared store: restarts can fail; say how to fix it."""
    e = os.environ if environ is None else environ
    if (
        e.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
        and e.get("GROUP_WORLD_SIZE", "1") != "1"
        and int(e.get("TORCHELASTIC_MAX_RESTARTS", "0") or 0) > 0
    ):
        return (
            "torchrun --max-restarts across nodes: set TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 in torchrun's "
            "environment on every node, or a restarted worker may reach a dead worker's address (pytorch#135712)"
        )
    return None


def setup(env: DistEnv, device: str) -> None:
    """Join the process group (no-op for one process) and bind this process to its GPU."""
    if device.startswith("cuda"):
        torch.cuda.set_device(torch.device(device))
    if env.distributed and not dist.is_initialized():
        timeout = pg_timeout()
        kwargs: dict[str, Any] = {"backend": backend_for(device), "timeout": timeout}
        # device_id (torch >= 2.3) binds NCCL to this GPU up front; older DLAMI torch lacks it.
        if device.startswith("cuda") and "device_id" in inspect.signature(dist.init_process_group).parameters:
            kwargs["device_id"] = torch.device(device)
        namespace = restart_namespace()
        if namespace:
            store, rank, world_size = next(dist.rendezvous("env://", timeout=timeout))
            kwargs.update(store=dist.PrefixStore(namespace, store), rank=rank, world_size=world_size)
        if ifname := gloo_ifname(os.environ):
            os.environ["GLOO_SOCKET_IFNAME"] = ifname  # before any gloo group: the training one on the CPU too
        warning = restart_warning()
        if warning and env.is_main:
            warnings.warn(warning, stacklevel=2)
        dist.init_process_group(**kwargs)
        global _control
        # Yes/no questions between steps (stop now?) go over gloo on the CPU beside NCCL: a NCCL
        # all_reduce would make the CPU wait for the GPU's queued work before every step.
        backend = control_backend(dist.get_backend())
        _control = dist.new_group(backend=backend, timeout=timeout) if backend else None


def control_backend(backend: str) -> str | None:
    """The backend of a second group for CPU-side questions between steps, when the training
    group's collectives run on the GPU; None: the training group answers them itself."""
    return "gloo" if backend == "nccl" else None


def gloo_ifname(
    environ: Mapping[str, str],
    route: Callable[[str], str | None] = interface_to,
    interfaces: Callable[[], list[str]] = interface_names,
) -> str | None:
    """GLOO_SOCKET_IFNAME when the user set none: gloo otherwise picks the interface its host name
    resolves to, which can be loopback, and the group would wait for peers it cannot reach.
    NCCL_SOCKET_IFNAME's interface when it names some: `=ens5` exactly, `ens` or `ens,eth` as NCCL
    reads them (prefixes; gloo needs one exact name, so the first interface they match). When it
    names none or only excludes some (`^lo,docker`, which gloo cannot express) and the job spans
    nodes, the interface that routes to MASTER_ADDR (the rendezvous host)."""
    if environ.get("GLOO_SOCKET_IFNAME"):
        return None
    nccl = environ.get("NCCL_SOCKET_IFNAME", "").strip()
    if nccl.startswith("="):
        return nccl[1:].split(",")[0].strip() or None
    if nccl and not nccl.startswith("^"):
        prefixes = [p.strip() for p in nccl.split(",") if p.strip()]
        names = interfaces()
        return next((n for p in prefixes for n in names if n.startswith(p)), None)
    world, local = environ.get("WORLD_SIZE", "1"), environ.get("LOCAL_WORLD_SIZE", "")
    master = environ.get("MASTER_ADDR", "")
    spans_nodes = local.isdigit() and world.isdigit() and int(local) < int(world)
    return route(master) if spans_nodes and master else None


_control = None  # setup's gloo group beside a NCCL one; None: the default group (gloo) answers


def cleanup() -> None:
    global _control
    _control = None
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def backend_name() -> str | None:
    """The process group's backend ("nccl", "gloo") when several processes train together, else None."""
    return dist.get_backend() if active() else None


def barrier() -> None:
    if active():
        dist.barrier()


def all_reduce_sum(values: list[float] | torch.Tensor, device: str = "cpu") -> torch.Tensor:
    """Sum numbers (float64) or a tensor across ranks; a copy, identity for one process."""
    t = values.clone() if isinstance(values, torch.Tensor) else torch.tensor(values, dtype=torch.float64)
    if active():
        t = t.to(device)
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.cpu()


def any_rank(flag: bool) -> bool:
    """True on every rank if it is true on any rank (e.g. a spot notice seen by one node). A CPU
    exchange: it never waits for the GPU's queued work."""
    if not active():
        return flag
    t = torch.tensor([1 if flag else 0], dtype=torch.int32)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=_control)
    return bool(t.item())


def gather_counts(count: float, device: str = "cpu") -> list[int]:
    """Every rank's count, in rank order (e.g. the images each rank trained on)."""
    if not active():
        return [int(count)]
    t = torch.zeros(dist.get_world_size(), dtype=torch.float64)
    t[dist.get_rank()] = count
    return [int(x) for x in all_reduce_sum(t, device).tolist()]


def holder_of_newest(epochs: list[int]) -> int | None:
    """The rank whose checkpoint has the most epochs (the lowest such rank); None if no rank has one (-1)."""
    best = max(epochs, default=-1)
    return None if best < 0 else epochs.index(best)


def broadcast_object(obj: T, src: int = 0) -> T:
    """rank src's picklable object on every rank (src is a global rank)."""
    if not active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def use_sync_bn(requested: bool, device_type: str, world_size: int) -> bool:
    """--sync-bn: convert BatchNorm to SyncBatchNorm only when several processes share statistics.

    CUDA only: DDP refuses SyncBatchNorm on CPU modules ("SyncBatchNorm layers only work with
    GPU modules"), so on the CPU it is an error up front rather than a crash after set-up.
    """
    if not requested:
        return False
    if device_type != "cuda":
        raise HardwareError(
            "--sync-bn needs CUDA GPUs (PyTorch's SyncBatchNorm does not run on the CPU); "
            "drop --sync-bn to train on the CPU"
        )
    return world_size > 1


def wrap_model(model: torch.nn.Module, device: str, sync_bn: bool) -> torch.nn.Module:
    """DDP-wrap for several processes (SyncBatchNorm when sync_bn, see use_sync_bn); unchanged for one."""
    if not active():
        return model
    if sync_bn:
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    ids = [torch.device(device).index] if device.startswith("cuda") else None
    return DDP(model, device_ids=ids)


def resolve_nproc(value: str, gpu_count: int) -> int:
    """--nproc-per-node auto|N: auto is one process per visible GPU (one on a CPU box)."""
    if value == "auto":
        return max(1, gpu_count)
    try:
        n = int(value)
    except ValueError:
        raise UserError(f"--nproc-per-node {value!r}: use auto or a whole number") from None
    if n < 1:
        raise UserError(f"--nproc-per-node {n}: must be at least 1")
    return n


def torchrun_command(python: str, nproc: int, fit_args: list[str]) -> list[str]:
    """The torchrun line that `ec2train fit --nproc-per-node N` runs on this one node."""
    return [
        python,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={nproc}",
        "-m",
        "ec2train",
        "fit",
        *fit_args,
    ]


def strip_option(args: list[str], name: str) -> list[str]:
    """argv without `name VALUE` / `name=VALUE` (so the launched workers do not relaunch)."""
    out, skip = [], False
    for a in args:
        if skip:
            skip = False
        elif a == name:
            skip = True
        elif not a.startswith(name + "="):
            out.append(a)
    return out
