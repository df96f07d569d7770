"""Autostop decides busy from what matters (work processes by what they execute, sessions, utmp
logins, CPU time, GPUs through nvidia-smi), tested against fake /proc trees of each case in both
directions: live work keeps the box up, an idle box powers off."""

from __future__ import annotations

import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from ec2train.job import autostop

# What an idle DLAMI box runs anyway: none of it is work.
BASELINE = [
    ("/sbin/init", "systemd"),
    ("/usr/sbin/sshd -D", "sshd"),
    ("sshd: /usr/sbin/sshd -D [listener] 0 of 10-100 startups", "sshd"),
    ("/usr/bin/python3 /usr/bin/networkd-dispatcher --run-startup-triggers", "python3.10"),
    ("/usr/bin/python3 /usr/share/unattended-upgrades/unattended-upgrade-shutdown --wait-for-signal", "python3.10"),
    ("/usr/bin/amazon-ssm-agent", "amazon-ssm-agent"),
    ("/opt/pytorch/bin/python -m ec2train.job.autostop --idle-minutes 30", "python3.11"),
]

BUSY = {
    "jupyter kernel": (
        "/opt/pytorch/bin/python -m ipykernel_launcher -f /home/ubuntu/.local/share/jupyter/runtime/kernel-1.json",
        "python3.11",
    ),
    "python train.py": ("python train.py --epochs 5", "python3.11"),
    "python3 -u script": ("/opt/pytorch/bin/python3 -u -X dev /home/ubuntu/work/train.py", "python3.11"),
    "torch.distributed.run": ("python -m torch.distributed.run --nproc-per-node 4 train.py", "python3.11"),
    "torchrun": ("/opt/pytorch/bin/python /opt/pytorch/bin/torchrun --nnodes 2 -m ec2train fit", "python3.11"),
    "ec2train fit": ("/opt/pytorch/bin/python /opt/pytorch/bin/ec2train fit --epochs 5", "python3.11"),
    "ec2train data prepare": (
        "/opt/pytorch/bin/python /opt/pytorch/bin/ec2train data prepare dogImages dogImages-256",
        "python3.11",
    ),
    "ec2train evaluate": ("/opt/pytorch/bin/python /opt/pytorch/bin/ec2train evaluate --data d", "python3.11"),
    "job runner": ("/opt/pytorch/bin/python -m ec2train.job.runner --job s3://b/j", "python3.11"),
    "new OpenSSH login": ("sshd-session: ubuntu@pts/0", "sshd-session"),
    "old OpenSSH login": ("sshd: ubuntu@pts/0", "sshd"),
    "SSH tunnel": ("sshd: ubuntu@notty", "sshd"),
    "SSM session": ("/usr/bin/ssm-session-worker sess-1 i-1", "ssm-session-worker"),
    "aws s3 sync": ("/usr/local/bin/aws s3 sync s3://b/dogImages dogImages", "aws"),
    "dpkg": ("/usr/bin/dpkg --status-fd 35 --configure --pending", "dpkg"),
}

IDLE = {
    "vim of torchrun notes": ("vim torchrun-notes.txt", "vim"),
    "less of a fit log": ("less ec2train-fit.log", "less"),
    "grep for torchrun": ("grep -r torchrun .", "grep"),
    "a shell and tmux": ("-bash", "bash"),
    "sshd privileged half": ("sshd: ubuntu [priv]", "sshd"),
    "sshd-session privileged half": ("sshd-session: ubuntu [priv]", "sshd-session"),
    "tensorboard": ("/opt/pytorch/bin/python /opt/pytorch/bin/tensorboard --logdir runs", "python3.11"),
    "tensorboard module": ("/opt/pytorch/bin/python -m tensorboard.main --logdir runs", "python3.11"),
    "jupyter server": ("/opt/pytorch/bin/python /opt/pytorch/bin/jupyter-lab --no-browser", "python3.11"),
    "ec2train serve": ("/opt/pytorch/bin/python /opt/pytorch/bin/ec2train serve --model m.pth", "python3.11"),
    "python REPL": ("python3", "python3.11"),
    "http.server": ("python3 -m http.server 8000", "python3.11"),
}


def fake_proc(root: Path, *processes: tuple[str, str | None], stat: str | None = None, boot: str = "boot-1") -> Path:
    """A /proc tree: PID/cmdline (NUL-separated; a title set by the process, like sshd's, is one
    argument), PID/exe (a link to the executable), stat and the boot id."""
    proc = root / "proc"
    for pid, (line, exe) in enumerate(processes, start=100):
        (proc / str(pid)).mkdir(parents=True)
        args = [line] if line.startswith(("sshd", "-bash")) else line.split(" ")
        (proc / str(pid) / "cmdline").write_bytes(b"\0".join(a.encode() for a in args) + b"\0")
        if exe is not None:
            (proc / str(pid) / "exe").symlink_to(f"/usr/bin/{exe}")  # need not exist: only read as a link
    (proc / "self").mkdir(parents=True, exist_ok=True)  # not a pid: skipped
    (proc / "sys" / "kernel" / "random").mkdir(parents=True, exist_ok=True)
    (proc / "sys" / "kernel" / "random" / "boot_id").write_text(boot + "\n")
    (proc / "stat").write_text(stat or _stat(busy=1000, idle=100_000))
    return proc


def _stat(busy: int, idle: int, cpus: int = 4) -> str:
    """A /proc/stat with `busy` jiffies of user time and `idle` of idle time in all."""
    line = f"cpu  {busy} 0 0 {idle} 0 0 0 0 0 0\n"
    return line + "".join(f"cpu{i} {busy // cpus} 0 0 {idle // cpus} 0 0 0 0 0 0\n" for i in range(cpus))


@pytest.fixture(autouse=True)
def no_real_gpu(monkeypatch, tmp_path):
    """Whatever this box has, the tests see only the nvidia-smi they put on PATH."""
    empty = tmp_path / "empty-bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", f"{empty}:/usr/bin:/bin")


def _powers_off(proc: Path, tmp_path: Path, **kwargs) -> bool:
    """Busy 31 minutes ago in this boot, and now? (a 30-minute autostop)"""
    state = tmp_path / "state"
    state.write_text('{"last_busy": 0, "boot_id": "boot-1", "cpu": null}')
    return autostop.check(30, state=state, proc=proc, now=31 * 60, **kwargs)[0]


@pytest.mark.parametrize("case", sorted(BUSY))
def test_live_work_and_logins_keep_the_box_up(tmp_path, case):
    proc = fake_proc(tmp_path, *BASELINE, BUSY[case])
    reasons = autostop.busy_reasons(proc)
    assert len(reasons) == 1, reasons
    assert not _powers_off(proc, tmp_path)


@pytest.mark.parametrize("case", sorted(IDLE))
def test_idle_boxes_power_off_whatever_their_command_lines_say(tmp_path, case):
    proc = fake_proc(tmp_path, *BASELINE, IDLE[case])
    assert autostop.busy_reasons(proc) == []
    assert _powers_off(proc, tmp_path)


def test_processes_are_matched_by_what_they_execute():
    def work(line: str, exe: str = "python3.11") -> str | None:
        return autostop.work(autostop.Process(1, tuple(line.split(" ")), exe))

    assert work("python train.py") == "python train.py"
    assert work("python -um ec2train fit --epochs 3") == "python -m ec2train fit"  # -u and -m in one cluster
    assert work("python -W ignore -X dev -m ipykernel_launcher -f k.json") == "python -m ipykernel_launcher"
    assert work("python -c import torch") == "python -c"
    assert work("/usr/bin/python3 /usr/local/bin/train.py") == "python /usr/local/bin/train.py"  # /usr/local is yours
    assert work("/usr/bin/python3 /usr/lib/python3/dist-packages/x.py") is None  # the system's own
    assert work("/usr/bin/torchrun --nproc-per-node 2 train.py") == "torchrun"
    assert work("ec2train fit", exe="") == "ec2train fit"  # exe unreadable: argv[0] names the script
    assert work("vim train.py", exe="vim") is None and work("nano ec2train.toml", exe="nano") is None
    assert work("/opt/x/my-torchrun-wrapper", exe="my-torchrun-wrapper") is None


def _utmp(*entries: tuple[int, int, str, str]) -> bytes:
    """struct utmp records: (type, pid, line, user)."""
    fmt = struct.Struct("<h2xi32s4s32s256shhiii4i20s")
    return b"".join(
        fmt.pack(kind, pid, line.encode(), b"ts/0", user.encode(), b"10.0.0.9", 0, 0, 0, 0, 0, 0, 0, 0, 0, b"")
        for kind, pid, line, user in entries
    )


def test_a_live_utmp_login_keeps_the_box_up_and_a_stale_one_does_not(tmp_path):
    proc = fake_proc(tmp_path, *BASELINE)
    utmp = tmp_path / "run" / "utmp"  # PROC/../run/utmp, where the real one is
    utmp.parent.mkdir()
    utmp.write_bytes(_utmp((7, 100, "pts/0", "ubuntu")))  # pid 100 (init here) exists
    assert autostop.busy_reasons(proc) == ["login: ubuntu on pts/0"]
    assert not _powers_off(proc, tmp_path)
    utmp.write_bytes(_utmp((7, 4242, "pts/1", "ubuntu"), (8, 100, "pts/0", "")))  # gone; a DEAD_PROCESS
    assert autostop.busy_reasons(proc) == []
    assert _powers_off(proc, tmp_path)


def test_cpu_time_since_the_last_check_keeps_the_box_up(tmp_path):
    state = tmp_path / "state"
    proc = fake_proc(tmp_path, *BASELINE, stat=_stat(busy=10_000, idle=400_000))
    assert autostop.check(30, state=state, proc=proc, now=0) == (False, [])  # the first check starts the period
    # a minute later: 4 CPUs x 6,000 jiffies, 3,000 of them busy = half a core's worth
    (proc / "stat").write_text(_stat(busy=13_000, idle=421_000))
    assert autostop.check(30, state=state, proc=proc, now=60) == (False, ["CPU 0.5 cores busy"])
    (proc / "stat").write_text(_stat(busy=13_100, idle=445_000))  # 0.02 cores: daemons
    stop, reasons = autostop.check(30, state=state, proc=proc, now=60 + 30 * 60)
    assert stop and reasons == []


@pytest.fixture
def fake_nvidia_smi(tmp_path, monkeypatch):
    """An nvidia-smi on PATH that answers from files: set(util=..., apps=..., exit=...)."""
    bin_dir = tmp_path / "gpu-bin"
    bin_dir.mkdir()
    script = bin_dir / "nvidia-smi"
    script.write_text(
        "#!/bin/sh\n"
        f'd="{bin_dir}"\n'
        'case "$1" in --query-gpu=*) cat "$d/util" ;; --query-compute-apps=*) cat "$d/apps" ;; esac\n'
        'exit "$(cat "$d/exit")"\n'
    )
    script.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")

    def set_answers(util: str = "0, 0\n", apps: str = "", exit: int = 0) -> str:
        (bin_dir / "util").write_text(util)
        (bin_dir / "apps").write_text(apps)
        (bin_dir / "exit").write_text(str(exit))
        return str(script)

    return set_answers


def test_a_working_gpu_or_a_gpu_process_keeps_the_box_up(tmp_path, fake_nvidia_smi):
    proc = fake_proc(tmp_path, *BASELINE)
    smi = fake_nvidia_smi(util="0, 87\n1, 0\n")
    assert autostop.busy_reasons(proc, nvidia_smi=smi) == ["GPU 0 87% busy"]
    smi = fake_nvidia_smi(util="0, 0\n", apps="4242, /opt/pytorch/bin/python3.11\n")
    assert autostop.busy_reasons(proc, nvidia_smi=smi) == ["GPU process 4242 /opt/pytorch/bin/python3.11"]
    assert not _powers_off(proc, tmp_path, nvidia_smi=smi)
    smi = fake_nvidia_smi(util="0, 0\n1, [N/A]\n")
    assert autostop.busy_reasons(proc, nvidia_smi=smi) == []
    assert _powers_off(proc, tmp_path, nvidia_smi=smi)
    smi = fake_nvidia_smi(util="NVIDIA-SMI has failed because it couldn't communicate with the driver\n", exit=9)
    assert autostop.busy_reasons(proc, nvidia_smi=smi) == []  # no GPU signal, no crash


def test_a_new_boot_starts_the_idle_period_anew(tmp_path):
    """A stopped box started again: the last busy time is from before the stop, and the first
    check after boot must not power it off at once."""
    proc = fake_proc(tmp_path, *BASELINE, boot="boot-2")
    state = tmp_path / "state"
    state.write_text('{"last_busy": 0, "boot_id": "boot-1", "cpu": [1, 2, 4]}')
    assert autostop.check(30, state=state, proc=proc, now=5 * 3600) == (False, [])
    assert autostop.check(30, state=state, proc=proc, now=5 * 3600 + 30 * 60)[0] is True


def test_autostop_decision():
    assert autostop.decide(100, None, 30, busy=False) == (100, False)  # first check: the full period starts
    assert autostop.decide(200, 100, 30, busy=True) == (200, False)
    assert autostop.decide(100 + 29 * 60, 100, 30, busy=False) == (100, False)
    assert autostop.decide(100 + 30 * 60, 100, 30, busy=False) == (100, True)


def test_the_command_powers_off_only_when_idle_long_enough(tmp_path, fake_nvidia_smi):
    def run(proc: Path, state: Path) -> str:
        out = subprocess.run(
            [sys.executable, "-m", "ec2train.job.autostop", "--idle-minutes", "1", "--state", str(state)]
            + ["--proc", str(proc), "--dry-run"],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert out.returncode == 0, out.stderr
        return out.stdout

    fake_nvidia_smi(util="0, 0\n")
    idle = fake_proc(tmp_path / "idle", *BASELINE, IDLE["vim of torchrun notes"])
    state = tmp_path / "idle" / "state"
    state.write_text('{"last_busy": 0, "boot_id": "boot-1", "cpu": null}')
    assert "powering off" in run(idle, state)
    fake_nvidia_smi(util="0, 0\n", apps="4242, python\n")  # found on PATH, as on the box
    assert "busy: GPU process 4242 python" in run(idle, state)
    fake_nvidia_smi(util="0, 0\n")
    busy = fake_proc(tmp_path / "busy", *BASELINE, BUSY["jupyter kernel"])
    state = tmp_path / "busy" / "state"
    state.write_text('{"last_busy": 0, "boot_id": "boot-1", "cpu": null}')
    assert "busy: work: python -m ipykernel_launcher" in run(busy, state)
