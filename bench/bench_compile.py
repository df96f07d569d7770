"""What `ec2train serve --compile` buys for one architecture on this CPU, and what it costs.

Writes a model file with random weights for --arch (speed does not depend on the weights),
loads it with the server's own `Predictor`, times the eager forward pass per image at each
batch size the server compiles (`hw.batch_buckets(--max-batch)`: 1, 2, 4, 8), then compiles
them (`Predictor.compile`, the server's start-up step) and times the compiled pass the same
way. The eager pass is timed again after compiling and the faster of its two timings counts,
so a box that got busier meanwhile does not flatter the compiled pass. Prints compile seconds
per size, resident memory before and after, and per-image milliseconds with the ratio eager /
compiled, so a user can size the start-up and the memory before choosing --compile for a model.
--threads defaults to 1: what each of the server's two forward lanes runs with on a box of 2-4
cores; on a bigger box each lane gets more (docs/performance.md), so pass --threads to match.

    python bench/bench_compile.py            # resnet50 at 224 px: about 2 minutes on 2 cores
    python bench/bench_compile.py --arch resnet18 --image-size 64   # under a minute
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import torch  # noqa: E402

from ec2train import hw  # noqa: E402
from ec2train.errors import UserError  # noqa: E402
from ec2train.export import model_payload, save_model_file  # noqa: E402
from ec2train.infer import Predictor  # noqa: E402
from ec2train.model import build_model  # noqa: E402


def resident_mb() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) // 1024 for line in f if line.startswith("VmRSS:"))


def ms_per_image(predictor, batch, reps: int) -> float:
    """Median of reps passes, per image (one warm-up pass first)."""
    predictor.logits(batch)
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        predictor.logits(batch)
        times.append(time.perf_counter() - start)
    return statistics.median(times) / batch.shape[0] * 1000


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", default="resnet50")
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--classes", type=int, default=133)
    ap.add_argument("--max-batch", type=int, default=8, help="as serve's --max-batch [default: 8]")
    ap.add_argument("--threads", type=int, default=1, help="torch threads [default: 1, one serve lane]")
    ap.add_argument("--reps", type=int, default=5, help="timed passes per size and side [default: 5]")
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    torch.set_num_interop_threads(1)
    names = [f"class{i}" for i in range(args.classes)]
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.pth"
        model = build_model(args.arch, args.classes, "none")
        mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
        save_model_file(
            path,
            model_payload(
                model.state_dict(), arch=args.arch, class_names=names, image_size=args.image_size, mean=mean, std=std
            ),
        )
        del model
        predictor = Predictor(path)
    sizes = hw.batch_buckets(args.max_batch)
    image = torch.rand(1, 3, args.image_size, args.image_size)
    batches = {n: image.expand(n, -1, -1, -1).contiguous() for n in sizes}
    print(
        f"{args.arch} at {args.image_size} px, {args.threads} thread(s), batch sizes {list(sizes)}; "
        f"torch {torch.__version__}",
        flush=True,
    )

    eager = {n: ms_per_image(predictor, batches[n], args.reps) for n in sizes}
    before = resident_mb()
    start = time.perf_counter()
    try:
        predictor.compile(args.max_batch, lambda n, s: print(f"  compiled batches of {n} in {s:.1f} s", flush=True))
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    seconds = time.perf_counter() - start
    after = resident_mb()
    compiled = {}
    for n in sizes:
        compiled[n] = ms_per_image(predictor, batches[n], args.reps)
        eager[n] = min(eager[n], ms_per_image_eager(predictor, batches[n], args.reps))

    print(
        f"\ncompile: {seconds:.0f} s for {len(sizes)} sizes; resident memory {before} MB -> {after} MB "
        f"(+{after - before} MB)\n"
    )
    print("| batch | eager ms/image | compiled ms/image | speed-up |")
    print("|---:|---:|---:|---:|")
    for n in sizes:
        print(f"| {n} | {eager[n]:.1f} | {compiled[n]:.1f} | {eager[n] / compiled[n]:.2f}x |")
    return 0


def ms_per_image_eager(predictor, batch, reps: int) -> float:
    """The eager pass again, after compiling."""
    forward, predictor.forward = predictor.forward, predictor.model
    try:
        return ms_per_image(predictor, batch, reps)
    finally:
        predictor.forward = forward


if __name__ == "__main__":
    sys.exit(main())
