"""The decisions of a job's runners, as pure functions (ec2train.job.state), the environment of
a node's fit processes (ec2train.job.workers), and status.json's compare-and-swap against moto.

No training here: the real processes are test_job_runner (one node) and test_job_multinode."""

from __future__ import annotations

import datetime
import socket

import pytest

from ec2train.job import state, workers
from ec2train.job.spec import JobError, JobSpec
from ec2train.netif import interface_of
from tests.support.job_nodes import job_spec

NOW = 10_000.0


def spec(**changes) -> JobSpec:
    return job_spec(**{"max_hours": 24.0, "nodes": 2, "peer_timeout_seconds": 60.0, **changes})


def node(iid: str, attempt: int, state_: str = "waiting", age: float = 1.0, since: float = 0.0, **extra) -> dict:
    return {
        "instance": iid,
        "ip": f"10.0.0.{iid[-1]}",
        "instance_type": "g5.xlarge",
        "lifecycle": "spot",
        "state": state_,
        "attempt": attempt,
        "heartbeat_at": NOW - age,
        "waiting_since": since,
        **extra,
    }


def report(n: int, codes: list, **extra) -> dict:
    code = next((c for c in codes if c != 0), 0)
    return {"attempt": n, "exit_codes": codes, "exit_code": code, "notice": False, "sigterm": False, **extra}


def formed(nodes: list[dict], n: int = 1, status: dict | None = None) -> dict:
    status = status or state.new_status("dogs", 0, nodes=len(nodes))
    return state.begin_attempt(status, n, state.choose_members(nodes, len(nodes)), NOW)


# --------------------------------------------------------------------------- who trains


def test_ranks_follow_instance_ids_among_the_live_nodes_registered_for_the_attempt():
    nodes = [
        node("i-b", 1, since=5),
        node("i-a", 1, since=9),
        node("i-c", 1, since=1, age=120),  # silent for two minutes: lost, not ready
        node("i-d", 2),  # registered for another attempt
        node("i-e", 1, state_="exited"),
        node("i-f", 1, state_="training"),
    ]
    ready = state.ready_nodes(nodes, 1, NOW, 60)
    assert [n["instance"] for n in ready] == ["i-b", "i-a"]
    assert [m["instance"] for m in state.choose_members(ready, 2)] == ["i-a", "i-b"]  # rank order: by id
    assert state.choose_members(ready, 3) is None
    # More ready than needed (capacity rebalancing): those waiting longest train, ranked by id.
    extra = [node("i-z", 1, since=0), *ready]
    assert [m["instance"] for m in state.choose_members(extra, 2)] == ["i-b", "i-z"]


def test_an_attempt_is_written_once_and_only_when_none_runs():
    nodes = [node("i-2", 1), node("i-1", 1)]
    st = formed(nodes)
    [a] = st["attempts"]
    assert [(m["instance"], m["rank"], m["ip"]) for m in a["members"]] == [
        ("i-1", 0, "10.0.0.1"),
        ("i-2", 1, "10.0.0.2"),
    ]
    assert (st["state"], st["instance"], a["instance"], a["ended_at"]) == ("starting", "i-1", "i-1", None)
    assert state.begin_attempt(st, 1, nodes, NOW) is None  # another runner wrote it first
    assert state.begin_attempt(st, 2, nodes, NOW) is None  # attempt 1 still runs: fencing
    st["state"] = "cancelled"
    assert state.begin_attempt(st, 2, nodes, NOW) is None


def test_waiting_is_said_once_per_change_and_not_over_a_terminal_state():
    st = state.new_status("dogs", 0, nodes=2)
    st = state.waiting(st, 1, ["i-1"], 2, NOW)
    assert st["waiting"] == {"attempt": 1, "ready": ["i-1"], "need": 2} and st["state"] == "starting"
    assert state.waiting(st, 1, ["i-1"], 2, NOW) is None  # nothing new: no write
    st["state"] = "succeeded"
    assert state.waiting(st, 2, ["i-1"], 2, NOW) is None


# --------------------------------------------------------------------------- how an attempt ended


def test_settleable_waits_for_every_member_to_report_or_go_silent():
    a = formed([node("i-1", 1), node("i-2", 1)])["attempts"][0]
    training = {"i-1": node("i-1", 1, "training"), "i-2": node("i-2", 1, "training")}
    assert state.settleable(a, training, NOW, 60)[0] is False
    ended = {**training, "i-2": node("i-2", 1, "ended", report=report(1, [0], notice=True))}
    assert state.settleable(a, ended, NOW, 60)[0] is False  # rank 0 still finishing (uploading)
    silent = {**ended, "i-1": node("i-1", 1, "training", age=61)}
    assert state.settleable(a, silent, NOW, 60) == (True, {"i-2": ended["i-2"]["report"]}, ["i-1"])
    moved_on = {**ended, "i-1": node("i-1", 2, "waiting")}  # its runner restarted and forgot attempt 1
    assert state.settleable(a, moved_on, NOW, 60)[2] == ["i-1"]
    assert state.settleable(a, {"i-2": ended["i-2"]}, NOW, 60)[2] == ["i-1"]  # never wrote a node file


@pytest.mark.parametrize(
    "reports, lost, outcome, gone",
    [
        ({"i-1": report(1, [0]), "i-2": report(1, [0])}, [], "succeeded", []),
        # a notice on rank 1: rank 1 exits 0 (fit's rule for other ranks), rank 0 exits 75
        ({"i-1": report(1, [75]), "i-2": report(1, [0], notice=True)}, [], "interrupted", ["i-2"]),
        # rank 0 (the store's host) vanished; rank 1 was killed out of its collective
        ({"i-2": report(1, [-9], stopped_by="i-1 is lost")}, ["i-1"], "interrupted", ["i-1"]),
        ({"i-1": report(1, [75], sigterm=True), "i-2": report(1, [0])}, [], "interrupted", ["i-1"]),
        # every node alive, a fit failed: a code error
        ({"i-1": report(1, [1]), "i-2": report(1, [2])}, [], "failed", []),
        ({}, ["i-1", "i-2"], "lost", ["i-1", "i-2"]),
        ({"i-1": report(1, [75], timed_out=True), "i-2": report(1, [0])}, [], "timed-out", []),
        # rank 0 finished before the notice came: the job is done
        ({"i-1": report(1, [0]), "i-2": report(1, [0], notice=True)}, [], "succeeded", []),
    ],
)
def test_classify(reports, lost, outcome, gone):
    a = formed([node("i-1", 1), node("i-2", 1)])["attempts"][0]
    got = state.classify(a, reports, lost)
    assert (got["outcome"], got["lost"]) == (outcome, gone)


def test_a_failed_attempt_blames_the_rank_that_failed_first():
    a = formed([node("i-1", 1), node("i-2", 1)])["attempts"][0]
    reports = {
        "i-1": report(1, [1], failed_at=NOW - 1, log_tail=["gloo: connection closed by peer"]),
        "i-2": report(1, [2], failed_at=NOW - 3, log_tail=["error: cannot decode image x.jpg"]),
    }
    got = state.classify(a, reports, [])
    assert (got["outcome"], got["exit_code"], got["log_tail"]) == ("failed", 2, ["error: cannot decode image x.jpg"])


def test_the_job_goes_on_after_an_interruption_and_ends_after_max_failures():
    sp = spec(max_failures=2)
    st = formed([node("i-1", 1), node("i-2", 1)])
    st = state.end_attempt(st, sp, 1, {"i-1": report(1, [75]), "i-2": report(1, [0], notice=True)}, [], NOW)
    assert (st["state"], st["interruptions"], st["failures"]) == ("interrupted", 1, 0)
    assert "lost i-2 (spot notice)" in st["reason"] and "when 2 nodes are ready" in st["reason"]
    assert state.end_attempt(st, sp, 1, {}, ["i-1", "i-2"], NOW) is None  # recorded once
    st = formed([node("i-1", 2), node("i-3", 2)], 2, st)
    st = state.end_attempt(st, sp, 2, {"i-1": report(2, [1], log_tail=["x"]), "i-3": report(2, [1])}, [], NOW)
    assert (st["state"], st["failures"], st["exit_code"], st["log_tail"]) == ("retrying", 1, 1, ["x"])
    assert "fit exited 1; attempt 2 of 2 starts on new instances" in st["reason"]
    st = formed([node("i-4", 3), node("i-5", 3)], 3, st)
    st = state.end_attempt(st, sp, 3, {}, ["i-4", "i-5"], NOW)  # both vanished without a word
    assert (st["state"], st["failures"]) == ("failed", 2)
    assert "every node of the attempt vanished" in st["reason"] and "--max-failures 2" in st["reason"]
    assert [a["outcome"] for a in st["attempts"]] == ["interrupted", "failed", "lost"]


def test_a_node_that_fenced_itself_or_could_not_fetch_the_data_interrupts_the_attempt_without_counting():
    sp = spec()
    st = formed([node("i-1", 1), node("i-2", 1)])
    fenced = report(1, [-9], fenced=True, stopped_by="no heartbeat reached S3 for 21 s: this node fenced itself")
    st = state.end_attempt(st, sp, 1, {"i-1": report(1, [1]), "i-2": fenced}, [], NOW)  # i-1's ranks lost theirs
    assert (st["state"], st["failures"], st["attempts"][0]["lost"]) == ("interrupted", 0, ["i-2"])
    assert "lost i-2 (fenced itself: its heartbeat could not reach S3)" in st["reason"]
    st = formed([node("i-1", 2), node("i-2", 2)], 2, st)
    down = {**report(2, [None]), "exit_code": None, "unavailable": "DownloadInterrupted: HTTP 503"}
    st = state.end_attempt(st, sp, 2, {"i-1": down, "i-2": report(2, [-9], stopped_by="i-1 ended")}, [], NOW)
    assert (st["state"], st["failures"], st["interruptions"]) == ("interrupted", 0, 2)
    assert "i-1 (could not fetch the data: DownloadInterrupted: HTTP 503)" in st["reason"]


def test_attempts_that_keep_losing_a_node_before_an_epoch_ends_count_as_failures():
    """A node that vanishes (or cannot fetch the data) on every boot must not keep the job
    waiting until --max-hours; spot notices and attempts that got an epoch further never count."""
    sp = spec(max_failures=2)
    st, n = state.new_status("dogs", 0, nodes=2), 0

    def attempt(reports_lost, epoch_done=None):
        nonlocal st, n
        n += 1
        st = formed([node("i-1", n), node(f"i-{n + 1}", n)], n, st)
        if epoch_done is not None:
            st = state.progress_update(st, n, epoch_done, 10, NOW)
        reports, lost = reports_lost(n)
        st = state.end_attempt(st, sp, n, reports, lost, NOW)
        return st["state"], st["failures"]

    def vanished(n):
        return {"i-1": report(n, [-9], stopped_by="lost")}, [f"i-{n + 1}"]

    def noticed(n):
        return {"i-1": report(n, [75]), f"i-{n + 1}": report(n, [0], notice=True)}, []

    assert attempt(vanished) == ("interrupted", 0)
    assert attempt(noticed) == ("interrupted", 0)  # a reclaim: AWS's doing, not a stall
    assert attempt(vanished) == ("interrupted", 0)
    assert attempt(vanished, epoch_done=1) == ("interrupted", 0)  # it learned something: not a stall
    assert attempt(vanished) == ("interrupted", 0)
    assert attempt(vanished) == ("interrupted", 0)
    assert attempt(vanished) == ("retrying", 1)  # the third stalled attempt in a row counts
    assert "3 attempts in a row with no epoch finished" in st["reason"]
    assert state.after_attempt(st, n, "i-1", None) == ("relaunch", False)  # fresh instances
    assert attempt(vanished) == ("failed", 2)
    assert [a.get("stalled") for a in st["attempts"]] == [True, False, True, False, True, True, True, True]


def test_a_node_fences_itself_before_its_peers_may_call_it_lost():
    sp = spec(heartbeat_seconds=10.0, peer_timeout_seconds=60.0, stop_grace_seconds=30.0)
    # SIGTERM 40 s after its last heartbeat in S3, SIGKILL 10 s later; its peers may call it lost at 60 s.
    assert (state.fence_after(sp), state.fence_grace(sp)) == (40.0, 10.0)
    assert not state.must_fence(NOW - 39.9, NOW, sp) and state.must_fence(NOW - 40.0, NOW, sp)
    short = spec(heartbeat_seconds=1.0, peer_timeout_seconds=8.0, stop_grace_seconds=2.0)  # the multi-node tests'
    assert state.fence_after(short) + state.fence_grace(short) <= short.peer_timeout_seconds - short.heartbeat_seconds
    from ec2train.job import api

    req = api.SubmitRequest(
        "dogs", "s3://bucket/dogs", "s3://bucket/d.zip", [], peer_timeout_seconds=29, heartbeat_seconds=10
    )
    with pytest.raises(JobError, match="at least three heartbeats"):
        api._check(req)


def test_cancel_wins_over_a_late_outcome():
    st = formed([node("i-1", 1), node("i-2", 1)])
    st = state.cancelled(st, "ec2train job cancel", NOW)
    st = state.end_attempt(st, spec(), 1, {"i-1": report(1, [75], sigterm=True)}, ["i-2"], NOW)
    assert st["state"] == "cancelled" and st["attempts"][0]["outcome"] == "interrupted"
    assert state.cancelled(st, "again", NOW) is None


@pytest.mark.parametrize(
    "reports, lost, me, expected",
    [
        ({"i-1": report(1, [0]), "i-2": report(1, [0])}, [], "i-1", ("end", True)),  # rank 0 alone ends the job
        ({"i-1": report(1, [0]), "i-2": report(1, [0])}, [], "i-2", ("end", False)),
        ({"i-1": report(1, [75]), "i-2": report(1, [0], notice=True)}, [], "i-2", ("leave", False)),
        ({"i-1": report(1, [75]), "i-2": report(1, [0], notice=True)}, [], "i-1", ("continue", False)),
        ({"i-1": report(1, [1]), "i-2": report(1, [1])}, [], "i-2", ("relaunch", False)),
    ],
)
def test_what_each_runner_does_after_an_attempt(reports, lost, me, expected):
    st = formed([node("i-1", 1), node("i-2", 1)])
    st = state.end_attempt(st, spec(), 1, reports, lost, NOW)
    assert state.after_attempt(st, 1, me, reports.get(me)) == expected


def test_when_rank_0_is_lost_after_the_job_ended_a_survivor_ends_the_group():
    st = formed([node("i-1", 1), node("i-2", 1)])
    st = state.end_attempt(st, spec(max_failures=1), 1, {"i-2": report(1, [1])}, ["i-1"], NOW)
    assert st["state"] == "interrupted"  # a lost node is never a code error
    st = formed([node("i-2", 2), node("i-3", 2)], 2, st)
    st = state.end_attempt(st, spec(max_failures=1), 2, {"i-2": report(2, [1]), "i-3": report(2, [2])}, [], NOW)
    assert st["state"] == "failed" and state.after_attempt(st, 2, "i-3", None) == ("end", False)  # i-2 does
    st = formed([node("i-4", 1), node("i-5", 1)])
    st = state.end_attempt(st, spec(max_hours=1), 1, {"i-5": report(1, [0], timed_out=True)}, ["i-4"], NOW)
    assert st["state"] == "failed" and state.after_attempt(st, 1, "i-5", None) == ("end", True)


def test_out_of_time_only_between_attempts_and_progress_only_for_the_current_one():
    sp = spec(max_hours=1)
    st = state.new_status("dogs", 0, nodes=2)
    assert state.out_of_time(dict(st), sp, sp.deadline - 1) is None
    over = state.out_of_time(dict(st), sp, sp.deadline)
    assert over["state"] == "failed" and "--max-hours 1 waiting for 2 nodes" in over["reason"]
    st = formed([node("i-1", 1), node("i-2", 1)])
    assert state.out_of_time(st, sp, sp.deadline) is None  # its members stop it themselves
    st = state.progress_update(st, 1, 2, 5, NOW)
    assert (st["state"], st["epoch"], st["epochs"]) == ("running", 2, 5)
    assert state.progress_update(st, 1, 2, 5, NOW) is None and state.progress_update(st, 2, 3, 5, NOW) is None
    assert state.progress_update(st, 1, 1, 5, NOW) is None  # never goes back


# --------------------------------------------------------------------------- a node's processes


def test_nproc_per_node_is_taken_out_of_fit_and_given_to_the_runner():
    assert workers.split_nproc(["--epochs", "3", "--nproc-per-node", "4"]) == ("4", ["--epochs", "3"])
    assert workers.split_nproc(["--nproc-per-node=auto", "--lr", "0.1"]) == ("auto", ["--lr", "0.1"])
    assert workers.split_nproc(["--epochs", "3"]) == (None, ["--epochs", "3"])
    with pytest.raises(JobError, match="--nproc-per-node 'two'"):
        workers.split_nproc(["--nproc-per-node", "two"])
    assert workers.processes_per_node(None, 1, 8) == 1  # one node: as fit alone would run
    assert workers.processes_per_node(None, 2, 8) == 8  # several: every GPU
    assert workers.processes_per_node("auto", 2, 0) == 1 and workers.processes_per_node("3", 1, 8) == 3


def test_gpus_are_counted_from_their_device_files(tmp_path):
    for name in ("nvidia0", "nvidia1", "nvidiactl", "nvidia-uvm", "nvidia-caps"):
        (tmp_path / name).touch()
    assert workers.gpu_count(tmp_path) == 2


def test_worker_environments_give_each_process_its_rank_and_the_way_to_rank_0():
    envs = workers.worker_envs(
        {"PATH": "/bin", "OMP_NUM_THREADS": "4"},
        nodes=3,
        node_rank=1,
        nproc=2,
        master_addr="10.0.0.5",
        master_port=29400,
        ifname="ens5",
        efa=False,
    )
    assert [(e["RANK"], e["LOCAL_RANK"]) for e in envs] == [("2", "0"), ("3", "1")]
    e = envs[0]
    assert (e["WORLD_SIZE"], e["LOCAL_WORLD_SIZE"], e["GROUP_RANK"], e["GROUP_WORLD_SIZE"]) == ("6", "2", "1", "3")
    assert (e["MASTER_ADDR"], e["MASTER_PORT"], e["OMP_NUM_THREADS"]) == ("10.0.0.5", "29400", "4")
    # NCCL: anything but loopback and Docker (never a name like eth0); gloo cannot exclude: the interface itself
    assert (e["NCCL_SOCKET_IFNAME"], e["GLOO_SOCKET_IFNAME"], e["PATH"]) == ("^lo,docker", "ens5", "/bin")
    assert "FI_PROVIDER" not in e and e[workers.PG_TIMEOUT_ENV] == str(workers.PG_TIMEOUT_SECONDS)
    mine = workers.worker_envs(
        {"NCCL_SOCKET_IFNAME": "ens6", "OMP_NUM_THREADS": "1"},
        nodes=2,
        node_rank=0,
        nproc=1,
        master_addr="10.0.0.5",
        master_port=29400,
        ifname=None,
        efa=True,
    )[0]
    assert (mine["NCCL_SOCKET_IFNAME"], mine["OMP_NUM_THREADS"], mine["FI_PROVIDER"]) == ("ens6", "1", "efa")
    assert "GLOO_SOCKET_IFNAME" not in mine
    alone = workers.worker_envs(
        {"A": "1"}, nodes=1, node_rank=0, nproc=1, master_addr="x", master_port=1, ifname="lo", efa=False
    )
    assert alone == [{"A": "1"}]  # a plain, single-process fit


def test_the_interface_of_an_address_is_found():
    assert interface_of("127.0.0.1") == socket.if_nameindex()[0][1] or interface_of("127.0.0.1") == "lo"
    assert interface_of("192.0.2.77") is None  # TEST-NET-1: on no interface here


def test_the_runner_sets_a_shorter_process_group_timeout():
    from ec2train import ddp

    assert ddp.pg_timeout({}) == ddp.BARRIER_TIMEOUT
    assert ddp.pg_timeout({ddp.PG_TIMEOUT_ENV: "1200"}) == datetime.timedelta(minutes=20)
    assert ddp.pg_timeout({ddp.PG_TIMEOUT_ENV: "soon"}) == ddp.BARRIER_TIMEOUT
    assert workers.PG_TIMEOUT_ENV == ddp.PG_TIMEOUT_ENV


# --------------------------------------------------------------------------- status.json, compare-and-swap


def test_a_status_update_that_loses_the_race_is_applied_again_to_the_newer_status(aws):
    import json

    import boto3

    from ec2train import s3
    from ec2train.job.nodes import StatusFile

    boto3.client("s3").create_bucket(Bucket="ec2train-cas")
    prefix = s3.parse_uri("s3://ec2train-cas/dogs")
    status = StatusFile(prefix, "us-east-1")
    boto3.client("s3").put_object(Bucket="ec2train-cas", Key="dogs/_job/status.json", Body=b'{"seen": []}')
    calls = []

    def change(doc):
        calls.append(list(doc["seen"]))
        if len(calls) == 1:  # another runner writes between our read and our write
            other = {"seen": [*doc["seen"], "other"]}
            boto3.client("s3").put_object(Bucket="ec2train-cas", Key="dogs/_job/status.json", Body=json.dumps(other))
        doc["seen"].append("mine")
        return doc

    assert status.update(change)["seen"] == ["other", "mine"]
    assert calls == [[], ["other"]]  # refused once (If-Match), applied again to what the other wrote
    assert status.read()[0] == {"seen": ["other", "mine"]}
    assert status.update(lambda doc: None) == {"seen": ["other", "mine"]}  # no change: no write


def test_a_training_node_stops_when_its_attempt_is_no_longer_current_or_a_peer_ends_or_goes_silent(aws, tmp_path):
    """The runner's check at every heartbeat (runner._peer_trouble), against S3 in moto."""
    import json
    import time

    import boto3

    from ec2train import s3
    from ec2train.job import runner
    from ec2train.job.nodes import NodeFiles, StatusFile

    boto3.client("s3").create_bucket(Bucket="ec2train-fence")
    prefix = s3.parse_uri("s3://ec2train-fence/dogs")
    now = time.time()
    members = [node("i-1", 1), node("i-2", 1)]
    st = state.begin_attempt(state.new_status("dogs", 0, nodes=2), 1, members, now)
    body = json.dumps(st)
    boto3.client("s3").put_object(Bucket="ec2train-fence", Key="dogs/_job/status.json", Body=body)
    files = NodeFiles(prefix, "us-east-1")
    sp = spec(peer_timeout_seconds=60.0, stop_grace_seconds=30.0)
    me = runner.Node(sp, prefix, tmp_path, {"instance": "i-1"}, None, StatusFile(prefix, "us-east-1"), files, None)

    files.put({**node("i-2", 1, "training"), "heartbeat_at": now})
    assert runner._peer_trouble(me, 1, ["i-2"]) == (None, 0.0)
    files.put({**node("i-2", 1, "training"), "heartbeat_at": now - 61})
    assert runner._peer_trouble(me, 1, ["i-2"]) == ("i-2 is lost (no heartbeat for 60 s)", 30.0)
    files.put({**node("i-2", 1, "ended", report=report(1, [1])), "heartbeat_at": now})
    assert runner._peer_trouble(me, 1, ["i-2"]) == ("i-2 ended (exit 1)", 30.0)
    files.put({**node("i-2", 1, "ended", report=report(1, [0], notice=True)), "heartbeat_at": now})
    why, grace = runner._peer_trouble(me, 1, ["i-2"])
    assert why == "i-2 ended (exit 0)" and grace == 300.0  # 10 x the stop grace: rank 0 may still be uploading
    # Fencing: once the status no longer says attempt 1 runs (cancelled, or ended by the others),
    # this node stops at once, whatever its peers look like.
    StatusFile(prefix, "us-east-1").update(lambda s: state.cancelled(s, "ec2train job cancel", now))
    assert runner._peer_trouble(me, 1, []) == ("attempt 1 is no longer the job's current attempt (cancelled)", 0.0)


def test_a_nodes_processes_die_with_its_runner(tmp_path):
    """kill -9 of a runner leaves no training process behind to write into the prefix."""
    import os
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    runner_stand_in = (
        "import os, sys, time\n"
        "from ec2train.job import workers\n"
        "with open(sys.argv[1], 'w') as log:\n"
        "    w = workers.Workers([sys.executable, '-c', 'import time; time.sleep(120)'], [dict(os.environ)], log, '.')\n"
        "print(w.procs[0].pid, flush=True)\n"
        "time.sleep(120)\n"
    )
    parent = subprocess.Popen(
        [sys.executable, "-c", runner_stand_in, str(tmp_path / "log")], stdout=subprocess.PIPE, text=True
    )
    child = int(parent.stdout.readline())
    os.kill(child, 0)  # running
    assert os.getpgid(child) == child  # a session of its own: signalled as a group with its loader workers
    parent.send_signal(signal.SIGKILL)
    parent.wait()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            os.kill(child, 0)
        except ProcessLookupError:
            return
        if Path(f"/proc/{child}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
            return  # dead, not yet reaped by init
        time.sleep(0.05)
    os.kill(child, signal.SIGKILL)
    raise AssertionError("the training process outlived its runner")
