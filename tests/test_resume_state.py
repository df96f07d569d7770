"""The run's files and resume state (checkpoint.py): a finished run is reported, not redone;
more epochs on a finished run are refused; last.pt holds the best model once; the
lrs are logged per role and the backbone scale applies to pretrained backbones only."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import torch
from rich.console import Console

from ec2train.config import resolve
from ec2train.loop import fit
from tests.support.cli import assert_one_line_error, cli_in_process
from tests.support.training import TINY_FIT

# shufflenet: 6 MB checkpoints; CPU for exact, repeatable runs.
SMALL = {**TINY_FIT, "arch": "shufflenet_v2_x0_5", "epochs": 2, "device": "cpu"}


def _cli_args(data: Path, out: Path, **kw) -> list[str]:
    settings = {**SMALL, "data": str(data), "output": str(out / "model"), "logdir": str(out / "runs"), **kw}
    return [a for k, v in settings.items() for a in (f"--{k.replace('_', '-')}", str(v))]


def _snapshot(folder: Path) -> dict[str, tuple[int, bytes]]:
    return {
        str(p.relative_to(folder)): (p.stat().st_mtime_ns, p.read_bytes())
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def finished_run(demo_data, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("finished")
    result = fit(resolve(data=str(demo_data), output=str(root / "model"), logdir=str(root / "runs"), **SMALL))
    assert not result.interrupted and result.metrics["epochs_run"] == 2
    return root


def test_resume_auto_on_a_finished_run_reports_it_and_touches_nothing(finished_run: Path, demo_data, capsys):
    before = _snapshot(finished_run)
    code, out, err = cli_in_process(capsys, "fit", *_cli_args(demo_data, finished_run), "--resume", "auto")
    assert code == 0, out + err
    text = " ".join(out.split())
    assert "finished run" in text and str(finished_run / "model" / "model.pth") in text, text
    assert "Traceback" not in out + err and "resuming" not in text
    assert _snapshot(finished_run) == before  # same files, same bytes, same mtimes: no new TensorBoard run either


def test_more_epochs_on_a_finished_run_are_refused_with_the_fix(finished_run: Path, demo_data, capsys):
    before = _snapshot(finished_run)
    code, _, err = cli_in_process(capsys, "fit", *_cli_args(demo_data, finished_run, epochs=4), "--resume", "auto")
    assert_one_line_error(code, err, "finished run", "--resume never")
    assert _snapshot(finished_run) == before


def test_last_pt_stores_the_best_model_once(finished_run: Path, demo_data, tmp_path):
    ckpt = torch.load(finished_run / "model" / "last.pt", map_location="cpu", weights_only=True)
    assert ckpt["format"] == "ec2train.checkpoint/2"
    if ckpt["best_epoch"] == ckpt["epoch"]:  # the best weights are the model: no second copy
        assert ckpt["best_model"] is None
    else:
        assert not all(torch.equal(ckpt["model"][k], ckpt["best_model"][k]) for k in ckpt["model"])
    # Non-improving epochs keep their own copy of the best: lr ~0 from epoch 2 on never beats epoch 1.
    out = tmp_path / "flat"
    fit(resolve(data=str(demo_data), output=str(out), logdir=str(tmp_path / "runs"), **{**SMALL, "lr": 1e-9}))
    flat = torch.load(out / "last.pt", map_location="cpu", weights_only=True)
    assert (flat["best_epoch"], flat["epoch"]) == (1, 2)
    best = torch.load(out / "model.pth", map_location="cpu", weights_only=True)["state_dict"]
    assert all(torch.equal(best[k], flat["best_model"][k]) for k in best)


def _train_scalar_tags(runs: Path) -> set[str]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (run,) = [p for p in runs.iterdir() if p.is_dir()]
    return set(EventAccumulator(str(run / "train")).Reload().Tags()["scalars"])


def test_scratch_training_uses_lr_everywhere_and_logs_lr_once(finished_run: Path):
    history = json.loads((finished_run / "model" / "metrics.json").read_text())["history"]
    # --weights none: the backbone trains at --lr too (no 0.1 scale), so both recorded lrs agree,
    # and TensorBoard draws the one curve (a second, identical one would only hide it).
    assert all(h["lr"] == h["lr_backbone"] for h in history)
    tags = _train_scalar_tags(finished_run / "runs")
    assert "optimizer/lr" in tags and "optimizer/lr_backbone" not in tags


def test_pretrained_backbone_is_scaled_and_lr_is_the_heads(demo_data, tmp_path):
    import torchvision.models as tvm

    from ec2train.optim import backbone_lr

    weights = tmp_path / "backbone.pth"
    torch.save(tvm.get_model("shufflenet_v2_x0_5", weights=None).state_dict(), weights)
    cfg = resolve(
        data=str(demo_data),
        output=str(tmp_path / "out"),
        logdir=str(tmp_path / "runs"),
        **{**SMALL, "weights": str(weights), "freeze_backbone": False, "backbone_lr_scale": 0.5},
    )
    assert backbone_lr(cfg, 1.0) == 0.5 and backbone_lr(resolve(weights="none"), 1.0) == 1.0
    record = fit(cfg).history[0]  # mid-schedule: the last epoch's lrs are both 0
    assert record["lr"] == pytest.approx(SMALL["lr"] * 0.5) and record["lr_backbone"] == pytest.approx(
        record["lr"] * 0.5
    )
    assert {"optimizer/lr", "optimizer/lr_backbone"} <= _train_scalar_tags(tmp_path / "runs")


def test_fit_into_a_folder_holding_a_run_refuses_until_told_which_way(finished_run: Path, demo_data, capsys):
    before = _snapshot(finished_run / "model")
    code, _, err = cli_in_process(capsys, "fit", *_cli_args(demo_data, finished_run))
    assert_one_line_error(code, err, "already holds a run", "model.pth", "--resume auto", "--resume never", "--output")
    assert _snapshot(finished_run / "model") == before  # not even config.toml is rewritten


def test_tune_then_fit_refuses_a_taken_output_before_any_trial(finished_run: Path, demo_data, tmp_path, capsys):
    from ec2train.config import to_toml

    config = tmp_path / "fixed.toml"
    config.write_text(to_toml(resolve(data=str(demo_data), output=str(finished_run / "model"), **SMALL)))
    code, _, err = cli_in_process(
        capsys, "tune", "--config", config, "--trials", "1", "--then-fit", "--output", tmp_path / "t"
    )
    assert_one_line_error(code, err, "already holds a run", "--resume never")
    assert not (tmp_path / "t" / "best.toml").exists()


@pytest.mark.fast
def test_a_tie_on_valid_accuracy_goes_to_the_lower_valid_loss():
    from ec2train.checkpoint import TrainState

    net = torch.nn.Linear(2, 2)
    state = TrainState(run_name="r")
    assert state.record(1, 0.75, net, valid_loss=0.9)
    assert state.record(2, 0.75, net, valid_loss=0.6) and state.best_epoch == 2  # same accuracy, lower loss
    assert not state.record(3, 0.75, net, valid_loss=0.7) and state.best_epoch == 2
    assert state.record(4, 0.8, net, valid_loss=2.0) and state.best_epoch == 4  # accuracy first
    assert (state.stale_epochs, state.best_loss) == (0, 2.0)


def test_a_last_pt_with_weights_of_another_shape_is_one_line(finished_run: Path, demo_data, tmp_path, capsys):
    import shutil

    out = tmp_path / "edited"
    shutil.copytree(finished_run / "model", out / "model")
    ckpt = torch.load(out / "model" / "last.pt", map_location="cpu", weights_only=True)
    ckpt["epoch"] = 1  # unfinished, so fit restores it
    ckpt["model"]["fc.weight"] = torch.zeros(7, ckpt["model"]["fc.weight"].shape[1])
    torch.save(ckpt, out / "model" / "last.pt")
    code, _, err = cli_in_process(capsys, "fit", *_cli_args(demo_data, out), "--resume", "auto")
    assert_one_line_error(code, err, "last.pt", "fc.weight is [7,", "another shape", "--resume never")


def test_a_confusion_picture_that_cannot_be_drawn_costs_the_picture_not_the_run(demo_data, tmp_path, monkeypatch):
    from ec2train import loop

    def broken(*a, **k):
        raise RuntimeError("raqm_layout() failed\nand more")

    monkeypatch.setattr(loop, "log_confusion", broken)
    console = Console(file=io.StringIO(), width=300)
    out = tmp_path / "model"
    result = fit(
        resolve(data=str(demo_data), output=str(out), logdir=str(tmp_path / "runs"), **{**SMALL, "epochs": 1}),
        console=console,
    )
    assert not result.interrupted and "test_acc1" in json.loads((out / "metrics.json").read_text())
    text = console.file.getvalue()
    assert "confusion matrix was not drawn (RuntimeError: raqm_layout() failed)" in text, text


@pytest.mark.parametrize(
    "damage, needle",
    [
        (lambda c: c.pop("scheduler"), "no 'scheduler'"),
        (lambda c: c.update(rng="x"), "'rng' is of type str"),
        (lambda c: c.update(run_name=7), "'run_name' is of type int"),
        (lambda c: c.update(rng={"torch": "not a state"}), "damaged"),
    ],
)
def test_a_hand_edited_last_pt_is_one_line(finished_run: Path, demo_data, tmp_path, capsys, damage, needle):
    import shutil

    out = tmp_path / "edited"
    shutil.copytree(finished_run / "model", out / "model")
    ckpt = torch.load(out / "model" / "last.pt", map_location="cpu", weights_only=True)
    ckpt["epoch"] = 1  # unfinished, so fit restores it
    damage(ckpt)
    torch.save(ckpt, out / "model" / "last.pt")
    code, _, err = cli_in_process(capsys, "fit", *_cli_args(demo_data, out), "--resume", "auto")
    assert_one_line_error(code, err, "last.pt", needle, "--resume never")
