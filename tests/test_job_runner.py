"""The job runner run for real: a submitted job in moto, demo data in S3, a local IMDSv2 that
plays the instance (and sends the spot notice), and `ec2train fit` as the runner's subprocess.

Tiny settings keep each fit to seconds: 2 classes of 8 images, the S3/spot tests' small
architecture (a resnet18 checkpoint is ~180 MB per upload, this one ~6 MB), 2 epochs, 32 px, CPU.
Exact resume is test_spot's subject; here it is the job around fit."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import zipfile

import boto3
import pytest

from ec2train.job import api, runner
from tests.support.aws import DLAMI_ID
from tests.support.cli import Quiet, cli_in_process
from tests.support.job_nodes import FakeInstance
from tests.support.training import FIT

BUCKET = "ec2train-jobs"
REGION = "us-east-1"
PREFIX = f"s3://{BUCKET}/demo"
GROUP = "ec2train-job-demo"
FIT_ARGS = [
    "fit",
    "--arch",
    FIT["arch"],
    "--weights",
    "none",
    "--image-size",
    "32",
    "--epochs",
    "2",
    "--batch-size",
    "4",
    "--workers",
    "0",
    "--device",
    "cpu",
    "--spot-poll-seconds",
    "0.2",
]

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def small_data(tmp_path_factory):
    from ec2train.data import make_demo_dataset

    return make_demo_dataset(tmp_path_factory.mktemp("data") / "small", classes=2, per_class=8, size=32)


@pytest.fixture
def job(aws, monkeypatch, small_data, wheel, tmp_path):  # noqa: F811 - wheel is the imported fixture
    """Submit a job over demo data (a zip in S3); returns a function that submits with changes."""
    monkeypatch.delenv("AWS_EC2_METADATA_DISABLED", raising=False)  # fit's spot watcher must ask the fake IMDS
    s3 = boto3.client("s3", region_name=REGION)
    s3.create_bucket(Bucket=BUCKET)
    archive = tmp_path / "demo.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for f in sorted(small_data.rglob("*")):
            if f.is_file():
                zf.write(f, f"demo/{f.relative_to(small_data)}")
    s3.upload_file(str(archive), BUCKET, "data/demo.zip")
    servers = []

    def submit(**changes):
        req = dict(
            name="demo",
            s3_uri=PREFIX,
            data=f"s3://{BUCKET}/data/demo.zip",
            fit_args=FIT_ARGS,
            ami=DLAMI_ID,
            wheel=str(wheel),
            sync_seconds=0.5,
        )
        api.submit(api.SubmitRequest(**{**req, **changes}), region=REGION, console=Quiet())

    def instance(*args, **kwargs):
        servers.append(FakeInstance(*args, **kwargs))
        monkeypatch.setenv("AWS_EC2_METADATA_SERVICE_ENDPOINT", servers[-1].url)  # what fit's watcher reads
        # The fake answers from this test's process, which also runs moto and the runner: under
        # CI's load its answers came later than the 1 s default, and fit missed the notice.
        monkeypatch.setenv("AWS_METADATA_SERVICE_TIMEOUT", "10")
        return servers[-1]

    submit.instance = instance
    yield submit
    for s in servers:
        s.close()


def status() -> dict:
    return json.loads(
        boto3.client("s3", region_name=REGION).get_object(Bucket=BUCKET, Key="demo/_job/status.json")["Body"].read()
    )


def desired() -> int:
    [g] = boto3.client("autoscaling", region_name=REGION).describe_auto_scaling_groups(AutoScalingGroupNames=[GROUP])[
        "AutoScalingGroups"
    ]
    return g["DesiredCapacity"]


def keys(prefix: str) -> list[str]:
    return [
        o["Key"]
        for o in boto3.client("s3", region_name=REGION)
        .list_objects_v2(Bucket=BUCKET, Prefix=prefix)
        .get("Contents", [])
    ]


def log_of(key_part: str) -> str:
    [key] = [k for k in keys("demo/_job/logs/") if key_part in k]
    return boto3.client("s3", region_name=REGION).get_object(Bucket=BUCKET, Key=key)["Body"].read().decode()


def test_spot_notice_then_a_replacement_resumes_from_s3_and_ends_the_job(job, tmp_path):
    # Two processes on the one node (as on a 2-GPU box): the runner starts both and sees rank 0's
    # exit 75 itself (torchrun would report a plain failure, exit 1). Batches of 1 per process at
    # 64 px over 3 epochs: epochs 2 and 3 (16 steps each, seconds on a loaded box) are the window
    # for the notice, which the runner has fit watch for (--spot-watch on).
    fit_args = [*FIT_ARGS, "--nproc-per-node", "2"]
    fit_args[fit_args.index("--batch-size") + 1] = "1"
    fit_args[fit_args.index("--image-size") + 1] = "64"
    fit_args[fit_args.index("--epochs") + 1] = "3"
    fit_args[fit_args.index("--spot-poll-seconds") + 1] = "0.1"
    job(spot=True, fit_args=fit_args)
    first = tmp_path / "instance-1"
    log = first / "attempt-001.log"

    def after_epoch_one() -> bool:  # fit has logged epoch 1 (its checkpoint is written in the background)
        return log.exists() and "epoch 1/3:" in log.read_text(errors="replace")

    imds = job.instance("i-0000000000000001", notice_when=after_epoch_one)
    code = runner.run_job(PREFIX, first, imds_endpoint=imds.url)
    assert code == 75, (first / "attempt-001.log").read_text()
    assert "--spot-watch on" in log.read_text() and "(2 processes)" in log.read_text()
    st = status()
    assert (st["state"], st["interruptions"], st["failures"]) == ("interrupted", 1, 0)
    done = st["epoch"]
    assert done in (1, 2), st  # stopped in epoch 2 or 3, with the last whole epoch's checkpoint
    assert st["attempts"][0]["outcome"] == "interrupted" and st["attempts"][0]["lifecycle"] == "spot"
    assert desired() == 1  # the group is left alone: AWS launches the replacement
    assert "demo/last.pt" in keys("demo/") and "demo/model.pth" in keys("demo/")
    assert "spot interruption notice" in log_of("attempt-001-i-0000000000000001")
    assert imds.tokenless_gets == 0

    # The replacement: an empty disk, no notice. It resumes from the checkpoint in S3.
    second = tmp_path / "instance-2"
    imds2 = job.instance("i-0000000000000002")
    assert runner.run_job(PREFIX, second, imds_endpoint=imds2.url) == 0
    st = status()
    assert (st["state"], st["epoch"], st["epochs"], st["exit_code"]) == ("succeeded", 3, 3, 0)
    assert [(a["instance"], a["outcome"]) for a in st["attempts"]] == [
        ("i-0000000000000001", "interrupted"),
        ("i-0000000000000002", "succeeded"),
    ]
    metrics = json.loads(
        boto3.client("s3", region_name=REGION).get_object(Bucket=BUCKET, Key="demo/metrics.json")["Body"].read()
    )
    assert [h["epoch"] for h in metrics["history"]] == [1, 2, 3]  # the first `done` came from the first instance
    assert metrics["world_size"] == 2 and st["attempts"][0]["exit_codes"]["i-0000000000000001"] == [75, 0]
    assert "resuming from" in log_of("attempt-002") and f"{done} of 3 epochs done" in log_of("attempt-002")
    assert desired() == 0  # the job ended itself: the group terminates the instance

    st = api.status("demo", region=REGION)
    assert st["cost"]["usd"] is not None and st["cost"]["hours"] > 0 and st["prices_as_of"]


def test_a_failing_fit_ends_failed_with_its_exit_code_and_log_tail(job, tmp_path, capsys):
    """Run as the user data runs it: `python -m ec2train.job.runner`, a subprocess."""
    job(fit_args=["fit", "--arch", "no-such-arch", "--weights", "none"], max_failures=1)
    imds = job.instance("i-00000000000000f1", lifecycle="on-demand")
    done = subprocess.run(
        [sys.executable, "-m", "ec2train.job.runner", "--job-uri", PREFIX, "--workdir", str(tmp_path / "w")],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "AWS_EC2_METADATA_SERVICE_ENDPOINT": imds.url},
    )
    assert done.returncode == 0, done.stderr  # the job is over: nothing for the user data to do
    st = status()
    assert (st["state"], st["exit_code"], st["failures"]) == ("failed", 2, 1)
    assert "fit exited 2" in st["reason"]
    assert any("no-such-arch" in line for line in st["log_tail"]), st["log_tail"]
    assert desired() == 0

    # What the user sees: `job status` (state, exit code, cost estimate with its date, log tail), `job logs`.

    code, out, err = cli_in_process(capsys, "job", "status", "demo", "--region", REGION)
    assert code == 0, err
    words = out.split()  # rich may wrap the table's long cells: check words, not phrases
    for word in ("failed", "i-00000000000000f1", "on-demand", "estimate", "2025-06", "no-such-arch"):
        assert word in words or any(word in w for w in words), word
    lines = []
    api.logs("demo", region=REGION, write=lines.append)
    assert lines[0] == "==> attempt-001-i-00000000000000f1.log <=="
    assert "running: -m ec2train fit --arch no-such-arch" in lines[1] and "fit ended: exit 2" in lines[1]


def test_after_max_failures_no_relaunch(job, tmp_path):
    job(fit_args=["fit", "--arch", "no-such-arch", "--weights", "none"], max_failures=2)
    imds = job.instance("i-00000000000000a1")
    assert runner.run_job(PREFIX, tmp_path / "a1", imds_endpoint=imds.url) == runner.EXIT_RELAUNCH
    assert (status()["state"], status()["failures"], desired()) == ("retrying", 1, 1)  # a fresh instance tries again
    imds = job.instance("i-00000000000000a2")
    assert runner.run_job(PREFIX, tmp_path / "a2", imds_endpoint=imds.url) == 0
    st = status()
    assert (st["state"], st["failures"], len(st["attempts"])) == ("failed", 2, 2)
    assert desired() == 0
    # A late replacement (launched before the group reached 0) trains nothing and ends again.
    imds = job.instance("i-00000000000000a3")
    assert runner.run_job(PREFIX, tmp_path / "a3", imds_endpoint=imds.url) == 0
    assert len(status()["attempts"]) == 2 and not (tmp_path / "a3" / "data").exists()


def test_max_hours_stops_a_fit_that_would_run_on(job, tmp_path):
    job(
        fit_args=[
            "fit",
            "--arch",
            FIT["arch"],
            "--weights",
            "none",
            "--image-size",
            "32",
            "--epochs",
            "500",
            "--workers",
            "0",
            "--device",
            "cpu",
        ],
        max_hours=30 / 3600,  # counted from submit: the attempt must start before it passes, even on a loaded box
    )
    imds = job.instance("i-00000000000000b1", lifecycle="on-demand")
    t0 = time.monotonic()
    assert runner.run_job(PREFIX, tmp_path / "b1", imds_endpoint=imds.url, grace=20) == 0
    st = status()
    assert st["state"] == "failed" and "--max-hours" in st["reason"] and st["attempts"][0]["outcome"] == "timed-out"
    assert desired() == 0
    assert time.monotonic() - t0 < 120
