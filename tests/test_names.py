"""Class names with newlines, escape sequences, markup, formulas or bad bytes: refused where a data
set is checked, and shown safely wherever a model file still carries them (the PNG, TensorBoard,
CSV files, the terminal, served JSON)."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image

from ec2train.names import MAX_NAME_CHARS, csv_cell, name_problem, printable
from tests.support.cli import assert_one_line_error, cli_in_process
from tests.support.training import untrained_model_file

FAST = ["--arch", "resnet18", "--weights", "none", "--image-size", "32", "--workers", "0", "--epochs", "1"]

# What a folder name or a crafted model file can hold; each must come out as one visible line.
HOSTILE = [
    "Poodle\nX-Injected: 1",  # a newline (the raqm_layout() crash) that would also split a header
    "\x1b[31mRed\x1b[0m\x1b]0;title\x07",  # colour and window-title escape sequences
    "[bold red]Markup[/] [link=http://x]",  # rich markup must stay text
    '=HYPERLINK("http://x")',  # a spreadsheet formula
    "abc\u202etxt.exe",  # a right-to-left override
    "bad\udcffbytes",  # a folder name that is not UTF-8
]


def _raw_controls(text: str) -> list[str]:
    """Characters that must never reach a terminal, a picture's layout or a header."""
    return [c for c in text if (ord(c) < 32 and c not in "\n") or 0x7F <= ord(c) < 0xA0 or c == "\u202e"]


@pytest.mark.parametrize(
    "name,shown",
    [
        ("Poodle", "Poodle"),
        ("Café crème", "Café crème"),
        ("a\nb", "a\\nb"),
        ("\x1b[31mred", "\\x1b[31mred"),
        ("tab\there\r", "tab\\there\\r"),
        ("abc\u202etxt", "abc\\u202etxt"),
        ("bad\udcffbytes", "bad\\udcffbytes"),
        ("line\u2028sep", "line\\u2028sep"),
        (123, "123"),  # a crafted model file's integer label
    ],
)
def test_printable_is_one_visible_line(name, shown):
    assert printable(name) == shown
    assert printable(shown) == shown  # already safe text is left alone
    assert printable("x" * 50, limit=10) == "x" * 9 + "\u2026"


@pytest.mark.parametrize(
    "name,problem",
    [
        ("Affenpinscher", None),
        ("Bull terrier", None),
        ("Chien de Saint-Hubert", None),
        ("a" * MAX_NAME_CHARS, None),
        ("a\nb", "holds a newline (\\n)"),
        ("\x1b[31mred", "holds an escape character (\\x1b)"),
        ("nul\x00", "holds a control character (\\x00)"),
        ("abc\u202etxt", "holds a bidirectional control (\\u202e)"),
        ("bad\udcffbytes", "is not valid UTF-8"),
        ("   ", "is empty"),
        ("a" * (MAX_NAME_CHARS + 1), f"is {MAX_NAME_CHARS + 1} characters long (at most {MAX_NAME_CHARS})"),
    ],
)
def test_name_problem(name, problem):
    assert name_problem(name) == problem


@pytest.mark.parametrize(
    "value,cell",
    [
        ("Poodle", "Poodle"),
        ("=1+1", "'=1+1"),
        ("+1", "'+1"),
        ("-1", "'-1"),
        ("@SUM(A1)", "'@SUM(A1)"),
        ("\t=1", "\\t=1"),  # shown as text: no longer a tab at the start
        ("a=b", "a=b"),
    ],
)
def test_csv_cell_escapes_formulas(value, cell):
    assert csv_cell(value) == cell


# ---------------------------------------------------------------- checked once: data check and fit


@pytest.fixture
def newline_class(demo_data: Path, tmp_path: Path) -> Path:
    """The demo data with its first class folder renamed to hold a newline, in every split."""
    root = tmp_path / "data"
    shutil.copytree(demo_data, root)
    for split in ("train", "valid", "test"):
        (root / split / "001.Circle").rename(root / split / "001.Cir\ncle")
    return root


def test_fit_refuses_a_class_folder_with_a_newline_before_training(newline_class, tmp_path, capsys):
    code, out, err = cli_in_process(capsys, "fit", "--data", newline_class, "--output", tmp_path / "out", *FAST)
    assert_one_line_error(code, err, "001.Cir\\ncle", "holds a newline", "rename")
    assert len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "out").exists()


def test_data_check_reports_unsafe_names_once_each_and_prints_markup_as_text(newline_class, capsys):
    import os

    (newline_class / "train" / "\x1b[2J").mkdir()  # a folder whose name clears the screen
    os.mkdir(bytes(newline_class / "valid") + b"/bad\xffbytes")  # a name that is not UTF-8
    shutil.rmtree(newline_class / "test" / "002.Square")
    (newline_class / "test" / "002.[bold]Square").mkdir()  # rich markup in a name (and an empty class)
    code, out, err = cli_in_process(capsys, "data", "check", newline_class)
    assert code == 1, err
    assert "no problems" not in out and "Traceback" not in err
    problems = [line for line in err.splitlines() if line.startswith("problem:")]
    assert sum("001.Cir\\ncle" in line and "holds a newline" in line for line in problems) == 1, err
    assert any("\\x1b[2J" in line and "escape character" in line for line in problems), err
    assert any("bad\\udcffbytes" in line and "not valid UTF-8" in line for line in problems), err
    assert any("empty class folder" in line and "002.[bold]Square" in line for line in problems), err
    assert not _raw_controls(out + err), repr(err)


# ---------------------------------------------------------------- shown safely: a model file that has them


@pytest.fixture
def hostile_model(demo_data: Path, tmp_path: Path) -> Path:
    """A real model file for the demo classes whose class names are the HOSTILE ones (as an older
    version, or a crafted file, may have written them)."""
    path = untrained_model_file(demo_data, tmp_path / "model" / "model.pth")
    payload = torch.load(path, weights_only=True)
    payload["class_names"] = HOSTILE[:4]
    torch.save(payload, path)
    return path


@pytest.mark.parametrize("n", [4, 30, 133])
def test_the_confusion_picture_draws_any_name(tmp_path, n):
    from ec2train.plots import confusion_figure, render, write_confusion_png

    names = [HOSTILE[i % len(HOSTILE)] + f" {i}" for i in range(n)]
    names[1] = "x" * 5000  # an absurdly long one cannot make the picture absurdly wide
    m = torch.eye(n) * 5 + torch.roll(torch.eye(n), 1, dims=1) * 2
    fig = confusion_figure(m, names)
    for text in (fig.title, *fig.row_labels, *fig.column_labels, *fig.pairs):
        assert not _raw_controls(text) and "\n" not in text, repr(text)
    assert "Poodle\\nX-Injected: 1 0" in fig.pairs[2]  # the pair list names the class, escaped
    width, height = render(fig).size
    assert width < 4000 and height < 4000
    write_confusion_png(tmp_path / "c.png", m, names)
    assert Image.open(tmp_path / "c.png").size == (width, height)


def test_tensorboard_tables_keep_one_row_per_class(tmp_path):
    from ec2train.plots import confused_line, most_confused, per_class_markdown

    m = torch.tensor([[3, 1, 0, 0], [0, 4, 0, 0], [0, 0, 4, 0], [2, 0, 0, 2]])
    table = per_class_markdown(m, HOSTILE[:4]).splitlines()
    assert len(table) == 2 + 4 and all(row.startswith("| ") and row.endswith(" |") for row in table[2:])
    assert not _raw_controls("\n".join(table))
    lines = [confused_line(p) for p in most_confused(m, HOSTILE[:4])]
    assert lines[0].startswith("=HYPERLINK") and "Poodle\\nX-Injected: 1" in lines[1]


def test_evaluate_with_hostile_names_writes_every_file_and_prints_them_as_text(
    hostile_model, demo_data, tmp_path, capsys
):
    code, out, err = cli_in_process(
        capsys, "evaluate", "--model", hostile_model, "--data", demo_data, "--out", tmp_path / "eval"
    )
    assert code == 0, err
    assert Image.open(tmp_path / "eval" / "confusion-test.png").size[0] >= 700
    assert json.loads((tmp_path / "eval" / "evaluation-test.json").read_text())["class_names"] == HOSTILE[:4]
    with open(tmp_path / "eval" / "confusion-test.csv", newline="") as f:
        rows = list(csv.reader(f))
    assert len(rows) == 5 and all(len(r) == 5 for r in rows)
    assert rows[0][1:] == [
        "Poodle\\nX-Injected: 1",
        "\\x1b[31mRed\\x1b[0m\\x1b]0;title\\x07",
        HOSTILE[2],
        "'" + HOSTILE[3],
    ]
    assert not _raw_controls(out + err), repr(out)
    assert "[bold red]Markup[/]" in out  # shown as typed, not taken as rich markup
    assert "Poodle\\nX-Injected: 1" in out


def test_predict_with_hostile_names_prints_table_json_and_csv(hostile_model, demo_data, tmp_path, capsys, monkeypatch):
    from ec2train.cli._app import console

    # The many-images table folds long cells at 80 columns; the console exists already (COLUMNS
    # is read when it is made), so widen it itself.
    monkeypatch.setattr(console, "_width", 300)
    payload = torch.load(hostile_model, weights_only=True)
    payload["class_names"] = [HOSTILE[0], HOSTILE[1], HOSTILE[5], HOSTILE[4]]  # bad bytes too
    torch.save(payload, hostile_model)
    image = next((demo_data / "test" / "001.Circle").iterdir())
    for args in ((image,), (image, image.parent)):  # one image's table; the many-images table
        code, out, err = cli_in_process(capsys, "predict", "--model", hostile_model, *args, "--top-k", "4")
        assert code == 0, err
        assert not _raw_controls(out + err), repr(out)
        assert "\\x1b[31mRed" in out and "bad\\udcffbytes" in out
    code, out, err = cli_in_process(
        capsys, "predict", "--model", hostile_model, image, "--json", "--csv", tmp_path / "p.csv", "--top-k", "4"
    )
    assert code == 0, err
    labels = {p["label"] for p in json.loads(out)["predictions"]}
    assert labels == set(payload["class_names"])  # JSON escapes them; a client gets the names back exactly
    with open(tmp_path / "p.csv", newline="", encoding="utf-8") as f:
        (row,) = list(csv.DictReader(f))
    assert not _raw_controls(row["label"]) and row["label"] in {printable(n) for n in payload["class_names"]}


def test_served_answers_carry_hostile_names_only_inside_json(hostile_model, demo_data):
    import urllib.request

    from ec2train.server import create_app
    from tests.test_serve import ServerThread

    jpeg = next((demo_data / "test" / "001.Circle").iterdir()).read_bytes()
    with ServerThread(create_app(hostile_model, max_batch=2, max_wait_ms=5, compile="off")) as srv:
        srv.wait_ready()
        req = urllib.request.Request(srv.url + "/invocations", data=jpeg, headers={"Content-Type": "image/jpeg"})
        with urllib.request.urlopen(req, timeout=60) as resp:
            headers, body = resp.headers.items(), resp.read()
    assert {p["label"] for p in json.loads(body)["predictions"]} == set(HOSTILE[:4])
    assert not any(_raw_controls(k + v) for k, v in headers), headers
    assert b"\n" not in body and b"\x1b" not in body and not any(k.lower() == "x-injected" for k, _ in headers)


@pytest.mark.fast
def test_folders_that_read_alike_keep_their_folder_names():
    from ec2train.data import class_names

    assert class_names(["001.Poodle", "002.Poodle", "003.Great_Dane"]) == ["001.Poodle", "002.Poodle", "Great Dane"]
    assert class_names(["001.Affenpinscher", "124.Poodle"]) == ["Affenpinscher", "Poodle"]
