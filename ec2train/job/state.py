"""status.json and the pure decisions a job's runners take on it.

One attempt is one set of `nodes` instances training together (one instance for a
single-node job). The runners find each other through their node files (ec2train.job.nodes):
each registers for the next attempt; when `nodes` fresh registrations are there, one of them
writes the attempt into status.json (a conditional write: only one attempt can win), with its
members in the order of their instance ids, which is their rank order (rank 0 first). Only
the members of the current attempt train; a new attempt starts only once the current one has
ended (fencing), so one set of nodes at a time trains into the prefix.

Every change below is a function status -> new status, or None when there is nothing to
change; nodes.StatusFile.update applies it with a conditional write and applies it again to
the newer status when another runner wrote first.

An attempt ends when each member has reported how its part ended, or has gone silent (no
heartbeat for peer_timeout_seconds: lost). Its outcome (classify):

    succeeded    rank 0's fit exited 0: the model is in S3 (rank 0 ends the job)
    timed-out    --max-hours stopped it
    interrupted  a member got a spot notice or SIGTERM, vanished, fenced itself (its heartbeat
                 could not reach S3) or could not fetch the data for a passing reason (S3 or
                 the server did not answer); the job waits until the group is back to `nodes`
                 instances, then resumes from the checkpoint in S3. The STALL_LIMIT-th such
                 attempt in a row with no spot notice or SIGTERM and no epoch finished counts as
                 a failure: a node that vanishes on every boot still ends the job.
    failed       every member is alive and a fit failed (a code error), or the data cannot be
                 fetched (a permanent error): counts toward --max-failures
    lost         no member reported at all (they all vanished): counts as a failure, so a
                 runner that dies on every boot still ends the job after --max-failures
"""

from __future__ import annotations

import re
import time
from typing import Any

from ec2train.spot import EXIT_INTERRUPTED

TERMINAL = ("succeeded", "failed", "cancelled")
LOG_TAIL_LINES = 20
STALL_LIMIT = 3  # attempts in a row interrupted with nothing learned and nothing reclaimed: a failure
_EPOCH_LINE = re.compile(r"\bepoch (\d+)/(\d+):")


def iso(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


def new_status(name: str, now: float, nodes: int = 1) -> dict[str, Any]:
    return {
        "job": name,
        "state": "submitted",
        "nodes": nodes,
        "attempts": [],
        "failures": 0,
        "interruptions": 0,
        "epoch": 0,
        "epochs": None,
        "exit_code": None,
        "reason": "",
        "log_tail": [],
        "waiting": None,
        "updated_at": now,
    }


# --------------------------------------------------------------------------- nodes and members


def fresh(node: dict[str, Any] | None, now: float, timeout: float) -> bool:
    """The node's runner is alive: it wrote its heartbeat within `timeout` and has not exited."""
    if not node:
        return False
    return node.get("state") != "exited" and now - float(node.get("heartbeat_at") or 0) < timeout


def ready_nodes(nodes: list[dict[str, Any]], attempt: int, now: float, timeout: float) -> list[dict[str, Any]]:
    """The live nodes registered for `attempt`."""
    return [n for n in nodes if n.get("state") == "waiting" and n.get("attempt") == attempt and fresh(n, now, timeout)]


def choose_members(ready: list[dict[str, Any]], count: int) -> list[dict[str, Any]] | None:
    """`count` of the ready nodes (those waiting longest first), in rank order: sorted by
    instance id, so every runner that sees the same nodes picks the same ranks."""
    if len(ready) < count:
        return None
    first = sorted(ready, key=lambda n: (n.get("waiting_since") or 0, n["instance"]))[:count]
    return sorted(first, key=lambda n: n["instance"])


def current_attempt(status: dict[str, Any]) -> dict[str, Any] | None:
    attempts = status.get("attempts") or []
    return attempts[-1] if attempts and attempts[-1].get("ended_at") is None else None


def member_ids(attempt: dict[str, Any]) -> list[str]:
    return [m["instance"] for m in attempt["members"]]


def fence_grace(spec: Any) -> float:
    """A fencing node's SIGTERM-to-SIGKILL time: no longer than a heartbeat (its checkpoint cannot
    reach S3 anyway, and fit's local save is atomic), so fence_after can be long."""
    return min(spec.stop_grace_seconds, spec.heartbeat_seconds)


def fence_after(spec: Any) -> float:
    """Seconds without a heartbeat in S3 after which a training node stops its own processes
    (SIGTERM, SIGKILL fence_grace later). Its peers call it lost peer_timeout_seconds after its
    last heartbeat and may then start the next attempt without it, so its training must be gone
    by then, with a heartbeat to spare (submit keeps this at least a heartbeat: a slow write
    alone must not fence a node)."""
    return spec.peer_timeout_seconds - fence_grace(spec) - spec.heartbeat_seconds


def must_fence(last_beat: float, now: float, spec: Any) -> bool:
    """This node's last heartbeat that reached S3 is too old for it to go on training."""
    return now - last_beat >= fence_after(spec)


def report_of(node: dict[str, Any] | None, attempt: int) -> dict[str, Any] | None:
    """How the node's part of `attempt` ended, if it said."""
    report = (node or {}).get("report")
    return report if isinstance(report, dict) and report.get("attempt") == attempt else None


def settleable(
    attempt: dict[str, Any], nodes: dict[str, dict[str, Any]], now: float, timeout: float
) -> tuple[bool, dict[str, dict[str, Any]], list[str]]:
    """(every member reported or is lost, their reports, the lost members). A member is lost
    when its runner went silent, exited without a word, or moved on to another attempt."""
    reports, lost, waiting = {}, [], False
    for iid in member_ids(attempt):
        node = nodes.get(iid)
        report = report_of(node, attempt["n"])
        if report is not None:
            reports[iid] = report
        elif not fresh(node, now, timeout) or (node or {}).get("attempt") != attempt["n"]:
            lost.append(iid)
        else:
            waiting = True
    return not waiting, reports, lost


# --------------------------------------------------------------------------- changes


def begin_attempt(status: dict[str, Any], n: int, members: list[dict[str, Any]], now: float) -> dict[str, Any] | None:
    """Attempt n with these members (rank order), unless the job is over, another attempt is
    under way, or attempt n was already written (by another runner, maybe with other members)."""
    if status["state"] in TERMINAL or current_attempt(status) or len(status["attempts"]) != n - 1:
        return None
    keep = ("instance", "ip", "instance_type", "lifecycle")
    rows = [{**{k: m.get(k) for k in keep}, "rank": rank} for rank, m in enumerate(members)]
    status["attempts"].append(
        {
            "n": n,
            "members": rows,
            # rank 0's, as single-node jobs always showed them (and the cost estimate of old statuses)
            **{k: rows[0][k] for k in ("instance", "instance_type", "lifecycle")},
            "started_at": now,
            "epoch_at_start": status.get("epoch") or 0,
            "ended_at": None,
            "outcome": None,
            "exit_code": None,
            "lost": [],
        }
    )
    status.update(
        state="starting",
        reason="",
        exit_code=None,
        log_tail=[],
        waiting=None,
        updated_at=now,
        instance=rows[0]["instance"],
    )
    return status


def waiting(status: dict[str, Any], n: int, ready: list[str], count: int, now: float) -> dict[str, Any] | None:
    """Say that attempt n waits for nodes (None when that is already what it says)."""
    if status["state"] in TERMINAL or current_attempt(status):
        return None
    note = {"attempt": n, "ready": sorted(ready), "need": count}
    if status.get("waiting") == note:
        return None
    status.update(waiting=note, updated_at=now)
    if status["state"] in ("submitted", "retrying"):
        status["state"] = "starting"
    return status


def progress_update(status: dict[str, Any], n: int, done: int, total: int | None, now: float) -> dict[str, Any] | None:
    """Rank 0's epochs, read from fit's log, while attempt n runs."""
    cur = current_attempt(status)
    if cur is None or cur["n"] != n:
        return None
    epoch, epochs = max(done, status.get("epoch") or 0), total or status.get("epochs")
    if (status["state"], status.get("epoch"), status.get("epochs")) == ("running", epoch, epochs):
        return None
    status.update(state="running", epoch=epoch, epochs=epochs, updated_at=now)
    return status


def out_of_time(status: dict[str, Any], spec: Any, now: float) -> dict[str, Any] | None:
    """Past --max-hours with no attempt running: the job ends."""
    if status["state"] in TERMINAL or current_attempt(status) or now < spec.deadline:
        return None
    what = f"waiting for {spec.nodes} nodes" if spec.nodes > 1 else "before an attempt started"
    status.update(
        state="failed", reason=f"ran past --max-hours {spec.max_hours:g} {what}", waiting=None, updated_at=now
    )
    return status


def classify(attempt: dict[str, Any], reports: dict[str, dict[str, Any]], lost: list[str]) -> dict[str, Any]:
    """The attempt's outcome from its members' reports (see the module docstring)."""
    ids = member_ids(attempt)
    r0 = reports.get(ids[0])
    r0_exit = (r0.get("exit_codes") or [None])[0] if r0 else None
    gone = [i for i in ids if i in lost or (i in reports and _went_away(reports[i]))]
    failing = [reports[i] for i in ids if i in reports and reports[i].get("exit_code") not in (0, EXIT_INTERRUPTED)]
    first = min(failing, key=lambda r: r.get("failed_at") or float("inf")) if failing else None
    if any(r.get("timed_out") for r in reports.values()):
        outcome = "timed-out"
    elif r0_exit == 0:
        outcome = "succeeded"
    elif not reports:
        outcome = "lost"
    elif gone or r0_exit == EXIT_INTERRUPTED:
        outcome = "interrupted"
    else:
        outcome = "failed"
    blame = first if outcome == "failed" and first else r0
    return {
        "outcome": outcome,
        "lost": gone if outcome in ("interrupted", "lost") else [],
        "exit_code": blame.get("exit_code") if blame else None,
        "error": (blame or {}).get("error"),
        "log_tail": list((blame or {}).get("log_tail") or [])[-LOG_TAIL_LINES:],
        "exit_codes": {i: r.get("exit_codes") for i, r in reports.items()},
    }


def _went_away(report: dict[str, Any]) -> bool:
    """The member's part ended for a reason outside the code: its instance is going away, it
    fenced itself, or the data could not be fetched for now."""
    return bool(report.get("notice") or report.get("sigterm") or report.get("fenced") or report.get("unavailable"))


def _why_lost(reports: dict[str, dict[str, Any]], gone: list[str]) -> str:
    parts = []
    for i in gone:
        r = reports.get(i) or {}
        if r.get("notice") or r.get("sigterm"):
            why = "spot notice" if r.get("notice") else "SIGTERM"
        elif r.get("fenced"):
            why = "fenced itself: its heartbeat could not reach S3"
        elif r.get("unavailable"):
            why = f"could not fetch the data: {r['unavailable']}"
        else:
            why = "no heartbeat"
        parts.append(f"{i} ({why})")
    return ", ".join(parts)


def stall_streak(status: dict[str, Any], n: int) -> int:
    """How many attempts in a row, ending with attempt n, stalled: interrupted without a spot
    notice or SIGTERM (a node vanished, fenced itself or could not fetch the data) and with no
    epoch finished during them."""
    streak = 0
    for a in reversed(status["attempts"][:n]):
        if not a.get("stalled"):
            break
        streak += 1
    return streak


def _stalled(attempt: dict[str, Any], reports: dict[str, dict[str, Any]], epoch: int) -> bool:
    reclaimed = any(r.get("notice") or r.get("sigterm") for r in reports.values())
    return not reclaimed and "epoch_at_start" in attempt and epoch <= attempt["epoch_at_start"]


def end_attempt(
    status: dict[str, Any], spec: Any, n: int, reports: dict[str, dict[str, Any]], lost: list[str], now: float
) -> dict[str, Any] | None:
    """Record attempt n's outcome and what the job does next (None: already recorded)."""
    if len(status["attempts"]) < n or status["attempts"][n - 1].get("ended_at") is not None:
        return None
    attempt = status["attempts"][n - 1]
    got = classify(attempt, reports, lost)
    outcome = got["outcome"]
    attempt.update(
        ended_at=now, outcome=outcome, exit_code=got["exit_code"], lost=got["lost"], exit_codes=got["exit_codes"]
    )
    status.update(exit_code=got["exit_code"], log_tail=got["log_tail"], updated_at=now)
    if status["state"] in TERMINAL:  # cancelled meanwhile: keep it
        return status
    if outcome == "succeeded":
        status.update(state="succeeded", reason="")
    elif outcome == "timed-out":
        status.update(state="failed", reason=f"ran past --max-hours {spec.max_hours:g}; training was stopped")
    elif outcome == "interrupted":
        status["interruptions"] += 1
        who = _why_lost(reports, got["lost"])
        attempt["stalled"] = _stalled(attempt, reports, status.get("epoch") or 0)
        streak = stall_streak(status, n)
        if streak < STALL_LIMIT:
            status.update(
                state="interrupted",
                reason=(f"lost {who}; " if who else "stopped by SIGTERM; ")
                + f"resumes from the checkpoint in S3 when {spec.nodes} node{'s are' if spec.nodes > 1 else ' is'} ready",
            )
            return status
        _count_failure(status, spec, f"lost {who}, {streak} attempts in a row with no epoch finished")
    else:
        if outcome == "lost":
            what = "every node of the attempt vanished without a word"
        elif got["exit_code"] is not None:
            what = f"fit exited {got['exit_code']}"
        else:
            what = f"the attempt could not start fit ({got['error'] or 'see the log'})"
        _count_failure(status, spec, what)
    return status


def _count_failure(status: dict[str, Any], spec: Any, what: str) -> None:
    """One more failed attempt: the job retries on new instances or, at --max-failures, ends."""
    status["failures"] += 1
    if status["failures"] >= spec.max_failures:
        status.update(
            state="failed",
            reason=f"{what}; {status['failures']} failed attempts (--max-failures {spec.max_failures})",
        )
    else:
        status.update(
            state="retrying",
            reason=f"{what}; attempt {status['failures'] + 1} of {spec.max_failures} starts on new instances",
        )


def after_attempt(status: dict[str, Any], n: int, me: str, report: dict[str, Any] | None) -> tuple[str, bool]:
    """What this runner does once attempt n is recorded: (decision, set the group to 0?).

    end       the job is over; rank 0 ends the group (the others, if rank 0 never reported)
    leave     this instance got a spot notice or SIGTERM: AWS takes it, the group replaces it
    relaunch  a failed attempt with attempts left: power off, the group starts fresh instances
    continue  another node was lost: wait for the group to be whole again and train on
    """
    attempt = status["attempts"][n - 1]
    rank0 = member_ids(attempt)[0]
    if status["state"] in TERMINAL:  # rank 0 ends the group; if it never reported, the others do
        return "end", me == rank0 or rank0 not in (attempt.get("exit_codes") or {})
    if report and (report.get("notice") or report.get("sigterm")):
        return "leave", False
    if status["state"] == "retrying":
        return "relaunch", False
    return "continue", False


def progress(log_text: str) -> tuple[int, int | None]:
    """(epochs done, epochs asked) from fit's output: its `epoch N/M:` lines."""
    found = _EPOCH_LINE.findall(log_text)
    if not found:
        return 0, None
    done, total = found[-1]
    return int(done), int(total)


def cancelled(status: dict[str, Any], reason: str, now: float) -> dict[str, Any] | None:
    if status["state"] in TERMINAL:
        return None
    status.update(state="cancelled", reason=reason, waiting=None, updated_at=now)
    return status
