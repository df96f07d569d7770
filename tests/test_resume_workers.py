"""Resume is bit-exact with loader worker processes and a model with dropout."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch.utils.data import Dataset

from ec2train.config import resolve
from ec2train.data import EvalSampler, TrainSampler, make_demo_dataset, make_loader
from ec2train.loop import fit
from tests.support.training import TINY_FIT


def _run(data: Path, out: Path, **kw):
    # mobilenet_v3_small: its classifier has Dropout, which draws from the global RNG every step.
    settings = {**TINY_FIT, "arch": "mobilenet_v3_small", "workers": 2, "epochs": 2, "batch_size": 8, **kw}
    return resolve(data=str(data), output=str(out), logdir=str(out / "runs"), **settings)


@pytest.mark.timeout(900)  # three small fits with worker processes; slow on a shared 2-core box
def test_resume_with_workers_and_dropout_equals_uninterrupted(tmp_path: Path):
    demo_data = make_demo_dataset(tmp_path / "data", classes=2, per_class=16, size=32)
    full = fit(_run(demo_data, tmp_path / "full"))
    steps = {"n": 0}

    def stop_in_epoch_two() -> bool:
        steps["n"] += 1
        return steps["n"] == 4 + 2  # 4 steps per epoch (32 images / 8)

    assert fit(_run(demo_data, tmp_path / "cut"), should_stop=stop_in_epoch_two).interrupted
    fit(_run(demo_data, tmp_path / "cut", resume="auto"))  # new loaders, global RNG from the checkpoint
    a = torch.load(tmp_path / "full" / "last.pt", weights_only=True)
    b = torch.load(tmp_path / "cut" / "last.pt", weights_only=True)
    assert a["epoch"] == b["epoch"] == 2, full.history
    assert a["model"].keys() == b["model"].keys()
    for name in a["model"]:
        assert torch.equal(a["model"][name], b["model"][name]), name


class Keys(Dataset):
    def __len__(self) -> int:
        return 8

    def __getitem__(self, key):
        return key[0] if isinstance(key, tuple) else key


@pytest.mark.fast
def test_loaders_leave_the_global_rng_alone():
    data = Keys()
    before = torch.random.get_rng_state()
    for sampler in (TrainSampler(8, seed=3), EvalSampler(8)):
        loader = make_loader(data, sampler, batch_size=4, workers=0, pin_memory=False)
        list(loader)
        list(loader)
    assert torch.equal(torch.random.get_rng_state(), before)
