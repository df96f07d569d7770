"""status.json: a job's state and its attempts, and the pure decisions the runner takes on it.

One attempt is one instance's run of `fit`. The runner starts one with `begin_attempt` and ends
it with `end_attempt`; both return the new status and what to do with the Auto Scaling group:

    end        the job is over (succeeded, failed, past --max-hours): desired capacity -> 0
    leave      a spot notice stopped fit (exit 75): AWS replaces the instance, the next
               runner resumes from the checkpoint in S3
    relaunch   a failed attempt with attempts left: power off, the group starts a new instance
    run        (begin only) go ahead and train

An attempt that a later runner finds unfinished (its instance vanished without a word) counts
as a failure, so a runner that crashes on every boot still ends after --max-failures.
"""

from __future__ import annotations

import re
import time
from typing import Any

from ec2train.spot import EXIT_INTERRUPTED

TERMINAL = ("succeeded", "failed", "cancelled")
LOG_TAIL_LINES = 20
# A previous attempt whose status is fresher than this is still alive (capacity rebalancing
# starts the replacement before the old instance is gone): wait for it rather than race it.
STALE_SECONDS = 180.0
_EPOCH_LINE = re.compile(r"\bepoch (\d+)/(\d+):")


def iso(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


def new_status(name: str, now: float) -> dict[str, Any]:
    return {
        "job": name,
        "state": "submitted",
        "attempts": [],
        "failures": 0,
        "interruptions": 0,
        "epoch": 0,
        "epochs": None,
        "exit_code": None,
        "reason": "",
        "log_tail": [],
        "updated_at": now,
    }


def previous_alive(status: dict[str, Any], instance: str, now: float, stale_seconds: float = STALE_SECONDS) -> bool:
    """Another instance's attempt is unfinished and wrote its status recently."""
    attempts = status.get("attempts") or []
    if not attempts or attempts[-1].get("ended_at") is not None or attempts[-1].get("instance") == instance:
        return False
    return now - float(status.get("updated_at") or 0) < stale_seconds


def _end(status: dict[str, Any], state: str, reason: str, now: float) -> tuple[dict[str, Any], str]:
    status.update(state=state, reason=reason, updated_at=now)
    return status, "end"


def begin_attempt(
    status: dict[str, Any], spec: Any, instance: dict[str, str], now: float
) -> tuple[dict[str, Any], str]:
    """A new instance's runner starts: run, or end the job (already over, too many failures, too late)."""
    if status["state"] in TERMINAL:
        return status, "end"  # a late replacement of a finished job: just make sure the group is at 0
    attempts = status["attempts"]
    if attempts and attempts[-1].get("ended_at") is None:
        lost = attempts[-1]
        lost.update(ended_at=now, outcome="lost", exit_code=None)
        status["failures"] += 1
    if status["failures"] >= spec.max_failures:
        return _end(status, "failed", f"{status['failures']} failed attempts (--max-failures {spec.max_failures})", now)
    if now >= spec.deadline:
        return _end(status, "failed", f"ran past --max-hours {spec.max_hours:g}", now)
    attempts.append(
        {"n": len(attempts) + 1, **instance, "started_at": now, "ended_at": None, "outcome": None, "exit_code": None}
    )
    status.update(
        state="starting", reason="", exit_code=None, log_tail=[], updated_at=now, instance=instance.get("instance")
    )
    return status, "run"


def end_attempt(
    status: dict[str, Any], spec: Any, exit_code: int | None, log_tail: list[str], now: float, timed_out: bool = False
) -> tuple[dict[str, Any], str]:
    """fit ended with exit_code (None: it could not start, e.g. the data fetch failed)."""
    attempt = status["attempts"][-1]
    status.update(exit_code=exit_code, log_tail=log_tail[-LOG_TAIL_LINES:], updated_at=now)
    if timed_out:
        attempt.update(ended_at=now, outcome="timed-out", exit_code=exit_code)
        return _end(status, "failed", f"ran past --max-hours {spec.max_hours:g}; fit was stopped", now)
    if exit_code == 0:
        attempt.update(ended_at=now, outcome="succeeded", exit_code=0)
        return _end(status, "succeeded", "", now)
    if exit_code == EXIT_INTERRUPTED:
        attempt.update(ended_at=now, outcome="interrupted", exit_code=exit_code)
        status["interruptions"] += 1
        status.update(state="interrupted", reason="spot interruption notice; the replacement resumes from S3")
        return status, "leave"
    attempt.update(ended_at=now, outcome="failed", exit_code=exit_code)
    status["failures"] += 1
    what = f"fit exited {exit_code}" if exit_code is not None else "the attempt could not start fit"
    if status["failures"] >= spec.max_failures:
        return _end(
            status, "failed", f"{what}; {status['failures']} failed attempts (--max-failures {spec.max_failures})", now
        )
    status.update(
        state="retrying",
        reason=f"{what}; attempt {status['failures'] + 1} of {spec.max_failures} starts on a new instance",
    )
    return status, "relaunch"


def progress(log_text: str) -> tuple[int, int | None]:
    """(epochs done, epochs asked) from fit's output: its `epoch N/M:` lines."""
    found = _EPOCH_LINE.findall(log_text)
    if not found:
        return 0, None
    done, total = found[-1]
    return int(done), int(total)
