"""Every bad input gets a one-line error naming the problem and the fix, exit 2, no traceback."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from tests.support.cli import assert_one_line_error, cli_in_process, run_cli
from tests.support.training import untrained_model_file

FAST = ["--arch", "resnet18", "--weights", "none", "--image-size", "32", "--workers", "0", "--epochs", "1"]


@pytest.fixture
def data_copy(demo_data: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "data"
    shutil.copytree(demo_data, dst)
    return dst


def fit_err(capsys, data, tmp_path, *extra):
    return cli_in_process(
        capsys, "fit", "--data", data, "--output", tmp_path / "out", "--logdir", tmp_path / "runs", *FAST, *extra
    )


@pytest.mark.fast
def test_missing_data_folder(capsys, tmp_path):
    assert_one_line_error(*fit_err(capsys, tmp_path / "nope", tmp_path)[:3:2], "does not exist", "data fetch")


def test_missing_split(capsys, data_copy, tmp_path):
    shutil.rmtree(data_copy / "valid")
    assert_one_line_error(*fit_err(capsys, data_copy, tmp_path)[:3:2], "missing split 'valid'")


def test_class_lists_differ(capsys, data_copy, tmp_path):
    shutil.move(str(data_copy / "test" / "004.Cross"), str(data_copy / "test" / "005.Plus"))
    assert_one_line_error(*fit_err(capsys, data_copy, tmp_path)[:3:2], "different classes", "005.Plus")


def test_empty_class(capsys, data_copy, tmp_path):
    for p in (data_copy / "train" / "002.Square").iterdir():
        p.unlink()
    assert_one_line_error(*fit_err(capsys, data_copy, tmp_path)[:3:2], "empty class folder", "002.Square")


@pytest.mark.parametrize("workers", ["0", "1"])
def test_corrupt_image_stops_with_its_path(capsys, data_copy, tmp_path, workers):
    bad = data_copy / "train" / "001.Circle" / "Circle_train_0003.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    code, _, err = fit_err(capsys, data_copy, tmp_path, "--workers", workers)
    assert_one_line_error(code, err, "cannot decode image", "Circle_train_0003.jpg", "data check")


def test_data_check_lists_every_problem(capsys, data_copy):
    (data_copy / "train" / "001.Circle" / "Circle_train_0003.jpg").write_bytes(b"garbage")
    (data_copy / "valid" / "002.Square" / "Square_valid_0000.jpg").write_bytes(b"\xff\xd8\xff")
    for p in (data_copy / "test" / "003.Triangle").iterdir():
        p.unlink()
    code, out, err = cli_in_process(capsys, "data", "check", data_copy)
    assert code == 1
    assert "Circle_train_0003.jpg" in err and "Square_valid_0000.jpg" in err
    assert "empty class folder" in err and "003.Triangle" in err
    assert "Traceback" not in err


def test_data_check_clean(capsys, demo_data):
    code, out, err = cli_in_process(capsys, "data", "check", demo_data)
    assert code == 0 and "no problems" in out
    assert "192" in out  # 4 x 48 train images counted


@pytest.mark.parametrize(
    "option,value,needle",
    [
        ("--epochs", "0", "at least 1"),
        ("--lr", "0", "greater than 0"),
        ("--lr", "-1", "greater than 0"),
        ("--batch-size", "0", "at least 1"),
        ("--label-smoothing", "1.5", "[0, 1)"),
        ("--warmup-epochs", "9", "fewer than"),
    ],
)
def test_invalid_numbers(capsys, demo_data, tmp_path, option, value, needle):
    code, _, err = fit_err(capsys, demo_data, tmp_path, option, value)
    assert_one_line_error(code, err, option, needle)
    assert not (tmp_path / "out").exists(), "nothing is written for invalid settings"


def test_a_batch_of_one_that_batch_norm_cannot_train_on_is_a_one_line_error(capsys, demo_data, tmp_path):
    # resnet18 at 32 px: one image's features are 1x1 at the last BatchNorm (at 224 px, 7x7: it trains)
    code, _, err = fit_err(capsys, demo_data, tmp_path, "--batch-size", "1")
    assert_one_line_error(code, err, "batch of 1 image", "BatchNorm", "--batch-size 2", "--freeze-backbone")
    assert not (tmp_path / "out" / "last.pt").exists()  # it stops at the first step: no epoch was lost


def test_an_epoch_that_would_end_in_a_lone_image_trains(capsys, tmp_path):
    """16 training images in batches of 5 would end each epoch with one image; at 32 px
    resnet18's last BatchNorm then sees one value per channel, which torch refuses."""
    from ec2train.data import make_demo_dataset

    data = make_demo_dataset(tmp_path / "d", classes=2, per_class=8, size=32)
    assert len(list((data / "train").rglob("*.jpg"))) == 16
    code, out, err = fit_err(capsys, data, tmp_path, "--batch-size", "5")
    assert code == 0, err
    assert "15/15" in out or "15/15" in err  # one image sits out this epoch


def test_unknown_arch(capsys, demo_data, tmp_path):
    assert_one_line_error(
        *fit_err(capsys, demo_data, tmp_path, "--arch", "resnet51")[:3:2], "unknown --arch", "resnet50"
    )


def test_no_network_for_imagenet_weights(capsys, demo_data, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))  # no cached weights
    code, _, err = fit_err(capsys, demo_data, tmp_path, "--weights", "imagenet")
    assert_one_line_error(code, err, "cannot download imagenet weights", "--weights none")


def test_weights_path_missing(capsys, demo_data, tmp_path):
    assert_one_line_error(*fit_err(capsys, demo_data, tmp_path, "--weights", tmp_path / "x.pth")[:3:2], "no such file")


def test_unreadable_and_foreign_model_files(capsys, demo_data, tmp_path):
    image = sorted((demo_data / "test" / "001.Circle").glob("*.jpg"))[0]
    junk = tmp_path / "junk.pth"
    junk.write_text("not a model")
    bare = tmp_path / "bare.pth"
    model = untrained_model_file(demo_data, tmp_path / "model.pth")  # its weights do not matter here
    torch.save(torch.load(model, weights_only=True)["state_dict"], bare)  # the starter script's format
    evil = tmp_path / "evil.pth"

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"format": "ec2train.model/1", "x": Evil()}, evil)
    for path, needle in (
        (tmp_path / "missing.pth", "no model file"),
        (junk, "not a pytorch file"),
        (bare, "not an ec2train model file"),
        (evil, "untrusted pickles are refused"),
    ):
        code, out, err = cli_in_process(capsys, "predict", "--model", path, image)
        assert_one_line_error(code, err, needle)
        assert "pwned" not in out


def test_bad_config_file(capsys, demo_data, tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text("[fit]\nlearning_rate = 0.1\n")
    assert_one_line_error(
        *fit_err(capsys, demo_data, tmp_path, "--config", cfg)[:3:2], "unknown setting 'learning_rate'"
    )
    cfg.write_text("epochs = 'three'\n")
    assert_one_line_error(*fit_err(capsys, demo_data, tmp_path, "--config", cfg)[:3:2], "'epochs' must be a int")
    cfg.write_text("epochs = [\n")
    assert_one_line_error(*fit_err(capsys, demo_data, tmp_path, "--config", cfg)[:3:2], "not valid toml")


def test_resume_path_missing(capsys, demo_data, tmp_path):
    assert_one_line_error(
        *fit_err(capsys, demo_data, tmp_path, "--resume", tmp_path / "last.pt")[:3:2], "no such checkpoint"
    )


def test_real_entry_point_bad_input_has_no_traceback(tmp_path):
    res = run_cli("fit", "--data", tmp_path / "missing", *FAST)
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert res.stderr.strip().startswith("error:") and len(res.stderr.strip().splitlines()) <= 2
