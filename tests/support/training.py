"""Training settings and weight checks shared by test modules: the tiny fit (TINY_FIT), its
cheaper-to-upload variant for the S3 and spot tests (FIT), and one uninterrupted reference run."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import torch

# Small and learnable: 4 classes, 48 training images each, 40 px JPEGs.
TINY_FIT = dict(arch="resnet18", weights="none", image_size=32, batch_size=16, lr=3e-3, workers=0, epochs=4)


# TINY_FIT with a 1.4M-parameter model: its last.pt is ~6 MB instead of resnet18's ~180 MB,
# so each test uploads a few MB per epoch. Exact resume does not depend on the architecture.
# CPU even on a GPU box: bitwise-equal weights after a resume need deterministic kernels.
# threads=1: fit applies its thread plan, and bitwise-equal weights need the same thread count
# (reduction order) in the in-process reference and in every subprocess run.
FIT = dict(TINY_FIT, arch="shufflenet_v2_x0_5", epochs=3, device="cpu", threads=1)


def options(**settings) -> list[str]:
    """`--name value` for each setting (underscores become dashes)."""
    return [a for k, v in settings.items() for a in (f"--{k.replace('_', '-')}", str(v))]


def fit_args(data: Path, output: Path, logdir: Path, **overrides) -> list[str]:
    """`ec2train fit` options for FIT (overrides win)."""
    return options(**{**FIT, "data": str(data), "output": str(output), "logdir": str(logdir), **overrides})


def weights(path: Path) -> dict[str, torch.Tensor]:
    """The state_dict inside model.pth or last.pt."""
    obj = torch.load(path, map_location="cpu", weights_only=True)
    return obj["state_dict"] if "state_dict" in obj else obj["model"]


def state_dicts_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"


@functools.cache
def reference_run(data: str, root: str) -> dict[str, Any]:
    """Final model.pth and last.pt weights of an uninterrupted FIT run (once per session),
    and the path of its model.pth."""
    from ec2train.config import resolve
    from ec2train.loop import fit

    out = Path(root) / "reference"
    result = fit(resolve(data=data, output=str(out / "model"), logdir=str(out / "runs"), **FIT))
    assert not result.interrupted and len(result.history) == FIT["epochs"]
    return {
        "model": weights(result.model_path),
        "last": weights(result.output / "last.pt"),
        "model_path": result.model_path,
    }


def untrained_model_file(data: Path, dest: Path) -> Path:
    """A real model file with untrained weights for DATA's classes, at DEST: quick to make, and
    its answers need not be right to be checked (and surely confuse classes)."""
    from ec2train.export import model_payload, save_model_file
    from ec2train.model import build_model

    torch.manual_seed(0)
    folders = sorted(p.name for p in (data / "test").iterdir())
    payload = model_payload(
        build_model("shufflenet_v2_x0_5", len(folders)).state_dict(),
        arch="shufflenet_v2_x0_5",
        class_names=[f.split(".", 1)[1] for f in folders],
        class_folders=folders,
        image_size=32,
        mean=(0.5, 0.5, 0.5),
        std=(0.25, 0.25, 0.25),
    )
    return save_model_file(dest, payload)
