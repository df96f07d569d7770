"""Data layout, names, demo data, samplers and `data fetch` over real HTTP."""

from __future__ import annotations

import http.server
import io
import os
import shutil
import subprocess
import sys
import threading
import zipfile
from pathlib import Path

import pytest
import torch

from ec2train.data import (
    DataError,
    EvalSampler,
    ImageDataset,
    SplitSampler,
    TrainSampler,
    check_dataset,
    class_name,
    fetch_dataset,
    make_demo_dataset,
    make_loader,
    scan_split,
    start_workers,
)
from ec2train.errors import UserError
from ec2train.preprocess import eval_transform, train_transform
from tests.support.cli import assert_one_line_error, cli_in_process


@pytest.mark.fast
@pytest.mark.parametrize(
    "folder,name",
    [
        ("001.Affenpinscher", "Affenpinscher"),
        ("124.Poodle", "Poodle"),
        ("035.Bull_terrier", "Bull terrier"),
        ("Great_Dane", "Great Dane"),
        ("v2.model", "v2.model"),
    ],
)
def test_class_names_are_human(folder, name):
    assert class_name(folder) == name


@pytest.mark.fast
def test_demo_data_layout_and_idempotence(tmp_path):
    root = make_demo_dataset(tmp_path / "d", classes=3, per_class=8, size=32)
    report = check_dataset(root, decode=True)
    assert report.ok
    assert {s: (r.classes, r.images) for s, r in report.splits.items()} == {
        "train": (3, 24),
        "valid": (3, 9),
        "test": (3, 9),
    }
    stamp = (root / "train" / "001.Circle").stat().st_mtime_ns
    assert make_demo_dataset(root, classes=3, per_class=8, size=32) == root  # same call: nothing rewritten
    assert (root / "train" / "001.Circle").stat().st_mtime_ns == stamp
    with pytest.raises(DataError, match="--force"):
        make_demo_dataset(root, classes=4, per_class=8, size=32)
    assert make_demo_dataset(root, classes=4, per_class=8, size=32, force=True)
    assert check_dataset(root).splits["train"].classes == 4


@pytest.mark.fast
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


@pytest.mark.fast
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


@pytest.mark.fast
def test_train_sampler_never_ends_an_epoch_with_a_batch_of_one():
    """17 images in batches of 4 would end with a lone image, which BatchNorm cannot train on:
    that epoch leaves one image out (a different one each epoch); other sizes keep every image."""
    s = TrainSampler(17, seed=1, batch_size=4)
    left_out = set()
    for epoch in range(6):
        s.set_epoch(epoch)
        order = s.indices()
        assert len(order) == len(s) == 16 and len(set(order)) == 16
        left_out |= set(range(17)) - set(order)
    assert len(left_out) > 1  # not always the same image
    assert len(TrainSampler(18, batch_size=4)) == 18 and len(TrainSampler(17, batch_size=1)) == 17
    assert len(TrainSampler(17)) == 17  # no batch size given: every image
    # per rank: 2 ranks of 9 (17 padded to 18), batches of 4 -> 8 each, equal steps on both ranks
    shards = [TrainSampler(17, r, 2, seed=1, batch_size=4) for r in range(2)]
    assert [len(x.indices()) for x in shards] == [8, 8]


@pytest.mark.fast
def test_eval_sampler_counts_each_image_once():
    shards = [list(EvalSampler(13, r, 4)) for r in range(4)]
    flat = sorted(i for s in shards for i in s)
    assert flat == list(range(13))


class _Numbers(torch.utils.data.Dataset):
    def __len__(self):
        return 12

    def __getitem__(self, index):
        return index, os.getpid()


def test_one_eval_loader_reads_valid_then_test_with_the_same_workers():
    shards = [SplitSampler({"valid": 5, "test": 7}, r, 2) for r in range(2)]
    assert [list(s) for s in shards] == [[0, 2, 4], [1, 3]] and [len(s) for s in shards] == [3, 2]
    for s in shards:
        s.use("test")
    assert [list(s) for s in shards] == [[5, 7, 9, 11], [6, 8, 10]] and [len(s) for s in shards] == [4, 3]

    sampler = SplitSampler({"valid": 5, "test": 7})
    loader = make_loader(_Numbers(), sampler, 4, 1, False)
    passes = []
    for split in ("valid", "test", "valid"):
        sampler.use(split)
        batches = list(loader)
        passes.append(([int(i) for b, _ in batches for i in b], {int(p) for _, ps in batches for p in ps}))
    assert [indices for indices, _ in passes] == [[0, 1, 2, 3, 4], list(range(5, 12)), [0, 1, 2, 3, 4]]
    workers = set().union(*(pids for _, pids in passes))
    assert len(workers) == 1 and os.getpid() not in workers  # one persistent worker served all three


def _children() -> set[int]:
    kids = set()
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            continue
        if int(stat[stat.rindex(")") + 2 :].split()[1]) == os.getpid():
            kids.add(int(pid))
    return kids


def test_start_workers_forks_them_before_any_batch_is_asked_for():
    sampler = SplitSampler({"valid": 6})
    loader = make_loader(_Numbers(), sampler, 4, 1, False)
    before = _children()
    start_workers(loader)
    started = _children() - before
    assert len(started) == 1 and not sampler.idle  # the worker runs, and the sampler reads again
    batches = list(loader)
    assert [int(i) for b, _ in batches for i in b] == list(range(6))
    assert {int(p) for _, ps in batches for p in ps} == started  # the pass used the worker started early
    start_workers(make_loader(_Numbers(), SplitSampler({"valid": 6}), 4, 0, False))  # no workers: nothing to do
    with pytest.raises(TypeError, match="idle"):  # a sampler it cannot pause would load real batches now
        start_workers(make_loader(_Numbers(), EvalSampler(6), 4, 1, False))


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


@pytest.mark.fast
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


@pytest.mark.fast
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


# ---------------------------------------------------------------- hostile archives


def _bomb(path: Path, size: int = 30 << 20) -> Path:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("dogImages/train/001.A/a.jpg", b"x")
        with zf.open("dogImages/train/001.A/zeros.jpg", "w") as f:
            for _ in range(size >> 20):
                f.write(bytes(1 << 20))
    return path


def _no_leftovers(folder: Path, *keep: str) -> None:
    assert sorted(p.name for p in folder.iterdir()) == sorted(keep), "partial output left behind"


def test_zip_bomb_is_refused_before_anything_is_written(tmp_path):
    bomb = _bomb(tmp_path / "bomb.zip")
    assert bomb.stat().st_size < 100_000  # 30 MiB of zeros in a few kB
    out = tmp_path / "out"
    with pytest.raises(
        DataError, match=r"zeros.jpg.*expands \d+x \(limit 100x\); a zip bomb\? \(deleted the download\)"
    ):
        fetch_dataset(bomb.as_uri(), out / "dogImages")
    _no_leftovers(out)


@pytest.mark.fast
def test_unpack_limits_total_entries_and_free_disk(tmp_path, monkeypatch):
    import shutil

    from ec2train.data import UnpackLimits

    src = make_demo_dataset(tmp_path / "src", classes=2, per_class=4, size=24)
    archive = tmp_path / "d.zip"
    archive.write_bytes(_zip_of(src))
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(DataError, match="entries, over the limit of 5"):
        fetch_dataset(archive.as_uri(), out / "a", limits=UnpackLimits(max_entries=5))
    with pytest.raises(DataError, match="expands to .* GiB.*refusing"):
        fetch_dataset(archive.as_uri(), out / "b", limits=UnpackLimits(max_bytes=1000))
    free = shutil.disk_usage(out).free
    with pytest.raises(DataError, match=rf"needs .* GiB spare in {out}, which has .* GiB free; free some space"):
        fetch_dataset(archive.as_uri(), out / "c", limits=UnpackLimits(disk_margin=free))
    _no_leftovers(out, "c.zip")  # refused for space only: the download stays for the rerun
    assert check_dataset(fetch_dataset(archive.as_uri(), out / "d")).ok  # the defaults let a real data set through


def _lie(archive: Path, name: str, compress_size: int | None = None, file_size: int | None = None) -> Path:
    """Rewrite the sizes that the central directory declares for one entry (what zipfile and our
    checks read), leaving its data as it is: a zip that lies about its sizes."""
    import struct

    data = bytearray(archive.read_bytes())
    with zipfile.ZipFile(archive) as zf:
        at = zf.start_dir
    while data[at : at + 4] == b"PK\x01\x02":
        n, m, k = struct.unpack_from("<HHH", data, at + 28)
        if data[at + 46 : at + 46 + n].decode() == name:
            if compress_size is not None:
                struct.pack_into("<I", data, at + 20, compress_size)
            if file_size is not None:
                struct.pack_into("<I", data, at + 24, file_size)
            archive.write_bytes(bytes(data))
            return archive
        at += 46 + n + m + k
    raise AssertionError(f"no entry {name} in {archive}")


def _bytes_written() -> int:
    """Bytes this process has handed to write() so far (Linux)."""
    return int(dict(line.split(": ") for line in Path("/proc/self/io").read_text().splitlines())["wchar"])


def _overlapping_bomb(path: Path, entries: int = 16, size: int = 8 << 20) -> Path:
    """Entries of zeros (about 8 kB packed each), each declaring 1/64 of its size as packed:
    its declared data runs over the entries after it, so the declared ratio (64x) passes a 100x
    limit while the file expands 400x. A stored tail of random bytes keeps the last reads in
    the file (the shape of the red team's 1.45 MB zip that unpacked to 1.1 GB)."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for split in ("train", "valid", "test"):  # a data set, as far as the layout goes
            zf.writestr(f"dogImages/{split}/001.A/a.jpg", b"x")
        for i in range(entries):
            with zf.open(f"dogImages/train/001.A/zeros{i}.jpg", "w") as f:
                for _ in range(size >> 20):
                    f.write(bytes(1 << 20))
        zf.writestr(zipfile.ZipInfo("dogImages/train/001.A/tail.jpg"), os.urandom(size // 40))
    for i in range(entries):
        _lie(path, f"dogImages/train/001.A/zeros{i}.jpg", compress_size=size // 64)
    return path


def test_a_zip_that_understates_its_packing_is_refused_before_a_byte_is_unpacked(tmp_path):
    archive = _overlapping_bomb(tmp_path / "lying.zip")
    size = archive.stat().st_size
    with zipfile.ZipFile(archive) as zf:
        declared = sum(m.file_size for m in zf.infolist()) / sum(m.compress_size for m in zf.infolist())
    assert declared < 100 < (16 * 8 << 20) / size  # within the limit as declared, far past it in fact
    out = tmp_path / "out"
    before = _bytes_written()
    with pytest.raises(DataError, match=r"zeros0.jpg.*declares 131072 compressed bytes.*\(deleted the download\)"):
        fetch_dataset(archive.as_uri(), out / "dogImages")
    unpacked = _bytes_written() - before - size  # less the download's copy of the archive
    assert unpacked < 64 << 10, f"{unpacked} bytes written before the refusal"
    _no_leftovers(out)


def test_unpacking_counts_the_bytes_it_writes_and_stops_at_the_limit(tmp_path):
    """Whatever the declared sizes say, the bytes written are counted: past 100x the archive's
    real size (or the total limit) the unpacking stops. Here the directory checks are skipped
    to reach that counter: 30 MiB of zeros in about 30 kB stops after about 3 MiB."""
    from ec2train.data import UnpackLimits
    from ec2train.data.fetch import extract_within_limits

    archive = _bomb(tmp_path / "bomb.zip", size=30 << 20)
    size = archive.stat().st_size
    dest = tmp_path / "dest"
    with (
        zipfile.ZipFile(archive) as zf,
        pytest.raises(DataError, match=r"stopped after .* MiB: past 100x the archive's \d+ KiB; a zip bomb"),
    ):
        extract_within_limits(zf, dest, UnpackLimits(), size)
    on_disk = sum(p.stat().st_size for p in dest.rglob("*") if p.is_file())
    assert 100 * size - (1 << 20) < on_disk <= 100 * size, on_disk  # stopped before the chunk that crossed it
    with (
        zipfile.ZipFile(archive) as zf,
        pytest.raises(DataError, match=r"stopped after 1.0 MiB: past the limit of 2.0 MiB; a zip bomb"),
    ):
        extract_within_limits(zf, tmp_path / "dest2", UnpackLimits(max_bytes=2 << 20), size)


def _stored_past_its_end(path: Path) -> Path:
    """A stored (uncompressed) entry declared 10 MB long in a file of a few hundred bytes:
    reading it runs off the end of the file (EOFError, which click printed as "Aborted!")."""
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("dogImages/train/001.A/a.jpg", b"x" * 100)
    return _lie(path, "dogImages/train/001.A/a.jpg", compress_size=10_000_000, file_size=10_000_000)


def _bad_crc(path: Path) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("dogImages/train/001.A/a.jpg", b"x" * 1000)
    data = bytearray(path.read_bytes())
    data[data.index(b"x" * 1000) + 500] = ord("y")
    path.write_bytes(bytes(data))
    return path


@pytest.mark.parametrize(
    "make,needle", [(_stored_past_its_end, "declares 10000000 compressed bytes"), (_bad_crc, "is corrupt")]
)
def test_every_refused_archive_is_one_line_and_deleted_so_a_rerun_fetches_anew(tmp_path, capsys, make, needle):
    archive = make(tmp_path / "d.zip")
    dest = tmp_path / "out" / "dogImages"
    for _ in range(2):  # the rerun gets the same answer, not an archive left from the first run
        code, _, err = cli_in_process(capsys, "data", "fetch", "--url", archive.as_uri(), "--dest", dest)
        last = err.strip().splitlines()[-1]  # after the progress bar
        assert code == 2 and "Aborted" not in err and "Traceback" not in err, err
        assert last.startswith("error:") and needle in last and "deleted" in last, err
        _no_leftovers(tmp_path / "out")


def _zip_with(path: Path, *entries: tuple[str, int | None, bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("dogImages/train/001.A/a.jpg", b"x")
        for name, mode, data in entries:
            info = zipfile.ZipInfo(name)
            if mode is not None:
                info.external_attr = mode << 16
            zf.writestr(info, data)
    return path


@pytest.mark.fast
@pytest.mark.parametrize(
    "entries,problem",
    [
        ([("dogImages/valid", 0o120777, b"/etc")], "is a symbolic link"),
        # the case that used to end in NotADirectoryError: a link (unpacked as a file) with entries below it
        ([("dogImages/valid", 0o120777, b"train"), ("dogImages/valid/001.A/b.jpg", None, b"y")], "symbolic link"),
        ([("dogImages/test", 0o010644, b"")], "not a plain file or folder"),  # a FIFO
        (
            [("dogImages/test", None, b"f"), ("dogImages/test/001.A/c.jpg", None, b"y")],
            "a file and a folder of that name",
        ),
        ([("dogImages/train/001.A/a.jpg", None, b"again")], "holds it twice"),
    ],
)
def test_odd_members_are_one_line_and_leave_nothing(tmp_path, entries, problem):
    archive = _zip_with(tmp_path / "odd.zip", *entries)
    out = tmp_path / "out"
    with pytest.raises(DataError, match=problem):
        fetch_dataset(archive.as_uri(), out / "dogImages", keep_archive=True)
    _no_leftovers(out)  # neither a .unpacking folder nor the refused download


@pytest.mark.fast
def test_sha256_is_checked_before_unpacking(tmp_path):
    import hashlib

    src = make_demo_dataset(tmp_path / "src", classes=2, per_class=2, size=24)
    archive = tmp_path / "d.zip"
    archive.write_bytes(_zip_of(src))
    good = hashlib.sha256(archive.read_bytes()).hexdigest()
    out = tmp_path / "out"
    with pytest.raises(DataError, match=f"has sha256 {good}, not the expected {'0' * 64}"):
        fetch_dataset(archive.as_uri(), out / "dogImages", sha256="0" * 64)
    _no_leftovers(out)  # the wrong download is deleted, so a rerun fetches anew
    assert check_dataset(fetch_dataset(archive.as_uri(), out / "dogImages", sha256=good.upper())).ok


@pytest.mark.fast
@pytest.mark.parametrize(
    "old,new,ok",
    [
        ("https://a.example/x.zip", "https://b.example/y.zip", True),
        ("http://a.example/x.zip", "https://b.example/y.zip", True),
        ("http://a.example/x.zip", "http://b.example/y.zip", True),
        ("https://a.example/x.zip", "http://a.example/x.zip", False),
        ("HTTPS://a.example/x.zip", "Http://a.example/x.zip", False),
        ("https://a.example/x.zip", "file:///etc/passwd", False),
        ("http://a.example/x.zip", "ftp://a.example/x.zip", False),
    ],
)
def test_redirect_policy_keeps_tls(old, new, ok):
    from ec2train.data import check_redirect

    if ok:
        check_redirect(old, new)
    else:
        with pytest.raises(DataError, match="refusing the redirect"):
            check_redirect(old, new)


class _Redirect(http.server.BaseHTTPRequestHandler):
    location = ""

    def do_GET(self):  # noqa: N802
        self.send_response(302)
        self.send_header("Location", type(self).location)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass


def test_fetch_follows_a_real_redirect_through_the_policy(zip_server, tmp_path, monkeypatch):
    import ec2train.data.fetch as data

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Redirect)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    start = f"http://127.0.0.1:{server.server_address[1]}/dogImages.zip"
    seen = []
    real = data.check_redirect
    monkeypatch.setattr(data, "check_redirect", lambda old, new: (seen.append((old, new)), real(old, new)))
    try:
        _Redirect.location = zip_server
        assert check_dataset(fetch_dataset(start, tmp_path / "a" / "dogImages")).ok
        assert seen == [(start, zip_server)]
        _Redirect.location = "ftp://127.0.0.1/dogImages.zip"
        with pytest.raises(DataError, match="refusing the redirect"):
            fetch_dataset(start, tmp_path / "b" / "dogImages")
    finally:
        server.shutdown()


# ---------------------------------------------------------------- data split


@pytest.fixture
def unsplit(tmp_path):
    """A folder of class folders (40, 7 and 3 images), as most downloaded data sets come."""
    from PIL import Image

    root = tmp_path / "photos"
    for folder, n in (("001.Akita", 40), ("002.Boxer", 7), ("Corgi", 3)):
        (root / folder).mkdir(parents=True)
        for i in range(n):
            Image.new("RGB", (40, 40), (i * 5, 0, 0)).save(root / folder / f"{folder}_{i:02d}.jpg")
    (root / "001.Akita" / "notes.txt").write_text("not an image")
    return root


def _tree(root: Path) -> dict[str, list[str]]:
    return {str(p.relative_to(root)): sorted(f.name for f in p.iterdir()) for p in sorted(root.glob("*/*"))}


def test_split_is_stratified_deterministic_and_linked(unsplit, tmp_path):
    from ec2train.data import split_dataset

    result = split_dataset(unsplit, tmp_path / "a", valid=0.1, test=0.2, seed=3)
    assert result.counts == {
        "train": {"001.Akita": 28, "002.Boxer": 5, "Corgi": 1},
        "valid": {"001.Akita": 4, "002.Boxer": 1, "Corgi": 1},
        "test": {"001.Akita": 8, "002.Boxer": 1, "Corgi": 1},  # 7 x 0.2 = 1.4 -> 1
    }
    report = check_dataset(tmp_path / "a", decode=True)
    assert report.ok and report.class_folders == ["001.Akita", "002.Boxer", "Corgi"]
    for folder in ("001.Akita", "002.Boxer", "Corgi"):  # each image in exactly one split
        names = [n for split in ("train", "valid", "test") for n in _tree(tmp_path / "a")[f"{split}/{folder}"]]
        assert sorted(names) == sorted(p.name for p in (unsplit / folder).glob("*.jpg"))
    some = next((tmp_path / "a" / "train" / "Corgi").iterdir())
    assert some.stat().st_ino == (unsplit / "Corgi" / some.name).stat().st_ino and result.copied == 0  # hard links
    assert _tree(split_dataset(unsplit, tmp_path / "b", valid=0.1, test=0.2, seed=3).root) == _tree(tmp_path / "a")
    assert _tree(split_dataset(unsplit, tmp_path / "c", valid=0.1, test=0.2, seed=4).root) != _tree(tmp_path / "a")
    copied = split_dataset(unsplit, tmp_path / "d", valid=0.1, test=0.2, seed=3, mode="copy")
    assert copied.copied == 50 and _tree(copied.root) == _tree(tmp_path / "a")
    assert (copied.root / "train" / "Corgi" / some.name).stat().st_ino != some.stat().st_ino


def test_split_links_fall_back_to_copies_across_file_systems(unsplit, tmp_path, monkeypatch):
    import errno
    import os

    from ec2train.data import split_dataset

    def cross_device(src, dst):
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    monkeypatch.setattr(os, "link", cross_device)
    result = split_dataset(unsplit, tmp_path / "x")
    assert result.copied == 50 and check_dataset(result.root).ok


def test_split_refuses_overwrite_and_bad_input_leaving_nothing(unsplit, tmp_path):
    from ec2train.data import split_dataset

    (tmp_path / "taken").mkdir()
    with pytest.raises(DataError, match="already exists.*never overwrites"):
        split_dataset(unsplit, tmp_path / "taken")
    with pytest.raises(DataError, match="together below 1"):
        split_dataset(unsplit, tmp_path / "y", valid=0.5, test=0.5)
    split = split_dataset(unsplit, tmp_path / "ok").root
    with pytest.raises(DataError, match="already split"):
        split_dataset(split, tmp_path / "again")
    (unsplit / "Dingo").mkdir()
    (unsplit / "Corgi" / "Corgi_00.jpg").rename(unsplit / "Dingo" / "d.jpg")
    with pytest.raises(DataError, match="class Corgi has 2 images; each class needs at least 3"):
        split_dataset(unsplit, tmp_path / "z")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ok", "photos", "taken"]


@pytest.fixture
def noisy_unsplit(tmp_path):
    """About 1.8 MB of incompressible JPEGs in three class folders: more than `tiny_disk` holds."""
    import numpy as np
    from PIL import Image

    root, rng = tmp_path / "noisy", np.random.default_rng(0)
    for folder in ("Akita", "Boxer", "Corgi"):
        (root / folder).mkdir(parents=True)
        for i in range(30):
            pixels = rng.integers(0, 256, (128, 128, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / folder / f"{i:02d}.jpg", quality=95)
    return root


def _left_in(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


@pytest.mark.parametrize("copy", [True, False])  # hard links from one file system to another are copies too
def test_split_onto_a_full_disk_is_one_line_and_leaves_nothing(noisy_unsplit, tiny_disk, capsys, copy):
    code, _, err = cli_in_process(capsys, "data", "split", noisy_unsplit, tiny_disk / "split", *["--copy"] * copy)
    assert_one_line_error(code, err, f"disk full: cannot copy into {tiny_disk}", "MiB free", "free some space")
    assert _left_in(tiny_disk) == [], "a half-made split was left behind"


def test_split_full_disk_message_anywhere(unsplit, tmp_path, monkeypatch):
    """The same as above where no tmpfs can be mounted: the copy raises ENOSPC by hand."""
    import errno
    import shutil

    from ec2train.data import split_dataset

    def full(src, dst, **kwargs):
        Path(dst).write_bytes(b"x" * 100)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(shutil, "copyfile", full)
    with pytest.raises(
        UserError, match=rf"disk full: cannot copy into {tmp_path}: the images need \d+ KiB \(.* MiB free\)"
    ):
        split_dataset(unsplit, tmp_path / "split", mode="copy")
    assert _left_in(tmp_path) == ["photos"]


def _without_dac_override(*args) -> subprocess.CompletedProcess:
    """`ec2train ARGS` as a process that file modes apply to: root keeps its uid but loses the
    capabilities that let it read any file (as the user the tests run as elsewhere)."""
    cmd = [sys.executable, "-m", "ec2train", *map(str, args)]
    if os.geteuid() == 0:
        if not shutil.which("setpriv"):
            pytest.skip("running as root without setpriv: file modes do not apply")
        drop = "-dac_override,-dac_read_search"
        cmd = ["setpriv", f"--bounding-set={drop}", f"--inh-caps={drop}", *cmd]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("what", ["file", "folder"])
def test_split_of_an_unreadable_file_or_folder_is_one_line_and_leaves_nothing(unsplit, tmp_path, what):
    bad = unsplit / "002.Boxer" / ("002.Boxer_03.jpg" if what == "file" else "")
    bad.chmod(0)
    try:
        done = _without_dac_override("data", "split", unsplit, tmp_path / "split", "--copy")
    finally:
        bad.chmod(0o755)
    assert_one_line_error(done.returncode, done.stderr, "cannot read", str(bad).rstrip("/"), "chmod")
    assert _left_in(tmp_path) == ["photos"]


def test_split_refuses_links_out_of_src_and_follows_links_inside_it(unsplit, tmp_path):
    from ec2train.data import split_dataset

    secret = tmp_path / "elsewhere" / "secret.jpg"
    secret.parent.mkdir()
    shutil.copy(unsplit / "Corgi" / "Corgi_00.jpg", secret)
    (unsplit / "Corgi" / "Corgi_99.jpg").symlink_to(secret)
    for mode in ("copy", "link"):
        with pytest.raises(DataError, match=r"Corgi_99.jpg leads to .*secret.jpg, outside .*photos.*cp -L"):
            split_dataset(unsplit, tmp_path / "split", mode=mode)
        assert _left_in(tmp_path) == ["elsewhere", "photos"]
    (unsplit / "Corgi" / "Corgi_99.jpg").unlink()
    (unsplit / "Corgi" / "Corgi_99.jpg").symlink_to("../002.Boxer/002.Boxer_00.jpg")  # inside SRC: fine
    copied = split_dataset(unsplit, tmp_path / "split", mode="copy").root
    found = next(copied.glob("*/Corgi/Corgi_99.jpg"))
    assert not found.is_symlink() and found.read_bytes() == (unsplit / "002.Boxer" / "002.Boxer_00.jpg").read_bytes()


def test_demo_on_a_full_disk_is_one_line_and_leaves_nothing(tiny_disk, capsys):
    code, _, err = cli_in_process(capsys, "data", "demo", tiny_disk / "demo", "--size", "256", "--per-class", "100")
    assert_one_line_error(code, err, f"disk full: cannot write the demo data set in {tiny_disk}", "MiB free")
    assert _left_in(tiny_disk) == [], "a .demo.tmp-PID folder was left behind"


def test_demo_full_disk_message_anywhere(tmp_path, monkeypatch):
    import errno

    from PIL import Image

    def full(self, fp, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Image.Image, "save", full)
    with pytest.raises(UserError, match=rf"disk full: cannot write the demo data set in {tmp_path} \(.* MiB free\)"):
        make_demo_dataset(tmp_path / "demo", classes=2, per_class=2, size=32)
    assert _left_in(tmp_path) == []


def test_fit_on_an_unsplit_folder_points_to_data_split(unsplit, tmp_path, capsys):

    code, _, err = cli_in_process(capsys, "fit", "--data", unsplit, "--output", tmp_path / "out", "--weights", "none")
    assert_one_line_error(code, err, "missing split 'train'", f"ec2train data split {unsplit} {unsplit}-split")
    assert not (tmp_path / "out").exists()


def test_cli_data_split_and_fetch_sha256(unsplit, tmp_path, capsys):

    code, out, err = cli_in_process(
        capsys, "data", "split", unsplit, tmp_path / "s", "--valid", "0.2", "--test", "0.1", "--seed", "1"
    )
    assert code == 0, err
    assert "train 34, valid 10, test 6 images in 3 classes" in " ".join(out.split())
    code, _, err = cli_in_process(capsys, "data", "split", unsplit, tmp_path / "s")
    assert_one_line_error(code, err, "already exists", "never overwrites")
    archive = tmp_path / "d.zip"
    archive.write_bytes(_zip_of(tmp_path / "s"))
    code, _, err = cli_in_process(
        capsys, "data", "fetch", "--url", archive.as_uri(), "--dest", tmp_path / "f", "--sha256", "ab" * 32
    )
    last = err.strip().splitlines()[-1]  # after the progress bar
    assert (
        code == 2 and "Traceback" not in err and last.startswith("error:") and "not the expected " + "ab" * 32 in last
    ), err
