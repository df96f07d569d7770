"""The pieces of jobs that need no training: the status decisions, the cost estimate (autostop's
idle check: test_autostop.py), the wheel publisher, and the first-boot script run in a sandbox (stub aws, python,
systemctl, poweroff) to show it installs only a wheel whose hash matches."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ec2train.job import cost, state
from ec2train.job.spec import JobError, JobSpec, check_fit_args

ROOT = Path(__file__).resolve().parents[1]
USER_DATA = ROOT / "ec2train" / "job" / "user_data.sh"


def spec(**changes) -> JobSpec:
    base = dict(
        name="dogs",
        s3_uri="s3://b/dogs",
        data="s3://b/d.zip",
        fit_args=[],
        region="us-east-1",
        group="ec2train-job-dogs",
        submitted_at=1000.0,
        max_hours=1.0,
        max_failures=2,
    )
    return JobSpec(**{**base, **changes})


ME = {"instance": "i-1", "instance_type": "g4dn.xlarge", "lifecycle": "spot"}


# --------------------------------------------------------------------------- status decisions


@pytest.mark.fast
def test_attempts_interruptions_and_the_failure_cap():
    s, d = state.begin_attempt(state.new_status("dogs", 1000), spec(), ME, 1010)
    assert d == "run" and s["state"] == "starting" and s["attempts"][0]["instance"] == "i-1"
    s, d = state.end_attempt(s, spec(), 75, ["x"], 1100)
    assert (d, s["state"], s["interruptions"], s["failures"]) == ("leave", "interrupted", 1, 0)
    s, d = state.begin_attempt(s, spec(), {**ME, "instance": "i-2"}, 1200)
    s, d = state.end_attempt(s, spec(), 1, [f"line {i}" for i in range(50)], 1300)
    assert (d, s["state"], s["failures"], s["exit_code"]) == ("relaunch", "retrying", 1, 1)
    assert s["log_tail"] == [f"line {i}" for i in range(30, 50)]  # the last 20 lines
    # The third instance vanishes without a word; the fourth counts that as the second failure.
    s, d = state.begin_attempt(s, spec(), {**ME, "instance": "i-3"}, 1400)
    assert d == "run"
    s, d = state.begin_attempt(s, spec(), {**ME, "instance": "i-4"}, 1500)
    assert (d, s["state"], s["failures"]) == ("end", "failed", 2)
    assert [a["outcome"] for a in s["attempts"]] == ["interrupted", "failed", "lost"]
    # Over is over: a late replacement only ends the group again.
    assert state.begin_attempt(s, spec(), {**ME, "instance": "i-5"}, 1600)[1] == "end" and len(s["attempts"]) == 3


@pytest.mark.fast
def test_success_the_deadline_and_a_live_predecessor():
    s, _ = state.begin_attempt(state.new_status("dogs", 1000), spec(), ME, 1010)
    assert state.end_attempt(dict(s), spec(), 0, [], 1020)[1] == "end"
    late, d = state.begin_attempt(state.new_status("dogs", 1000), spec(), ME, 1000 + 3600)
    assert (d, late["state"]) == ("end", "failed") and "--max-hours 1" in late["reason"]
    s, _ = state.begin_attempt(state.new_status("dogs", 1000), spec(), ME, 1010)
    s["updated_at"] = 1010
    assert state.previous_alive(s, "i-2", 1010 + 60)  # capacity rebalancing: wait for it
    assert not state.previous_alive(s, "i-2", 1010 + state.STALE_SECONDS + 1)  # gone quiet: it is lost
    assert not state.previous_alive(s, "i-1", 1020)  # our own


@pytest.mark.fast
def test_progress_reads_fits_epoch_lines():
    log = "epoch 1/3 ━━━ 16/192\nepoch 1/3: train loss 1.0\nepoch 2/3: train loss 0.9\n"
    assert state.progress(log) == (2, 3) and state.progress("nothing yet") == (0, None)


def test_the_last_sync_counts_an_epoch_fit_logged_after_the_previous_one(aws, tmp_path):
    """fit can log an epoch and stop (a spot notice) between two of the runner's syncs: the
    status written after it ended still has that epoch."""
    import json

    import boto3

    from ec2train import s3
    from ec2train.job.runner import Attempt

    boto3.client("s3", region_name="us-east-1").create_bucket(Bucket="ec2train-parts")
    status = {"state": "running", "attempts": [{}], "epoch": 0, "epochs": None}
    att = Attempt(spec(), s3.parse_uri("s3://ec2train-parts/dogs"), tmp_path, ME, status)
    att.say("running: fit")
    att.sync()
    with open(att.log_path, "a") as log:
        log.write("epoch 1/3: train loss 1.0 | valid acc 0.5\nstopped by a spot interruption notice\n")
    att.status["state"] = "interrupted"  # what end_attempt decided
    att.sync()
    body = boto3.client("s3", region_name="us-east-1").get_object(Bucket="ec2train-parts", Key="dogs/_job/status.json")[
        "Body"
    ]
    assert (json.loads(body.read())["epoch"], att.status["epochs"]) == (1, 3)


# --------------------------------------------------------------------------- cost


@pytest.mark.fast
def test_spot_types_stay_in_the_family_with_as_many_gpus_and_no_smaller():
    assert cost.spot_types("g4dn.xlarge") == ["g4dn.xlarge", "g4dn.2xlarge", "g4dn.4xlarge", "g4dn.8xlarge"]
    assert cost.spot_types("g5.12xlarge") == ["g5.12xlarge", "g5.24xlarge"]  # 4 GPUs each
    assert cost.spot_types("x9.huge") == ["x9.huge"]


@pytest.mark.fast
def test_cost_estimate_prices_each_attempt_by_its_type_and_market():
    st = {
        "attempts": [
            {"instance_type": "g4dn.xlarge", "lifecycle": "spot", "started_at": 0, "ended_at": 3600},
            {"instance_type": "g4dn.xlarge", "lifecycle": "on-demand", "started_at": 3600, "ended_at": None},
        ]
    }
    est = cost.estimate(st, now=5400)
    assert est["hours"] == pytest.approx(1.5)
    assert est["usd"] == pytest.approx(cost.PRICES["g4dn.xlarge"][2] + 0.5 * cost.PRICES["g4dn.xlarge"][1])
    assert cost.estimate({"attempts": [{"instance_type": "zz.big", "started_at": 0, "ended_at": 1}]})["usd"] is None


# --------------------------------------------------------------------------- fit arguments


@pytest.mark.fast
def test_fit_args():
    assert check_fit_args(["fit", "--epochs", "3"]) == ["--epochs", "3"] == check_fit_args(["--epochs", "3"])
    for bad in (["tune"], ["fit", "--resume", "never"], ["fit", "--output=x"]):
        with pytest.raises(JobError):
            check_fit_args(bad)


@pytest.mark.fast
def test_on_spot_the_runner_has_fit_watch_for_the_notice_unless_the_job_chose(tmp_path):
    from ec2train.job.runner import Attempt, fit_command

    def command(fit_args, lifecycle):
        att = Attempt(spec(fit_args=fit_args), None, tmp_path, {**ME, "lifecycle": lifecycle}, {"attempts": [{}]})
        return fit_command(att, tmp_path / "data")[4:]

    assert command(["--epochs", "3"], "spot")[:4] == ["--epochs", "3", "--spot-watch", "on"]
    assert "--spot-watch" not in command(["--epochs", "3"], "on-demand")
    for chosen in (["--spot-watch", "off"], ["--spot-watch=off"]):
        cmd = command(chosen, "spot")
        assert cmd[: len(chosen)] == chosen and cmd.count("--spot-watch") + cmd.count("--spot-watch=off") == 1


# --------------------------------------------------------------------------- the wheel


def test_publish_puts_the_wheel_under_its_hash_and_the_module_prints_it(aws, tmp_path):
    import boto3

    from ec2train.job import dist

    boto3.client("s3").create_bucket(Bucket="ec2train-dist")
    wheel = tmp_path / "ec2train-0.1.0-py3-none-any.whl"
    wheel.write_bytes(b"PK not really a wheel, but bytes with a hash")
    sha = hashlib.sha256(wheel.read_bytes()).hexdigest()
    out = subprocess.run(
        [sys.executable, "-m", "ec2train.job.dist", "--s3-uri", "s3://ec2train-dist/run", "--wheel", str(wheel)],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "AWS_ENDPOINT_URL": aws},
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == [f"s3://ec2train-dist/run/_dist/{sha[:16]}/{wheel.name}", sha]
    body = (
        boto3.client("s3").get_object(Bucket="ec2train-dist", Key=f"run/_dist/{sha[:16]}/{wheel.name}")["Body"].read()
    )
    assert body == wheel.read_bytes()
    bad = subprocess.run(
        [sys.executable, "-m", "ec2train.job.dist", "--s3-uri", "https://x/y"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert bad.returncode == 2 and bad.stderr.startswith("error: ") and len(bad.stderr.strip().splitlines()) == 1
    with pytest.raises(dist.DistError, match="not a wheel"):
        dist.publish_wheel("s3://ec2train-dist/run", wheel=tmp_path / "nope.tar.gz")


# --------------------------------------------------------------------------- the first-boot script

STUB = """#!/bin/bash
echo "$(basename "$0") $*" >>"$CALLS"
case "$(basename "$0") $1 $2" in
  "aws s3 cp") src=${*: -2:1}; [[ $src == s3://* ]] && cp "$FAKE_S3/${src#s3://}" "${*: -1}"; exit 0 ;;
  "python -m pip") [[ $3 == list ]] && echo "torch==2.14.1"; exit 0 ;;
  "python -m ec2train.job.runner") exit "${RUNNER_EXIT:-0}" ;;
esac
exit 0
"""


@pytest.fixture
def sandbox(tmp_path):
    """A fake DLAMI: a PyTorch env whose activate puts stubs first on PATH; returns run(settings)."""
    stubs = tmp_path / "stubs"
    stubs.mkdir()
    for name in ("aws", "python", "ec2train", "systemctl", "poweroff", "curl"):
        (stubs / name).write_text(STUB)
        (stubs / name).chmod(0o755)
    env_dir = tmp_path / "pytorch"
    (env_dir / "bin").mkdir(parents=True)
    (env_dir / "bin" / "activate").write_text(f'export PATH="{stubs}:$PATH"\n')
    (tmp_path / "units").mkdir()
    fake_s3 = tmp_path / "s3"
    (fake_s3 / "bkt" / "run" / "_dist").mkdir(parents=True)
    wheel = fake_s3 / "bkt" / "run" / "_dist" / "ec2train-0.1.0-py3-none-any.whl"
    wheel.write_bytes(b"the wheel's bytes")

    def run(settings: dict[str, str], **env: str):
        script = tmp_path / "user-data"
        script.write_text(
            "#!/bin/bash\n"
            + "".join(f"{k}={v}\n" for k, v in settings.items())
            + USER_DATA.read_text().split("\n", 1)[1]
        )
        calls = tmp_path / "calls"
        calls.write_text("")
        done = subprocess.run(
            ["bash", str(script)],
            capture_output=True,
            text=True,
            timeout=60,
            env={
                "PATH": f"{stubs}:/usr/bin:/bin",
                "CALLS": str(calls),
                "FAKE_S3": str(fake_s3),
                "PYTORCH_ENV": str(env_dir),
                "SETUP_LOG": str(tmp_path / "setup.log"),
                "SYSTEMD_DIR": str(tmp_path / "units"),
                "JOB_WORKDIR": str(tmp_path / "job"),
                "REGION": "us-east-1",
                **env,
            },
        )
        return done, calls.read_text().splitlines()

    run.wheel, run.units = wheel, tmp_path / "units"
    return run


def test_first_boot_installs_the_wheel_only_when_its_hash_matches(sandbox):
    uri = "s3://bkt/run/_dist/ec2train-0.1.0-py3-none-any.whl"
    sha = hashlib.sha256(sandbox.wheel.read_bytes()).hexdigest()
    done, calls = sandbox({"WHEEL_URI": uri, "WHEEL_SHA256": sha, "LOGIN_USER": "nobody", "AUTOSTOP_MINUTES": "30"})
    assert done.returncode == 0, done.stdout + done.stderr
    [install] = [c for c in calls if c.startswith("python -m pip install")]
    assert install.endswith("/ec2train-0.1.0-py3-none-any.whl") and "-c " in install  # the file, torch pinned
    service = (sandbox.units / "ec2train-autostop.service").read_text()
    assert "-m ec2train.job.autostop --idle-minutes 30" in service and "Type=oneshot" in service
    assert "OnUnitActiveSec=1min" in (sandbox.units / "ec2train-autostop.timer").read_text()
    assert "systemctl enable --now ec2train-autostop.timer" in calls
    assert not [c for c in calls if c.startswith("poweroff")]

    done, calls = sandbox({"WHEEL_URI": uri, "WHEEL_SHA256": "0" * 64, "LOGIN_USER": "nobody"})
    assert done.returncode != 0 and "does not have the SHA-256" in done.stdout + done.stderr
    assert not [c for c in calls if "pip install" in c]  # a tampered wheel is never installed


def test_first_boot_of_a_job_ends_the_job_when_setup_fails_and_relaunches_after_a_failed_attempt(sandbox):
    uri = "s3://bkt/run/_dist/ec2train-0.1.0-py3-none-any.whl"
    job = {"WHEEL_URI": uri, "LOGIN_USER": "nobody", "JOB_URI": "s3://bkt/run", "JOB_GROUP": "ec2train-job-x"}
    done, calls = sandbox({**job, "WHEEL_SHA256": "0" * 64})
    assert "aws autoscaling set-desired-capacity --auto-scaling-group-name ec2train-job-x --desired-capacity 0" in calls
    assert any(c.startswith("aws s3 cp") and "s3://bkt/run/_job/logs/setup-failed-" in c for c in calls)
    assert calls[-1] == "poweroff "

    sha = hashlib.sha256(sandbox.wheel.read_bytes()).hexdigest()
    for exit_code, powers_off in (("0", False), ("75", False), ("3", True)):
        done, calls = sandbox({**job, "WHEEL_SHA256": sha}, RUNNER_EXIT=exit_code)
        assert done.returncode == 0, done.stderr
        assert f"python -m ec2train.job.runner --job-uri s3://bkt/run --workdir {sandbox.units.parent}/job" in calls
        assert (calls[-1] == "poweroff ") is powers_off, (exit_code, calls)
