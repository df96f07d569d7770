"""Autostop for interactive boxes: power off after N idle minutes.

A systemd timer (installed by the user data of `infra/launch_ec2.sh --autostop N`) runs
`python -m ec2train.job.autostop --idle-minutes N` every minute. Busy means a training process
(`ec2train fit`/`tune`, `torchrun`) or a login (an SSH or SSM session) exists; the time of the
last busy check is kept in a small state file, and once the box has been idle for N minutes it
powers off. The launch set what a power-off does: stop an on-demand box, terminate a spot one,
so no AWS permission is needed for it.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

STATE_FILE = Path("/var/lib/ec2train/autostop-last-busy")
TRAINING = ("torchrun", "ec2train fit", "ec2train tune", "ec2train.job.runner", "-m ec2train fit", "-m ec2train tune")


def _cmdlines(proc: Path) -> list[str]:
    lines = []
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            raw = (entry / "cmdline").read_bytes()
        except OSError:  # the process ended while we looked
            continue
        lines.append(raw.replace(b"\0", b" ").decode("utf-8", "replace").strip())
    return lines


def busy_reasons(proc: Path = Path("/proc")) -> list[str]:
    """What keeps the box busy: training processes and login sessions (empty: idle)."""
    reasons = []
    for line in _cmdlines(proc):
        words = line.split()
        name = Path(words[0]).name if words else ""
        if any(t in line for t in TRAINING) and "ec2train.job.autostop" not in line:
            reasons.append(f"training: {line[:80]}")
        # sshd names a session's process "sshd: USER@pts/0" (or @notty for tunnels and scp).
        elif (name.startswith("sshd:") and "@" in line) or name == "ssm-session-worker":
            reasons.append(f"session: {line[:80]}")
    return reasons


def decide(now: float, last_busy: float | None, idle_minutes: float, busy: bool) -> tuple[float, bool]:
    """(the new last-busy time, power off now?). The first check counts as busy: a fresh boot
    gets the full idle period."""
    if busy or last_busy is None:
        return now, False
    return last_busy, now - last_busy >= idle_minutes * 60


def _read(state: Path) -> float | None:
    try:
        return float(state.read_text().strip())
    except (OSError, ValueError):
        return None


def check(
    idle_minutes: float, *, state: Path = STATE_FILE, proc: Path = Path("/proc"), now: float | None = None
) -> tuple[bool, list[str]]:
    """One timer tick: update the state file; returns (power off now?, busy reasons)."""
    now = time.time() if now is None else now
    reasons = busy_reasons(proc)
    last_busy, stop = decide(now, _read(state), idle_minutes, bool(reasons))
    state.parent.mkdir(parents=True, exist_ok=True)
    tmp = state.with_name(state.name + ".tmp")
    tmp.write_text(f"{last_busy}\n")
    tmp.replace(state)
    return stop, reasons


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m ec2train.job.autostop", description="Power off after N idle minutes."
    )
    parser.add_argument("--idle-minutes", type=float, required=True)
    parser.add_argument("--state", type=Path, default=STATE_FILE)
    parser.add_argument("--proc", type=Path, default=Path("/proc"))
    parser.add_argument("--dry-run", action="store_true", help="say what it would do; never power off")
    args = parser.parse_args(argv)
    if not args.idle_minutes > 0:
        parser.error("--idle-minutes must be > 0")
    stop, reasons = check(args.idle_minutes, state=args.state, proc=args.proc)
    if not stop:
        print("busy: " + "; ".join(reasons) if reasons else "idle, not for long enough yet")
        return 0
    print(f"idle for {args.idle_minutes:g} minutes (no training process, no session): powering off")
    if not args.dry_run:
        subprocess.run(["systemctl", "poweroff"], check=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
