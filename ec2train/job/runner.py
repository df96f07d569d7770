"""The job runner: started on each instance by its user data, one per instance.

    python -m ec2train.job.runner --job-uri s3://bucket/prefix --workdir /opt/ec2train-job

It reads job.json, learns who it is from IMDSv2 (instance id, private IP, type, spot or not)
and loops:

1. The job is over (succeeded, failed, cancelled, past --max-hours)? Set the group to 0 (a
   late instance of a finished job) and exit.
2. An attempt is under way without this instance (capacity rebalancing brought it early)?
   Wait; if every member of that attempt has gone silent, record its end (ec2train.job.state).
3. Register for the next attempt (its node file, ec2train.job.nodes) and wait until `nodes`
   live instances have; one of them writes the attempt into status.json, with the members'
   ranks in the order of their instance ids. Rank 0's private IP is where the c10d store opens.
4. Train: fetch the data once per instance (a passing error is retried, then interrupts the
   attempt), start this node's fit processes (ec2train.job.workers) with --resume auto
   --s3-uri, so every attempt continues from the last checkpoint in S3. While they run, beat,
   mirror the log, and watch: a local process that fails, another member that reports its end
   or goes silent for peer_timeout_seconds, stops this node's training (SIGTERM, SIGKILL after
   stop_grace_seconds) instead of leaving it in a collective that would wait out its timeout.
   --max-hours stops it too, and so does the node itself when its heartbeat has not reached S3
   for state.fence_after seconds (fencing: its peers will soon call it lost).
5. Report how this node's part ended, wait until every member has (or is lost), record the
   attempt's outcome, then: the job is over (rank 0 sets the group to 0), this instance is
   going away (spot notice, SIGTERM: exit 75), a failed attempt is retried on new instances
   (exit 3: the user data powers off), or, when another node was lost, go back to 3.

Exit status: 0 job over, 75 this instance is being taken (leave the group alone), 3 relaunch,
2 bad setup.
"""

from __future__ import annotations

import argparse
import functools
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ec2train import aws, s3
from ec2train.errors import UserError, first_line
from ec2train.job import state, workers
from ec2train.job.nodes import Heartbeat, NodeFiles, StatusFile
from ec2train.job.spec import JobSpec, get_text, job_file
from ec2train.netif import interface_of
from ec2train.spot import EXIT_INTERRUPTED, Imds

EXIT_RELAUNCH = 3
STOP_GRACE_SECONDS = 110.0  # SIGTERM lets fit finish its step and upload; AWS gives spot 120 s
EXIT_FOR = {"end": 0, "leave": EXIT_INTERRUPTED, "relaunch": EXIT_RELAUNCH}
META = "/latest/meta-data/"
PROCESS_POLL_SECONDS = 0.1
# A data fetch that fails for a passing reason is tried again, waiting twice as long each time
# (up to a minute), for this long at most: the other nodes' fit processes wait for this one at
# the rendezvous, within the process group's timeout (workers.PG_TIMEOUT_SECONDS).
FETCH_FIRST_WAIT_SECONDS = 5.0
FETCH_RETRY_SECONDS = 600.0


def instance_facts(imds: Imds) -> dict[str, str]:
    """Who this instance is, from IMDSv2: id, private IP, type, spot or on-demand, and its group
    (instance tags in IMDS; the launch template enables them)."""
    facts = {
        "instance": imds.get(META + "instance-id") or "?",
        "ip": imds.get(META + "local-ipv4") or "127.0.0.1",
        "instance_type": imds.get(META + "instance-type") or "?",
        "lifecycle": imds.get(META + "instance-life-cycle") or "on-demand",
    }
    group = imds.get(META + "tags/instance/aws:autoscaling:groupName")
    if group:
        facts["group"] = group
    return facts


@dataclass
class Node:
    """This instance's runner: who it is, the job, and its handles on S3."""

    spec: JobSpec
    prefix: s3.S3Uri
    workdir: Path
    facts: dict[str, str]
    imds: Imds
    status: StatusFile
    files: NodeFiles
    beat: Heartbeat
    clock: Callable[[], float] = time.time
    grace: float = STOP_GRACE_SECONDS
    sigterm: bool = False
    data: Path | None = None
    attempt_n: int = 1  # the attempt this runner's log lines go to
    _synced: dict[str, float] = field(default_factory=dict)
    _unsent: dict[Path, s3.S3Uri] = field(default_factory=dict)

    @property
    def me(self) -> str:
        return self.facts["instance"]

    @property
    def poll(self) -> float:
        return max(0.2, self.spec.heartbeat_seconds)

    @property
    def log_path(self) -> Path:
        return self.workdir / f"attempt-{self.attempt_n:03d}.log"

    @property
    def log_uri(self) -> s3.S3Uri:
        return job_file(self.prefix, f"logs/attempt-{self.attempt_n:03d}-{self.me}.log")

    def say(self, line: str) -> None:
        with open(self.log_path, "a", encoding="utf-8") as f:
            f.write(f"[runner {state.iso(self.clock())}] {line}\n")

    def log_text(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace") if self.log_path.exists() else ""

    def upload_log(self) -> None:
        """This attempt's log to S3, and any earlier one whose last upload failed (a node that
        fenced itself says so once S3 answers again)."""
        if self.log_path.exists():
            self._unsent[self.log_path] = self.log_uri
        for path, uri in list(self._unsent.items()):
            try:
                s3.upload_file(path, uri)
                del self._unsent[path]
            except s3.S3Error as exc:  # the next sync tries again; the log stays on disk
                if exc.permanent:
                    raise

    def read_status(self) -> dict[str, Any]:
        doc = self.status.read()[0]
        if doc is None:
            raise UserError(f"no status.json under {self.prefix}/_job/: was the job submitted with this --s3-uri?")
        return doc

    def group(self) -> str:
        return self.facts.get("group") or self.spec.group

    def end_group(self) -> None:
        self.say(f"setting the desired capacity of {self.group()} to 0: the job is over")
        aws.client("autoscaling", region=self.spec.region).set_desired_capacity(
            AutoScalingGroupName=self.group(), DesiredCapacity=0, HonorCooldown=False
        )

    def every(self, name: str, seconds: float) -> bool:
        """True at most once per `seconds` for `name`."""
        now = time.monotonic()
        if now - self._synced.get(name, -1e9) >= seconds:
            self._synced[name] = now
            return True
        return False


# --------------------------------------------------------------------------- the loop


def _loop(r: Node) -> int:
    while True:
        try:
            code = _step(r)
        except s3.S3Error as exc:
            if exc.permanent:
                raise
            r.say(f"S3 did not answer ({exc}); trying again")  # the peers allow for a few silent beats
            time.sleep(r.poll)
            continue
        if code is not None:
            return code


def _step(r: Node) -> int | None:
    """One turn of the loop (see the module docstring); an exit status, or None to go on."""
    st = r.read_status()
    if st["state"] in state.TERMINAL:
        r.say(f"the job is {st['state']}: nothing to train")
        r.end_group()  # a late instance of a finished job: the group must stay at 0
        return 0
    if r.sigterm:
        r.say("SIGTERM while waiting: this instance is going away")
        return EXIT_INTERRUPTED
    cur = state.current_attempt(st)
    if cur is not None and r.me not in state.member_ids(cur):
        _await(r, cur)
        return None
    mine = (r.beat.doc.get("attempt"), r.beat.doc.get("state"))
    if cur is not None and mine == (cur["n"], "waiting"):
        decision = _attempt(r, cur)  # another member wrote it while this runner waited for it
    elif cur is not None and mine == (cur["n"], "ended"):
        decision = _finish(r, cur, r.beat.doc["report"])  # S3 failed while it settled: again
    elif cur is not None:  # ours, but this runner never started it: it restarted, its training is gone
        r.attempt_n = cur["n"]
        decision = _finish(r, cur, _report(cur["n"], stopped_by="the runner restarted", sigterm=r.sigterm))
    elif r.status.update(lambda s: state.out_of_time(s, r.spec, r.clock()))["state"] in state.TERMINAL:
        return None  # the next turn ends it
    elif (attempt := _join(r, st)) is None:
        time.sleep(r.poll)
        return None
    else:
        decision = _attempt(r, attempt)
    return None if decision == "continue" else EXIT_FOR[decision]


def _await(r: Node, cur: dict[str, Any]) -> None:
    """An attempt runs without us: wait for the next one, and record this one's end if every
    member has gone silent without a word (no runner of theirs is left to do it)."""
    r.attempt_n = cur["n"] + 1
    if r.beat.doc.get("attempt") != cur["n"] + 1:
        r.say(f"attempt {cur['n']} runs on {', '.join(state.member_ids(cur))}: waiting for the next one")
        r.beat.set(state="waiting", attempt=cur["n"] + 1, rank=None, waiting_since=r.clock())
    ready, reports, lost = state.settleable(
        cur, r.files.some(state.member_ids(cur)), r.clock(), r.spec.peer_timeout_seconds
    )
    if ready:
        r.say(f"attempt {cur['n']}: {', '.join(lost) or 'its members'} went silent; recording its end")
        r.status.update(lambda s: state.end_attempt(s, r.spec, cur["n"], reports, lost, r.clock()))
    else:
        time.sleep(r.poll)


def _join(r: Node, st: dict[str, Any]) -> dict[str, Any] | None:
    """Register for the next attempt; write it into the status once enough nodes are ready.
    Returns the attempt when it has formed with this instance in it."""
    n = len(st["attempts"]) + 1
    r.attempt_n = n
    if r.beat.doc.get("attempt") != n or r.beat.doc.get("state") != "waiting":
        r.say(f"ready for attempt {n}; waiting for {r.spec.nodes} node{'s' if r.spec.nodes > 1 else ''}")
        r.beat.set(state="waiting", attempt=n, rank=None, waiting_since=r.clock())
    now = r.clock()
    horizon = now - 2 * r.spec.peer_timeout_seconds  # skip long-dead nodes' files without reading them
    ready = state.ready_nodes(list(r.files.all(newer_than=horizon).values()), n, now, r.spec.peer_timeout_seconds)
    members = state.choose_members(ready, r.spec.nodes)
    if members is None or r.me not in [m["instance"] for m in members]:
        r.status.update(lambda s: state.waiting(s, n, [x["instance"] for x in ready], r.spec.nodes, r.clock()))
        return None
    st = r.status.update(lambda s: state.begin_attempt(s, n, members, r.clock()))
    cur = state.current_attempt(st)
    return cur if cur is not None and cur["n"] == n and r.me in state.member_ids(cur) else None


# --------------------------------------------------------------------------- one attempt


def _attempt(r: Node, att: dict[str, Any]) -> str:
    n, rank = att["n"], state.member_ids(att).index(r.me)
    r.attempt_n = n
    r.say(
        f"attempt {n}: rank {rank} of {len(att['members'])} on {r.facts}; rank 0 is {att['members'][0]['instance']} "
        f"at {att['members'][0]['ip']}:{r.spec.rdzv_port}"
    )
    r.beat.set(state="training", attempt=n, rank=rank, report=None)
    report = _train(r, att, rank)
    codes = report["exit_codes"]
    r.say(f"fit ended: exit {codes[0] if len(codes) == 1 else codes} ({report['stopped_by'] or 'by itself'})")
    if report["notice"] or report["sigterm"]:
        r.say(f"this instance is going away ({'a spot interruption notice' if report['notice'] else 'SIGTERM'})")
    if rank == 0:
        _progress(r, n)
    return _finish(r, att, report)


def _report(n: int, **fields: Any) -> dict[str, Any]:
    """How this node's part of attempt n ended (its node file carries it to the others)."""
    base = {"attempt": n, "exit_codes": [None], "exit_code": None, "notice": False, "sigterm": False}
    # fenced: it stopped itself, S3 out of reach; unavailable / error: why fit could not start,
    # a passing trouble (the attempt is interrupted) or not (it failed).
    extra = {"fenced": False, "unavailable": None, "error": None}
    return {**base, **extra, "timed_out": False, "stopped_by": None, "failed_at": None, **fields}


def _finish(r: Node, att: dict[str, Any], report: dict[str, Any]) -> str:
    """Report, wait for the others' reports, record the outcome; what this runner does next."""
    n = att["n"]
    report["log_tail"] = r.log_text().splitlines()[-state.LOG_TAIL_LINES :]
    r.beat.set(state="ended", attempt=n, report=report)
    r.upload_log()
    st = _settle(r, att)
    a = st["attempts"][n - 1]
    r.say(f"attempt {n}: {a['outcome']}; the job is {st['state']} {st.get('reason') or ''}".rstrip())
    decision, end_group = state.after_attempt(st, n, r.me, report)
    if end_group:
        r.end_group()
    r.upload_log()
    return decision


def _settle(r: Node, att: dict[str, Any]) -> dict[str, Any]:
    """Wait until every member has reported or is lost (bounded by peer_timeout_seconds), then
    record the attempt's outcome, unless another member already did."""
    n, ids = att["n"], state.member_ids(att)
    while True:
        st = r.read_status()
        if st["attempts"][n - 1].get("ended_at") is not None:
            return st
        ready, reports, lost = state.settleable(
            st["attempts"][n - 1], r.files.some(ids), r.clock(), r.spec.peer_timeout_seconds
        )
        if ready:
            return r.status.update(functools.partial(_record_end, r, n, reports, lost))
        time.sleep(r.poll)


def _record_end(r: Node, n: int, reports: dict[str, Any], lost: list[str], status: dict[str, Any]) -> dict | None:
    return state.end_attempt(status, r.spec, n, reports, lost, r.clock())


def _progress(r: Node, n: int) -> None:
    done, total = state.progress(r.log_text())
    try:
        r.status.update(lambda s: state.progress_update(s, n, done, total, r.clock()))
    except s3.S3Error as exc:
        if exc.permanent:
            raise
        r.say(f"status update failed ({exc}); trying again at the next sync")


def _fetch_data(r: Node) -> Path:
    """The data set, fetched once per instance (a later attempt, or a restarted runner, finds it
    in place and skips even importing the data module: torch, seconds of CPU)."""
    dest = r.workdir / "data"
    if r.data is None and all((dest / split).is_dir() for split in ("train", "valid", "test")):
        r.say(f"data: {dest} is in place")
        r.data = dest
    if r.data is None:
        from ec2train.data import fetch_dataset

        r.say(f"data: {r.spec.data} -> {dest} (once per instance)")
        r.data = _retrying(r, lambda: fetch_dataset(r.spec.data, dest))
    return r.data


def transient(exc: BaseException) -> bool:
    """A fetch error that asking again may cure: S3 or the network did not answer, the server
    said 5xx, the connection broke off (the next try resumes the partial download)."""
    from ec2train.data.fetch import DownloadInterrupted

    return isinstance(exc, DownloadInterrupted) or (isinstance(exc, s3.S3Error) and not exc.permanent)


def _retrying(r: Node, fetch: Callable[[], Path]) -> Path:
    """fetch(), tried again with backoff while its error is transient, for FETCH_RETRY_SECONDS at
    most and never past --max-hours or a SIGTERM; then its last error is raised."""
    give_up, wait = time.monotonic() + FETCH_RETRY_SECONDS, FETCH_FIRST_WAIT_SECONDS
    while True:
        try:
            return fetch()
        except UserError as exc:
            left = min(give_up - time.monotonic(), r.spec.deadline - r.clock())
            if not transient(exc) or r.sigterm or left <= wait:
                raise
            r.say(f"data: {first_line(exc)}; trying again in {wait:g} s")
            end = time.monotonic() + wait
            while time.monotonic() < end and not r.sigterm:
                time.sleep(min(PROCESS_POLL_SECONDS, wait))
            wait = min(2 * wait, 60.0)


def fit_command(spec: JobSpec, args: list[str], workdir: Path, data: Path, lifecycle: str) -> list[str]:
    """fit with the job's arguments and this instance's folders. On a spot instance the runner
    has just heard IMDS answer, so fit watches for the notice with --spot-watch on (auto would
    switch the watcher off when a loaded instance answers its first request late); a
    --spot-watch in the job's own arguments wins."""
    watch = ["--spot-watch", "on"] if lifecycle == "spot" and not _has_option(args, "--spot-watch") else []
    return [
        sys.executable,
        "-m",
        "ec2train",
        "fit",
        *args,
        *watch,
        "--data",
        str(data),
        "--output",
        str(workdir / "output"),
        "--logdir",
        str(workdir / "runs"),
        "--resume",
        "auto",
        "--s3-uri",
        spec.s3_uri,
    ]


def _has_option(args: list[str], name: str) -> bool:
    return any(a == name or a.startswith(name + "=") for a in args)


def _start(r: Node, att: dict[str, Any], rank: int, data: Path, log: Any) -> workers.Workers:
    nproc_value, args = workers.split_nproc(r.spec.fit_args)
    nproc = workers.processes_per_node(nproc_value, r.spec.nodes, workers.gpu_count())
    base = {**os.environ, "PYTHONUNBUFFERED": "1", "COLUMNS": "200"}  # one line per epoch, unwrapped
    if nproc > 1:  # each process's share of the cores, as fit --nproc-per-node gives it (torch: imported here only)
        from ec2train.threads import launch_env

        base = launch_env(nproc, base)
    envs = workers.worker_envs(
        base,
        nodes=r.spec.nodes,
        node_rank=rank,
        nproc=nproc,
        master_addr=att["members"][0]["ip"],
        master_port=r.spec.rdzv_port,
        ifname=interface_of(r.facts["ip"]),
        efa=r.spec.efa,
    )
    cmd = fit_command(r.spec, args, r.workdir, data, r.facts.get("lifecycle", ""))
    r.say("running: " + " ".join(cmd[1:]) + (f"  ({len(envs)} processes)" if len(envs) > 1 else ""))
    return workers.Workers(cmd, envs, log, r.workdir)


def _train(r: Node, att: dict[str, Any], rank: int) -> dict[str, Any]:
    """This node's part of the attempt: fit's processes, watched until they end. Returns its report."""
    report = _report(att["n"])
    try:
        data = _fetch_data(r)
    except UserError as exc:
        r.say(f"could not start fit: {exc}")
        # A passing trouble interrupts the attempt (the next one fetches again); only the rest counts.
        kind = "unavailable" if transient(exc) else "error"
        return {**report, kind: first_line(exc), "sigterm": r.sigterm, "timed_out": r.clock() >= r.spec.deadline}
    if state.must_fence(r.beat.last_ok, r.clock(), r.spec):  # the peers may be about to call it lost
        why = f"no heartbeat reached S3 for {r.clock() - r.beat.last_ok:.0f} s: not starting fit (this node fenced itself)"
        r.say(why)
        return {**report, "fenced": True, "stopped_by": why, "sigterm": r.sigterm}
    with open(r.log_path, "a", encoding="utf-8") as log:
        procs = _start(r, att, rank, data, log)
    previous = signal.signal(signal.SIGTERM, lambda *_: _on_sigterm(r, procs))
    try:
        _watch(r, att, procs, report)
    finally:
        signal.signal(signal.SIGTERM, previous)
        procs.signal(signal.SIGKILL)  # whatever is left (the runner itself is failing)
    return {
        **report,
        "exit_codes": procs.exit_codes,
        "exit_code": procs.exit_code,
        "failed_at": procs.failed_at,
        "notice": _noticed(r),
        "sigterm": r.sigterm,
    }


def _on_sigterm(r: Node, procs: workers.Workers) -> None:
    """Instance shutdown (scale-in, cancel, the spot reclaim itself): fit saves and stops."""
    r.sigterm = True
    procs.signal(signal.SIGTERM)


def _noticed(r: Node) -> bool:
    if r.facts.get("lifecycle") != "spot":
        return False
    try:
        return r.imds.instance_action() is not None
    except OSError:
        return False


def _watch(r: Node, att: dict[str, Any], procs: workers.Workers, report: dict[str, Any]) -> None:
    """Until this node's processes end: stop them when one of them fails, at --max-hours, when
    the attempt is no longer the current one, or when another member ended or went silent; sync
    log and progress. A thread of its own fences the node meanwhile (_fence)."""
    n, acted = att["n"], set()
    peers = [i for i in state.member_ids(att) if i != r.me]
    done = threading.Event()
    fence = threading.Thread(target=_fence, args=(r, procs, report, done), name="ec2train-fence", daemon=True)
    fence.start()
    try:
        while not procs.poll():  # poll() also SIGKILLs what outlives a stop's grace
            time.sleep(PROCESS_POLL_SECONDS)
            if procs.failure is not None and not procs.stopping and "failure" not in acted:
                # Its siblings would wait for it in their next collective (NCCL: until the process
                # group's timeout), and the peers only hear of it from this node's report.
                acted.add("failure")
                rank, code = procs.failure
                grace = r.grace if r.sigterm else r.spec.stop_grace_seconds  # shutting down: rank 0 may be uploading
                _stop(r, report, procs, f"local rank {rank} exited {code}", grace)
            if r.clock() >= r.spec.deadline and "deadline" not in acted:
                acted.add("deadline")
                r.say(f"--max-hours {r.spec.max_hours:g} reached")
                report["timed_out"] = True
                _stop(r, report, procs, "--max-hours", r.grace)
            if not procs.stopping and r.every("peers", r.spec.heartbeat_seconds):
                why, grace = _peer_trouble(r, n, peers)
                if why:  # a peer failed or vanished: our collectives cannot finish (else: they end by themselves)
                    _stop(r, report, procs, why, grace, term=grace <= r.spec.stop_grace_seconds)
            if r.every("sync", r.spec.sync_seconds):
                if att["members"][0]["instance"] == r.me:
                    _progress(r, n)
                r.upload_log()
    finally:
        done.set()
        fence.join()


def _stop(r: Node, report: dict[str, Any], procs: workers.Workers, why: str, grace: float, term: bool = True) -> None:
    r.say(f"stopping this node's training: {why}")
    report["stopped_by"] = why
    procs.stop(grace, term=term)


def _fence(r: Node, procs: workers.Workers, report: dict[str, Any], done: threading.Event) -> None:
    """Stop this node's training once its last heartbeat in S3 is state.fence_after seconds old:
    its peers will soon call it lost and may start the next attempt without it, and only one set
    of nodes may train into the prefix. A thread of its own, because the watch loop's S3 calls
    can block longer than that when S3 does not answer; it delivers a stop's SIGKILL on time too."""
    while not done.wait(PROCESS_POLL_SECONDS):
        if procs.poll():
            return
        if not report.get("fenced") and state.must_fence(r.beat.last_ok, r.clock(), r.spec):
            report["fenced"] = True
            why = f"no heartbeat reached S3 for {r.clock() - r.beat.last_ok:.0f} s: this node fenced itself"
            _stop(r, report, procs, why, state.fence_grace(r.spec))


def _peer_trouble(r: Node, n: int, peers: list[str]) -> tuple[str | None, float]:
    """Why this node must stop (and how long it may take to stop by itself), or (None, 0)."""
    try:
        st = r.read_status()
        cur = state.current_attempt(st)
        if st["state"] in state.TERMINAL or cur is None or cur["n"] != n:
            return f"attempt {n} is no longer the job's current attempt ({st['state']})", 0.0
        if not peers:
            return None, 0.0
        nodes, now = r.files.some(peers), r.clock()
    except s3.S3Error as exc:
        if exc.permanent:
            raise
        return None, 0.0  # S3 hiccup: look again at the next beat
    for peer in peers:
        report = state.report_of(nodes.get(peer), n)
        if report is not None:
            code = report.get("exit_code")
            clean = code in (0, EXIT_INTERRUPTED) and not report.get("timed_out")
            # A clean end (fit finished, or every rank agreed to stop): this node's processes end by
            # themselves, rank 0 maybe after uploading its checkpoint or model; a bound all the same.
            patience = max(r.grace, 10 * r.spec.stop_grace_seconds)
            return f"{peer} ended (exit {code})", patience if clean else r.spec.stop_grace_seconds
        if not state.fresh(nodes.get(peer), now, r.spec.peer_timeout_seconds):
            return f"{peer} is lost (no heartbeat for {r.spec.peer_timeout_seconds:g} s)", r.spec.stop_grace_seconds
    return None, 0.0


# --------------------------------------------------------------------------- entry points


def run_job(
    job_uri: str,
    workdir: str | Path,
    *,
    imds_endpoint: str | None = None,
    clock: Callable[[], float] = time.time,
    grace: float = STOP_GRACE_SECONDS,
) -> int:
    """One instance's part of a job; returns the exit status the user data acts on."""
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    prefix = s3.parse_uri(job_uri.rstrip("/"))
    text = get_text(job_file(prefix, "job.json"))
    if text is None:
        raise UserError(f"no job.json under {prefix}/_job/: was the job submitted with this --s3-uri?")
    spec = JobSpec.from_json(text)
    imds = Imds(imds_endpoint)
    facts = instance_facts(imds)
    files = NodeFiles(prefix, spec.region)
    doc = {**facts, "started_at": clock(), "state": "starting", "attempt": None, "rank": None, "report": None}
    beat = Heartbeat(files, doc, spec.heartbeat_seconds, clock)
    r = Node(spec, prefix, workdir, facts, imds, StatusFile(prefix, spec.region), files, beat, clock, grace)
    previous = signal.signal(signal.SIGTERM, lambda *_: setattr(r, "sigterm", True))
    try:
        with beat:
            try:
                return _loop(r)
            finally:
                beat.set(state="exited", exited_at=clock())
                r.upload_log()
    finally:
        signal.signal(signal.SIGTERM, previous)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m ec2train.job.runner", description="Run this instance's part of an ec2train job."
    )
    parser.add_argument("--job-uri", required=True, help="the job's S3 prefix (its _job/job.json is read)")
    parser.add_argument("--workdir", default="/opt/ec2train-job", help="local folder for data, outputs and logs")
    args = parser.parse_args(argv)
    try:
        return run_job(args.job_uri, args.workdir)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
