"""Spot interruptions against a real local IMDSv2 server: token handling, quiet switch-off,
and a `python -m ec2train fit` subprocess stopped mid-training by a notice, resumed from S3
on a fresh folder to the same final weights as an uninterrupted run."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import pytest
import torch
from typer.testing import CliRunner

from tests.support.aws import NOTICE, FaultyProxy
from tests.support.net import free_port
from tests.support.training import assert_same_weights, fit_args, reference_run, weights

BUCKET = "ec2train-spot"

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ---------------------------------------------------------------- the watcher


def test_watcher_stops_on_a_notice_using_imdsv2_tokens_only(imds):
    from ec2train.spot import SpotWatcher

    server = imds(notice_when=lambda: server.polls >= 3)
    lines = []
    watcher = SpotWatcher("auto", 0.05, endpoint=server.url, log_line=lines.append).start()
    try:
        assert watcher.wait_ready(3) in ("watching", "notice")
        deadline = time.monotonic() + 5
        while not watcher.should_stop() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert watcher.should_stop()
    finally:
        watcher.stop()
    assert server.polls == 3 and server.notices_sent == 1  # no notice before the third poll, none missed after
    assert (watcher.notice.action, watcher.notice.time) == (NOTICE["action"], NOTICE["time"])
    assert server.tokenless_gets == 0  # never IMDSv1
    assert any("terminate" in line and NOTICE["time"] in line for line in lines)


def test_watcher_renews_its_token_before_it_expires(imds):
    from ec2train.spot import SpotWatcher

    server = imds()
    watcher = SpotWatcher("on", 0.05, endpoint=server.url, token_ttl=2).start()
    try:
        time.sleep(2.8)  # tokens die at 2 s; the watcher renews at 1.6 s
    finally:
        watcher.stop()
    assert not watcher.should_stop()
    assert server.token_puts >= 2
    assert server.expired_gets == 0 and server.tokenless_gets == 0  # never sent a dead token
    assert server.polls > 10


def test_watcher_recovers_from_a_revoked_token(imds):
    from ec2train.spot import SpotWatcher

    server = imds()
    watcher = SpotWatcher("on", 0.05, endpoint=server.url).start()
    try:
        assert watcher.wait_ready(3) == "watching"
        server.tokens.clear()  # e.g. the metadata service restarted
        polls = server.polls
        time.sleep(0.5)
    finally:
        watcher.stop()
    assert server.polls > polls + 3 and server.token_puts >= 2


@pytest.mark.fast
@pytest.mark.parametrize("listener", ["closed port", "silent listener"])
def test_watcher_switches_itself_off_quietly_without_a_metadata_service(listener, caplog, monkeypatch):
    from ec2train.spot import SpotWatcher

    monkeypatch.delenv("AWS_EC2_METADATA_DISABLED", raising=False)

    sock = None
    if listener == "closed port":
        url = f"http://127.0.0.1:{free_port()}"  # nothing listens: connection refused
    else:  # accepts connections, never answers (what a dropped IMDS hop looks like): timeout
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        sock.listen(8)
        url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    lines = []
    caplog.set_level("DEBUG", logger="ec2train.spot")
    t0 = time.monotonic()
    watcher = SpotWatcher("auto", 0.05, endpoint=url, timeout=0.3, log_line=lines.append).start()
    try:
        assert watcher.wait_ready(3) == "disabled"
        took = time.monotonic() - t0
        # a refusal ends the probe at once; a silence is asked PROBE_TRIES times, then given up
        assert took < 0.9 if listener == "closed port" else 0.9 <= took < 3, took
    finally:
        watcher.stop()
        if sock:
            sock.close()
    assert not watcher.should_stop() and lines == []
    records = [r for r in caplog.records if r.name == "ec2train.spot"]
    assert [r.levelname for r in records] == ["DEBUG"] and "watcher off" in records[0].getMessage()


def test_auto_keeps_watching_when_a_loaded_instance_answers_its_first_probe_late(imds):
    """Under load the first token request can time out; auto tries it again instead of
    switching the watcher off for the whole run (and missing the notice)."""
    from ec2train.spot import PROBE_TRIES, SpotWatcher

    server = imds(notice_when=lambda: server.polls >= 2, slow_puts=PROBE_TRIES - 1, slow_seconds=0.6)
    watcher = SpotWatcher("auto", 0.05, endpoint=server.url, timeout=0.3).start()
    try:
        assert watcher.wait_ready(5) in ("watching", "notice")
        deadline = time.monotonic() + 5
        while not watcher.should_stop() and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        watcher.stop()
    assert watcher.should_stop() and server.token_puts >= PROBE_TRIES


def test_metadata_timeout_follows_the_aws_sdks_setting(imds, monkeypatch):
    """AWS_METADATA_SERVICE_TIMEOUT, as the SDKs read it: a service that answers in 1.5 s is
    missed at the default 1 s and heard at 3; a value that is not seconds is one line."""
    from ec2train.errors import UserError
    from ec2train.spot import Imds, request_timeout

    server = imds(slow_puts=2, slow_seconds=1.5)
    monkeypatch.delenv("AWS_METADATA_SERVICE_TIMEOUT", raising=False)
    with pytest.raises(TimeoutError):
        Imds(server.url).token()
    monkeypatch.setenv("AWS_METADATA_SERVICE_TIMEOUT", "3")
    assert Imds(server.url).token()
    for bad in ("soon", "0", "-1", "nan", "1e9"):
        with pytest.raises(UserError, match="AWS_METADATA_SERVICE_TIMEOUT=.*expected seconds"):
            request_timeout({"AWS_METADATA_SERVICE_TIMEOUT": bad})
    assert request_timeout({}) == 1.0 and request_timeout({"AWS_METADATA_SERVICE_TIMEOUT": " 2.5 "}) == 2.5


@pytest.mark.fast
def test_watch_modes(monkeypatch):
    from ec2train.errors import UserError
    from ec2train.spot import SpotWatcher

    assert SpotWatcher("off").start().state == "off"
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")  # the SDKs' switch
    assert SpotWatcher("auto").start().state == "off"
    with pytest.raises(UserError, match="auto, on, off"):
        SpotWatcher("sometimes")


# ---------------------------------------------------------------- fit stopped by a notice, resumed elsewhere


def test_fit_subprocess_stops_on_a_notice_and_resume_auto_elsewhere_matches_an_uninterrupted_run(
    aws, imds, demo_data, tmp_path, tmp_path_factory
):
    from ec2train import aws as aws_mod
    from ec2train.cli import app
    from ec2train.run import EXIT_INTERRUPTED

    reference = reference_run(str(demo_data), str(tmp_path_factory.getbasetemp()))
    s3 = aws_mod.client("s3")
    s3.create_bucket(Bucket=BUCKET)
    uri = f"s3://{BUCKET}/spot-run"
    first = tmp_path / "instance1"
    # The notice arrives once the first epoch's checkpoint exists, i.e. during epoch 2 or 3.
    server = imds(notice_when=lambda: (first / "out" / "last.pt").exists())
    env = {k: v for k, v in os.environ.items() if k != "AWS_EC2_METADATA_DISABLED"}
    env.update(AWS_ENDPOINT_URL=aws, AWS_EC2_METADATA_SERVICE_ENDPOINT=server.url, OMP_NUM_THREADS="1")
    cmd = [
        sys.executable,
        "-m",
        "ec2train",
        "fit",
        *fit_args(demo_data, first / "out", first / "runs"),
        "--s3-uri",
        uri,
        "--spot-poll-seconds",
        "0.1",
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    output = " ".join((proc.stdout + proc.stderr).split())  # rich wraps long lines
    print(proc.stdout + proc.stderr)
    assert proc.returncode == EXIT_INTERRUPTED == 75, output
    assert "spot interruption notice" in output and "--resume auto" in output
    assert server.notices_sent >= 1 and server.tokenless_gets == 0

    # The last completed epoch's checkpoint is in S3, identical to the one on the lost disk.
    local = torch.load(first / "out" / "last.pt", map_location="cpu", weights_only=True)
    assert 1 <= local["epoch"] < 3
    body = s3.get_object(Bucket=BUCKET, Key="spot-run/last.pt")["Body"].read()
    assert body == (first / "out" / "last.pt").read_bytes()
    assert f"the checkpoint of epoch {local['epoch']} is in {uri}/last.pt" in output

    # A new instance: empty disk, same command plus --resume auto, no notice this time.
    second = tmp_path / "instance2"
    run = CliRunner().invoke(
        app,
        [
            "fit",
            *fit_args(demo_data, second / "out", second / "runs"),
            "--s3-uri",
            uri,
            "--resume",
            "auto",
            "--spot-watch",
            "off",
        ],
    )
    assert run.exit_code == 0, run.output
    assert f"{local['epoch']} of 3 epochs done" in run.output
    metrics = json.loads((second / "out" / "metrics.json").read_text())
    assert [h["epoch"] for h in metrics["history"]] == [1, 2, 3]
    assert_same_weights(weights(second / "out" / "model.pth"), reference["model"])
    assert_same_weights(weights(second / "out" / "last.pt"), reference["last"])


def test_under_torchrun_all_ranks_stop_and_rank_0_finishes_its_upload(aws, imds, demo_data, tmp_path):
    from ec2train import aws as aws_mod
    from ec2train.run import EXIT_INTERRUPTED

    aws_mod.client("s3").create_bucket(Bucket=BUCKET)
    # Every checkpoint upload takes 2 s more: if the other rank exited with an error first,
    # torchrun would SIGTERM rank 0 in the middle of it.
    proxy = FaultyProxy(aws)
    proxy.delay = (lambda method, path: method == "PUT" and path.startswith(f"/{BUCKET}/ddp/last.pt"), 2.0)
    out = tmp_path / "out"
    server = imds(notice_when=lambda: (out / "last.pt").exists())
    env = {k: v for k, v in os.environ.items() if k != "AWS_EC2_METADATA_DISABLED"}
    env.update(AWS_ENDPOINT_URL=proxy.url, AWS_EC2_METADATA_SERVICE_ENDPOINT=server.url, OMP_NUM_THREADS="1")
    cmd = [
        sys.executable,
        "-m",
        "ec2train",
        "fit",
        "--nproc-per-node",
        "2",
        *fit_args(demo_data, out, tmp_path / "runs", epochs=2, batch_size=8),
        "--s3-uri",
        f"s3://{BUCKET}/ddp",
        "--spot-poll-seconds",
        "0.1",
    ]
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    finally:
        proxy.close()
    output = proc.stdout + proc.stderr
    # Rank 0 records its 75 for the launcher and every rank exits 0, so torchrun reports no failure
    # (no page of ChildFailedError) and the launcher exits 75.
    assert proc.returncode == EXIT_INTERRUPTED and "ChildFailedError" not in output, output
    assert "SIGTERM" not in output, output  # nobody was killed
    assert output.count("spot interruption notice:") == 1  # rank 0 speaks for all
    ckpt = out / "last.pt"
    assert torch.load(ckpt, map_location="cpu", weights_only=True)["epoch"] == 1
    s3 = aws_mod.client("s3")
    assert s3.get_object(Bucket=BUCKET, Key="ddp/last.pt")["Body"].read() == ckpt.read_bytes()


def test_sigterm_stops_like_a_notice_keeps_the_checkpoint_and_flushes_s3(aws, demo_data, tmp_path):
    import signal

    from ec2train import aws as aws_mod
    from ec2train.run import EXIT_INTERRUPTED

    s3 = aws_mod.client("s3")
    s3.create_bucket(Bucket=BUCKET)
    out = tmp_path / "out"
    env = dict(os.environ, AWS_ENDPOINT_URL=aws, OMP_NUM_THREADS="1")
    cmd = [
        sys.executable,
        "-m",
        "ec2train",
        "fit",
        *fit_args(demo_data, out, tmp_path / "runs"),
        "--s3-uri",
        f"s3://{BUCKET}/term",
        "--spot-watch",
        "off",
    ]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 240
        while not (out / "last.pt").exists():  # the first epoch's checkpoint: epoch 2 is under way
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[0]
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)  # what docker stop / systemd / a shutdown send
        output = proc.communicate(timeout=240)[0]
    finally:
        proc.kill()
    text = " ".join(output.split())
    assert proc.returncode == EXIT_INTERRUPTED, output
    assert "stopped by SIGTERM" in text and "--resume auto" in text and "Traceback" not in output, text
    ckpt = torch.load(out / "last.pt", map_location="cpu", weights_only=True)
    assert 1 <= ckpt["epoch"] < 3
    assert f"the checkpoint of epoch {ckpt['epoch']} is in s3://{BUCKET}/term/last.pt" in text
    # The S3 mirror was flushed before the exit: it holds exactly the local checkpoint.
    assert s3.get_object(Bucket=BUCKET, Key="term/last.pt")["Body"].read() == (out / "last.pt").read_bytes()


def test_fit_help_documents_the_interruption_exit_status():
    from ec2train.cli import app
    from ec2train.run import EXIT_INTERRUPTED

    text = " ".join(CliRunner().invoke(app, ["fit", "--help"], env={"COLUMNS": "200"}).output.split())
    assert f"{EXIT_INTERRUPTED} stopped by a spot interruption notice" in text and "--resume auto" in text
    assert "--spot-watch" in text and "--s3-uri" in text and "--kms-key" in text
