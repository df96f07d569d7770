"""Multi-node jobs run for real: two runners on this machine, each a process with its own fake
IMDSv2 (its own instance id, private IP 127.0.0.1, a spot notice on demand) and its own
working folder, against one moto server; their fit processes train together with gloo on the
CPU (rank 0's c10d store on 127.0.0.1 at the job's rendezvous port).

    (a) success: rank 0 sets the group to 0, the model is in S3, and its weights are those of a
        2-process `fit --nproc-per-node 2` on one machine with the same global batch (bitwise:
        two ranks, one thread each, and a sum of two numbers is the same in either order)
    (b) a spot notice on the rank-1 node after epoch 1 stops both; a replacement joins; the job
        succeeds with (a)'s weights
    (c) the rank-0 node (the c10d store's host) freezes after epoch 1, as an instance that
        vanishes does: the survivor stops within the peer timeout, records the lost node, a
        replacement joins, the job succeeds with (a)'s weights
    (d) one rank fails (a damaged image on its node's disk): both nodes end within seconds and
        the job counts one failed attempt

Each scenario is one module fixture (two or three runners, one to two attempts), shared by the
tests that read it. Tiny on purpose: 2 classes x 8 images at 32 px, 4 steps per epoch.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import boto3
import pytest
import torch

from ec2train.job import api
from tests.support.aws import DLAMI_ID, reset_moto
from tests.support.aws_recorder import AwsRecorder
from tests.support.cli import Quiet
from tests.support.job_nodes import FakeInstance, RunnerProcess, wait_for
from tests.support.net import free_port
from tests.support.training import FIT, assert_same_weights, options

BUCKET = "ec2train-multinode"
REGION = "us-east-1"
EPOCHS = 4
# FIT's small model, 4 steps per epoch (16 images, 2 ranks x 2: epochs 2-4 are the window for
# the spot notice, seconds even on an idle box), one thread per process.
FIT_ARGS = ["fit", *options(**{**FIT, "epochs": EPOCHS, "batch_size": 2, "spot_poll_seconds": 0.1})]
# Node loss is noticed after PEER_TIMEOUT s without a heartbeat; a stopped node's training is
# SIGKILLed STOP_GRACE s after its SIGTERM. Short here, 60 s and 30 s by default.
HEARTBEAT, PEER_TIMEOUT, STOP_GRACE = 1.0, 8.0, 2.0
RUN_TIMEOUT = 240


def s3():
    return boto3.client("s3", region_name=REGION)


def status(name: str) -> dict:
    return json.loads(s3().get_object(Bucket=BUCKET, Key=f"{name}/_job/status.json")["Body"].read())


def desired(name: str) -> int:
    [g] = boto3.client("autoscaling", region_name=REGION).describe_auto_scaling_groups(
        AutoScalingGroupNames=[f"ec2train-job-{name}"]
    )["AutoScalingGroups"]
    return g["DesiredCapacity"]


def has_key(key: str) -> bool:
    return s3().list_objects_v2(Bucket=BUCKET, Prefix=key).get("KeyCount", 0) > 0


def model_weights(name: str, tmp: Path) -> dict[str, torch.Tensor]:
    path = tmp / f"{name}-model.pth"
    s3().download_file(BUCKET, f"{name}/model.pth", str(path))
    return torch.load(path, weights_only=True)["state_dict"]


@pytest.fixture(scope="module")
def cloud(moto_server, wheel, tmp_path_factory):
    """A moto server with the bucket and the data zip; AWS_ENDPOINT_URL for this module."""
    from ec2train.data import make_demo_dataset

    reset_moto(moto_server)
    root = tmp_path_factory.mktemp("multinode")
    data = make_demo_dataset(root / "demo", classes=2, per_class=8, size=32)
    # The recording hop answers the placement-group calls, which moto does not implement.
    with pytest.MonkeyPatch.context() as mp, AwsRecorder(moto_server) as recorder:
        mp.setenv("AWS_ENDPOINT_URL", recorder.url)
        s3().create_bucket(Bucket=BUCKET)
        archive = root / "demo.zip"
        with zipfile.ZipFile(archive, "w") as zf:
            for f in sorted(data.rglob("*")):
                if f.is_file():
                    zf.write(f, f"demo/{f.relative_to(data)}")
        s3().upload_file(str(archive), BUCKET, "data/demo.zip")
        yield {"root": root, "data": data, "wheel": wheel, "recorder": recorder, "moto": moto_server}


class Job:
    """One submitted 2-node job and the runners started for it."""

    def __init__(self, cloud: dict, name: str, **changes):
        self.cloud, self.name = cloud, name
        self.uri = f"s3://{BUCKET}/{name}"
        self.runners: list[RunnerProcess] = []
        self.servers: list[FakeInstance] = []
        req = dict(
            name=name,
            s3_uri=self.uri,
            data=f"s3://{BUCKET}/data/demo.zip",
            fit_args=FIT_ARGS,
            ami=DLAMI_ID,
            wheel=str(cloud["wheel"]),
            spot=True,
            nodes=2,
            sync_seconds=1.0,
            rdzv_port=free_port(),
            heartbeat_seconds=HEARTBEAT,
            peer_timeout_seconds=PEER_TIMEOUT,
            stop_grace_seconds=STOP_GRACE,
            **changes,
        )
        api.submit(api.SubmitRequest(**req), region=REGION, console=Quiet())

    def start(self, n: int, fetch: bool = False, **imds) -> RunnerProcess:
        """Runner n, as instance i-0...n. Unless `fetch`, its disk already holds the data set (the
        download is test_job_runner's subject; importing the data module costs each runner seconds)."""
        server = FakeInstance(f"i-{n:017d}", group=f"ec2train-job-{self.name}", **imds)
        self.servers.append(server)
        workdir = self.cloud["root"] / self.name / f"node-{n}"
        if not fetch and not (workdir / "data").exists():
            shutil.copytree(self.cloud["data"], workdir / "data")
        # Straight to moto: the recording hop only answers submit's placement-group calls.
        runner = RunnerProcess(self.uri, workdir, server, {"AWS_ENDPOINT_URL": self.cloud["moto"]})
        self.runners.append(runner)
        return runner

    def close(self) -> None:
        for r in self.runners:
            if r.proc.poll() is None:
                r.kill()
        for s in self.servers:
            s.close()


@pytest.fixture(scope="module")
def success(cloud):
    """(a): two nodes train to the end."""
    job = Job(cloud, "duo")
    try:
        t0 = time.monotonic()
        first, second = job.start(1, fetch=True), job.start(2)  # node 1 downloads the data, node 2 has it
        codes = [first.wait(RUN_TIMEOUT), second.wait(RUN_TIMEOUT)]
        assert codes == [0, 0], first.tail() + "\n---\n" + second.tail()
        yield {"job": job, "first": first, "second": second, "seconds": time.monotonic() - t0}
    finally:
        job.close()


@pytest.fixture(scope="module")
def reference(cloud):
    """The same fit as one 2-process run on one machine (`fit --nproc-per-node 2`)."""
    out = cloud["root"] / "reference"
    args = [a for a in FIT_ARGS[1:]]
    done = subprocess.run(
        [sys.executable, "-m", "ec2train", "fit", "--nproc-per-node", "2", *args, "--data", str(cloud["data"])]
        + ["--output", str(out / "model"), "--logdir", str(out / "runs")],
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT,
        env={**__import__("os").environ, "OMP_NUM_THREADS": "1"},
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return torch.load(out / "model" / "model.pth", weights_only=True)["state_dict"]


def test_two_nodes_train_to_the_end_and_rank_0_ends_the_job(success):
    st = status("duo")
    assert (st["state"], st["epoch"], st["epochs"], st["failures"], st["interruptions"]) == (
        "succeeded",
        EPOCHS,
        EPOCHS,
        0,
        0,
    )
    [attempt] = st["attempts"]
    assert [(m["instance"], m["rank"], m["ip"]) for m in attempt["members"]] == [
        ("i-00000000000000001", 0, "127.0.0.1"),
        ("i-00000000000000002", 1, "127.0.0.1"),
    ]
    assert desired("duo") == 0
    assert f"data: s3://{BUCKET}/data/demo.zip ->" in success["first"].log()
    assert "setting the desired capacity of ec2train-job-duo to 0" in success["first"].log()
    assert "setting the desired capacity" not in success["second"].log()  # rank 0 alone ends the job
    metrics = json.loads(s3().get_object(Bucket=BUCKET, Key="duo/metrics.json")["Body"].read())
    assert metrics["world_size"] == 2 and [h["images_per_rank"] for h in metrics["history"]] == [[8, 8]] * EPOCHS
    assert has_key("duo/model.pth") and has_key("duo/_job/logs/attempt-001-i-00000000000000002.log")
    print(f"2-node job: {success['seconds']:.1f} s from the runners' start to both ending")


def test_two_nodes_end_with_the_weights_of_one_two_process_run(success, reference, tmp_path):
    assert_same_weights(model_weights("duo", tmp_path), reference)


def test_a_node_that_boots_after_the_end_trains_nothing_and_keeps_the_group_at_0(success, cloud):
    job = success["job"]
    boto3.client("autoscaling", region_name=REGION).set_desired_capacity(
        AutoScalingGroupName="ec2train-job-duo", DesiredCapacity=1
    )  # as if AWS had launched one more before the group reached 0
    late = job.start(9, fetch=True)  # fetch if it had to: it must not
    assert late.wait(60) == 0, late.tail()
    assert desired("duo") == 0 and not (late.workdir / "data").exists()
    assert len(status("duo")["attempts"]) == 1


# ---------------------------------------------------------------------------- (b), (c): two losses, one job


def _resumed_at(log: str) -> int:
    """The epochs done in the checkpoint that fit resumed from (its `resuming from ...: N of M` line)."""
    return int(log.split("resuming from ")[1].split(": ")[1].split(" of ")[0])


@pytest.fixture(scope="module")
def two_losses(cloud):
    """One job loses a node twice: (b) a spot notice on rank 1 after epoch 1, then, once the
    replacement has trained an epoch more, (c) rank 0 (the c10d store's host) freezes as an
    instance that vanishes does. A replacement joins each time."""
    job = Job(cloud, "losses")
    try:
        one = job.start(1)
        two = job.start(2, notice_when=lambda: f"epoch 1/{EPOCHS}:" in one.log(1))
        assert two.wait(RUN_TIMEOUT) == 75, two.tail()  # its instance is being taken: leave the group alone
        # The survivor records the loss and waits for the group to be whole again.
        after_b = wait_for(lambda: (s := status("losses"))["waiting"] and s, RUN_TIMEOUT, "the survivor to wait")
        assert one.proc.poll() is None, one.tail()
        three = job.start(3)  # AWS's replacement
        resumed = _resumed_at(wait_for(lambda: "resuming from " in one.log(2) and one.log(2), RUN_TIMEOUT, "a resume"))
        wait_for(lambda: f"epoch {resumed + 1}/{EPOCHS}:" in one.log(2), RUN_TIMEOUT, "an epoch more", poll=0.02)
        frozen = time.monotonic()
        one.freeze()  # rank 0, the c10d store's host: no FIN, no RST, no heartbeat
        after_c = wait_for(
            lambda: len((s := status("losses"))["attempts"]) == 2 and s["attempts"][1]["ended_at"] and s,
            RUN_TIMEOUT,
            "the second loss recorded",
            poll=0.25,
        )
        noticed = time.monotonic() - frozen
        one.kill()  # AWS terminates what is left of it
        four = job.start(4)
        codes = [three.wait(RUN_TIMEOUT), four.wait(RUN_TIMEOUT)]
        assert codes == [0, 0], three.tail() + "\n---\n" + four.tail()
        yield {"runners": (one, two, three, four), "after_b": after_b, "after_c": after_c, "noticed": noticed}
    finally:
        job.close()


def test_a_spot_notice_on_rank_1_stops_both_and_the_survivor_waits_for_a_replacement(two_losses):
    one, two, three, _ = two_losses["runners"]
    st = two_losses["after_b"]
    assert st["state"] == "interrupted" and "lost i-00000000000000002 (spot notice)" in st["reason"]
    assert st["waiting"] == {"attempt": 2, "ready": ["i-00000000000000001"], "need": 2}
    [first] = st["attempts"]
    assert (first["outcome"], first["lost"]) == ("interrupted", ["i-00000000000000002"])
    assert first["exit_codes"]["i-00000000000000001"] == [75]  # rank 0 saved the last whole epoch and said so
    assert "this instance is going away (a spot interruption notice)" in two.log(1)
    assert "stopped by a stop request" in one.log(1)  # rank 0 stopped at the step rank 1 asked for
    assert 1 <= _resumed_at(one.log(2)) < EPOCHS  # the new group continued from the checkpoint, not from scratch


def test_losing_the_rendezvous_host_stops_the_survivor_within_the_peer_timeout(two_losses):
    _, _, three, _ = two_losses["runners"]
    st = two_losses["after_c"]
    second = st["attempts"][1]
    assert [m["instance"] for m in second["members"]] == ["i-00000000000000001", "i-00000000000000003"]
    assert (second["outcome"], second["lost"]) == ("interrupted", ["i-00000000000000001"])
    assert "lost i-00000000000000001 (no heartbeat)" in st["reason"]
    assert "stopping this node's training: i-00000000000000001 is lost" in three.log(2)
    # Silent for PEER_TIMEOUT s, seen at the next heartbeat, SIGKILLed STOP_GRACE s after SIGTERM
    # (blocked in a gloo all-reduce, it cannot stop by itself): not a 30-minute collective timeout.
    print(f"rank 0 frozen: the loss was recorded {two_losses['noticed']:.1f} s later (peer timeout {PEER_TIMEOUT:g} s)")
    assert two_losses["noticed"] < PEER_TIMEOUT + STOP_GRACE + 30


def test_after_both_losses_the_job_succeeds_with_the_weights_of_the_uninterrupted_run(two_losses, success, tmp_path):
    _, _, three, four = two_losses["runners"]
    st = status("losses")
    assert (st["state"], st["interruptions"], st["failures"], st["epoch"]) == ("succeeded", 2, 0, EPOCHS)
    third = st["attempts"][2]
    assert [m["instance"] for m in third["members"]] == ["i-00000000000000003", "i-00000000000000004"]
    assert "setting the desired capacity" in three.log(3) and "setting the desired capacity" not in four.log(3)
    assert _resumed_at(three.log(3)) >= 1
    assert desired("losses") == 0
    metrics = json.loads(s3().get_object(Bucket=BUCKET, Key="losses/metrics.json")["Body"].read())
    assert [h["epoch"] for h in metrics["history"]] == list(range(1, EPOCHS + 1))
    assert_same_weights(model_weights("losses", tmp_path), model_weights("duo", tmp_path))


def test_job_status_shows_every_node_and_the_cost_of_all_of_them(two_losses):
    st = api.status("losses", region=REGION)
    rows = {r["instance"]: r for r in st["node_rows"]}
    assert sorted(rows) == [f"i-{n:017d}" for n in (1, 2, 3, 4)]
    assert all(r["spot"] and r["type"] == "g4dn.xlarge" for r in rows.values())
    # Each in the latest attempt it was part of; the frozen rank 0 never wrote its exit.
    assert [(rows[i]["attempt"], rows[i]["rank"], rows[i]["state"]) for i in sorted(rows)] == [
        (2, 0, "lost"),
        (1, 1, "exited"),
        (3, 0, "exited"),
        (3, 1, "exited"),
    ]
    nodes = [json.loads(s3().get_object(Bucket=BUCKET, Key=f"losses/_job/nodes/{i}.json")["Body"].read()) for i in rows]
    # The frozen node never wrote its exit: it counts to its last heartbeat.
    hours = sum(((n.get("exited_at") or n["heartbeat_at"]) - n["started_at"]) / 3600 for n in nodes)
    assert st["cost"]["hours"] == pytest.approx(hours) and st["cost"]["usd"] == pytest.approx(hours * 0.21)


# ---------------------------------------------------------------------------- (d) a rank fails


@pytest.fixture(scope="module")
def rank_fails(cloud):
    job = Job(cloud, "broken", max_failures=1)
    try:
        # Node 2's disk holds a damaged copy of the data (the runner fetches only what is missing).
        bad = cloud["root"] / "broken" / "node-2" / "data"
        shutil.copytree(cloud["data"], bad)
        for image in (bad / "train").rglob("*.jpg"):
            image.write_bytes(b"not a jpeg")
        first, second = job.start(1), job.start(2)
        codes = [first.wait(RUN_TIMEOUT), second.wait(RUN_TIMEOUT)]
        yield {"job": job, "first": first, "second": second, "codes": codes}
    finally:
        job.close()


def test_a_failing_rank_ends_both_nodes_at_once_and_counts_one_failure(rank_fails):
    run = rank_fails
    assert run["codes"] == [0, 0], run["first"].tail() + "\n---\n" + run["second"].tail()  # the job is over
    st = status("broken")
    assert (st["state"], st["failures"], st["interruptions"]) == ("failed", 1, 0)
    [attempt] = st["attempts"]
    assert attempt["outcome"] == "failed" and attempt["exit_codes"]["i-00000000000000002"] == [2]
    assert "--max-failures 1" in st["reason"] and any("cannot decode image" in line for line in st["log_tail"])
    assert desired("broken") == 0
    # The healthy node's fit ended within moments of the failing one's (gloo saw the peer go; with
    # NCCL, which may not, the runner stops it at its next heartbeat, SIGKILL STOP_GRACE s later).
    failed_at = {
        i: json.loads(s3().get_object(Bucket=BUCKET, Key=f"broken/_job/nodes/{i}.json")["Body"].read())["report"][
            "failed_at"
        ]
        for i in ("i-00000000000000001", "i-00000000000000002")
    }
    apart = failed_at["i-00000000000000001"] - failed_at["i-00000000000000002"]
    print(f"a failing rank: the other node's fit ended {apart:.1f} s after the failing one's")
    assert 0 <= apart < HEARTBEAT + STOP_GRACE + 10


# ---------------------------------------------------------------------------- waiting for capacity


def test_a_node_that_waits_alone_for_its_peers_ends_the_job_at_max_hours(cloud):
    """The zone has no capacity for the second node: the first waits, says so, and --max-hours
    still ends the job (the group's scheduled action would, were no runner left)."""
    job = Job(cloud, "alone", max_hours=12 / 3600)  # counted from submit
    try:
        lone = job.start(1, fetch=True)
        st = wait_for(lambda: (s := status("alone"))["waiting"] and s, 60, "the runner to wait")
        assert st["waiting"] == {"attempt": 1, "ready": ["i-00000000000000001"], "need": 2} and not st["attempts"]
        assert lone.wait(120) == 0, lone.tail()
    finally:
        job.close()
    st = status("alone")
    assert st["state"] == "failed" and "ran past --max-hours" in st["reason"] and "waiting for 2 nodes" in st["reason"]
    assert desired("alone") == 0 and not (lone.workdir / "data").exists()  # nothing fetched, nothing trained
