"""Crafted model files (issue 26.8): every reader (predict, serve, evaluate, export, the SageMaker
handler) goes through model.read_model_file, which checks the metadata before anything is built
from it: one line each (`error: ...`, exit 2), no traceback, and no memory spent on a head or an
image size the file merely claims."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ec2train.model import MAX_CLASSES, ModelError, read_model_file
from tests.support.cli import assert_one_line_error, cli_in_process, run_cli
from tests.support.net import free_port

# `ec2train ARGS...` in a fresh process that reports its peak resident memory (VmHWM) on exit.
PEAK_PROBE = r"""
import atexit, sys
def peak():
    with open("/proc/self/status") as f:
        mb = int(next(l for l in f if l.startswith("VmHWM")).split()[1]) / 1024
    sys.stderr.write(f"\npeak-mb {mb:.0f}\n")
atexit.register(peak)
from ec2train.cli import main
main(sys.argv[1:])
"""


@pytest.fixture(scope="module")
def saved(trained_model) -> dict:
    return torch.load(trained_model, map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def image(demo_data) -> Path:
    return next((demo_data / "test").rglob("*.jpg"))


def crafted(saved: dict, path: Path, **changes) -> Path:
    torch.save({**saved, **changes}, path)
    return path


def _names(n: int) -> list[str]:
    return [f"class {i}" for i in range(n)]


@pytest.mark.parametrize(
    "changes, needle",
    [
        ({"class_names": [0, 1, 2, 3]}, "class_names is not a list of strings"),
        ({"image_size": 0}, "image_size is 0, not a whole number of pixels from 16 to 1024"),
        ({"image_size": 30_000}, "image_size is 30000, not a whole number of pixels from 16 to 1024"),
        ({"image_size": 64.5}, "image_size is 64.5"),
        ({"num_classes": 0, "class_names": []}, "num_classes is 0, not a whole number from 1 to 100,000"),
        ({"num_classes": "4"}, "num_classes is 4, not a whole number"),
        ({"arch": "resnet18; rm -rf /"}, "arch 'resnet18; rm -rf /' is not a torchvision classification model"),
        ({"mean": [0.5, float("nan"), 0.5]}, "mean and std are not 3 finite numbers each"),
        ({"std": [0.2, 0.0, 0.2]}, "mean and std are not 3 finite numbers each (std above 0)"),
        ({"class_names": ["a", "b", "c"]}, "class_names has 3 entries for 4 classes"),
        (
            {"num_classes": 5, "class_names": _names(5)},
            "0 missing, 0 unexpected and 2 of the wrong shape (fc.weight is (4, 512), resnet18 with 5 classes needs (5, 512))",
        ),
        ({"arch": "resnet34"}, "weights do not match arch resnet34"),
    ],
)
def test_a_crafted_model_file_is_one_line_for_predict(saved, image, tmp_path, capsys, changes, needle):
    model = crafted(saved, tmp_path / "model.pth", **changes)
    code, _, err = cli_in_process(capsys, "predict", image, "--model", model)
    assert_one_line_error(code, err, "model.pth: ", needle, "not written by `ec2train fit`")


def _peak_mb(*args) -> tuple[subprocess.CompletedProcess, float]:
    out = subprocess.run(
        [sys.executable, "-c", PEAK_PROBE, *map(str, args)], capture_output=True, text=True, timeout=300
    )
    err, peak = out.stderr.rsplit("peak-mb", 1)
    out.stderr = err
    return out, float(peak)


def test_a_head_of_hundreds_of_thousands_of_classes_is_refused_before_it_is_built(
    saved, trained_model, image, tmp_path
):
    # Issue 26.8: num_classes = 3,000,000 cost 58.6 s and 6.7 GB before its error. Here 200,000
    # (a 400 MB head for resnet18, allocated and initialised before its weights were compared).
    classes = 2 * MAX_CLASSES
    model = crafted(saved, tmp_path / "model.pth", num_classes=classes, class_names=_names(classes))
    out, peak = _peak_mb("predict", image, "--model", model)
    good, baseline = _peak_mb("predict", image, "--model", trained_model)
    print(f"a model file claiming {classes} classes: refused at a peak of {peak:.0f} MB ({baseline:.0f} MB to predict)")
    assert good.returncode == 0, good.stderr
    assert_one_line_error(out.returncode, out.stderr, "num_classes is 200000, not a whole number from 1 to 100,000")
    assert peak < baseline + 100  # measured: below the baseline (the file is read, nothing is built)


def test_serve_refuses_a_crafted_model_file_instead_of_answering_500(saved, tmp_path):
    # Issue 26.8: image_size = 30000 made a server that said ready and answered every request 500
    # (after 5.3 GB); it now stops at start with one line.
    model = crafted(saved, tmp_path / "model.pth", image_size=30_000)
    out = run_cli("serve", "--model", model, "--port", free_port(), "--compile", "off", "--log-level", "critical")
    assert_one_line_error(out.returncode, out.stderr, "image_size is 30000")


def test_the_real_model_file_passes_and_the_handler_uses_the_same_check(saved, trained_model, tmp_path):
    meta = read_model_file(trained_model)
    assert meta["num_classes"] == 4 and json.dumps(meta["class_names"])
    from ec2train.infer import Predictor

    with pytest.raises(ModelError, match="class_names is not a list of strings"):
        Predictor(crafted(saved, tmp_path / "model.pth", class_names=[1, 2, 3, 4]))
