"""fit --freeze-backbone --cache-features: the same training, from features computed once."""

from __future__ import annotations

import io
import os
from pathlib import Path

import pytest
import torch
from rich.console import Console

from ec2train.config import resolve
from ec2train.data import make_demo_dataset, scan_split
from ec2train.features import CACHE_DIR, FeatureCacheError, cache_key
from ec2train.infer import Predictor
from ec2train.loop import fit
from ec2train.model import build_model, find_head, read_model_file
from tests.support.cli import assert_one_line_error, cli_in_process
from tests.support.net import free_port
from tests.support.training import TINY_FIT

SETTINGS = dict(
    TINY_FIT, epochs=3, batch_size=8, lr=0.03, freeze_backbone=True
)  # a random frozen backbone needs a bold head


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_demo_dataset(tmp_path_factory.mktemp("feat") / "d", classes=4, per_class=16, size=40, eval_per_class=6)


def run(data: Path, out: Path, **kw):
    log = io.StringIO()
    result = fit(
        resolve(data=str(data), output=str(out), logdir=str(out / "runs"), **{**SETTINGS, **kw}),
        console=Console(file=log, width=200),
    )
    return result, log.getvalue()


@pytest.fixture(scope="module")
def cached(data, tmp_path_factory):
    return run(data, tmp_path_factory.mktemp("cached") / "out", cache_features=True)


def test_cached_training_equals_training_on_images(data: Path, cached, tmp_path: Path):
    """Without augmentation the normal path computes the very same features every epoch, so
    both paths must train the same head: same losses, accuracies and weights."""
    with_cache, log = cached
    assert "augmentation" in log and "computed features of 64 images once" in log
    plain, _ = run(data, tmp_path / "plain", augment=False)
    for a, b in zip(with_cache.history, plain.history, strict=True):
        for key in ("train_loss", "train_acc1", "valid_loss", "valid_acc1"):
            assert a[key] == pytest.approx(b[key], abs=1e-4), key
    ma, mb = read_model_file(with_cache.model_path), read_model_file(plain.model_path)
    for name in ma["state_dict"]:
        torch.testing.assert_close(ma["state_dict"][name], mb["state_dict"][name], atol=1e-5, rtol=1e-4)
    assert with_cache.metrics["valid_acc1"] > 0.5  # it learns (4 classes: chance is 0.25)
    assert with_cache.metrics["test_acc1"] == pytest.approx(plain.metrics["test_acc1"])


def test_model_file_is_full_backbone_plus_trained_head_and_predicts_like_the_head(data: Path, cached):
    result, _ = cached
    meta = read_model_file(result.model_path)  # weights_only=True inside
    torch.manual_seed(0)  # TrainConfig.seed
    initial = build_model("resnet18", 4, "none")  # fit seeds, then builds: the frozen backbone's weights
    head_name, _ = find_head(initial)
    for name, tensor in initial.state_dict().items():
        if not name.startswith(head_name + "."):
            assert torch.equal(meta["state_dict"][name], tensor), name
    assert not torch.equal(meta["state_dict"][f"{head_name}.weight"], initial.state_dict()[f"{head_name}.weight"])

    cache = torch.load(next((result.output / CACHE_DIR).glob("valid-*.pt")), weights_only=True)
    head = torch.nn.Linear(cache["features"].shape[1], 4)
    head.load_state_dict({"weight": meta["state_dict"]["fc.weight"], "bias": meta["state_dict"]["fc.bias"]})
    from_features = head(cache["features"]).argmax(1).tolist()
    _, samples = scan_split(data, "valid", meta["class_folders"])
    predictor = Predictor(result.model_path)
    from_images = [p[0]["index"] for p in predictor.predict([path for path, _ in samples], k=1)]
    assert from_images == from_features
    assert cache["labels"].tolist() == [label for _, label in samples]


def test_rerun_reads_the_cache_and_changed_data_recomputes(data: Path, cached, tmp_path: Path):
    result, _ = cached
    out = tmp_path / "again"
    (out / CACHE_DIR).mkdir(parents=True)
    for f in (result.output / CACHE_DIR).iterdir():
        (out / CACHE_DIR / f.name).write_bytes(f.read_bytes())
    _, log = run(data, out, epochs=1, cache_features=True)
    assert "train: 64 images' features read from" in log and "computed" not in log

    image = next((data / "valid").rglob("*.jpg"))
    st = image.stat()
    os.utime(image, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    try:  # a second run into the same folder, which now holds a run: say so
        _, log = run(data, out, epochs=1, cache_features=True, resume="never")
    finally:
        os.utime(image, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert "valid: computed features of 24 images" in log and "train: 64 images' features read" in log
    assert len(list((out / CACHE_DIR).glob("valid-*.pt"))) == 1  # the stale one is gone


def test_cache_key_follows_backbone_data_and_preprocessing_not_head(data: Path):
    torch.manual_seed(0)
    net = build_model("resnet18", 4, "none")
    head_name, head = find_head(net)
    _, samples = scan_split(data, "train")
    kw = dict(arch="resnet18", image_size=32, mean=(0.5,) * 3, std=(0.25,) * 3, precision="cpu-off")
    key = cache_key(net, head_name, samples, **kw)
    with torch.no_grad():
        head.weight.add_(1)
    assert cache_key(net, head_name, samples, **kw) == key  # the head trains; its features do not change
    assert cache_key(net, head_name, samples[:-1], **kw) != key
    assert cache_key(net, head_name, samples, **{**kw, "image_size": 64}) != key
    assert cache_key(net, head_name, samples, **{**kw, "precision": "cuda-bf16"}) != key
    with torch.no_grad():
        net.layer1[0].conv1.weight.mul_(1.01)
    assert cache_key(net, head_name, samples, **kw) != key


def test_cache_features_needs_a_frozen_backbone(capsys, data: Path, tmp_path: Path):
    code, _, err = cli_in_process(
        capsys, "fit", "--data", data, "--output", tmp_path, "--weights", "none", "--cache-features"
    )
    assert_one_line_error(code, err, "--cache-features", "--freeze-backbone")


def test_architecture_whose_head_is_not_last_is_refused(data: Path, tmp_path: Path):
    # squeezenet's classifier conv is followed by ReLU and pooling: features before it would be wrong.
    with pytest.raises(FeatureCacheError, match="without --cache-features"):
        run(data, tmp_path / "sq", arch="squeezenet1_1", image_size=64, epochs=1, cache_features=True)


@pytest.mark.fast
def test_help_says_augmentation_is_off(capsys):
    from typer.testing import CliRunner

    from ec2train.cli import app

    out = CliRunner().invoke(app, ["fit", "--help"], env={"COLUMNS": "300"}).output
    assert "--cache-features" in out and "augmentation is off" in " ".join(out.split())


class _Images(torch.utils.data.Dataset):
    """Seven 'images' whose label is their index mod 3 (an odd count: shards are uneven)."""

    def __len__(self) -> int:
        return 7

    def __getitem__(self, i):
        return torch.full((3, 8, 8), float(i)), i % 3


def _tiny_net() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(4, 3)
    )


def _features_on_rank(rank: int, world: int, port: int, out: str) -> None:
    """One process of a real 2-process gloo group: sharded features, then DDP head steps."""
    import torch.distributed as dist

    from ec2train import ddp, hw
    from ec2train.data import TrainSampler
    from ec2train.features import FeatureSettings, feature_loaders
    from ec2train.loop import StepContext, train_one_epoch

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        net = _tiny_net()
        ds = _Images()
        ds.samples = []  # the cache key reads image files; no disk cache here
        ctx = StepContext("cpu", hw.amp_policy("off", "cpu"), False)
        sampler = TrainSampler(len(ds), rank, world, seed=0)
        settings = FeatureSettings(arch="tiny", image_size=8, mean=(0,) * 3, std=(1,) * 3, batch_size=2)
        model, train_loader, _ = feature_loaders(net, "3", {"train": ds, "valid": ds}, sampler, ctx, settings)
        feats = train_loader.dataset.features.clone()
        opt = torch.optim.SGD(net[3].parameters(), lr=0.1)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda _s: 1.0)
        train_one_epoch(model, train_loader, opt, sched, ctx)
        torch.save(
            {"features": feats, "labels": train_loader.dataset.labels, "head": net[3].state_dict()}, f"{out}/{rank}.pt"
        )
    finally:
        ddp.cleanup()


def test_features_are_sharded_over_ranks_and_assembled_whole(tmp_path: Path):
    import torch.multiprocessing as mp

    mp.start_processes(_features_on_rank, args=(2, free_port(), str(tmp_path)), nprocs=2, start_method="spawn")
    r0, r1 = (torch.load(tmp_path / f"{r}.pt", weights_only=True) for r in (0, 1))
    net = _tiny_net().eval()
    with torch.no_grad():
        whole = net[:3](torch.stack([_Images()[i][0] for i in range(7)]))
    torch.testing.assert_close(r0["features"], whole)  # every row: rank 1's shard arrived too
    torch.testing.assert_close(r1["features"], whole)
    assert r0["labels"].tolist() == r1["labels"].tolist() == [i % 3 for i in range(7)]
    for name in r0["head"]:  # DDP kept the two heads identical through training
        torch.testing.assert_close(r0["head"][name], r1["head"][name])
    assert not torch.equal(r0["head"]["weight"], net[3].weight)  # and they trained
