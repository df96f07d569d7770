"""The runner's part of an attempt, with stand-ins for fit: its watch loop over cheap child
processes (one that fails, one blocked as a rank in a collective would be, deaf to SIGTERM),
its heartbeat through a proxy in front of moto that can stop answering, and the data fetch from
a local HTTP server that fails on demand. Real processes, real S3 calls (moto), no training:
the multi-node scenarios with real fit processes are test_job_multinode's.
"""

from __future__ import annotations

import io
import json
import os
import sys
import threading
import time
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import boto3
import pytest

from ec2train import s3
from ec2train.job import runner, state, workers
from ec2train.job.nodes import Heartbeat, NodeFiles, StatusFile
from tests.support.aws import FaultyProxy
from tests.support.job_nodes import job_spec

BUCKET = "ec2train-watch"
# A stand-in for one fit process, by its ROLE: `exitN` ends with code N after a moment; `hang`
# is a rank blocked in a collective (NCCL waits out its timeout; SIGTERM's stop flag is only
# read between steps), so only SIGKILL ends it before its 25 s are up.
CHILD = """
import os, signal, sys, time
role = os.environ["ROLE"]
if role.startswith("exit"):
    time.sleep(0.3)
    sys.exit(int(role[4:]))
signal.signal(signal.SIGTERM, signal.SIG_IGN)
time.sleep(25)
"""


def _node_doc(iid: str, **extra) -> dict:
    return {"instance": iid, "ip": "127.0.0.1", "instance_type": "g5.xlarge", "lifecycle": "spot", **extra}


def make_node(tmp_path, members=("i-1",), **spec_changes) -> tuple[runner.Node, dict]:
    """This runner (i-1) as a member of attempt 1, which status.json in moto says is current."""
    boto3.client("s3").create_bucket(Bucket=BUCKET)
    prefix = s3.parse_uri(f"s3://{BUCKET}/dogs")
    now = time.time()
    sp = job_spec(s3_uri=str(prefix), nodes=len(members), submitted_at=now, sync_seconds=600.0, **spec_changes)
    st = state.begin_attempt(state.new_status("dogs", now, nodes=len(members)), 1, [_node_doc(i) for i in members], now)
    boto3.client("s3").put_object(Bucket=BUCKET, Key="dogs/_job/status.json", Body=json.dumps(st).encode())
    files = NodeFiles(prefix, "us-east-1")
    beat = Heartbeat(files, {**_node_doc("i-1"), "state": "training", "attempt": 1, "rank": 0}, sp.heartbeat_seconds)
    r = runner.Node(sp, prefix, tmp_path, _node_doc("i-1"), None, StatusFile(prefix, "us-east-1"), files, beat)
    return r, state.current_attempt(st)


def fake_fit(tmp_path, roles: list[str]) -> workers.Workers:
    envs = [{**os.environ, "ROLE": role, "LOCAL_RANK": str(i)} for i, role in enumerate(roles)]
    with open(tmp_path / "fit.log", "a") as log:
        return workers.Workers([sys.executable, "-c", CHILD], envs, log, tmp_path)


# --------------------------------------------------------------------------- a local rank fails


def test_a_local_rank_that_fails_stops_its_siblings_within_the_stop_grace(aws, tmp_path):
    """With --nproc-per-node > 1, one rank raising must not leave its siblings (and, through
    them, every other node) blocked in a collective until the process group's timeout."""
    r, att = make_node(tmp_path, heartbeat_seconds=1.0, peer_timeout_seconds=20.0, stop_grace_seconds=1.0)
    procs = fake_fit(tmp_path, ["hang", "exit1"])
    report = runner._report(1)
    t0 = time.monotonic()
    with r.beat:
        runner._watch(r, att, procs, report)
    took = time.monotonic() - t0
    assert procs.exit_codes == [-9, 1]  # the sibling, deaf to SIGTERM, was killed stop_grace later
    assert took < 12, took  # not the 25 s the blocked rank would have waited
    assert report["stopped_by"] == "local rank 1 exited 1"
    assert procs.exit_code == 1  # the report blames the rank that failed, not the one killed after it
    assert "stopping this node's training: local rank 1 exited 1" in r.log_text()


def test_a_clean_local_end_or_a_stop_request_is_left_alone():
    """Exit 0 (a rank done) and 75 (stopped, checkpoint saved) are no failures: the others end
    by themselves."""
    assert workers.first_failure([None, 0, 75]) is None
    assert workers.first_failure([None, 75, 2, -9]) == (2, 2)
    assert workers.first_failure([None, None]) is None


# --------------------------------------------------------------------------- fencing


def test_a_node_whose_heartbeat_cannot_reach_s3_stops_its_training_before_its_peers_call_it_lost(
    aws, tmp_path, monkeypatch
):
    """S3 stops answering this node (a black hole: its heartbeat and its status reads hang): its
    peers will call it lost after the peer timeout and may form the next attempt without it, so
    its processes must be gone before then, though the watch loop is stuck in an S3 call, and its
    report says it fenced itself."""
    proxy = FaultyProxy(aws)
    monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)  # this node's S3 goes through the proxy
    r, att = make_node(
        tmp_path, members=("i-1", "i-2"), heartbeat_seconds=1.0, peer_timeout_seconds=8.0, stop_grace_seconds=2.0
    )
    peer_files = NodeFiles(r.prefix, "us-east-1", client=boto3.client("s3", endpoint_url=aws))  # the peer's S3 works
    peer = Heartbeat(peer_files, {**_node_doc("i-2"), "state": "training", "attempt": 1, "rank": 1}, 1.0)
    procs = fake_fit(tmp_path, ["hang", "hang"])
    released = threading.Event()
    cut = threading.Timer(1.5, lambda: setattr(proxy, "hold", (lambda method, path: True, released)))
    back = threading.Timer(14.0, released.set)  # S3 answers again: the loop's stuck call returns
    dead_at = []
    watcher = threading.Thread(target=lambda: dead_at.append(_when_dead([p.pid for p in procs.procs])), daemon=True)
    try:
        with peer, r.beat:
            cut.start(), back.start(), watcher.start()
            runner._watch(r, att, procs, report := runner._report(1))
            last_beat = r.beat.last_ok
    finally:
        cut.cancel(), back.cancel(), released.set()
        proxy.close()
    watcher.join(5)
    assert procs.exit_codes == [-9, -9]
    assert report["fenced"] and "fenced itself" in report["stopped_by"]
    # Peers call a node lost peer_timeout_seconds after its last heartbeat in S3: gone before that.
    gone = dead_at[0] - last_beat
    print(
        f"fenced: training gone {gone:.1f} s after its last heartbeat in S3 (lost after {r.spec.peer_timeout_seconds:g})"
    )
    assert gone < r.spec.peer_timeout_seconds, (gone, r.log_text())
    assert "fenced itself" in r.log_text()


def _when_dead(pids: list[int]) -> float:
    """time.time() once none of `pids` runs (gone, or a zombie not yet reaped)."""

    def running(pid: int) -> bool:
        try:
            with open(f"/proc/{pid}/stat") as f:
                return f.read().rsplit(")", 1)[1].split()[0] != "Z"
        except OSError:
            return False

    while any(running(p) for p in pids):
        time.sleep(0.02)
    return time.time()


def test_a_node_that_has_not_reached_s3_lately_does_not_start_its_training(aws, tmp_path):
    r, att = make_node(tmp_path, heartbeat_seconds=1.0, peer_timeout_seconds=8.0, stop_grace_seconds=2.0)
    (tmp_path / "data").mkdir()
    for split in ("train", "valid", "test"):
        (tmp_path / "data" / split).mkdir()
    r.beat.last_ok = time.time() - 6  # its heartbeat failed for 6 s (the fetch took that long)
    report = runner._train(r, att, 0)
    assert report["fenced"] and report["exit_codes"] == [None]
    assert "not starting fit" in r.log_text()


# --------------------------------------------------------------------------- fetching the data


class Origin:
    """A data set's web server on 127.0.0.1: GET /demo.zip answers `fail(n)` (an HTTP status)
    for the n-th request while it says so, the zip otherwise."""

    def __init__(self, fail=lambda n: None):
        self.fail, self.requests = fail, 0
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w") as zf:
            for split in ("train", "valid", "test"):
                zf.writestr(f"demo/{split}/a/x.jpg", b"not read here")
        body, origin = buf.getvalue(), self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                origin.requests += 1
                code = origin.fail(origin.requests)
                payload = b"" if code else body
                self.send_response(code or 200)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/demo.zip"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def origin():
    servers = []

    def start(fail=lambda n: None):
        servers.append(Origin(fail))
        return servers[-1]

    yield start
    for s in servers:
        s.close()


@pytest.fixture
def quick_retries(monkeypatch):
    monkeypatch.setattr(runner, "FETCH_FIRST_WAIT_SECONDS", 0.05, raising=False)
    monkeypatch.setattr(runner, "FETCH_RETRY_SECONDS", 3.0, raising=False)


def test_a_transient_download_error_is_retried_not_counted(aws, tmp_path, origin, quick_retries):
    web = origin(fail=lambda n: 503 if n <= 2 else None)  # the server is briefly unavailable
    r, _ = make_node(tmp_path, data=web.url)
    assert (runner._fetch_data(r) / "train" / "a" / "x.jpg").exists()
    assert web.requests == 3
    assert "trying again" in r.log_text()


def test_a_download_that_keeps_failing_reports_the_node_interrupted_and_a_permanent_error_failed(
    aws, tmp_path, origin, quick_retries
):
    down = origin(fail=lambda n: 503)
    r, att = make_node(tmp_path, data=down.url)
    report = runner._train(r, att, 0)
    assert "HTTP 503" in report["unavailable"] and down.requests >= 2
    st = state.end_attempt(r.read_status(), r.spec, 1, {"i-1": report}, [], time.time())
    assert (st["state"], st["failures"], st["interruptions"]) == ("interrupted", 0, 1)
    assert "could not fetch the data" in st["reason"]

    missing = origin(fail=lambda n: 404)  # a wrong address: asking again cannot help
    (tmp_path / "b").mkdir()
    r, att = make_node(tmp_path / "b", data=missing.url)
    report = runner._train(r, att, 0)
    assert report.get("unavailable") is None and "HTTP 404" in report["error"] and missing.requests == 1
    st = state.end_attempt(r.read_status(), r.spec, 1, {"i-1": report}, [], time.time())
    assert (st["state"], st["failures"]) == ("retrying", 1) and "HTTP 404" in st["reason"]


def test_which_fetch_errors_are_worth_retrying():
    from ec2train.data.fetch import DataError, DownloadInterrupted

    assert runner.transient(s3.S3Error("cannot reach S3", permanent=False))
    assert not runner.transient(s3.S3Error("access denied"))
    assert runner.transient(DownloadInterrupted("stopped at 5 of 9 bytes"))
    assert not runner.transient(DataError("not a data set"))
