"""What TensorBoard shows for a fit, read the way its dashboard reads it: from a real
`tensorboard` server on 127.0.0.1, through the HTTP data API its pages call.

The layout follows Keras: RUN/train and RUN/validation hold the same tags, so each metric's
train and valid curves share one chart; the learning curves' group sorts first; the settings
are in the HParams tab only; the confusion matrix says how to see it at its actual size.
(bench/tensorboard_screenshot.py takes pictures of the same pages in a headless browser.)
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.support.net import free_port

CARD_WIDTH = 350  # px: about what TensorBoard's image cards scale a picture to (Images and Time Series)


class TensorBoardServer:
    """`tensorboard --logdir LOGDIR` on a free loopback port."""

    def __init__(self, logdir: Path):
        self.url = f"http://127.0.0.1:{free_port()}"
        port = self.url.rsplit(":", 1)[1]
        cmd = [sys.executable, "-c", "from tensorboard.main import run_main; run_main()"]
        cmd += ["--logdir", str(logdir), "--host", "127.0.0.1", "--port", port, "--reload_interval", "1"]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)

    def get(self, path: str, **query: str):
        url = f"{self.url}{path}" + (f"?{urllib.parse.urlencode(query)}" if query else "")
        with urllib.request.urlopen(url, timeout=30) as resp:
            body = resp.read()
        return json.loads(body) if resp.headers.get_content_type() == "application/json" else body

    def post(self, path: str, doc: dict):
        req = urllib.request.Request(
            self.url + path, data=json.dumps(doc).encode(), headers={"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(req, timeout=30) as resp:
            return json.loads(resp.read())

    def wait_for(self, runs: set[str], timeout: float = 90) -> None:
        deadline = time.monotonic() + timeout
        while True:
            assert self.proc.poll() is None, self.proc.stderr.read()
            try:
                if runs <= set(self.get("/data/plugin/scalars/tags")):
                    return
            except OSError:
                pass
            assert time.monotonic() < deadline, "tensorboard never listed the runs"
            time.sleep(0.3)

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(30)


@pytest.fixture(scope="module")
def board(trained_model: Path):
    runs = trained_model.parent.parent / "runs"
    (run,) = [p.name for p in runs.iterdir() if p.is_dir()]
    server = TensorBoardServer(runs)
    try:
        server.wait_for({f"{run}/train", f"{run}/validation", f"{run}/test"})
        yield server, run
    finally:
        server.close()


@pytest.fixture(scope="module")
def metrics(trained_model: Path) -> dict:
    return json.loads((trained_model.parent / "metrics.json").read_text())


def test_train_and_valid_of_a_metric_share_one_chart(board, metrics):
    server, run = board
    tags = server.get("/data/plugin/scalars/tags")
    train, valid = set(tags[f"{run}/train"]), set(tags[f"{run}/validation"])
    # One tag in two runs is one chart with two lines (as Keras's train/ and validation/ runs).
    assert {"epoch/loss", "epoch/accuracy"} <= train & valid
    points = server.get("/data/plugin/scalars/scalars", run=f"{run}/validation", tag="epoch/accuracy")
    assert [p[1] for p in points] == [1, 2, 3, 4]
    assert [p[2] for p in points] == pytest.approx([h["valid_acc1"] for h in metrics["history"]])
    # The best epoch's test accuracy is one point on the same chart, at that epoch.
    (test,) = server.get("/data/plugin/scalars/scalars", run=f"{run}/test", tag="epoch/accuracy")
    assert test[1] == metrics["best_epoch"] and test[2] == pytest.approx(metrics["test_acc1"])


def test_the_learning_curves_come_first_and_nothing_else_crowds_them(board):
    server, run = board
    tags = server.get("/data/plugin/scalars/tags")
    every = sorted({tag for run_tags in tags.values() for tag in run_tags})
    # The dashboard groups tags by their first part and sorts the groups by name.
    groups = list(dict.fromkeys(tag.split("/")[0] for tag in every))
    assert groups[0] == "epoch" and set(groups[1:]) == {"optimizer", "throughput"}, groups
    assert not [t for t in every if t.startswith("hparam")]  # settings live in the HParams tab only
    # --weights none: the backbone trains at --lr, so there is one lr curve, not two identical ones.
    assert "optimizer/lr" in tags[f"{run}/train"] and "optimizer/lr_backbone" not in tags[f"{run}/train"]
    # Only the run's own sub-runs have curves: the run itself holds its HParams entry.
    assert set(tags) == {f"{run}/train", f"{run}/validation", f"{run}/test"}


def test_hparams_tab_has_the_settings_and_the_final_numbers(board, metrics, trained_model: Path):
    server, run = board
    experiment = server.post("/data/plugin/hparams/experiment", {"experimentName": ""})
    assert {"lr", "arch", "batch_size", "image_size"} <= {h["name"] for h in experiment["hparamInfos"]}
    columns = [(m["name"]["group"], m["name"]["tag"]) for m in experiment["metricInfos"]]
    assert columns == [("validation", "epoch/accuracy"), ("validation", "epoch/loss"), ("test", "epoch/accuracy")]
    statuses = ["STATUS_UNKNOWN", "STATUS_SUCCESS", "STATUS_FAILURE", "STATUS_RUNNING"]
    request = {"experimentName": "", "allowedStatuses": statuses, "colParams": [], "startIndex": 0, "sliceSize": 10}
    (group,) = server.post("/data/plugin/hparams/session_groups", request)["sessionGroups"]
    assert group["hparams"]["arch"] == "resnet18" and group["hparams"]["lr"] == pytest.approx(3e-3)
    values = {(m["name"]["group"], m["name"]["tag"]): m["value"] for m in group["metricValues"]}
    assert values[("test", "epoch/accuracy")] == pytest.approx(metrics["test_acc1"])
    assert values[("validation", "epoch/accuracy")] == pytest.approx(metrics["history"][-1]["valid_acc1"])
    (session,) = group["sessions"]
    assert session["name"] == run and session["status"] == "STATUS_SUCCESS"


def _ink_rows(image: Image.Image) -> np.ndarray:
    return (np.asarray(image.convert("L")) < 160).any(axis=1)


def test_the_confusion_matrix_says_how_to_read_it_at_the_size_shown(board):
    """Scaled to an image card's width, the picture itself is unreadable (5 px letters); the note
    above it stays readable there and says where the actual-size switch is."""
    from ec2train.plots import VIEWING_NOTE

    server, run = board
    assert server.get("/data/plugin/images/tags")[f"{run}/test"] == {
        "test/confusion_matrix": {"displayName": "", "description": "", "samples": 1}
    }
    (entry,) = server.get("/data/plugin/images/images", run=f"{run}/test", tag="test/confusion_matrix", sample="0")
    image = Image.open(io.BytesIO(server.get(f"/data/plugin/images/individualImage?{entry['query']}")))
    shown = image.resize((CARD_WIDTH, round(image.height * CARD_WIDTH / image.width)), Image.Resampling.LANCZOS)
    ink = _ink_rows(shown)
    # The note's lines: the first runs of ink rows from the top, one per line of VIEWING_NOTE.
    edges = np.flatnonzero(np.diff(ink.astype(int)))
    lines = list(zip(edges[::2] + 1, edges[1::2] + 1))[: len(VIEWING_NOTE)]
    heights = [end - start for start, end in lines]
    assert len(heights) == len(VIEWING_NOTE) and min(heights) >= 9, heights  # letters 9+ px tall at card size
    assert any("Show actual image size" in line for line in VIEWING_NOTE)
