"""Benchmark 7: the GPU loader's CPU side against the CPU loader, on this box (no GPU needed).

On a GPU box with few CPUs, what bounds the CPU loader is the CPU time its workers spend per
image (decode, crop, resize). With the GPU loader (`fit --loader gpu`) a worker only reads the
file, checks its header and draws the crop; the decoding and transforms move to the GPU. This
measures, in CPU seconds of one thread (what a loader worker pays, whatever else the box runs):

  - the CPU loader's worker, per image (fit's dataset and transforms);
  - the GPU loader's worker, per image (read, header, crop draw, and the batch's collate);
  - the GPU loader's device side run on the CPU device (decode_batch, device="cpu"): the same
    work the GPU does, here on one CPU thread: not what a GPU costs, shown for completeness;
and how close the two loaders' pixels are (libjpeg-turbo on both sides here; bench/gpu_check.py
measures nvJPEG on a GPU). The images are 500x375 JPEGs, about dogImages' size.

    python bench/bench_gpu_loader.py
"""

from __future__ import annotations

import argparse
import math

import torch
from _common import best_of, big_data, row

from ec2train.data import EvalSampler, eval_dataset, make_loader, mix_seed, scan_split, train_dataset
from ec2train.data.gpu import decode_batch


def _worker_side(dataset, keys, batch_size: int):
    """One worker's work for the samples: __getitem__ for each and collate per batch."""

    def run() -> None:
        for start in range(0, len(keys), batch_size):
            items = [dataset[k] for k in keys[start : start + batch_size]]
            if hasattr(dataset, "collate"):
                dataset.collate(items)
            else:
                torch.stack([x for x, _ in items])

    return run


def _device_side(dataset, keys, batch_size: int):
    batches = [
        dataset.collate([dataset[k] for k in keys[s : s + batch_size]])[0] for s in range(0, len(keys), batch_size)
    ]
    return lambda: [decode_batch(b, "cpu") for b in batches]


def _agreement(cpu_ds, dev_ds, keys) -> str:
    a = torch.stack([cpu_ds[k][0] for k in keys]).float()
    b = decode_batch(dev_ds.collate([dev_ds[k] for k in keys])[0], "cpu").float()
    d = (a - b).abs()
    psnr = 10 * math.log10(255**2 / (a - b).pow(2).mean().item())
    return f"max {int(d.max())}, mean {d.mean().item():.3f} levels, PSNR {psnr:.1f} dB"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=64)
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=3)
    a = ap.parse_args()
    torch.set_num_threads(1)  # as in a loader worker
    _, samples = scan_split(big_data(width=500, images=a.images), "train")
    samples = samples[: a.images]
    n, s = len(samples), a.image_size
    print(f"benchmark 7: the GPU loader's CPU side, {n} JPEGs of 500x375, --image-size {s}, one thread")
    results = {}
    for name, train in (("train", True), ("eval", False)):
        cpu_ds = train_dataset(samples, s, True) if train else eval_dataset(samples, s)
        dev_ds = train_dataset(samples, s, True, on_device=True) if train else eval_dataset(samples, s, on_device=True)
        keys = [(k, mix_seed(0, 1, k)) for k in range(n)] if train else list(range(n))
        t_cpu, t_worker, t_device = best_of(
            a.rounds,
            _worker_side(cpu_ds, keys, a.batch_size),
            _worker_side(dev_ds, keys, a.batch_size),
            _device_side(dev_ds, keys, a.batch_size),
            cpu=True,
        )
        print(row(f"{name}: CPU loader worker (decode + transform)", t_cpu, n))
        print(row(f"{name}: GPU loader worker (read + header + crop draw + collate)", t_worker, n))
        print(row(f"{name}: GPU loader device side on the CPU device (decode_batch)", t_device, n))
        print(
            f"  {name}: pixels, GPU loader on the CPU device against the CPU loader: {_agreement(cpu_ds, dev_ds, keys)}"
        )
        results[name] = t_cpu / t_worker
    loader = make_loader(eval_dataset(samples, s, on_device=True), EvalSampler(n), a.batch_size, 1, False)
    assert sum(len(labels) for _, labels in loader) == n  # the batches cross a real worker process
    print(
        f"RESULT gpu loader: a worker spends {results['train']:.0f}x less CPU per image (train), "
        f"{results['eval']:.0f}x (eval) than the CPU loader's; the decoding moves to the GPU"
    )


if __name__ == "__main__":
    main()
