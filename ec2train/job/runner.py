"""The job runner: started on the instance by its user data, one per instance.

    python -m ec2train.job.runner --job-uri s3://bucket/prefix --workdir /opt/ec2train-job

It reads job.json, opens an attempt in status.json (or ends the job: see ec2train.job.state),
fetches the data once per instance, runs `ec2train fit ... --resume auto --s3-uri <prefix>` and,
every few seconds while fit runs, mirrors the attempt's log and its status (epoch) to S3. At the
end it records the outcome and acts on the group: desired capacity 0 when the job is over, hands
off when a spot notice stopped fit (exit 75; AWS launches the replacement), or exits 3 so the
user data powers off and the group starts a fresh attempt. A --max-hours deadline stops fit
(SIGTERM, then SIGKILL) and ends the job, even if training hangs.

Exit status: 0 job over, 75 interrupted (leave the group alone), 3 relaunch, 2 bad setup.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ec2train import aws, s3
from ec2train.errors import UserError
from ec2train.job import state
from ec2train.job.spec import JobSpec, get_json, get_text, job_file, put_text
from ec2train.spot import EXIT_INTERRUPTED, Imds

EXIT_RELAUNCH = 3
STOP_GRACE_SECONDS = 110.0  # SIGTERM lets fit finish its step and upload; AWS gives spot 120 s
EXIT_FOR = {"end": 0, "leave": EXIT_INTERRUPTED, "relaunch": EXIT_RELAUNCH}
META = "/latest/meta-data/"


def instance_facts(imds: Imds) -> dict[str, str]:
    """Who this instance is, from IMDSv2: id, type, spot or on-demand, and its group (instance
    tags in IMDS; the launch template enables them)."""
    facts = {
        "instance": imds.get(META + "instance-id") or "?",
        "instance_type": imds.get(META + "instance-type") or "?",
        "lifecycle": imds.get(META + "instance-life-cycle") or "on-demand",
    }
    group = imds.get(META + "tags/instance/aws:autoscaling:groupName")
    if group:
        facts["group"] = group
    return facts


@dataclass
class Attempt:
    """The attempt this runner owns: where its files are, and how it reports."""

    spec: JobSpec
    prefix: s3.S3Uri
    workdir: Path
    facts: dict[str, str]
    status: dict[str, Any]
    clock: Callable[[], float] = time.time

    @property
    def log_path(self) -> Path:
        return self.workdir / f"attempt-{len(self.status['attempts']):03d}.log"

    @property
    def log_uri(self) -> s3.S3Uri:
        return job_file(self.prefix, f"logs/{self.log_path.name.removesuffix('.log')}-{self.facts['instance']}.log")

    def say(self, line: str) -> None:
        with open(self.log_path, "a", encoding="utf-8") as f:
            f.write(f"[runner {state.iso(self.clock())}] {line}\n")

    def log_text(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace") if self.log_path.exists() else ""

    def sync(self) -> None:
        """Mirror the log and the status (with the epoch fit reached) to S3. The epoch is read
        from the log at every sync, the last one too: a fit that logs an epoch and ends between
        two syncs still counts it."""
        done, total = state.progress(self.log_text())
        self.status.update(epoch=max(done, self.status.get("epoch") or 0), epochs=total or self.status.get("epochs"))
        self.status["updated_at"] = self.clock()
        if self.log_path.exists():
            s3.upload_file(self.log_path, self.log_uri)
        put_text(job_file(self.prefix, "status.json"), json.dumps(self.status, indent=2))

    def group(self) -> str:
        return self.facts.get("group") or self.spec.group

    def end_group(self) -> None:
        self.say(f"setting the desired capacity of {self.group()} to 0: the job is over")
        aws.client("autoscaling", region=self.spec.region).set_desired_capacity(
            AutoScalingGroupName=self.group(), DesiredCapacity=0, HonorCooldown=False
        )


def _open(job_uri: str, workdir: Path, imds: Imds, clock: Callable[[], float], wait_poll: float) -> tuple[Attempt, str]:
    prefix = s3.parse_uri(job_uri.rstrip("/"))
    text = get_text(job_file(prefix, "job.json"))
    if text is None:
        raise UserError(f"no job.json under {prefix}/_job/: was the job submitted with this --s3-uri?")
    spec = JobSpec.from_json(text)
    facts = instance_facts(imds)
    status = get_json(job_file(prefix, "status.json")) or state.new_status(spec.name, clock())
    # Capacity rebalancing starts the replacement before the old instance is gone: let it finish.
    while state.previous_alive(status, facts["instance"], clock()):
        time.sleep(wait_poll)
        status = get_json(job_file(prefix, "status.json")) or status
    status, decision = state.begin_attempt(status, spec, facts, clock())
    return Attempt(spec, prefix, workdir, facts, status, clock), decision


def _fetch_data(att: Attempt) -> Path:
    from ec2train.data import fetch_dataset

    dest = att.workdir / "data"
    att.say(f"data: {att.spec.data} -> {dest} (once per instance)")
    return fetch_dataset(att.spec.data, dest)


def fit_command(att: Attempt, data: Path) -> list[str]:
    """fit with the job's arguments and this attempt's folders. On a spot instance the runner has
    just heard IMDS answer, so fit watches for the notice with --spot-watch on (auto would switch
    the watcher off when a loaded instance answers its first request late); a --spot-watch in the
    job's own arguments wins."""
    watch = (
        ["--spot-watch", "on"]
        if att.facts.get("lifecycle") == "spot" and not _has_option(att.spec.fit_args, "--spot-watch")
        else []
    )
    return [
        sys.executable,
        "-m",
        "ec2train",
        "fit",
        *att.spec.fit_args,
        *watch,
        "--data",
        str(data),
        "--output",
        str(att.workdir / "output"),
        "--logdir",
        str(att.workdir / "runs"),
        "--resume",
        "auto",
        "--s3-uri",
        att.spec.s3_uri,
    ]


def _has_option(args: list[str], name: str) -> bool:
    return any(a == name or a.startswith(name + "=") for a in args)


def _stop(proc: subprocess.Popen, grace: float) -> int:
    """SIGTERM (fit stops after its step and uploads its checkpoint), SIGKILL after the grace."""
    proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait()


def _train(att: Attempt, data: Path, grace: float) -> tuple[int, bool]:
    """Run fit, syncing every spec.sync_seconds; returns (exit code, stopped by --max-hours)."""
    cmd = fit_command(att, data)
    att.say("running: " + " ".join(cmd[1:]))
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "COLUMNS": "200"}  # one line per epoch, unwrapped
    with open(att.log_path, "a", encoding="utf-8") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=att.workdir)
    # Instance shutdown (scale-in, cancel) SIGTERMs us: pass it on, fit saves and exits 75.
    previous = signal.signal(signal.SIGTERM, lambda *_: proc.send_signal(signal.SIGTERM))
    att.status["state"] = "running"
    try:
        while True:
            try:
                return proc.wait(timeout=max(0.0, min(att.spec.sync_seconds, att.spec.deadline - att.clock()))), False
            except subprocess.TimeoutExpired:
                pass
            if att.clock() >= att.spec.deadline:
                att.say(f"--max-hours {att.spec.max_hours:g} reached: stopping fit")
                return _stop(proc, grace), True
            att.sync()
    finally:
        signal.signal(signal.SIGTERM, previous)
        if proc.poll() is None:
            proc.kill()


def run_job(
    job_uri: str,
    workdir: str | Path,
    *,
    imds_endpoint: str | None = None,
    clock: Callable[[], float] = time.time,
    grace: float = STOP_GRACE_SECONDS,
    wait_poll: float = 15.0,
) -> int:
    """One instance's part of a job; returns the exit status the user data acts on."""
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    att, decision = _open(job_uri, workdir, Imds(imds_endpoint), clock, wait_poll)
    att.say(
        f"attempt {len(att.status['attempts'])} on {att.facts}: {decision} ({att.status['state']}) {att.status['reason']}"
    )
    if decision == "run":
        att.sync()
        exit_code, timed_out = None, False
        try:
            data = _fetch_data(att)
            exit_code, timed_out = _train(att, data, grace)
        except UserError as exc:
            att.say(f"could not start fit: {exc}")
        att.say(f"fit ended: exit {exit_code}")
        tail = att.log_text().splitlines()[-state.LOG_TAIL_LINES :]
        att.status, decision = state.end_attempt(att.status, att.spec, exit_code, tail, clock(), timed_out)
        att.say(f"outcome: {att.status['state']} {att.status['reason']}".rstrip())
    if decision == "end":
        att.end_group()
    att.sync()
    return EXIT_FOR[decision]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m ec2train.job.runner", description="Run one attempt of an ec2train job."
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
