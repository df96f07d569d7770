"""`ec2train data prepare`: a resized copy with the same layout; idempotent, resumable, honest about bad files."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from PIL import Image

from ec2train.data import check_dataset, make_demo_dataset
from ec2train.prepare import MARKER, prepare_dataset
from tests.support.cli import assert_one_line_error, cli_in_process
from tests.support.images import photo_like
from tests.support.training import TINY_FIT


@pytest.fixture
def src(tmp_path: Path) -> Path:
    """A small data set with the cases that matter: large JPEGs, a PNG, a small JPEG,
    a non-image file, a hidden file and a corrupt image."""
    root = make_demo_dataset(tmp_path / "src", classes=3, per_class=4, size=40, eval_per_class=2)
    cls = root / "train" / "001.Circle"
    photo_like(600, 400, seed=1).save(cls / "big.jpg", quality=90)
    photo_like(300, 500, seed=2).save(cls / "portrait.jpeg", quality=90)
    photo_like(400, 300, seed=3).save(cls / "drawing.png")
    (cls / "notes.txt").write_text("not an image")
    (cls / ".DS_Store").write_bytes(b"\0" * 10)
    (root / "train" / "002.Square" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    return root


def test_resized_copy_keeps_layout_and_leaves_out_non_images(src: Path, tmp_path: Path):
    dst = tmp_path / "dst"
    report = prepare_dataset(src, dst, size=64, workers=2)
    cls = dst / "train" / "001.Circle"
    assert Image.open(cls / "big.jpg").size == (96, 64)  # short side = size, aspect kept
    assert Image.open(cls / "portrait.jpeg").size == (64, 107)
    assert Image.open(cls / "drawing.jpg").format == "JPEG" and Image.open(cls / "drawing.jpg").size == (85, 64)
    small = next(p for p in sorted((src / "train" / "003.Triangle").iterdir()))
    # Already small enough (40 px): copied byte for byte rather than re-encoded.
    assert (dst / small.relative_to(src)).read_bytes() == small.read_bytes()
    assert not (cls / "notes.txt").exists() and not (cls / ".DS_Store").exists()
    assert not (dst / "train" / "002.Square" / "broken.jpg").exists()
    assert len(report.corrupt) == 1 and "broken.jpg" in report.corrupt[0]
    images = [p for p in src.rglob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png")]
    assert report.written == len(images) - 1 and report.skipped == 0
    for split in ("train", "valid", "test"):
        assert sorted(p.name for p in (dst / split).iterdir()) == sorted(p.name for p in (src / split).iterdir())
    marker = json.loads((dst / MARKER).read_text())
    assert marker["complete"] is True and marker["params"] == {"size": 64, "quality": 90}
    assert check_dataset(dst, decode=True).corrupt == []


def test_rerun_skips_done_files_and_redoes_changed_ones(src: Path, tmp_path: Path):
    dst = tmp_path / "dst"
    first = prepare_dataset(src, dst, size=64, workers=1)
    again = prepare_dataset(src, dst, size=64, workers=1)
    assert again.written == 0 and again.skipped == first.written
    photo_like(800, 600, seed=9).save(src / "train" / "001.Circle" / "big.jpg")  # the source changed
    (dst / "valid" / "002.Square").joinpath(next((src / "valid" / "002.Square").iterdir()).name).unlink()
    third = prepare_dataset(src, dst, size=64, workers=1)
    assert third.written == 2
    assert Image.open(dst / "train" / "001.Circle" / "big.jpg").size == (85, 64)


def test_interrupted_run_leaves_only_whole_files_and_a_rerun_finishes(src: Path, tmp_path: Path):
    dst = tmp_path / "dst"
    calls = {"n": 0}

    def interrupt(_k: int) -> None:
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        prepare_dataset(src, dst, size=64, workers=2, on_done=interrupt)
    assert json.loads((dst / MARKER).read_text())["complete"] is False
    done = [p for p in dst.rglob("*.jp*g")]
    assert len(done) > 0
    assert not list(dst.rglob(".*.tmp"))
    for p in done:
        Image.open(p).load()  # every file present is complete
    (dst / "train" / ".big.jpg.abc.tmp").write_bytes(b"half")  # as left by a process killed outright
    report = prepare_dataset(src, dst, size=64, workers=2)
    total = len([p for p in src.rglob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png")]) - 1  # one is corrupt
    assert report.skipped == len(done) and report.written == total - len(done)
    assert not list(dst.rglob(".*.tmp"))
    assert json.loads((dst / MARKER).read_text())["complete"] is True


def test_cli_lists_corrupt_images_exits_1_and_fit_trains_on_the_copy(capsys, src: Path, tmp_path: Path):
    dst = tmp_path / "dst"
    code, out, err = cli_in_process(capsys, "data", "prepare", src, dst, "--size", "32", "--workers", "2")
    assert code == 1
    assert "broken.jpg" in err and "1 source images could not be decoded" in " ".join(err.split())
    assert f"ec2train fit --data {dst}" in " ".join(out.split())
    (src / "train" / "002.Square" / "broken.jpg").unlink()
    code, out, _ = cli_in_process(capsys, "data", "prepare", src, dst, "--size", "32")
    assert code == 0 and "0 images written" in out

    from ec2train.config import resolve
    from ec2train.loop import fit

    settings = dict(TINY_FIT, epochs=1, batch_size=8)
    result = fit(resolve(data=str(dst), output=str(tmp_path / "out"), logdir=str(tmp_path / "runs"), **settings))
    assert result.metrics["test_images"] == 6 and result.model_path.is_file()


@pytest.mark.parametrize(
    "args, needle",
    [
        (["{src}", "{src}/inside"], "inside the source"),
        (["{tmp}/nowhere", "{tmp}/dst"], "does not exist"),
        (["{src}", "{tmp}/dst", "--size", "8"], "--size 8"),
        (["{src}", "{tmp}/dst", "--quality", "100"], "--quality 100"),
        (["{src}", "{src}/../foreign"], "not a prepared data set"),
    ],
)
def test_bad_arguments_are_one_line_errors(capsys, src: Path, tmp_path: Path, args, needle):
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "keep.txt").write_text("user data")
    argv = [a.format(src=src, tmp=tmp_path) for a in args]
    code, _, err = cli_in_process(capsys, "data", "prepare", *argv)
    assert_one_line_error(code, err, needle)
    assert (tmp_path / "foreign" / "keep.txt").read_text() == "user data"


def test_other_settings_into_the_same_folder_are_refused(capsys, src: Path, tmp_path: Path):
    shutil.rmtree(src / "train" / "002.Square")
    shutil.rmtree(src / "valid")
    shutil.rmtree(src / "test")
    prepare_dataset(src, tmp_path / "dst", size=64, workers=1)
    code, _, err = cli_in_process(capsys, "data", "prepare", src, tmp_path / "dst", "--size", "128")
    assert_one_line_error(
        code, err, "prepared with --quality 90 --size 64, not --quality 90 --size 128", "another folder"
    )
    assert "{" not in err
