"""The trainer end to end: it learns, exports a self-describing model file, resumes exactly."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from ec2train.config import resolve
from ec2train.infer import Predictor
from ec2train.loop import fit
from ec2train.model import MODEL_FORMAT
from tests.support.cli import cli_in_process, run_cli
from tests.support.training import TINY_FIT, state_dicts_equal


def test_training_learns_and_writes_everything(trained_model: Path):
    out = trained_model.parent
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["valid_acc1"] >= 0.8  # 4 classes: chance is 0.25
    assert metrics["test_acc1"] >= 0.7
    assert metrics["test_images"] == 4 * 12
    assert metrics["epochs_run"] == 4 and [h["epoch"] for h in metrics["history"]] == [1, 2, 3, 4]
    assert 1 <= metrics["best_epoch"] <= 4
    # loss falls over training
    assert metrics["history"][-1]["train_loss"] < metrics["history"][0]["train_loss"]
    assert (out / "last.pt").is_file() and (out / "config.toml").is_file()
    assert not list(out.glob(".*.tmp")), "temp files left behind"


def test_model_file_is_self_describing_and_weights_only(trained_model: Path, tmp_path: Path, demo_data: Path):
    obj = torch.load(trained_model, map_location="cpu", weights_only=True)
    assert obj["format"] == MODEL_FORMAT
    assert obj["arch"] == "resnet18" and obj["num_classes"] == 4
    assert obj["class_names"] == ["Circle", "Square", "Triangle", "Cross"]
    assert obj["class_folders"][0] == "001.Circle"
    assert obj["image_size"] == 32 and len(obj["mean"]) == 3 and len(obj["std"]) == 3
    assert not any(k.startswith(("module.", "_orig_mod.")) for k in obj["state_dict"])
    assert obj["metrics"]["test_acc1"] >= 0.7 and obj["config"]["arch"] == "resnet18"
    assert set(obj["versions"]) >= {"torch", "torchvision", "ec2train"}
    # Serving needs nothing but the file: copy it alone into an empty folder.
    alone = tmp_path / "model.pth"
    shutil.copy(trained_model, alone)
    predictor = Predictor(alone)
    images = sorted((demo_data / "test" / "003.Triangle").glob("*.jpg"))
    preds = predictor.predict(images, k=2)
    top1 = [p[0]["label"] for p in preds]
    assert top1.count("Triangle") >= len(images) * 0.7, top1
    assert abs(sum(p["probability"] for p in predictor.predict(images[:1], k=4)[0]) - 1) < 1e-4


def test_resolved_config_reloads(trained_model: Path):
    from ec2train.config import load_toml

    cfg = resolve(trained_model.parent / "config.toml")
    assert cfg.arch == "resnet18" and cfg.image_size == 32 and cfg.epochs == 4
    assert load_toml(trained_model.parent / "config.toml")["lr"] == pytest.approx(3e-3)


def _small(demo_data: Path, out: Path, **kw):
    # shufflenet: 6 MB checkpoints instead of resnet18's 180 MB, so these runs are not disk-bound
    settings = {**TINY_FIT, "arch": "shufflenet_v2_x0_5", "epochs": 3, **kw}
    return resolve(data=str(demo_data), output=str(out), logdir=str(out / "runs"), **settings)


def test_interrupted_then_resumed_equals_uninterrupted(demo_data: Path, tmp_path: Path):
    # threads=1: bitwise-equal weights need the same thread count in both runs, and the thread
    # probe (on for the defaults) may choose differently in each: it times real steps.
    full = fit(_small(demo_data, tmp_path / "full", epochs=2, threads=1))
    steps = {"n": 0}

    def stop_in_epoch_two() -> bool:
        steps["n"] += 1
        return steps["n"] == 12 + 5  # 12 steps per epoch (192 images / 16): stop mid-epoch 2

    cut = fit(_small(demo_data, tmp_path / "cut", epochs=2, threads=1), should_stop=stop_in_epoch_two)
    assert cut.interrupted
    ckpt = torch.load(tmp_path / "cut" / "last.pt", map_location="cpu", weights_only=True)
    assert ckpt["epoch"] == 1
    resumed = fit(_small(demo_data, tmp_path / "cut", epochs=2, resume="auto", threads=1))
    assert [h["epoch"] for h in resumed.history] == [1, 2]
    a = torch.load(full.model_path, weights_only=True)
    b = torch.load(resumed.model_path, weights_only=True)
    assert state_dicts_equal(a["state_dict"], b["state_dict"])
    assert a["metrics"]["test_acc1"] == b["metrics"]["test_acc1"]
    last_a = torch.load(tmp_path / "full" / "last.pt", weights_only=True)
    last_b = torch.load(tmp_path / "cut" / "last.pt", weights_only=True)
    assert state_dicts_equal(last_a["model"], last_b["model"])
    assert last_a["optimizer"]["state"][0]["step"] == last_b["optimizer"]["state"][0]["step"]


def test_resume_explicit_path_and_mismatch(demo_data: Path, tmp_path: Path, capsys):
    stop: list[int] = []  # an unfinished run: stopped in epoch 2 (a finished one cannot be extended)
    fit(
        _small(demo_data, tmp_path / "a", epochs=2),
        on_epoch=lambda e, r: stop.append(e),
        should_stop=lambda: bool(stop),
    )
    ckpt = tmp_path / "a" / "last.pt"
    done = fit(_small(demo_data, tmp_path / "b", epochs=2, resume=str(ckpt)))
    assert [h["epoch"] for h in done.history] == [1, 2]
    code, _, err = cli_in_process(
        capsys,
        "fit",
        "--data",
        demo_data,
        "--output",
        tmp_path / "a",
        "--resume",
        "auto",
        "--arch",
        "resnet18",
        "--weights",
        "none",
        "--epochs",
        "2",
        "--image-size",
        "32",
        "--workers",
        "0",
    )
    assert code == 2 and "arch" in err and "Traceback" not in err


def test_fit_evaluate_predict_round_trip_cli(trained_model: Path, demo_data: Path, tmp_path: Path):
    res = run_cli("evaluate", "--model", trained_model, "--data", demo_data, "--split", "test", "--out", tmp_path)
    assert res.returncode == 0, res.stderr
    report = json.loads((tmp_path / "evaluation-test.json").read_text())
    assert report["images"] == 48 and report["acc1"] >= 0.7 and report["acc5"] == 1.0
    assert set(report["per_class_acc1"]) == {"Circle", "Square", "Triangle", "Cross"}
    csv = (tmp_path / "confusion-test.csv").read_text().splitlines()
    assert len(csv) == 5 and sum(int(x) for line in csv[1:] for x in line.split(",")[1:]) == 48
    assert (tmp_path / "confusion-test.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    image = sorted((demo_data / "test" / "001.Circle").glob("*.jpg"))[0]
    res = run_cli("predict", "--model", trained_model, image, "--top-k", "3", "--json")
    assert res.returncode == 0, res.stderr
    answer = json.loads(res.stdout)
    assert [p["label"] for p in answer["predictions"]][0] in {"Circle", "Square", "Triangle", "Cross"}
    assert len(answer["predictions"]) == 3
    assert answer["predictions"][0]["probability"] >= answer["predictions"][1]["probability"]


def test_patience_stops_early(demo_data: Path, tmp_path: Path):
    # lr so small nothing improves after epoch 1: patience 1 stops after epoch 2.
    result = fit(_small(demo_data, tmp_path, epochs=5, patience=1, lr=1e-9, freeze_backbone=True))
    assert result.metrics["epochs_run"] < 5 and result.metrics["stopped_early"]


def test_next_epochs_workers_start_before_this_epochs_checkpoint(demo_data: Path, tmp_path: Path, monkeypatch):
    """The loader workers decode the next epoch's first batches while the checkpoint is written
    (not during that epoch's first step), and never for an epoch that the epoch count or
    patience ends the run before."""
    from ec2train.checkpoint import CheckpointSaver
    from ec2train.data import TrainSampler

    events = []
    sampler_iter, save_epoch = TrainSampler.__iter__, CheckpointSaver.save_epoch

    def iterating(self):
        if not self.idle:  # idle: the workers being started, with nothing to load
            events.append(("batches", self.epoch + 1))
        return sampler_iter(self)

    def saving(saver, state):
        events.append(("save", state.epoch))
        return save_epoch(saver, state)

    monkeypatch.setattr(TrainSampler, "__iter__", iterating)
    monkeypatch.setattr(CheckpointSaver, "save_epoch", saving)
    fit(_small(demo_data, tmp_path / "three", workers=1))
    assert events == [("batches", 1), ("batches", 2), ("save", 1), ("batches", 3), ("save", 2), ("save", 3)]

    events.clear()  # patience 1 with nothing to learn: epoch 2 is the last, and epoch 3's batches are never read
    result = fit(
        _small(demo_data, tmp_path / "patience", epochs=5, patience=1, lr=1e-9, freeze_backbone=True, workers=1)
    )
    assert result.metrics["epochs_run"] == 2
    assert events == [("batches", 1), ("batches", 2), ("save", 1), ("save", 2)], events
