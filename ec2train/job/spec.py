"""What a job is: its name and the names of what it creates, its settings (job.json), and
where its files live under the S3 prefix.

    <s3-uri>/                 fit's own mirror: last.pt, model.pth, metrics.json, runs/
    <s3-uri>/_dist/<hash>/    the wheel the instance installs (ec2train.job.dist)
    <s3-uri>/_job/job.json    these settings; the runner reads them
    <s3-uri>/_job/status.json the job's state, attempts and counters (ec2train.job.state);
                              every change is a conditional write (If-Match), so runners on
                              several nodes never lose each other's updates
    <s3-uri>/_job/nodes/<instance-id>.json
                              one per instance, written by its runner alone: its private IP,
                              type, market, the attempt it waits for or trains in, its rank,
                              a heartbeat, and how its part of an attempt ended (ec2train.job.nodes)
    <s3-uri>/_job/logs/       one log per attempt and instance, mirrored every few seconds
"""

from __future__ import annotations

import json
import re
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ec2train import s3
from ec2train.errors import UserError

JOB_TAG = "ec2train:job"  # every resource a job creates carries it, with the job's name
URI_TAG = "ec2train:job-uri"  # on the group: where the job's files are, for status/logs/cancel
JOB_DIR = "_job"
NAME_RE = re.compile(r"^[a-z][a-z0-9-]{0,30}$")
# Options the runner sets itself on `fit` (the data folder, where outputs go, resume, mirror).
RUNNER_OWNS = ("--data", "--output", "--logdir", "--resume", "--s3-uri")
DEFAULT_MAX_HOURS = 24.0
DEFAULT_MAX_FAILURES = 2
MAX_NODES = 64  # a cluster placement group in one zone; beyond this, ask AWS about capacity first
RDZV_PORT = 29400  # rank 0's c10d store on its private IP (torchrun's customary port)


class JobError(UserError):
    """A job request that cannot go ahead; the message names the problem and the fix."""


def check_name(name: str) -> str:
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise JobError(f"job name {name!r}: use 1-31 lowercase letters, digits and '-', starting with a letter")
    return name


def resource_name(name: str) -> str:
    """The group, launch template, security group, role and instance profile are all called this."""
    return f"ec2train-job-{check_name(name)}"


def check_fit_args(args: list[str]) -> list[str]:
    """The user's `-- fit ...` arguments, without the leading `fit`; refuses what the runner sets."""
    args = list(args)
    if args and args[0] == "fit":
        args = args[1:]
    elif args and not args[0].startswith("-"):
        raise JobError(f"a job runs `ec2train fit`, not `{args[0]}`: write `-- fit --epochs 10 ...`")
    for arg in args:
        option = arg.split("=", 1)[0]
        if option in RUNNER_OWNS:
            raise JobError(
                f"{option} is set by the job runner; give the data with `job submit --data` and drop {option} after --"
            )
    return args


def job_file(prefix: str | s3.S3Uri, name: str) -> s3.S3Uri:
    base = prefix if isinstance(prefix, s3.S3Uri) else s3.parse_uri(prefix)
    return base.child(f"{JOB_DIR}/{name}")


def put_text(uri: s3.S3Uri, text: str, *, client: Any = None) -> None:
    """A small file (job.json, status.json) to S3, through the verified, encrypted upload."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / uri.key.rsplit("/", 1)[-1]
        path.write_text(text, encoding="utf-8")
        s3.upload_file(path, uri, client=client)


def get_text(uri: s3.S3Uri, *, client: Any = None) -> str | None:
    """A small file from S3, or None when there is no such object."""
    with tempfile.TemporaryDirectory() as tmp:
        try:
            path = s3.download_file(uri, Path(tmp) / "f", client=client)
        except s3.S3Error as exc:
            if "no such object" in str(exc):
                return None
            raise
        return path.read_text(encoding="utf-8", errors="replace")


def get_json(uri: s3.S3Uri, *, client: Any = None) -> dict[str, Any] | None:
    text = get_text(uri, client=client)
    return None if text is None else json.loads(text)


@dataclass(frozen=True)
class JobSpec:
    """job.json: everything the runner on the instance needs, and nothing secret."""

    name: str
    s3_uri: str
    data: str
    fit_args: list[str]
    region: str
    group: str
    submitted_at: float
    max_hours: float = DEFAULT_MAX_HOURS
    max_failures: int = DEFAULT_MAX_FAILURES
    spot: bool = False
    sync_seconds: float = 10.0  # how often the runner mirrors its log and status
    nodes: int = 1  # instances that train together (the group's desired capacity)
    efa: bool = False
    rdzv_port: int = RDZV_PORT
    # Node loss (docs/jobs.md): a runner writes its heartbeat every heartbeat_seconds; a node
    # silent for peer_timeout_seconds is lost, and its peers stop their training (SIGTERM, then
    # SIGKILL after stop_grace_seconds) instead of waiting out a collective's timeout.
    heartbeat_seconds: float = 10.0
    peer_timeout_seconds: float = 60.0
    stop_grace_seconds: float = 30.0

    @property
    def deadline(self) -> float:
        return self.submitted_at + self.max_hours * 3600

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> JobSpec:
        doc: dict[str, Any] = json.loads(text)
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in doc.items() if k in known})
