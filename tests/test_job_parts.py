"""The pieces of jobs that need no training: the cost estimate (the runners' decisions:
test_job_state.py; autostop's idle check: test_autostop.py), the wheel publisher, and the
first-boot script run in a sandbox (stub aws, python, systemctl, poweroff) to show it installs
only a wheel whose hash matches."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ec2train.job import cost
from ec2train.job.spec import JobError, check_fit_args
from tests.support.job_nodes import job_spec

ROOT = Path(__file__).resolve().parents[1]
USER_DATA = ROOT / "ec2train" / "job" / "user_data.sh"


spec = job_spec


# --------------------------------------------------------------------------- cost


@pytest.mark.fast
def test_spot_types_stay_in_the_family_with_as_many_gpus_and_no_smaller_and_not_much_dearer():
    # g4dn.8xlarge (4.1x g4dn.xlarge's on-demand price) is left out: spot bills up to on-demand.
    assert cost.spot_types("g4dn.xlarge") == ["g4dn.xlarge", "g4dn.2xlarge", "g4dn.4xlarge"]
    assert all(
        cost.PRICES[t][1] <= cost.SPOT_PRICE_RATIO * cost.PRICES["g4dn.xlarge"][1]
        for t in cost.spot_types("g4dn.xlarge")
    )
    assert cost.spot_types("g5.12xlarge") == ["g5.12xlarge", "g5.24xlarge"]  # 4 GPUs each
    assert cost.spot_types("g5.8xlarge", efa=True) == ["g5.8xlarge", "g5.16xlarge"]  # both have EFA
    assert cost.spot_types("x9.huge") == ["x9.huge"]


@pytest.mark.fast
def test_cost_estimate_prices_every_node_by_its_type_and_market_until_it_exited_or_went_silent():
    nodes = [
        {"instance_type": "g4dn.xlarge", "lifecycle": "spot", "started_at": 0, "exited_at": 3600},
        {"instance_type": "g4dn.xlarge", "lifecycle": "on-demand", "started_at": 3600, "heartbeat_at": 5390},
        # vanished at its last heartbeat, an hour ago: counted to that heartbeat, not to now
        {"instance_type": "g5.xlarge", "lifecycle": "spot", "started_at": 0, "heartbeat_at": 1800},
    ]
    est = cost.estimate(nodes, now=5400, timeout=60)
    assert est["hours"] == pytest.approx(1 + 0.5 + 0.5)
    assert est["usd"] == pytest.approx(
        cost.PRICES["g4dn.xlarge"][2] + 0.5 * cost.PRICES["g4dn.xlarge"][1] + 0.5 * cost.PRICES["g5.xlarge"][2]
    )
    unknown = cost.estimate([{"instance_type": "zz.big", "started_at": 0, "exited_at": 1}])
    assert unknown["usd"] is None and unknown["unpriced"] == ["zz.big"]


@pytest.mark.fast
def test_price_lines_give_the_range_and_the_worst_case_of_every_node():
    types = cost.spot_types("g4dn.xlarge")
    price, worst = cost.price_lines(types, 4, True, 24, 100)
    assert "$0.21-$0.48 per instance-hour at typical spot prices ($0.53-$1.20 on-demand)" in price
    assert "4 nodes: $0.84-$1.92 per hour" in price
    # 4 nodes x 24 h x the dearest type's on-demand price, plus 4 x 100 GB of gp3 for 24 h
    expected = 24 * (4 * 1.204 + 4 * 100 * cost.EBS_GB_MONTH / cost.HOURS_PER_MONTH)
    assert f"${expected:,.2f} if all 4 nodes run the full --max-hours 24 at $1.20/h" in worst
    day = cost.price_lines(["g5.12xlarge"], 2, False, None, 100)[1]
    assert day.startswith(f"worst case ${24 * (2 * 5.672 + 2 * 100 * 0.08 / 730):,.2f} per day until you tear it down")
    assert "unknown for x9.huge" in cost.price_lines(["x9.huge"], 1, False, 1, 100)[0]


# --------------------------------------------------------------------------- fit arguments


@pytest.mark.fast
def test_fit_args():
    assert check_fit_args(["fit", "--epochs", "3"]) == ["--epochs", "3"] == check_fit_args(["--epochs", "3"])
    for bad in (["tune"], ["fit", "--resume", "never"], ["fit", "--output=x"]):
        with pytest.raises(JobError):
            check_fit_args(bad)


@pytest.mark.fast
def test_on_spot_the_runner_has_fit_watch_for_the_notice_unless_the_job_chose(tmp_path):
    from ec2train.job.runner import fit_command

    def command(fit_args, lifecycle):
        return fit_command(spec(), fit_args, tmp_path, tmp_path / "data", lifecycle)[4:]

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
