"""Shared by test_s3.py and test_spot.py: the fit settings and one uninterrupted reference run."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import torch

from conftest import TINY_FIT

# TINY_FIT with a 1.4M-parameter model: its last.pt is ~6 MB instead of resnet18's ~180 MB,
# so each test uploads a few MB per epoch. Exact resume does not depend on the architecture.
FIT = dict(TINY_FIT, arch="shufflenet_v2_x0_5", epochs=3)


def fit_args(data: Path, output: Path, logdir: Path, **overrides) -> list[str]:
    """`ec2train fit` options for FIT (overrides win)."""
    settings = {**FIT, "data": str(data), "output": str(output), "logdir": str(logdir), **overrides}
    return [a for k, v in settings.items() for a in (f"--{k.replace('_', '-')}", str(v))]


def weights(path: Path) -> dict[str, torch.Tensor]:
    """The state_dict inside model.pth or last.pt."""
    obj = torch.load(path, map_location="cpu", weights_only=True)
    return obj["state_dict"] if "state_dict" in obj else obj["model"]


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"


@functools.lru_cache(maxsize=None)
def reference_run(data: str, root: str) -> dict[str, Any]:
    """Final model.pth and last.pt weights of an uninterrupted FIT run (once per session),
    and the path of its model.pth."""
    from ec2train.config import resolve
    from ec2train.loop import fit

    out = Path(root) / "reference"
    result = fit(resolve(data=data, output=str(out / "model"), logdir=str(out / "runs"), **FIT))
    assert not result.interrupted and len(result.history) == FIT["epochs"]
    return {"model": weights(result.model_path), "last": weights(result.output / "last.pt"), "model_path": result.model_path}
