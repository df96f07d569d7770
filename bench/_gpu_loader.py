"""bench/gpu_check.py's checks of the GPU loader (`fit --loader gpu`) on a real GPU: what the CPU
tests (tests/test_gpu_loader.py, libjpeg-turbo in place of nvJPEG) cannot show.

1. the eval and train transforms equal the CPU loader's within the stated tolerance
   (nvJPEG's IDCT and chroma upsampling against libjpeg-turbo's), on dogImages-sized photos;
2. the fallbacks on the GPU: files the device does not decode are the CPU loader's pixels, a JPEG
   that nvJPEG and libjpeg both refuse stops with the CPU loader's error naming the file; and
   decoding beside work queued on the training stream corrupts neither (pytorch/vision PR 9606);
3. end to end img/s of resnet50 at 224 px (frozen backbone and full fine-tune, AMP auto) with
   the CPU loader and the GPU loader, in a process restricted to 4 CPUs (a g4dn.xlarge or
   g5.xlarge) and unrestricted, on generated 500x400 JPEGs (about dogImages' size), and the
   goal: on 4 CPUs the GPU loader at least 2x the CPU loader with the frozen backbone, and within
   15% of the step's rate for the full fine-tune.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

# The stated tolerance on the GPU (on the CPU, libjpeg-turbo on both sides: at most 1 level).
MAX_MEAN_LEVELS = 1.0
MIN_PSNR_DB = 40.0
GOAL_FROZEN_RATIO = 2.0  # GPU loader / CPU loader, end to end, frozen backbone, 4 CPUs
GOAL_FULL_SHARE = 0.85  # GPU loader end to end / step alone, full fine-tune, 4 CPUs
SMALL_BOX_CPUS = 4
CHILD_FLAG = "--loader-bench-child"


def make_photos(work: Path) -> tuple[Path, list[tuple[Path, int]]]:
    """The throughput data set (1280 train photos of 500x400, 4 classes, in the dogImages layout)
    and a few photos of other sizes for the equality check (the last one 1600x1200)."""
    from make_big_images import big_image, make_big_dataset
    from PIL import Image

    data = make_big_dataset(work / "dog-size", classes=4, per_class=320, eval_per_class=8, width=500, height=400)
    odd = work / "odd-sizes"
    odd.mkdir(exist_ok=True)
    samples = sorted((p, 0) for p in (data / "valid").rglob("*.jpg"))[:12]
    for k, (w, h) in enumerate([(500, 375), (375, 500), (333, 500), (640, 480), (1600, 1200)]):
        path = odd / f"{w}x{h}.jpg"
        photo = big_image(k % 4, max(w, h), min(w, h), 100 + k)  # it draws landscape photos
        (photo if w >= h else photo.transpose(Image.Transpose.ROTATE_90)).save(path, quality=90)
        samples.append((path, k % 2))
    return data, samples


def _levels(a, b) -> dict:
    d = (a.float() - b.float()).flatten()
    mse = d.pow(2).mean().item()
    return {
        "max": int(d.abs().max()),
        "mean": d.abs().mean().item(),
        "p999": float(d.abs().quantile(0.999)) if d.numel() <= 16_000_000 else float("nan"),
        "psnr": 10 * math.log10(255**2 / mse) if mse else math.inf,
    }


def without_segments(data: bytes, marker: int) -> bytes:
    """A JPEG without its segments of one kind (before the first scan)."""
    at, out = 2, data[:2]
    while data[at + 1] != 0xDA:
        end = at + 2 + int.from_bytes(data[at + 2 : at + 4], "big")
        if data[at + 1] != marker:
            out += data[at:end]
        at = end
    return out + data[at:]


def _batch_of(dataset):
    return dataset.collate([dataset[k] for k in range(len(dataset))])[0]


def _on_device(dataset, keys, device):
    from ec2train.data.gpu import decode_batch

    batch, _ = dataset.collate([dataset[k] for k in keys])
    return decode_batch(batch, device).cpu(), batch


def transforms_match(device: str, samples: list) -> list[tuple[str, bool, str]]:
    """The eval and train transforms on the GPU against the CPU loader's, where the CPU loader
    decodes at full scale (dogImages-sized photos at 224 px), and (reported) on a big photo,
    which the CPU loader decodes at reduced scale."""
    import torch

    from ec2train.data import eval_dataset, mix_seed, train_dataset

    small, big = samples[:-1], samples[-1:]
    out = []
    for train in (False, True):
        keys = [(k, mix_seed(5, 1, k)) for k in range(len(small))] if train else list(range(len(small)))
        cpu = train_dataset(small, 224, True) if train else eval_dataset(small, 224)
        dev = train_dataset(small, 224, True, on_device=True) if train else eval_dataset(small, 224, on_device=True)
        got, batch = _on_device(dev, keys, device)
        m = _levels(got, torch.stack([cpu[k][0] for k in keys]))
        ok = m["mean"] <= MAX_MEAN_LEVELS and m["psnr"] >= MIN_PSNR_DB and len(batch.encoded) == len(small)
        name = "train (same crops from the same seeds)" if train else "eval (resize 256, center crop 224)"
        out.append(
            (
                f"GPU loader, {name}, {len(small)} dogImages-sized photos: the CPU loader's pixels within "
                f"{MAX_MEAN_LEVELS:g} level on average and {MIN_PSNR_DB:g} dB",
                ok,
                f"max {m['max']}, mean {m['mean']:.3f}, 99.9th percentile {m['p999']:.0f} levels, PSNR {m['psnr']:.1f} dB "
                f"(libjpeg-turbo on both sides: max 1, mean about 0.16)",
            )
        )
    got, _ = _on_device(eval_dataset(big, 224, on_device=True), [0], device)
    reduced = _levels(got, eval_dataset(big, 224)[0][0][None])
    full = eval_dataset(big, 224)
    full.min_side = None
    full_scale = _levels(got, full[0][0][None])
    out.append(
        (
            "GPU loader, eval, a 1600x1200 photo (the CPU loader decodes it at half scale): reported",
            full_scale["mean"] <= MAX_MEAN_LEVELS,
            f"against the CPU loader: mean {reduced['mean']:.2f} levels, PSNR {reduced['psnr']:.1f} dB; against "
            f"a full-scale CPU decode: mean {full_scale['mean']:.2f}, max {full_scale['max']}",
        )
    )
    return out


def fallbacks_and_errors(device: str, work: Path, photo: Path) -> tuple[str, bool, str]:
    """A batch of a baseline JPEG, a progressive JPEG, a greyscale JPEG and a PNG through a worker
    and the GPU; then a JPEG with no quantization tables, which both decoders refuse."""
    import torch
    from PIL import Image

    from ec2train.data import CorruptImageError, EvalSampler, eval_dataset, make_loader
    from ec2train.data.gpu import decode_batch

    folder = work / "mixed"
    folder.mkdir(exist_ok=True)
    image = Image.open(photo).convert("RGB")
    image.save(folder / "a.jpg", quality=90)
    image.save(folder / "b.jpg", quality=90, progressive=True)
    image.convert("L").save(folder / "c.jpg")
    image.save(folder / "d.png")
    samples = [(folder / name, k) for k, name in enumerate(("a.jpg", "b.jpg", "c.jpg", "d.png"))]
    cpu, dev = eval_dataset(samples, 224), eval_dataset(samples, 224, on_device=True)
    ((batch, labels),) = make_loader(dev, EvalSampler(4), 4, 1, False)
    pixels = decode_batch(batch, device).cpu()
    expected = torch.stack([cpu[k][0] for k in range(4)])
    routed = (batch.encoded, batch.decoded) == ([0], [1, 2, 3]) and labels.tolist() == [0, 1, 2, 3]
    same = torch.equal(pixels[1:], expected[1:])
    close = _levels(pixels[:1], expected[:1])["mean"] <= MAX_MEAN_LEVELS
    bad = folder / "no-tables.jpg"
    bad.write_bytes(without_segments((folder / "a.jpg").read_bytes(), 0xDB))
    try:
        decode_batch(_batch_of(eval_dataset([(bad, 0)], 224, on_device=True)), device)
        error = "no error"
    except CorruptImageError as exc:
        error = str(exc)
    refused = str(bad) in error and "cannot decode image" in error
    return (
        "GPU loader on the GPU: other files decoded by the workers, a JPEG both decoders refuse stops with its path",
        routed and same and close and refused,
        f"routed {batch.encoded} to the GPU, {batch.decoded} to the workers; worker pixels equal: {same}; "
        f"error: {error[:120]}",
    )


def decode_beside_queued_work(device: str, samples: list, rounds: int = 20) -> tuple[str, bool, str]:
    """torchvision's CUDA decoder writes its output from a stream of its own without waiting for
    the caller's stream (pytorch/vision PR 9606). Each round queues a long kernel and then reads
    of tensors the size of the decoded images on the training stream, frees those tensors (their
    memory is free for the training stream while the reads still wait), and decodes: with
    data.gpu.device_decode neither the reads nor the images may change. torchvision's plain
    call, with the training stream current, is run the same way for comparison."""
    import torch
    from torchvision.io import ImageReadMode, decode_jpeg

    from ec2train.data.gpu import device_decode

    files = [torch.frombuffer(bytearray(p.read_bytes()), dtype=torch.uint8) for p, _ in samples[:8]]
    reference = [image.cpu() for image in device_decode(files, device)]
    torch.cuda.synchronize()

    def corrupted(decode) -> bool:
        victims = [torch.full_like(r, 7, device=device) for r in reference]
        torch.cuda._sleep(100_000_000)  # tens of ms of GPU time queued before the reads below
        sums = [v.sum(dtype=torch.int64) for v in victims]
        del victims  # freed for the training stream while the reads still wait
        images = decode(files)
        torch.cuda.synchronize()
        sums_ok = all(int(s) == 7 * r.numel() for s, r in zip(sums, reference))
        return not (sums_ok and all(torch.equal(i.cpu(), r) for i, r in zip(images, reference)))

    ours = sum(corrupted(lambda f: device_decode(f, device)) for _ in range(rounds))
    plain = sum(corrupted(lambda f: decode_jpeg(f, mode=ImageReadMode.RGB, device=device)) for _ in range(rounds))
    return (
        "GPU loader: decoding beside work queued on the training stream corrupts neither",
        ours == 0,
        f"{ours} of {rounds} rounds corrupted with data.gpu.device_decode; {plain} of {rounds} with torchvision's "
        "call on the training stream (pytorch/vision PR 9606)",
    )


def loader_bench_child(data: str, cpus: int) -> None:
    """In a process of its own (run_loader_bench): restricted to the first `cpus` CPUs before
    torch starts a thread (0: all), `ec2train bench`'s measurements of both loaders for the
    frozen backbone and the full fine-tune; one JSON line each."""
    if cpus:
        os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[:cpus])
    from ec2train.perf import bench

    for frozen in (True, False):
        r = bench(
            data, arch="resnet50", batch_size=64, device="cuda", image_size=224, steps=20, amp="auto", frozen=frozen
        )
        row = {
            "frozen": frozen,
            "cpus": len(os.sched_getaffinity(0)),
            "workers": r.workers,
            "amp": r.amp,
            "step": r.step_ips,
            **{f"{kind}_alone": rates.pipeline_ips for kind, rates in r.loaders.items()},
            **{f"{kind}_e2e": rates.end_to_end_ips for kind, rates in r.loaders.items()},
        }
        print(f"{CHILD_FLAG} {json.dumps(row)}", flush=True)


def run_loader_bench(data: Path, cpus: int, logs: Path | None) -> list[dict]:
    """loader_bench_child's rows, or one row with its error."""
    cmd = [sys.executable, str(ROOT / "bench" / "gpu_check.py"), CHILD_FLAG, str(data), str(cpus)]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("OMP_NUM_THREADS", None)  # the thread plan decides, from the CPUs this process may use
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=400)
    if logs is not None:
        (logs / f"loader-bench-{cpus or 'all'}-cpus.log").write_text(
            f"exit {proc.returncode}\n{proc.stdout}{proc.stderr}"
        )
    rows = [json.loads(ln.split(" ", 1)[1]) for ln in proc.stdout.splitlines() if ln.startswith(CHILD_FLAG)]
    if proc.returncode != 0 or len(rows) != 2:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1][:200]
        return [{"error": f"exit {proc.returncode}: {tail}"}]
    return rows


def loader_throughput(data: Path, logs: Path | None) -> tuple[list[tuple[str, bool, str]], list[str]]:
    """The goal checks and the table: both loaders, 4 CPUs and all of them."""
    rows = run_loader_bench(data, SMALL_BOX_CPUS, logs) + run_loader_bench(data, 0, logs)
    errors = [r["error"] for r in rows if "error" in r]
    if errors:
        return [("GPU loader end to end (ec2train bench in a child process)", False, errors[0])], []
    table = [
        "| resnet50 224 px, batch 64, amp auto | CPUs (workers) | step alone | cpu loader alone | gpu loader alone "
        "| end to end, cpu loader | end to end, gpu loader | gpu / cpu end to end | gpu end to end / step |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        table.append(
            f"| {'frozen backbone' if r['frozen'] else 'full fine-tune'}, {r['amp']} | {r['cpus']} ({r['workers']}) "
            f"| {r['step']:.0f} | {r['cpu_alone']:.0f} | {r['gpu_alone']:.0f} | {r['cpu_e2e']:.0f} | {r['gpu_e2e']:.0f} "
            f"| {r['gpu_e2e'] / r['cpu_e2e']:.2f}x | {r['gpu_e2e'] / r['step']:.2f} |"
        )
    frozen, full = (next(r for r in rows if r["cpus"] == rows[0]["cpus"] and r["frozen"] is f) for f in (True, False))
    ratio, share = frozen["gpu_e2e"] / frozen["cpu_e2e"], full["gpu_e2e"] / full["step"]
    checks = [
        (
            f"goal, frozen backbone on {frozen['cpus']} CPUs: GPU loader end to end >= {GOAL_FROZEN_RATIO:g}x the CPU loader's",
            ratio >= GOAL_FROZEN_RATIO,
            f"{frozen['gpu_e2e']:.0f} against {frozen['cpu_e2e']:.0f} img/s: {ratio:.2f}x (step alone {frozen['step']:.0f})",
        ),
        (
            f"goal, full fine-tune on {full['cpus']} CPUs: GPU loader end to end within {1 - GOAL_FULL_SHARE:.0%} of the step",
            share >= GOAL_FULL_SHARE,
            f"{full['gpu_e2e']:.0f} against the step's {full['step']:.0f} img/s: {share:.2f} (CPU loader {full['cpu_e2e']:.0f})",
        ),
    ]
    return checks, table


def loader_checks(device: str, work: Path, logs: Path | None) -> tuple[list[tuple[str, bool, str]], list[str]]:
    """Everything above: the PASS/FAIL checks and the throughput table."""
    data, samples = make_photos(work)
    checks = transforms_match(device, samples)
    checks.append(fallbacks_and_errors(device, work, samples[0][0]))
    checks.append(decode_beside_queued_work(device, samples))
    more, table = loader_throughput(data, logs)
    return checks + more, table
