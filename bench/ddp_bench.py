"""Scaling benchmark: the same `ec2train fit` with 1 process and with N processes under torchrun.

    python bench/ddp_bench.py                      # demo data, resnet18, 1 vs 2 processes
    python bench/ddp_bench.py --data dogImages --procs 1,4 --image-size 224 --epochs 1

Each run gets OMP_NUM_THREADS = cores / processes, so the processes share the cores instead of
fighting over them. Reports training throughput (images/s, from metrics.json), wall time, speedup
and scaling efficiency against the 1-process run measured here, and the images each rank trained
on per epoch, which shows that no rank sees the whole training set.
On a CPU box the cores are the limit, so N processes cannot beat one process using all cores;
on a GPU box with one process per GPU, efficiency near 100% is the goal.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ec2train.data import make_demo_dataset  # noqa: E402
from ec2train.threads import available_cpus, process_share  # noqa: E402


def run_fit(nproc: int, threads: int, data: Path, work: Path, args: argparse.Namespace) -> dict:
    out = work / f"procs{nproc}-threads{threads}"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={nproc}",
        "-m",
        "ec2train",
        "fit",
        "--data",
        str(data),
        "--output",
        str(out / "model"),
        "--logdir",
        str(out / "runs"),
        "--arch",
        args.arch,
        "--weights",
        "none",
        "--image-size",
        str(args.image_size),
        "--batch-size",
        str(args.batch_size),
        "--epochs",
        str(args.epochs),
        "--workers",
        "0",
        "--device",
        args.device,
        "--resume",
        "never",
    ]
    env = {
        **os.environ,
        "OMP_NUM_THREADS": str(threads),
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.exit(f"{nproc}-process run failed:\n{proc.stdout[-3000:]}")
    metrics = json.loads((out / "model" / "metrics.json").read_text())
    history = metrics["history"]
    # Steady state: leave out the first epoch (allocator and thread-pool warm-up) when there are more.
    steady = history[1:] or history
    ips = sum(h["images_per_second"] for h in steady) / len(steady)
    return {
        "procs": nproc,
        "threads": threads,
        "ips": ips,
        "fit_seconds": metrics["wall_seconds"],
        "process_seconds": wall,
        "per_rank": history[0]["images_per_rank"],
        "global_batch": metrics["global_batch"],
        "test_acc1": metrics["test_acc1"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", type=Path, help="Data set root [default: a generated demo set]")
    ap.add_argument("--procs", default="1,2", help="Comma-separated process counts; the first is the baseline.")
    ap.add_argument("--arch", default="resnet18")
    ap.add_argument("--image-size", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=16, help="Per process (weak scaling: global batch grows with N).")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--per-class", type=int, default=32, help="Demo data: training images per class (4 classes).")
    ap.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="Runs per configuration, interleaved; the fastest counts (shared boxes are noisy).",
    )
    ap.add_argument("--device", default="auto")
    args = ap.parse_args()
    procs = [int(p) for p in args.procs.split(",")]

    with tempfile.TemporaryDirectory(prefix="ddp-bench-") as tmp:
        work = Path(tmp)
        data = args.data or make_demo_dataset(work / "data", classes=4, per_class=args.per_class, size=args.image_size)
        train_images = sum(1 for p in (Path(data) / "train").rglob("*") if p.is_file())
        print(
            f"{args.arch} (full training) at {args.image_size} px, {train_images} training images, {args.epochs} epochs, "
            f"per-rank batch {args.batch_size}, {available_cpus()} CPUs"
        )
        # The runs to compare: N processes sharing the cores; plus a control, one process with the
        # threads each of the N processes gets, which isolates DDP's own cost from thread scaling.
        configs = [(n, process_share(n)) for n in procs]
        control = (1, configs[-1][1])
        if control not in configs:
            configs.append(control)
        runs = [run_fit(n, t, Path(data), work, args) for _ in range(args.repeat) for n, t in configs]
    results = [max((r for r in runs if (r["procs"], r["threads"]) == c), key=lambda r: r["ips"]) for c in configs]

    base = results[0]
    print(
        f"\n{'procs':>5} {'threads':>7} {'global':>6} {'img/s':>8} {'speedup':>7} {'effic.':>6} {'fit s':>6} {'total s':>7}  images per rank per epoch"
    )
    for r in results:
        speedup = r["ips"] / base["ips"]
        efficiency = speedup / (r["procs"] / base["procs"])
        print(
            f"{r['procs']:>5} {r['threads']:>7} {r['global_batch']:>6} {r['ips']:>8.1f} {speedup:>6.2f}x {efficiency:>6.0%} "
            f"{r['fit_seconds']:>6.1f} {r['process_seconds']:>7.1f}  {r['per_rank']} of {train_images}"
        )
    ctrl = next((r for r in results if (r["procs"], r["threads"]) == control), None)
    if ctrl is not None and ctrl is not base:
        for r in results:
            if r["procs"] > 1:
                eff = r["ips"] / (r["procs"] * ctrl["ips"])
                print(
                    f"{r['procs']} processes x {r['threads']} thread(s) vs 1 process x {ctrl['threads']}: "
                    f"{r['ips'] / ctrl['ips']:.2f}x, efficiency {eff:.0%} (DDP's own cost, same threads per process)"
                )
    for r in results:
        assert sum(r["per_rank"]) >= train_images, "the ranks together must cover the training set"
        if r["procs"] > 1:
            assert max(r["per_rank"]) < train_images, "a rank saw the whole training set"
    print("scaling efficiency = (img/s with N) / (N x img/s with 1); every rank trains on about 1/N of the images.")


if __name__ == "__main__":
    main()
