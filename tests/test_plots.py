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


@pytest.mark.fast
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


@pytest.mark.fast
def test_per_class_accuracy_and_shape_check():
    acc = per_class_accuracy([[3, 1, 0], [0, 0, 0], [1, 1, 2]], ["a", "b", "c"])
    assert acc == {"a": pytest.approx(0.75), "b": None, "c": pytest.approx(0.5)}
    with pytest.raises(ValueError, match="does not match 3 class names"):
        most_confused(torch.zeros(4, 4), ["a", "b", "c"])


@pytest.mark.fast
def test_figure_labels_both_axes_and_lists_pairs():
    fig = confusion_figure(FOUR, SHAPES)
    assert fig.row_labels == SHAPES and fig.column_labels == SHAPES and not fig.columns_at_top
    assert (fig.y_label, fig.x_label) == ("true class", "predicted class")
    assert len(fig.cell_texts) == 16 and (2, 0, "3") in fig.cell_texts and (1, 1, "11") in fig.cell_texts
    assert fig.pairs[2:4] == [" 1. Triangle", "     -> Circle:  3 of 12 (25%)"]
    assert (2, 0) in fig.framed and len(fig.framed) == 5  # every confused pair of FOUR is framed
    assert "48 images" in fig.title and "83.3%" in fig.title

    m, names = _breeds()
    fig = confusion_figure(m, names)
    assert fig.row_labels[5] == "Breed 5 [5]" and fig.row_labels[7] == "Nova scotia duck tolling retriever 7 [7]"
    assert fig.row_labels[14] == "Nova scotia duck tolling retriever \u2026 [14]"  # cut at 36 characters
    assert fig.column_labels == [str(i) for i in range(133)] and fig.columns_at_top  # numbered at both ends
    assert not fig.cell_texts, "no counts in 133 x 133 cells: the colour scale says it"
    assert fig.pairs[2:4] == [" 1. Breed 4 [4]", "     -> Breed 120 [120]:  7 of 15 (47%)"]


@pytest.mark.fast
def test_cells_are_coloured_by_their_share_of_the_true_class(tmp_path: Path):
    import numpy as np

    assert plots.blues(np.array([0.0, 1.0])).tolist() == [[247, 251, 255], [8, 48, 107]]  # matplotlib's Blues
    fig = confusion_figure(FOUR, SHAPES)
    image = np.asarray(plots.render(fig)).astype(int)
    g, cell = plots.geometry(fig), fig.layout.cell

    def corner_of(i: int, j: int) -> list[int]:  # a cell's pixel away from its text, grid line and frame
        return image[g.top + i * cell + 5, g.left + j * cell + 5].tolist()

    for i, j in ((1, 1), (0, 0), (2, 0), (0, 2), (3, 3)):
        assert corner_of(i, j) == plots.blues(np.array([FOUR[i, j].item() / 12]))[0].tolist(), (i, j)
    assert corner_of(0, 2) == [247, 251, 255]  # Circle -> Triangle: 0, the scale's white end
    assert image.shape[1] == g.width and image.shape[0] == g.height


@pytest.mark.fast
@pytest.mark.parametrize("classes", [1, 2, 3])
def test_a_few_classes_leave_room_for_the_title_and_the_colour_scale(classes: int):
    fig = confusion_figure(torch.eye(classes) * 3, [f"class {i}" for i in range(classes)])
    g = plots.geometry(fig)
    title_w, _ = plots._text_size(fig.title, plots._font(18))
    centre = g.left + g.side / 2  # the title is centred over the matrix, inside the picture
    assert centre - title_w / 2 >= 0 and centre + title_w / 2 <= g.width
    caption_h, _ = plots._text_size(plots.BAR_CAPTION, plots._font(13))
    assert plots.bar_height(g.side) >= caption_h and g.top + plots.bar_height(g.side) <= g.height


@pytest.mark.fast
def test_without_freetype_the_picture_is_left_out_with_the_reason(tmp_path: Path, monkeypatch):
    from PIL import features
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from torch.utils.tensorboard import SummaryWriter

    monkeypatch.setattr(features, "check", lambda name: name != "freetype2")
    writer = SummaryWriter(str(tmp_path))
    missing = plots.log_confusion(writer, FOUR, SHAPES, step=1)
    writer.close()
    assert missing and "without FreeType" in missing and "PyPI" in missing
    acc = EventAccumulator(str(tmp_path), size_guidance={"images": 0, "tensors": 0}).Reload()
    assert acc.Tags()["images"] == []  # no picture, but the tables are there
    assert "test/per_class_accuracy/text_summary" in acc.Tags()["tensors"]


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
