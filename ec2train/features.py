"""Frozen-backbone fast path (`fit --freeze-backbone --cache-features`).

With a frozen backbone in eval mode, the features it computes for an image never change, so
computing them every epoch (decode, resize, the whole forward pass) is wasted work. Here they
are computed once with the deterministic eval transform, kept in memory (and on disk under
the output folder, keyed by data + arch + backbone weights + image size), and the head is
trained from them with the same `train_one_epoch` / `evaluate` as always. The network is
untouched: fit exports the full model (backbone + trained head) as usual.

Augmentation is off in this mode: every epoch sees the same features for an image.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset

from ec2train import ddp
from ec2train.data import EvalSampler, make_loader
from ec2train.errors import UserError
from ec2train.files import atomic_torch_save

CACHE_FORMAT = "ec2train.features/1"
CACHE_DIR = "feature-cache"


class FeatureCacheError(UserError):
    """--cache-features cannot be used with this model or setting."""


class FeatureDataset(Dataset):
    """(feature, label) pairs; accepts TrainSampler's (index, seed) keys (the seed has nothing to do here)."""

    def __init__(self, features: torch.Tensor, labels: torch.Tensor):
        self.features, self.labels = features, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, key):
        index = key[0] if isinstance(key, tuple) else key
        return self.features[index], self.labels[index]


def cache_key(
    net: nn.Module,
    head_name: str,
    samples: Sequence[tuple[Path, int]],
    *,
    arch: str,
    image_size: int,
    mean: Sequence[float],
    std: Sequence[float],
    precision: str,
) -> str:
    """A digest of everything the features depend on: the backbone's weights (not the head's),
    each image's path, label, size and mtime, and the preprocessing and precision."""
    h = hashlib.sha256()
    h.update(
        json.dumps(
            {
                "format": CACHE_FORMAT,
                "arch": arch,
                "image_size": image_size,
                "mean": list(mean),
                "std": list(std),
                "precision": precision,
            }
        ).encode()
    )
    for name, tensor in sorted(net.state_dict().items()):
        if name.startswith(head_name + "."):
            continue
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    for path, label in samples:
        st = Path(path).stat()
        h.update(f"{path}\0{label}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


@torch.inference_mode()
def _forward_shard(net: nn.Module, head: nn.Module, loader, ctx) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The head's inputs (captured by a forward hook) and labels for this rank's shard."""
    net.eval()
    captured: list[torch.Tensor] = []
    hook = head.register_forward_hook(lambda _m, inputs, _out: captured.append(inputs[0]))
    feats: list[torch.Tensor] = []
    labels: list[torch.Tensor] = []
    try:
        for images, y in loader:
            images, _ = ctx.to_device(images, y)
            captured.clear()
            with ctx.autocast():
                logits = net(images)
                if not feats:
                    # The cache is only valid if the head is the network's last operation
                    # (not so for e.g. squeezenet, whose head is followed by ReLU and pooling).
                    again = head(captured[0]) if len(captured) == 1 else None
                    if (
                        again is None
                        or again.shape != logits.shape
                        or not torch.allclose(again.float(), logits.float(), rtol=1e-3, atol=1e-4)
                    ):
                        raise FeatureCacheError(
                            f"--cache-features does not work with {type(net).__name__}: its classifier layer is not the "
                            "model's last operation; train without --cache-features"
                        )
            feats.append(captured[0].float().cpu())
            labels.append(y)
    finally:
        hook.remove()
    return feats, labels


def compute_features(net: nn.Module, head: nn.Module, loader, ctx, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the network over the loader (an EvalSampler shard) and capture the head's input.

    Returns float32 (features, labels) for all n images: each rank fills its shard's rows and
    the rows are summed across ranks, so every rank ends with the whole split.
    """
    feats, labels = _forward_shard(net, head, loader, ctx)
    # Rank 0 always has images (EvalSampler gives it index 0), so it tells the others the shape.
    shape = ddp.broadcast_object(tuple(feats[0].shape[1:]) if feats else None)
    assert shape is not None  # rank 0's, never empty
    out = torch.zeros((n, *shape), dtype=torch.float32)
    out_labels = torch.zeros(n, dtype=torch.int64)
    if feats:
        index = torch.tensor(list(loader.sampler), dtype=torch.int64)
        out[index] = torch.cat(feats)
        out_labels[index] = torch.cat(labels)
    if ddp.active():
        out = ddp.all_reduce_sum(out, ctx.device)
        out_labels = ddp.all_reduce_sum(out_labels, ctx.device)
    return out, out_labels


def _load(path: Path, key: str) -> tuple[torch.Tensor, torch.Tensor] | None:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # a damaged or foreign file is recomputed, never trusted
        return None
    if not isinstance(obj, dict) or obj.get("format") != CACHE_FORMAT or obj.get("key") != key:
        return None
    return obj["features"], obj["labels"]


@dataclass(frozen=True)
class FeatureSettings:
    """How the features of a run are computed and cached: what they depend on (arch, image size,
    normalization) besides the weights and images, how they are loaded, and where they are kept."""

    arch: str
    image_size: int
    mean: Sequence[float]
    std: Sequence[float]
    batch_size: int
    workers: int = 0
    pin_memory: bool = False
    cache_dir: Path | None = None  # None: computed every time, never written


def split_features(
    split: str,
    net: nn.Module,
    head_name: str,
    dataset,
    ctx,
    settings: FeatureSettings,
    log: Callable[[str], None] = lambda _msg: None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Features and labels of one split: from the disk cache when it matches, else computed
    (sharded over ranks) and written to the cache by rank 0."""
    key = cache_key(
        net,
        head_name,
        dataset.samples,
        arch=settings.arch,
        image_size=settings.image_size,
        mean=settings.mean,
        std=settings.std,
        precision=f"{ctx.device.split(':')[0]}-{ctx.amp.name}",
    )
    cache_dir = settings.cache_dir
    path = cache_dir / f"{split}-{key[:24]}.pt" if cache_dir else None
    cached = _load(path, key) if path and path.is_file() else None
    # Every rank must take the same branch (the computation below is collective); on several
    # nodes, a cache on one node's disk does not help the others.
    if not ddp.any_rank(cached is None) and cached is not None:  # (no rank misses it, this one included)
        log(f"{split}: {len(dataset)} images' features read from {path}")
        return cached
    env = ddp.env_from()
    sampler = EvalSampler(len(dataset), env.rank, env.world_size)
    loader = make_loader(dataset, sampler, settings.batch_size, settings.workers, settings.pin_memory)
    t0 = time.perf_counter()
    feats, labels = compute_features(net, net.get_submodule(head_name), loader, ctx, len(dataset))
    del loader  # stop its workers
    seconds = time.perf_counter() - t0
    log(
        f"{split}: computed features of {len(dataset)} images once in {seconds:.1f} s ({len(dataset) / max(seconds, 1e-9):.0f} img/s)"
    )
    if path and cache_dir and env.is_main:
        for old in cache_dir.glob(f"{split}-*.pt"):  # features of older weights or data
            old.unlink(missing_ok=True)
        atomic_torch_save({"format": CACHE_FORMAT, "key": key, "features": feats, "labels": labels}, path)
    return feats, labels


def feature_loaders(
    net: nn.Module,
    head_name: str,
    datasets: dict[str, Any],
    train_sampler,
    ctx,
    settings: FeatureSettings,
    log: Callable[[str], None] = lambda _msg: None,
) -> tuple[nn.Module, Any, Any]:
    """(model to train, train loader, valid loader) for training the head from cached features.

    datasets: {"train": ..., "valid": ...} ImageDatasets with the eval transform. The train
    loader uses fit's own TrainSampler (same sharding, order and steps per epoch); the model
    to train is the head, DDP-wrapped when there are several processes.
    """
    log(
        "--cache-features: the backbone runs once per image (eval transform, no augmentation); "
        "the epochs train the head from the cached features"
    )
    train = FeatureDataset(*split_features("train", net, head_name, datasets["train"], ctx, settings, log))
    valid = FeatureDataset(*split_features("valid", net, head_name, datasets["valid"], ctx, settings, log))
    env = ddp.env_from()
    # In memory already: worker processes would only add copying.
    train_loader = make_loader(train, train_sampler, settings.batch_size, 0, settings.pin_memory)
    valid_sampler = EvalSampler(len(valid), env.rank, env.world_size)
    valid_loader = make_loader(valid, valid_sampler, settings.batch_size, 0, settings.pin_memory)
    head = net.get_submodule(head_name)
    return ddp.wrap_model(head, ctx.device, False), train_loader, valid_loader
