"""Datasets, samplers and loaders: the hot path from image files to batches of uint8 pixels.

Sharded over ranks, reproducible per sample (each sample's augmentation is seeded by
(seed, epoch, index)), and with persistent workers started before the trainer fills its heap.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from ec2train.data.encoded import EncodedDataset
from ec2train.data.layout import CorruptImageError
from ec2train.preprocess import ImageDecodeError, decode_min_side, eval_pixels, load_rgb, train_pixels

LOADER_SEED_TAG = 0x10AD  # keeps the loader's stream apart from the sampler's (seed, epoch) ones


def mix_seed(*parts: int) -> int:
    """A well-spread 63-bit seed from small integers (seed, epoch, index)."""
    h = 0x243F6A8885A308D3
    for p in parts:
        h = (h ^ (p & 0xFFFFFFFFFFFFFFFF)) * 0x100000001B3 & 0xFFFFFFFFFFFFFFFF
        h ^= h >> 29
    return h & 0x7FFFFFFFFFFFFFFF


def undecodable(path: Path | str, exc: ImageDecodeError) -> CorruptImageError:
    """The error for an image of the data set that cannot be decoded: it names the file and the fix."""
    return CorruptImageError(
        f"cannot decode image {path} ({exc}); remove or replace it (list all with `ec2train data check`)"
    )


class ImageDataset(Dataset):
    """Images and labels; keys may carry a per-sample seed so augmentation is reproducible.

    A key `(index, seed)` makes the random transform of that sample a function of the seed
    alone, whatever the number of workers or processes and across a resume.
    """

    def __init__(self, samples: Sequence[tuple[Path, int]], transform, min_side: int | None = None):
        self.samples = list(samples)
        self.transform = transform
        self.min_side = min_side

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, key):
        index, seed = key if isinstance(key, tuple) else (key, None)
        path, label = self.samples[index]
        try:
            img = load_rgb(path, min_side=self.min_side)
        except ImageDecodeError as exc:
            raise undecodable(path, exc) from None
        if seed is None:
            return self.transform(img), label
        # The CPU generator alone (what the transforms draw from), restored afterwards:
        # torch.manual_seed would also queue seeds for every accelerator backend, formatting a
        # stack trace each time (a third of the loader's time on small images).
        state = torch.random.get_rng_state()
        torch.random.default_generator.manual_seed(seed)
        try:
            return self.transform(img), label
        finally:
            torch.random.set_rng_state(state)


class TrainSampler(Sampler):
    """Shuffled, sharded over ranks (disjoint; padded by wrap-around so every rank steps equally).

    Yields (index, per-sample seed). Shuffling depends on (seed, epoch) only: call set_epoch.
    With batch_size > 1, a shard that would end in a batch of one image leaves that image out
    (a different one each epoch): BatchNorm cannot train on a batch of one.
    """

    def __init__(self, n: int, rank: int = 0, world: int = 1, seed: int = 0, shuffle: bool = True, batch_size: int = 0):
        self.n, self.rank, self.world, self.seed, self.shuffle = n, rank, world, seed, shuffle
        self.batch_size = batch_size
        self.epoch = 0
        self.idle = False  # yields nothing while set (start_workers)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def indices(self) -> list[int]:
        if self.shuffle:
            g = torch.Generator().manual_seed(mix_seed(self.seed, self.epoch))
            order = torch.randperm(self.n, generator=g).tolist()
        else:
            order = list(range(self.n))
        total = -(-self.n // self.world) * self.world
        order += order[: total - self.n]
        return order[self.rank :: self.world][: len(self)]

    def __iter__(self) -> Iterator[tuple[int, int]]:
        if self.idle:
            return
        for i in self.indices():
            yield i, mix_seed(self.seed, self.epoch, i)

    def __len__(self) -> int:
        shard = -(-self.n // self.world)
        return shard - 1 if self.batch_size > 1 and shard > 1 and shard % self.batch_size == 1 else shard


class EvalSampler(Sampler):
    """Disjoint shards with no padding, so metrics summed over ranks count every image once."""

    def __init__(self, n: int, rank: int = 0, world: int = 1):
        self.n, self.rank, self.world = n, rank, world

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, self.n, self.world))

    def __len__(self) -> int:
        return len(range(self.rank, self.n, self.world))


class SplitSampler(Sampler):
    """EvalSampler over one split at a time of a data set that holds several, one after the
    other (`sizes`, in order). One loader, and so one set of persistent workers, then serves
    the valid split every epoch and the test split at the end, instead of forking new workers
    for the test pass. `use(split)` picks the split the next pass reads."""

    def __init__(self, sizes: dict[str, int], rank: int = 0, world: int = 1):
        starts = itertools.accumulate(sizes.values(), initial=0)
        self.ranges = {name: range(start, start + n) for (name, n), start in zip(sizes.items(), starts)}
        self.rank, self.world = rank, world
        self.split = next(iter(sizes))
        self.idle = False  # yields nothing while set (start_workers)

    def use(self, split: str) -> None:
        self.split = split

    def __iter__(self) -> Iterator[int]:
        return iter(() if self.idle else self.ranges[self.split][self.rank :: self.world])

    def __len__(self) -> int:
        return len(self.ranges[self.split][self.rank :: self.world])


def start_workers(loader: DataLoader) -> None:
    """Fork the loader's persistent workers now, with nothing to load (its sampler, a
    TrainSampler or SplitSampler, is idle meanwhile); the next pass reuses them.

    A process forked later shares every page of the trainer's heap copy-on-write, so the
    trainer then pays a page fault for each page it writes again: forked after the model and a
    first epoch, tens of thousands of them in the next step (docs/performance.md). Forked
    before the model exists, they share little that the trainer writes."""
    if loader.num_workers == 0:
        return
    sampler = loader.sampler
    if not hasattr(sampler, "idle"):
        raise TypeError(f"start_workers needs a sampler that can be idle (TrainSampler, SplitSampler), not {sampler!r}")
    sampler.idle = True
    try:
        iter(loader)  # workers start; the empty pass ends at once and they wait for the next
    finally:
        sampler.idle = False


def default_workers(cpus: int | None, procs_per_node: int) -> int:
    """Loader workers per process: the CPUs this process can use, minus one for the main loop."""
    cpus = cpus or 1
    return max(0, min(8, cpus // max(1, procs_per_node) - 1))


def make_loader(dataset: Dataset, sampler: Sampler, batch_size: int, workers: int, pin_memory: bool) -> DataLoader:
    """A DataLoader with a generator of its own, seeded from the sampler's seed.

    Without one, every new iterator draws its workers' base seed from the global RNG; a resumed
    run makes new iterators where an uninterrupted one reuses its persistent workers, so the
    global RNG (dropout) would drift and resume would not be bit-exact. Worker seeds do not
    change the samples: each sample's augmentation is seeded by (seed, epoch, index).

    The GPU loader's dataset (EncodedDataset) batches with its own collate (files' bytes), and
    each worker keeps 2 batches ahead, not 4: reading files is quick, and fewer batches of
    bytes wait in shared memory.
    """
    generator = torch.Generator().manual_seed(mix_seed(getattr(sampler, "seed", 0), LOADER_SEED_TAG))
    encoded = isinstance(dataset, EncodedDataset)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=workers,
        collate_fn=dataset.collate if isinstance(dataset, EncodedDataset) else None,
        pin_memory=pin_memory,
        persistent_workers=workers > 0,
        prefetch_factor=(2 if encoded else 4) if workers > 0 else None,
        generator=generator,
    )


def train_dataset(
    samples: Sequence[tuple[Path, int]], image_size: int, augment: bool, on_device: bool = False
) -> ImageDataset | EncodedDataset:
    """uint8 pixels; loop.StepContext.to_device normalizes each batch on the device. on_device:
    the GPU loader's dataset (data/encoded.py), which leaves decoding JPEGs to the device."""
    cpu = ImageDataset(samples, train_pixels(image_size, augment), decode_min_side(image_size, augment))
    return EncodedDataset(cpu, image_size, augment) if on_device else cpu


def eval_dataset(
    samples: Sequence[tuple[Path, int]], image_size: int, on_device: bool = False
) -> ImageDataset | EncodedDataset:
    """The deterministic transform of validation, test, evaluate and the feature cache (uint8
    pixels, as train_dataset; on_device: as there)."""
    cpu = ImageDataset(samples, eval_pixels(image_size), decode_min_side(image_size, False))
    return EncodedDataset(cpu, image_size, False) if on_device else cpu
