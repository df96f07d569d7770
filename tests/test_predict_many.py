"""`ec2train predict` on folders and batches: every image under a folder is answered, a bad
file is reported for itself while the others keep their answers (exit 1), and the JSON and
CSV outputs say the same thing."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest

from tests.support.cli import cli_in_process
from tests.support.training import untrained_model_file

CLASSES = {"Circle", "Square", "Triangle", "Cross"}


@pytest.fixture(scope="module")
def model_file(demo_data: Path, tmp_path_factory) -> Path:
    """A real model file with untrained weights: answers need not be right to be checked."""
    return untrained_model_file(demo_data, tmp_path_factory.mktemp("model") / "model.pth")


@pytest.fixture
def folder(demo_data: Path, tmp_path: Path) -> Path:
    """Nested class folders of good images, plus an empty .jpg, a text file named .png and a
    README (not an image name: skipped, not an error)."""
    root = tmp_path / "photos"
    for cls in ("001.Circle", "002.Square"):
        dst = root / "nested" / cls
        dst.mkdir(parents=True)
        for src in sorted((demo_data / "test" / cls).glob("*.jpg"))[:3]:
            shutil.copy(src, dst / src.name)
    (root / "empty.jpg").write_bytes(b"")
    (root / "nested" / "notes.png").write_text("not an image at all\n")
    (root / "README.txt").write_text("holiday photos\n")
    return root


def _good(folder: Path) -> list[str]:
    return sorted(str(p) for p in (folder / "nested").rglob("*.jpg"))


def test_folder_answers_every_image_reports_bad_files_and_exits_1(capsys, model_file, folder, tmp_path):
    out_csv = tmp_path / "answers.csv"
    code, out, err = cli_in_process(
        capsys,
        "predict",
        "--model",
        model_file,
        folder,
        "--json",
        "--csv",
        out_csv,
        "--top-k",
        "2",
        "--batch-size",
        "4",
    )
    assert code == 1, err
    assert "Traceback" not in err and "2 of 8 images could not be read" in " ".join(err.split()), err
    docs = json.loads(out)
    by_path = {d["image"]: d for d in docs}
    assert sorted(by_path) == sorted([*_good(folder), str(folder / "empty.jpg"), str(folder / "nested" / "notes.png")])
    for path in _good(folder):  # every good image answered, in a batch with the bad ones
        preds = by_path[path]["predictions"]
        assert len(preds) == 2 and preds[0]["label"] in CLASSES and preds[0]["probability"] >= preds[1]["probability"]
    assert "empty" in by_path[str(folder / "empty.jpg")]["error"]
    assert "not a decodable image" in by_path[str(folder / "nested" / "notes.png")]["error"]
    assert all(
        "predictions" not in by_path[p] for p in (str(folder / "empty.jpg"), str(folder / "nested" / "notes.png"))
    )

    # The CSV holds the same answers: top-1 columns, the top-k as a JSON cell, the error column.
    rows = {r["image"]: r for r in csv.DictReader(out_csv.open(newline=""))}
    assert rows.keys() == by_path.keys()
    for path, doc in by_path.items():
        row = rows[path]
        if "error" in doc:
            assert row["error"] == doc["error"] and row["label"] == row["top_k"] == ""
        else:
            assert row["error"] == "" and json.loads(row["top_k"]) == doc["predictions"]
            assert row["label"] == doc["predictions"][0]["label"]
            assert float(row["probability"]) == pytest.approx(doc["predictions"][0]["probability"], abs=1e-6)


def test_an_empty_file_no_longer_hides_the_good_answer(capsys, model_file, demo_data, tmp_path):
    good = sorted((demo_data / "test" / "003.Triangle").glob("*.jpg"))[0]
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    code, out, err = cli_in_process(capsys, "predict", "--model", model_file, good, empty, tmp_path / "missing.jpg")
    assert code == 1, err
    rows = [line.split("│")[1:3] for line in out.splitlines() if line.startswith("│")]
    paths = "".join(r[0].strip() for r in rows)  # the image column, long paths folded back together
    answers = " ".join(" ".join(r[1] for r in rows).split())
    assert str(good) in paths and answers.split()[0] in CLASSES, out  # the good image's answer is there
    assert "error: empty file" in answers and "error: no such file" in answers, out


def test_all_good_exits_0_and_one_file_keeps_its_json_object(capsys, model_file, folder):
    good = _good(folder)
    code, out, err = cli_in_process(capsys, "predict", "--model", model_file, good[0], "--json")
    assert code == 0, err
    assert json.loads(out)["image"] == good[0]
    (folder / "nested" / "notes.png").unlink()
    code, out, err = cli_in_process(capsys, "predict", "--model", model_file, folder / "nested", "--json")
    assert code == 0, err
    assert [d["image"] for d in json.loads(out)] == good


def test_a_folder_without_images_is_reported(capsys, model_file, tmp_path):
    (tmp_path / "nothing").mkdir()
    (tmp_path / "nothing" / "README.txt").write_text("x")
    code, out, err = cli_in_process(capsys, "predict", "--model", model_file, tmp_path / "nothing", "--json")
    assert code == 1, err
    assert json.loads(out) == [{"image": str(tmp_path / "nothing"), "error": "no image files in this folder"}]


def test_predict_paths_batches_match_one_by_one(model_file, folder):
    from ec2train.infer import Predictor, image_files, predict_paths

    predictor = Predictor(model_file)
    files = image_files([folder])
    batched = list(predict_paths(predictor, files, k=3, batch_size=3))
    assert [a.path for a in batched] == [str(p) for p in files]
    for answer in batched:
        if answer.error is None:
            single = predictor.predict([answer.path], 3)[0]
            assert [p["label"] for p in answer.predictions] == [p["label"] for p in single]
            for a, b in zip(answer.predictions, single):
                assert a["probability"] == pytest.approx(b["probability"], abs=1e-5)
