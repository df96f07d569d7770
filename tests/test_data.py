"""Data layout, names, demo data, samplers and `data fetch` over real HTTP."""

from __future__ import annotations

import http.server
import io
import threading
import zipfile
from pathlib import Path

import pytest

from ec2train.data import (
    DataError,
    EvalSampler,
    ImageDataset,
    TrainSampler,
    check_dataset,
    class_name,
    fetch_dataset,
    make_demo_dataset,
    scan_split,
)
from ec2train.preprocess import eval_transform, train_transform


@pytest.mark.parametrize(
    "folder,name",
    [("001.Affenpinscher", "Affenpinscher"), ("124.Poodle", "Poodle"), ("035.Bull_terrier", "Bull terrier"),
     ("Great_Dane", "Great Dane"), ("v2.model", "v2.model")],
)
def test_class_names_are_human(folder, name):
    assert class_name(folder) == name


def test_demo_data_layout_and_idempotence(tmp_path):
    root = make_demo_dataset(tmp_path / "d", classes=3, per_class=8, size=32)
    report = check_dataset(root, decode=True)
    assert report.ok
    assert {s: (r.classes, r.images) for s, r in report.splits.items()} == {"train": (3, 24), "valid": (3, 9), "test": (3, 9)}
    stamp = (root / "train" / "001.Circle").stat().st_mtime_ns
    assert make_demo_dataset(root, classes=3, per_class=8, size=32) == root  # same call: nothing rewritten
    assert (root / "train" / "001.Circle").stat().st_mtime_ns == stamp
    with pytest.raises(DataError, match="--force"):
        make_demo_dataset(root, classes=4, per_class=8, size=32)
    assert make_demo_dataset(root, classes=4, per_class=8, size=32, force=True)
    assert check_dataset(root).splits["train"].classes == 4


def test_demo_classes_differ_by_content_not_name(tmp_path):
    import torch
    from PIL import Image
    from torchvision.transforms.functional import to_tensor

    root = make_demo_dataset(tmp_path / "d", classes=4, per_class=6, size=32)
    means = []
    for folder in sorted((root / "train").iterdir()):
        imgs = [to_tensor(Image.open(p)) for p in sorted(folder.glob("*.jpg"))]
        means.append(torch.stack(imgs).mean(dim=(0, 2, 3)))
    # class colour signatures differ clearly
    for i in range(4):
        for j in range(i + 1, 4):
            assert (means[i] - means[j]).abs().max() > 0.05


def test_train_sampler_shards_are_disjoint_and_cover():
    n = 23
    per_rank = [TrainSampler(n, rank=r, world=3, seed=1) for r in range(3)]
    for s in per_rank:
        s.set_epoch(4)
    shards = [s.indices() for s in per_rank]
    assert len({len(s) for s in shards}) == 1
    flat = [i for s in shards for i in s]
    assert set(flat) == set(range(n))
    assert len(flat) - len(set(flat)) == 1  # 23 -> 24: one wrap-around pad only
    s = TrainSampler(n, seed=1)
    s.set_epoch(1)
    e1 = s.indices()
    s.set_epoch(2)
    assert e1 != s.indices() and sorted(e1) == list(range(n))


def test_eval_sampler_counts_each_image_once():
    shards = [list(EvalSampler(13, r, 4)) for r in range(4)]
    flat = sorted(i for s in shards for i in s)
    assert flat == list(range(13))


def test_augmentation_is_a_function_of_the_sample_seed(demo_data):
    _, samples = scan_split(demo_data, "train")
    ds = ImageDataset(samples[:3], train_transform(32), None)
    a, _ = ds[(1, 1234)]
    b, _ = ds[(1, 1234)]
    c, _ = ds[(1, 999)]
    assert (a == b).all() and not (a == c).all()
    eval_ds = ImageDataset(samples[:3], eval_transform(32), None)
    assert (eval_ds[0][0] == eval_ds[0][0]).all()


class _RangeHandler(http.server.BaseHTTPRequestHandler):
    """Serves one zip with Range support and can drop the connection half-way once."""

    payload = b""
    cut_once = False
    requests: list = []

    def do_GET(self):  # noqa: N802
        type(self).requests.append(self.headers.get("Range"))
        start = 0
        rng = self.headers.get("Range")
        if rng:
            start = int(rng.split("=")[1].split("-")[0])
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(self.payload) - 1}/{len(self.payload)}")
        else:
            self.send_response(200)
        body = self.payload[start:]
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if type(self).cut_once:
            type(self).cut_once = False
            self.wfile.write(body[: len(body) // 2])
            self.wfile.flush()
            self.connection.shutdown(2)
            return
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def _zip_of(root: Path, top: str = "dogImages") -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for p in sorted(root.rglob("*")):
            if p.is_file() and not p.name.startswith("."):
                zf.write(p, f"{top}/{p.relative_to(root)}")
    return buf.getvalue()


@pytest.fixture
def zip_server(tmp_path):
    src = make_demo_dataset(tmp_path / "src", classes=2, per_class=4, size=24)
    _RangeHandler.payload = _zip_of(src)
    _RangeHandler.requests = []
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _RangeHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/dogImages.zip"
    server.shutdown()


def test_fetch_over_http_resumes_after_a_dropped_connection(zip_server, tmp_path):
    _RangeHandler.cut_once = True
    dest = tmp_path / "dest" / "dogImages"
    with pytest.raises(DataError, match="run the same command again to resume"):
        fetch_dataset(zip_server, dest)
    assert not dest.exists(), "a half download must not look like a data set"
    part = dest.parent / "dogImages.zip.part"
    assert 0 < part.stat().st_size < len(_RangeHandler.payload)
    seen = []
    path = fetch_dataset(zip_server, dest, progress=lambda done, total: seen.append((done, total)))
    assert _RangeHandler.requests == [None, f"bytes={len(_RangeHandler.payload) // 2}-"]
    assert check_dataset(path, decode=True).ok
    assert seen[-1][0] == seen[-1][1] == len(_RangeHandler.payload)
    assert path == dest and not part.exists() and not (dest.parent / "dogImages.zip").exists()
    assert fetch_dataset(zip_server, dest) == path  # already there: no download
    assert len(_RangeHandler.requests) == 2


def test_fetch_file_url_and_bad_archives(tmp_path):
    src = make_demo_dataset(tmp_path / "src", classes=2, per_class=2, size=24)
    archive = tmp_path / "dogImages.zip"
    archive.write_bytes(_zip_of(src))
    assert check_dataset(fetch_dataset(archive.as_uri(), tmp_path / "a" / "dogImages")).ok
    (tmp_path / "junk.zip").write_bytes(b"nope")
    with pytest.raises(DataError, match="not a zip"):
        fetch_dataset((tmp_path / "junk.zip").as_uri(), tmp_path / "b")
    evil = tmp_path / "evil.zip"
    with zipfile.ZipFile(evil, "w") as zf:
        zf.writestr("../../escape.txt", "x")
    with pytest.raises(DataError, match="outside"):
        fetch_dataset(evil.as_uri(), tmp_path / "c")
    assert not (tmp_path / "escape.txt").exists()
    with pytest.raises(DataError, match="unsupported scheme"):
        fetch_dataset("gopher://example.com/x.zip", tmp_path / "d")


def test_fetch_offline_fails_fast_with_advice(tmp_path):
    import socket
    import time

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    t = time.perf_counter()
    with pytest.raises(DataError, match="Offline\\?.*--url"):
        fetch_dataset(f"http://127.0.0.1:{port}/dogImages.zip", tmp_path / "dogImages", timeout=3)
    assert time.perf_counter() - t < 5
