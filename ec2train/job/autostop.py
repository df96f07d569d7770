"""Autostop for interactive boxes: power off after N idle minutes.

A systemd timer (installed by the user data of `infra/launch_ec2.sh --autostop N`) runs
`python -m ec2train.job.autostop --idle-minutes N` every minute. The box is busy while any of
these holds, judged from what matters, never from words in command lines:

- a GPU works: utilisation at or above GPU_BUSY_PERCENT, or a process holds one (nvidia-smi,
  where the box has it);
- the CPUs worked: at least CPU_BUSY_CORES cores' worth of time since the last check (/proc/stat);
- someone is logged in: an SSH session (sshd names its process `sshd: USER@pts/0`, OpenSSH 9.8+
  `sshd-session: USER@pts/0`, `@notty` for tunnels and scp), an SSM session, or a live login in utmp;
- work runs, matched by what the process executes: Python running a script or module
  (`python train.py`, a Jupyter kernel, `python -m torch.distributed.run`, `torchrun`,
  `ec2train fit|tune|evaluate|data ...`), or a transfer, build or package tool (WORK_PROGRAMS).

Not work by themselves: editors, pagers and shells whatever file they name (`vim
torchrun-notes.txt`), the system's own Python daemons (scripts under /usr, not /usr/local), and
servers that wait for clients (TensorBoard, a Jupyter server with no kernel, `ec2train serve`,
an interactive python): they keep the box up only while they use its CPU or GPU.

The last busy time, the boot it was seen in and the CPU counters are kept in a small state file;
once the box has been idle for N minutes it powers off. A new boot (a stopped box started again)
starts the full idle period anew. The launch set what a power-off does: stop an on-demand box,
terminate a spot one, so no AWS permission is needed for it.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import struct
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

STATE_FILE = Path("/var/lib/ec2train/autostop-last-busy")
GPU_BUSY_PERCENT = 5
CPU_BUSY_CORES = 0.5  # an idle box's daemons use a few hundredths of a core
_PYTHON = re.compile(r"python(\d+(\.\d+)?)?$")
_SESSION = re.compile(r"(sshd|sshd-session): (\S+@(pts/\d+|notty))")
# Console scripts and modules that wait for clients (or for the user) rather than work.
WAITING = frozenset(
    {"tensorboard", "jupyter", "jupyter-lab", "jupyter-notebook", "jupyter-server", "jupyterlab", "notebook",
     "jupyter_server", "ipython", "http", "streamlit", "gradio", "mlflow", "voila", "uvicorn", "gunicorn"}
)  # fmt: skip
EC2TRAIN_WAITING = frozenset({"serve", "autostop"})  # `ec2train serve`, `-m ec2train.job.autostop`
WORK_SCRIPTS = frozenset({"ec2train", "torchrun", "deepspeed", "accelerate"})
WORK_PROGRAMS = frozenset(
    {"aws", "s5cmd", "rclone", "rsync", "wget", "curl", "git", "git-lfs", "tar", "unzip", "zip", "pigz", "zstd",
     "make", "ninja", "cmake", "nvcc", "cc1", "cc1plus", "ld", "dpkg", "apt", "apt-get", "docker-init"}
)  # fmt: skip
_SYSTEM_SCRIPTS = ("/usr/", "/snap/", "/lib/", "/bin/", "/sbin/")  # /usr/local/ is the user's


@dataclass(frozen=True)
class Process:
    pid: int
    argv: tuple[str, ...]
    exe: str  # basename of /proc/PID/exe ("" where it cannot be read)


def read_processes(proc: Path) -> list[Process]:
    found = []
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            raw = (entry / "cmdline").read_bytes()
        except OSError:  # the process ended while we looked
            continue
        try:
            exe = (entry / "exe").readlink().name.removesuffix(" (deleted)")
        except OSError:  # a kernel thread, or not ours to read
            exe = ""
        argv = tuple(a.decode("utf-8", "replace") for a in raw.rstrip(b"\0").split(b"\0")) if raw else ()
        found.append(Process(int(entry.name), argv, exe))
    return found


def _python_target(args: tuple[str, ...]) -> tuple[str, str, tuple[str, ...]]:
    """What a python command line runs: ("module", name, rest), ("script", path, rest),
    ("command", code, rest) or ("interactive", "", ())."""
    i = 0
    while i < len(args):
        arg = args[i]
        if arg == "-" or not arg.startswith("-"):
            return "script", arg, args[i + 1 :]
        if arg.startswith("--"):
            i += 2 if arg == "--check-hash-based-pycs" else 1
            continue
        for j, flag in enumerate(arg[1:], start=1):  # a cluster: -u, -um mod, -Wignore, -X dev, -c code
            if flag in "mcWX":
                attached = arg[j + 1 :]
                value = attached or (args[i + 1] if i + 1 < len(args) else "")
                i += 1 if attached else 2
                if flag in "mc":
                    return ("module" if flag == "m" else "command"), value, args[i:]
                break
        else:
            i += 1
    return "interactive", "", ()


def _first_word(args: tuple[str, ...]) -> str:
    return next((a for a in args if not a.startswith("-")), "")


def work(p: Process) -> str | None:
    """Why this process is work that keeps the box up (a short description), or None."""
    if not p.argv:
        return None
    name = Path(p.argv[0]).name
    if name in WORK_SCRIPTS:  # argv names the script (exe unreadable, or argv[0] set by the program)
        return _script(p.argv[0], p.argv[1:])
    if _PYTHON.match(p.exe) or _PYTHON.match(name):
        kind, target, rest = _python_target(p.argv[1:])
        if kind == "module":
            top, _, sub = target.partition(".")
            if top == "ec2train":
                waiting = (sub.rsplit(".", 1)[-1] if sub else _first_word(rest)) in EC2TRAIN_WAITING
                return None if waiting else f"python -m {target} {_first_word(rest)}".rstrip()
            return None if top in WAITING else f"python -m {target}"
        if kind == "script":
            return _script(target, rest)
        return "python -c" if kind == "command" else None
    program = p.exe or name
    return f"{program} {_first_word(p.argv[1:])}".rstrip() if program in WORK_PROGRAMS else None


def _script(path: str, rest: tuple[str, ...]) -> str | None:
    script = Path(path).name
    if script == "ec2train":
        command = _first_word(rest)
        return None if command in EC2TRAIN_WAITING else f"ec2train {command}".rstrip()
    if script in WORK_SCRIPTS:
        return script
    if script in WAITING or (path.startswith(_SYSTEM_SCRIPTS) and not path.startswith("/usr/local/")):
        return None
    return f"python {path}"


def session(p: Process) -> str | None:
    """The login this process stands for: `ubuntu@pts/0`, an SSM session, or None."""
    title = " ".join(p.argv)
    if m := _SESSION.match(title):
        return m.group(2)
    program = p.exe or (Path(p.argv[0]).name if p.argv else "")
    return "SSM session" if program == "ssm-session-worker" else None


# ---------------------------------------------------------------- logins, CPU, GPU

_UTMP = struct.Struct("<h2xi32s4s32s256shhiii4i20s")  # Linux struct utmp (x86_64 and aarch64)
_USER_PROCESS = 7


def utmp_logins(utmp: Path, proc: Path) -> list[str]:
    """Live logins recorded in utmp (entries whose process still exists): `ubuntu on pts/0`."""
    try:
        data = utmp.read_bytes()
    except OSError:
        return []
    logins = []
    for offset in range(0, len(data) - _UTMP.size + 1, _UTMP.size):
        kind, pid, line, _, user, *_ = _UTMP.unpack_from(data, offset)
        if kind == _USER_PROCESS and (proc / str(pid)).is_dir():
            name, tty = (f.split(b"\0", 1)[0].decode("utf-8", "replace") for f in (user, line))
            logins.append(f"{name} on {tty}")
    return logins


def cpu_counters(proc: Path) -> tuple[int, int, int] | None:
    """(busy jiffies, all jiffies, CPUs) from /proc/stat; iowait counts as idle."""
    try:
        lines = (proc / "stat").read_text().splitlines()
        user, nice, system, idle, iowait, irq, softirq, steal = (int(v) for v in lines[0].split()[1:9])
    except (OSError, ValueError, IndexError):
        return None
    busy = user + nice + system + irq + softirq + steal
    cpus = sum(1 for line in lines if re.match(r"cpu\d", line))
    return busy, busy + idle + iowait, max(1, cpus)


def busy_cores(before: list[int] | None, now: tuple[int, int, int] | None) -> float | None:
    """Cores' worth of CPU time used between two samples (None: not comparable, e.g. a reboot)."""
    if not before or now is None or len(before) != 3 or now[1] <= before[1] or now[0] < before[0]:
        return None
    return (now[0] - before[0]) / (now[1] - before[1]) * now[2]


def gpu_activity(nvidia_smi: str | None) -> list[str]:
    """Busy GPUs and GPU processes, from nvidia-smi; empty where there is none or it fails."""
    if nvidia_smi is None:
        return []
    reasons: list[str] = []
    for query, kind in (
        ("--query-gpu=index,utilization.gpu", "util"),
        ("--query-compute-apps=pid,process_name", "apps"),
    ):
        try:
            out = subprocess.run(
                [nvidia_smi, query, "--format=csv,noheader,nounits"], capture_output=True, text=True, timeout=20
            )
        except (OSError, subprocess.SubprocessError):
            return reasons
        if out.returncode != 0:  # no driver loaded, a lost GPU: no GPU signal
            return reasons
        for line in filter(None, (x.strip() for x in out.stdout.splitlines())):
            index, _, value = (v.strip() for v in line.partition(","))
            if kind == "apps":
                reasons.append(f"GPU process {index} {value}".rstrip())
            elif value.isdigit() and int(value) >= GPU_BUSY_PERCENT:
                reasons.append(f"GPU {index} {value}% busy")
    return reasons


def busy_reasons(
    proc: Path = Path("/proc"),
    *,
    utmp: Path | None = None,
    nvidia_smi: str | None = None,
    cpu: float | None = None,
) -> list[str]:
    """What keeps the box busy (empty: idle). utmp defaults to PROC/../run/utmp (/run/utmp);
    cpu is the cores' worth of CPU time used since the last check, when known."""
    reasons = gpu_activity(nvidia_smi)
    if cpu is not None and cpu >= CPU_BUSY_CORES:
        reasons.append(f"CPU {cpu:.1f} cores busy")
    reasons += [f"login: {who}" for who in utmp_logins(utmp or proc.parent / "run" / "utmp", proc)]
    for p in read_processes(proc):
        if who := session(p):
            reasons.append(f"session: {who}")
        elif what := work(p):
            reasons.append(f"work: {what[:80]} (pid {p.pid})")
    return reasons


# ---------------------------------------------------------------- the decision and its state


def decide(now: float, last_busy: float | None, idle_minutes: float, busy: bool) -> tuple[float, bool]:
    """(the new last-busy time, power off now?). The first check counts as busy: a fresh boot
    gets the full idle period."""
    if busy or last_busy is None:
        return now, False
    return last_busy, now - last_busy >= idle_minutes * 60


def _read(state: Path) -> dict:
    try:
        loaded = json.loads(state.read_text())
    except (OSError, ValueError):
        return {}
    return loaded if isinstance(loaded, dict) else {}  # an older version's bare number: start anew


def _boot_id(proc: Path) -> str:
    try:
        return (proc / "sys" / "kernel" / "random" / "boot_id").read_text().strip()
    except OSError:
        return ""


def check(
    idle_minutes: float,
    *,
    state: Path = STATE_FILE,
    proc: Path = Path("/proc"),
    utmp: Path | None = None,
    nvidia_smi: str | None = None,
    now: float | None = None,
) -> tuple[bool, list[str]]:
    """One timer tick: update the state file; returns (power off now?, busy reasons)."""
    now = time.time() if now is None else now
    old, boot, counters = _read(state), _boot_id(proc), cpu_counters(proc)
    same_boot = old.get("boot_id") == boot
    cpu = busy_cores(old.get("cpu"), counters) if same_boot else None
    reasons = busy_reasons(proc, utmp=utmp, nvidia_smi=nvidia_smi, cpu=cpu)
    last = old.get("last_busy") if same_boot and isinstance(old.get("last_busy"), (int, float)) else None
    last_busy, stop = decide(now, last, idle_minutes, bool(reasons))
    state.parent.mkdir(parents=True, exist_ok=True)
    tmp = state.with_name(state.name + ".tmp")
    tmp.write_text(json.dumps({"last_busy": last_busy, "boot_id": boot, "cpu": counters}) + "\n")
    tmp.replace(state)
    return stop, reasons


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m ec2train.job.autostop", description="Power off after N idle minutes."
    )
    parser.add_argument("--idle-minutes", type=float, required=True)
    parser.add_argument("--state", type=Path, default=STATE_FILE)
    parser.add_argument("--proc", type=Path, default=Path("/proc"))
    parser.add_argument("--utmp", type=Path, default=None, help="default: /run/utmp")
    parser.add_argument("--dry-run", action="store_true", help="say what it would do; never power off")
    args = parser.parse_args(argv)
    if not args.idle_minutes > 0:
        parser.error("--idle-minutes must be > 0")
    stop, reasons = check(
        args.idle_minutes, state=args.state, proc=args.proc, utmp=args.utmp, nvidia_smi=shutil.which("nvidia-smi")
    )
    if not stop:
        more = f" (and {len(reasons) - 10} more)" if len(reasons) > 10 else ""
        print("busy: " + "; ".join(reasons[:10]) + more if reasons else "idle, not for long enough yet")
        return 0
    print(f"idle for {args.idle_minutes:g} minutes (no work, no session, no GPU or CPU load): powering off")
    if not args.dry_run:
        subprocess.run(["systemctl", "poweroff"], check=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
