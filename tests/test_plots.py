"""The confusion matrix for people: most confused pairs, a labelled PNG for 4 and 133 classes,
TensorBoard logging, and `evaluate` printing the pairs."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from ec2train import plots
from ec2train.plots import (
    Confusion,
    confusion_figure,
    most_confused,
    per_class_accuracy,
    write_confusion_png,
)
from tests.support.cli import cli_in_process
from tests.support.training import untrained_model_file

SHAPES = ["Circle", "Square", "Triangle", "Cross"]
# rows: true class, columns: predicted
FOUR = torch.tensor([[10, 1, 0, 1], [0, 11, 1, 0], [3, 0, 9, 0], [0, 0, 2, 10]])


def _breeds(n: int = 133) -> tuple[torch.Tensor, list[str]]:
    """A dogImages-sized matrix: mostly right, a few scattered mistakes, one clear worst pair."""
    g = torch.Generator().manual_seed(0)
    m = torch.diag(torch.randint(3, 9, (n,), generator=g))
    wrong = torch.randint(0, n, (3 * n, 2), generator=g)
    m[wrong[:, 0], wrong[:, 1]] += 1
    m[4, 120] += 6  # the worst pair by far
    names = [f"Nova scotia duck tolling retriever {i}" if i % 7 == 0 else f"Breed {i}" for i in range(n)]
    return m, names


def test_most_confused_orders_by_count_then_share_of_true_class():
    m = [[5, 2, 0], [3, 4, 1], [0, 2, 6]]
    pairs = most_confused(m, ["a", "b", "c"])
    # (a->b) and (c->b) both miss 2 images: a has 7, c has 8, so a->b is the larger share.
    assert pairs == [
        Confusion("b", "a", 3, pytest.approx(3 / 8)),
        Confusion("a", "b", 2, pytest.approx(2 / 7)),
        Confusion("c", "b", 2, pytest.approx(2 / 8)),
        Confusion("b", "c", 1, pytest.approx(1 / 8)),
    ]
    assert pairs[0].true_images == 8
    assert most_confused(m, ["a", "b", "c"], k=1) == pairs[:1]
    assert most_confused(torch.eye(3) * 4, ["a", "b", "c"]) == []  # the diagonal is never a confusion


def test_per_class_accuracy_and_shape_check():
    acc = per_class_accuracy([[3, 1, 0], [0, 0, 0], [1, 1, 2]], ["a", "b", "c"])
    assert acc == {"a": pytest.approx(0.75), "b": None, "c": pytest.approx(0.5)}
    with pytest.raises(ValueError, match="does not match 3 class names"):
        most_confused(torch.zeros(4, 4), ["a", "b", "c"])


def test_figure_labels_both_axes_and_lists_pairs():
    ax = confusion_figure(FOUR, SHAPES).axes[0]
    assert [t.get_text() for t in ax.get_yticklabels()] == SHAPES
    assert [t.get_text() for t in ax.get_xticklabels()] == SHAPES
    assert (ax.get_ylabel(), ax.get_xlabel()) == ("true class", "predicted class")
    texts = [t.get_text() for t in ax.texts]
    assert "3" in texts and "11" in texts and len(texts) == 16 + 1  # a count in every cell, plus the pairs
    assert "1. Triangle\n     \u2192 Circle:  3 of 12 (25%)" in texts[-1]
    assert "48 images" in ax.get_title() and "83.3%" in ax.get_title()

    m, names = _breeds()
    ax = confusion_figure(m, names).axes[0]
    rows = [t.get_text() for t in ax.get_yticklabels()]
    assert rows[5] == "Breed 5 [5]" and rows[7] == "Nova scotia duck tolling retriever 7 [7]"
    columns = [(t.label1.get_text(), t.label2.get_visible()) for t in ax.xaxis.get_major_ticks()]
    assert columns == [(str(i), True) for i in range(133)]  # numbered at the top and the bottom
    assert not any(t.get_text().isdigit() for t in ax.texts), "no counts in 133 x 133 cells: the colour scale says it"
    assert "Breed 4 [4]\n     \u2192 Breed 120 [120]:  " in ax.texts[-1].get_text()


def _red_pixels(image: Image.Image) -> int:
    import numpy as np

    rgb = np.asarray(image).astype(int)
    return int(((rgb[..., 0] > 180) & (rgb[..., 1] < 90) & (rgb[..., 2] < 90)).sum())


@pytest.mark.parametrize("classes", [4, 133])
def test_png_is_large_enough_to_read(tmp_path: Path, classes: int):
    m, names = (FOUR, SHAPES) if classes == 4 else _breeds()
    path = write_confusion_png(tmp_path / "confusion.png", m, names)
    assert [p.name for p in tmp_path.iterdir()] == ["confusion.png"], "temp file left behind"
    image = Image.open(path).convert("RGB")
    width, height = image.size
    if classes == 4:
        assert 700 <= width <= 1400 and 450 <= height <= 900, image.size
    else:  # about 15 px per row, so 7 pt names do not overlap
        assert height >= 133 * 14 and width >= height, image.size
        assert width <= 4000 and height <= 3000, image.size
    # The most confused cells are framed in red.
    assert _red_pixels(image) > 40


def test_log_confusion_writes_image_and_tables(tmp_path: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.util import tensor_util
    from torch.utils.tensorboard import SummaryWriter

    from ec2train.plots import log_confusion

    writer = SummaryWriter(str(tmp_path))
    log_confusion(writer, FOUR, SHAPES, step=5)
    writer.close()
    acc = EventAccumulator(str(tmp_path), size_guidance={"images": 0, "tensors": 0}).Reload()
    (event,) = acc.Images("test/confusion_matrix")
    assert event.step == 5 and event.width >= 700 and event.height >= 450
    assert event.encoded_image_string[:8] == b"\x89PNG\r\n\x1a\n"

    def text(tag: str) -> str:
        (t,) = acc.Tensors(f"{tag}/text_summary")
        return tensor_util.make_ndarray(t.tensor_proto).item().decode()

    table = text("test/per_class_accuracy").splitlines()
    assert table[:2] == ["| class | accuracy | images |", "|---|---:|---:|"]
    assert table[2] == "| Triangle | 0.750 | 12 |"  # worst first
    assert len(table) == 2 + 4
    assert text("test/most_confused").startswith("Triangle -> Circle: 3 of 12 images (25%)")


@pytest.fixture
def untrained_model(demo_data: Path, tmp_path: Path) -> Path:
    """A real model file with untrained weights: evaluating it is quick and sure to confuse classes."""
    return untrained_model_file(demo_data, tmp_path / "model" / "model.pth")


def test_evaluate_prints_and_saves_most_confused(untrained_model: Path, demo_data: Path, tmp_path: Path, capsys):
    code, out, err = cli_in_process(
        capsys, "evaluate", "--model", untrained_model, "--data", demo_data, "--out", tmp_path
    )
    assert code == 0, err
    with open(tmp_path / "confusion-test.csv", newline="") as f:
        rows = list(csv.reader(f))
    names, confusion = rows[0][1:], [[int(x) for x in row[1:]] for row in rows[1:]]
    expected = [p._asdict() for p in most_confused(confusion, names, k=5)]
    assert expected, "an untrained model confuses classes"
    report = json.loads((tmp_path / "evaluation-test.json").read_text())
    assert report["most_confused"] == expected
    lines = out.splitlines()
    start = lines.index("most confused (true -> predicted):")
    for line, pair in zip(lines[start + 1 :], expected):
        assert line.startswith(f"  {pair['true']} -> {pair['predicted']}: {pair['count']} of "), line
    assert Image.open(tmp_path / "confusion-test.png").size[0] >= 700


def test_warm_up_draws_once_in_the_background_and_drawing_waits_for_it(monkeypatch):
    monkeypatch.setattr(plots, "_warm_up", None)
    plots.warm_up()
    thread = plots._warm_up
    assert thread is not None and thread.daemon and thread.name == "ec2train-plots-warm-up"
    image = plots.render(plots.confusion_figure(torch.tensor([[3.0, 1.0], [0.0, 4.0]]), ["cat", "dog"]))
    assert not thread.is_alive()  # matplotlib's first use is not thread-safe: the real drawing waited
    assert image.size[0] > 100 and image.size[1] > 100
    plots.warm_up()
    assert plots._warm_up is thread  # once per process
