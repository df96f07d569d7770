"""Shared pieces of the benchmarks: the generated data set, timing, loader throughput.

Every benchmark prints ratios of two ways measured in the same run, each the best of a few
interleaved rounds, so a busy machine slows both sides alike.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from make_big_images import make_big_dataset  # noqa: E402

DEFAULT_ROOT = Path(os.environ.get("EC2TRAIN_BENCH_DIR", "/tmp/ec2train-bench"))
# 4 classes, 50 train + 25 valid + 25 test each: 400 photos of 1600x1200, about 0.4 MB each.
BIG = dict(classes=4, per_class=50, eval_per_class=25)


def big_data(root: Path = DEFAULT_ROOT, width: int = 1600, images: int | None = None) -> Path:
    """The shared 1600x1200 set, or (other width) a train-only set of `images` photos at 4:3."""
    t0 = time.perf_counter()
    if width == 1600:
        path = make_big_dataset(root / "big", **BIG)
    else:
        per_class = max(1, (images or 16) // BIG["classes"])
        path = make_big_dataset(root / f"big-{width}", BIG["classes"], per_class, 0, width, width * 3 // 4)
    if time.perf_counter() - t0 > 1:
        print(f"generated {path} in {time.perf_counter() - t0:.0f} s")
    return path


def best_of(rounds: int, *fns: Callable[[], object], cpu: bool = False) -> list[float]:
    """Seconds of each fn, the best of `rounds`, interleaved (A B A B ...).

    cpu=True counts this process's CPU time instead of wall time: for single-threaded work it
    is the cost itself, unaffected by other jobs on a shared machine.
    """
    clock = time.process_time if cpu else time.perf_counter
    best = [float("inf")] * len(fns)
    for _ in range(rounds):
        for i, fn in enumerate(fns):
            t0 = clock()
            fn()
            best[i] = min(best[i], clock() - t0)
    return best


def drain(dataset, batch_size: int = 32, workers: int = 0) -> Callable[[], int]:
    """A function that reads the whole dataset once through ec2train's loader."""
    from ec2train.data import EvalSampler, make_loader

    def run() -> int:
        loader = make_loader(dataset, EvalSampler(len(dataset)), batch_size, workers, False)
        return sum(len(labels) for _, labels in loader)

    return run


def row(name: str, seconds: float, images: int) -> str:
    return f"  {name:<64} {images / seconds:8.1f} img/s  ({1000 * seconds / images:5.1f} ms per image)"


def pretrained_backbone(root: Path = DEFAULT_ROOT, arch: str = "resnet18") -> Path:
    """A model file to start from, standing in for ImageNet weights (no download here).

    Fully trained at 64 px on the small demo drawings (ec2train data demo: the same shapes and
    colours on flat backgrounds; a related task, as ImageNet is to dog breeds). The benchmarks
    freeze it and train a head on the big photos. Made once (about a minute) and reused.
    """
    from ec2train.config import resolve
    from ec2train.data import make_demo_dataset
    from ec2train.loop import fit

    out = root / f"backbone-{arch}"
    if (out / "model.pth").is_file() and (out / "metrics.json").is_file():
        return out / "model.pth"
    t0 = time.perf_counter()
    demo = make_demo_dataset(root / "demo64", classes=BIG["classes"], per_class=32, size=64)
    fit(
        resolve(
            data=str(demo),
            output=str(out),
            logdir=str(root / "runs"),
            arch=arch,
            weights="none",
            image_size=64,
            epochs=3,
            lr=3e-3,
            batch_size=16,
        )
    )
    print(f"pre-trained a {arch} backbone on {demo} in {time.perf_counter() - t0:.0f} s")
    return out / "model.pth"


# ---------------------------------------------------------------- idle and busy box


def add_busy_option(parser) -> None:
    parser.add_argument(
        "--busy",
        type=int,
        default=1,
        metavar="N",
        help="also measure with N CPU-spinning processes on the box (a noisy neighbour); "
        "0: idle only. [default: 1, so one run measures idle and busy]",
    )


def busy_levels(busy: int) -> list[int]:
    return [0, busy] if busy > 0 else [0]


@contextlib.contextmanager
def spinning(n: int):
    """N processes that spin on a CPU each for the duration (n=0: nothing)."""
    procs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)]
    try:
        yield procs
    finally:
        for p in procs:
            p.kill()
        for p in procs:
            p.wait()


def load_note() -> str:
    """The box's load when a measurement starts: other jobs on a shared box slow every number."""
    one, five, _ = os.getloadavg()
    return f"load average {one:.2f} (1 min), {five:.2f} (5 min) on {os.cpu_count()} CPUs"


def level_name(busy: int) -> str:
    return "idle box" if busy == 0 else f"{busy} busy process{'es' * (busy > 1)}"


def run_arm(cmd: list[str], env: dict[str, str] | None = None) -> tuple[float, dict]:
    """Wall seconds of one process (imports and start-up included, as a user pays them) and the
    JSON object its last output line holds."""
    import json

    base = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    base["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).resolve().parents[1]), os.environ.get("PYTHONPATH", "")])
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env={**base, **(env or {})}, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    last = (proc.stdout.strip().splitlines() or [""])[-1]
    try:
        return seconds, json.loads(last)
    except ValueError:  # not one of ours (e.g. `ec2train fit`): its last line says enough
        return seconds, {"last line": " ".join(last.split())[:80]}


def compare_processes(
    arms: dict[str, list[str]], busy: int, rounds: int, baseline: str
) -> dict[tuple[int, str], float]:
    """Each arm as its own process, interleaved (A B A B), idle and then beside `busy` spinning
    processes; prints every run, then each arm's best time and its speed against `baseline`."""
    best: dict[tuple[int, str], float] = {}
    for level in busy_levels(busy):
        with spinning(level):
            print(f"{level_name(level)}: {load_note()}", flush=True)
            for rnd in range(rounds):
                for name, cmd in arms.items():
                    seconds, out = run_arm(cmd)
                    print(f"  round {rnd + 1} {name:<34} {seconds:7.1f} s  {out}", flush=True)
                    best[level, name] = min(best.get((level, name), float("inf")), seconds)
    print()
    print(f"| box | run | best wall s | speed vs {baseline} |")
    print("|---|---|---:|---:|")
    for (level, name), seconds in best.items():
        print(f"| {level_name(level)} | {name} | {seconds:.1f} | {best[level, baseline] / seconds:.2f}x |")
    return best
