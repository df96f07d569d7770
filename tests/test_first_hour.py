"""What a new user meets in the first hour: install hints that install into the right Python,
suggestions that name the fix, and output that reads at 80 columns."""

from __future__ import annotations

import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.cli import assert_one_line_error, cli_in_process

# ---------------------------------------------------------------- install hints


@pytest.mark.parametrize(
    "module,args,extra",
    [("uvicorn", ("serve", "--model", "no-such-model.pth"), "serve"), ("optuna", ("tune", "--trials", "1"), "tune")],
)
def test_a_missing_extra_names_the_python_that_runs_ec2train(capsys, monkeypatch, module, args, extra):
    monkeypatch.setitem(sys.modules, module, None)  # `import module` now fails as if it were not installed
    code, _, err = cli_in_process(capsys, *args)
    hint = f"{shlex.quote(sys.executable)} -m pip install 'ec2train[{extra}]'"
    assert_one_line_error(code, err, hint)


def test_the_install_hint_is_a_command_pip_runs():
    """The hint, run as printed (a dry run, offline): this Python's pip resolves it."""
    from ec2train.errors import pip_install

    hint = pip_install("ec2train[serve,tune]")
    assert hint.startswith(shlex.quote(sys.executable) + " -m pip install ")
    res = subprocess.run(
        [*shlex.split(hint), "--dry-run", "--no-index", "--quiet"], capture_output=True, text=True, timeout=120
    )
    assert res.returncode == 0, res.stderr


# ---------------------------------------------------------------- the README's path and the docs' snippets

ROOT = Path(__file__).resolve().parent.parent


def _blocks(markdown: str, after: str, lang: str = "") -> list[str]:
    """The fenced code blocks (of `lang`) in `markdown` between `after` and the next heading."""
    section = markdown.split(after, 1)[1].split("\n#", 1)[0]
    return [b.split("\n", 1)[1] for b in section.split("```")[1::2] if b.split("\n", 1)[0].strip() == lang]


def test_make_demo_installs_the_extras_the_readme_tries_next():
    """The quickstart's `Then try` block runs serve and tune: `make demo`'s install has their extras."""
    readme = (ROOT / "README.md").read_text()
    tried = " ".join(_blocks(readme, "Then try:"))
    needed = {extra for extra in ("serve", "tune") if f"ec2train {extra} " in tried}
    assert needed == {"serve", "tune"}
    makefile = (ROOT / "Makefile").read_text()
    assert "\ndemo: install\n" in makefile
    recipe = makefile.split("$(VENV)/.installed:", 1)[1].split("\n\n", 1)[0]
    (spec,) = [line.split("-e", 1)[1].strip(" '") for line in recipe.splitlines() if "pip install" in line]
    assert set(spec.removeprefix(".[").removesuffix("]").split(",")) >= needed


def test_default_outputs_are_ignored_by_git():
    """fit's TrainedModels/ and runs/, tune's tune/STUDY/ and the demo data: `git status` stays clean."""
    from ec2train.config import TrainConfig

    outputs = [TrainConfig.output, TrainConfig.logdir, "tune/ec2train", "demo-data"]
    files = [f"{folder}/some-file" for folder in outputs]
    res = subprocess.run(["git", "check-ignore", *files], cwd=ROOT, capture_output=True, text=True)
    assert sorted(res.stdout.split()) == sorted(files)
    # ... but not the tune package's own files
    assert subprocess.run(["git", "check-ignore", "ec2train/tune/new.py"], cwd=ROOT).returncode == 1


@pytest.fixture(scope="module")
def served(trained_model: Path):
    """`ec2train serve` on a free loopback port, as a user starts it."""
    import time
    import urllib.request

    from tests.support.net import free_port

    port = free_port()
    args = ["serve", "--model", str(trained_model), "--port", str(port), "--compile", "off", "--log-level", "warning"]
    proc = subprocess.Popen([sys.executable, "-m", "ec2train", *args], stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while True:
        try:
            if urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2).status == 200:
                break
        except OSError:
            pass
        assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read() if proc.poll() else "slow"
        time.sleep(0.2)
    yield port
    proc.terminate()
    proc.wait(30)


def test_the_python_snippets_in_docs_serve_work_as_written_without_aws_keys(served, demo_data, tmp_path):
    snippets = _blocks((ROOT / "docs" / "serve.md").read_text(), "Try it:", "python")
    assert len(snippets) == 2  # plain HTTP, and boto3
    image = next((demo_data / "test").rglob("*.jpg"))
    (tmp_path / "dog.jpg").write_bytes(image.read_bytes())
    env = {k: v for k, v in __import__("os").environ.items() if not k.startswith("AWS_")}
    env.update(AWS_CONFIG_FILE=str(tmp_path / "none"), AWS_SHARED_CREDENTIALS_FILE=str(tmp_path / "none"))
    env["AWS_EC2_METADATA_DISABLED"] = "true"  # a laptop: no keys anywhere, no instance role
    for code in snippets:
        code = code.replace("127.0.0.1:8080", f"127.0.0.1:{served}")
        res = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True)
        assert res.returncode == 0, res.stderr
        assert "'predictions'" in res.stdout and res.stdout.count("'label'") == 3, res.stdout


# ---------------------------------------------------------------- data folders: the fix, named

FAST = ["--arch", "resnet18", "--weights", "none", "--image-size", "32", "--workers", "0", "--epochs", "1"]


def test_a_mistyped_data_folder_suggests_the_folder_that_is_there(capsys, monkeypatch, tmp_path):
    (tmp_path / "demo-data").mkdir()
    monkeypatch.chdir(tmp_path)
    code, _, err = cli_in_process(capsys, "fit", "--data", "demo-dta", *FAST)
    assert_one_line_error(code, err, "data folder demo-dta does not exist", "did you mean --data demo-data?")
    assert "ec2train data demo" not in err  # not: write a demo data set under the misspelt name


def test_fit_without_data_points_to_fetch_and_data_not_to_fake_shapes(capsys, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)  # no dogImages/ here
    code, _, err = cli_in_process(capsys, "fit", *FAST)
    assert_one_line_error(code, err, "data folder dogImages does not exist", "ec2train data fetch", "--data DIR")
    assert "data demo dogImages" not in " ".join(err.split())  # the demo is offered as the demo only
    assert "ec2train data demo demo-data" in " ".join(err.split())


def test_a_missing_split_names_the_command_that_makes_it(capsys, demo_data, tmp_path):
    import shutil

    data = tmp_path / "data"
    shutil.copytree(demo_data, data, ignore=shutil.ignore_patterns("valid"))
    code, _, err = cli_in_process(capsys, "fit", "--data", data, "--output", tmp_path / "out", *FAST)
    assert_one_line_error(code, err, "missing split 'valid'", f"ec2train data split {data}/train {data}-split")


# ---------------------------------------------------------------- predict


@pytest.mark.parametrize("names", [["missing.jpg"], ["a.jpg", "b.jpg"], ["empty.jpg"]], ids=["one", "two", "empty"])
def test_predict_with_nothing_readable_is_one_error_line(capsys, trained_model, tmp_path, names):
    (tmp_path / "empty.jpg").write_bytes(b"")
    code, out, err = cli_in_process(capsys, "predict", "--model", trained_model, *(tmp_path / n for n in names))
    why = "empty file (0 bytes)" if names == ["empty.jpg"] else "no such file"
    assert_one_line_error(code, err, f"{tmp_path / names[-1]}: {why}")
    assert out == ""  # no table of errors


def _table_rows(out: str) -> list[list[str]]:
    return [[cell.strip() for cell in line.split("│")[1:-1]] for line in out.splitlines() if line.startswith("│")]


def test_predict_table_keeps_file_names_whole_at_80_columns(trained_model, demo_data, tmp_path):
    import os
    import shutil

    from tests.support.cli import run_cli

    deep = tmp_path / "photos_from_the_holiday_2026" / "camera_roll_backup" / "day_three"
    deep.mkdir(parents=True)
    names = ["Triangle_test_0000_phone.jpg", "Cross_test_0001_phone.jpg"]
    for name, src in zip(names, sorted((demo_data / "test").rglob("*.jpg"))):
        shutil.copy(src, deep / name)
    res = run_cli("predict", "--model", trained_model, deep, env={**os.environ, "COLUMNS": "80"})
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    assert max(len(line) for line in lines) <= 80, res.stdout
    cells = [row[0] for row in _table_rows(res.stdout)]
    for name in names:
        assert name in cells, res.stdout  # each name on one line, not folded mid-name
    # The folded lines join back into the full paths, split only after a "/".
    joined = "".join(cells)
    assert all(str(deep / name) in joined for name in names), res.stdout
    assert all(c.endswith("/") or c in names or c in ("image", "") for c in cells), cells


# ---------------------------------------------------------------- the confusion picture's right side


def _empty_runs(ink_columns) -> list[tuple[int, int]]:
    """(start, width) of each run of columns without ink."""
    runs, start = [], None
    for x, inked in enumerate(list(ink_columns) + [True]):
        if not inked and start is None:
            start = x
        elif inked and start is not None:
            runs.append((start, x - start))
            start = None
    return runs


@pytest.mark.parametrize("n", [2, 4, 12, 46])
def test_confusion_picture_keeps_the_list_off_the_edge_and_near_the_scale(tmp_path, n):
    """Measured on the PNG's pixels: the list of confused pairs keeps a margin from the right edge
    like the picture's other margins, and no wide band of empty columns separates it from the
    colour scale."""
    import numpy as np
    import torch
    from PIL import Image

    from ec2train.plots import confusion_figure, geometry, write_confusion_png

    m = torch.diag(torch.full((n,), 20.0)) + torch.randint(0, 3, (n, n), generator=torch.Generator().manual_seed(n))
    names = [f"Breed number {i}" for i in range(n)]
    png = write_confusion_png(tmp_path / "c.png", m, names)
    pixels = np.asarray(Image.open(png).convert("L"))
    ink = (pixels < 200).any(axis=0)
    inked = np.flatnonzero(ink)
    right_margin = pixels.shape[1] - 1 - inked.max()
    g = geometry(confusion_figure(m, names))
    # Beside the matrix: from the colour scale's right edge to the end of the picture.
    beside = ink[g.left + g.side + 1 :]
    inner = [w for start, w in _empty_runs(beside) if start + g.left + g.side + 1 + w < pixels.shape[1]]
    assert 40 <= right_margin <= 64, right_margin  # not touching the edge, not a wide empty strip
    assert max(inner) <= 48, inner  # the list sits a normal gap after the scale's caption
