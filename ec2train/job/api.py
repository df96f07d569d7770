"""submit, status, logs, cancel: the library behind `ec2train job ...`.

Nothing of ours keeps running: AWS's Auto Scaling group keeps one instance alive (and replaces
a reclaimed spot one); the runner on it trains and ends the job; these functions only read S3
and the group, or create and delete what a job is made of.
"""

from __future__ import annotations

import json
import re
import textwrap
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ec2train import aws, s3
from ec2train.deploy import StepRunner
from ec2train.job import cost, state, workers
from ec2train.job.dist import prepare_wheel, upload_wheel
from ec2train.job.nodes import NodeFiles, StatusFile
from ec2train.job.plan import (
    AMI_PLACEHOLDER,
    ROOT_DEVICE_PLACEHOLDER,
    SPOT_ALLOCATION,
    SUBNETS_PLACEHOLDER,
    Existing,
    Resources,
    Where,
    cancel_plan,
    submit_plan,
    user_data,
)
from ec2train.job.spec import (
    JOB_TAG,
    MAX_NODES,
    RDZV_PORT,
    URI_TAG,
    JobError,
    JobSpec,
    check_fit_args,
    check_name,
    get_json,
    get_text,
    job_file,
    put_text,
    resource_name,
)
from ec2train.policies import PolicyTemplateError, render_policy

DLAMI_PARAM = "/aws/service/deeplearning/ami/x86_64/oss-nvidia-driver-gpu-pytorch-2.12-ubuntu-24.04/latest/ami-id"


@dataclass(frozen=True)
class SubmitRequest:
    name: str
    s3_uri: str
    data: str
    fit_args: list[str]
    instance_type: str = "g4dn.xlarge"
    spot: bool = False
    max_hours: float = 24.0
    max_failures: int = 2
    disk_gb: int = 100
    ami: str | None = None
    subnet_ids: list[str] | None = None
    ssh_from: str | None = None  # an IPv4 address: SSH is allowed from it (/32) only
    key_name: str | None = None
    wheel: str | None = None  # a wheel to install instead of building one of this checkout
    sync_seconds: float = 10.0
    nodes: int = 1
    efa: bool = False
    rdzv_port: int = RDZV_PORT
    heartbeat_seconds: float = 10.0
    peer_timeout_seconds: float = 60.0
    stop_grace_seconds: float = 30.0


def _region(region: str | None) -> str:
    from ec2train.deploy import check_region

    return check_region(region or aws.region_of())


def _runner(region: str, dry_run: bool, console: Any) -> StepRunner:
    return StepRunner(region, dry_run=dry_run, console=console)


# --------------------------------------------------------------------------- submit


def _check_prefix(req: SubmitRequest) -> s3.S3Uri:
    """The job's prefix, checked against the IAM template it will be written into, before
    anything is built or sent."""
    prefix = s3.parse_uri(req.s3_uri)
    if not prefix.key.strip("/"):
        raise JobError(f"--s3-uri {req.s3_uri}: name a prefix for the job (s3://bucket/prefix), not a whole bucket")
    prefix = s3.S3Uri(prefix.bucket, prefix.key.rstrip("/"))
    try:
        render_policy("ec2-s3-access", Partition="aws", Bucket=prefix.bucket, Prefix=prefix.key)
    except PolicyTemplateError:
        raise JobError(
            f"--s3-uri {req.s3_uri}: the instance role's policy names this prefix, and IAM can only take letters, "
            "digits, . _ - = and / there (no spaces, * ? $ ( ) or quotes); choose such a prefix"
        ) from None
    return prefix


def _check(req: SubmitRequest) -> tuple[s3.S3Uri, list[str], str | None]:
    check_name(req.name)
    prefix = _check_prefix(req)
    args = check_fit_args(req.fit_args)
    workers.split_nproc(args)  # a bad --nproc-per-node fails here, not on the instances
    if not req.max_hours > 0 or req.max_failures < 1 or req.disk_gb < 1:
        raise JobError("--max-hours must be > 0, --max-failures >= 1 and --disk-gb >= 1")
    if not 1 <= req.nodes <= MAX_NODES:
        raise JobError(f"--nodes {req.nodes}: from 1 to {MAX_NODES}")
    if req.nodes > 1 and req.subnet_ids and len(req.subnet_ids) > 1:
        raise JobError(
            f"--nodes {req.nodes} runs in a cluster placement group, which is in one Availability Zone: give one --subnet-id"
        )
    if not (1024 <= req.rdzv_port <= 65535 and req.heartbeat_seconds > 0 and req.stop_grace_seconds > 0):
        raise JobError("the rendezvous port must be 1024-65535, heartbeat and stop grace > 0")
    if req.peer_timeout_seconds < 3 * req.heartbeat_seconds:
        # A node that cannot reach S3 fences itself (state.fence_after) at least a heartbeat after
        # its last one, and is gone a heartbeat before its peers may call it lost.
        raise JobError(
            "the peer timeout must be at least three heartbeats, or a slow write looks like a lost node "
            "and a node that cannot reach S3 has no time to stop its training before it is called lost"
        )
    cidr = None
    if req.ssh_from:
        import ipaddress

        try:
            cidr = f"{ipaddress.IPv4Address(req.ssh_from.removesuffix('/32'))}/32"
        except ValueError:
            raise JobError(
                f"--ssh-from {req.ssh_from!r}: give one IPv4 address (SSH is allowed from it alone)"
            ) from None
    return prefix, args, cidr


def _types(req: SubmitRequest) -> list[str]:
    """The instance types the group may launch; --efa refused where the asked type has none
    (the built-in list; a real run asks EC2 too, see _check_efa)."""
    if req.efa and req.instance_type in cost.PRICES and req.instance_type not in cost.EFA_TYPES:
        family = req.instance_type.split(".")[0]
        have = [
            t
            for t in sorted(cost.EFA_TYPES, key=lambda t: cost.PRICES.get(t, (0, 1e9))[1])
            if t.startswith(family + ".")
        ]
        raise JobError(
            f"--efa: {req.instance_type} has no Elastic Fabric Adapter"
            + (f" (in its family: {', '.join(have)})" if have else "")
            + "; drop --efa (NCCL then talks over TCP) or pick such a --type"
        )
    return cost.spot_types(req.instance_type, efa=req.efa) if req.spot else [req.instance_type]


def _check_efa(runner: StepRunner, types: list[str]) -> None:
    info = runner.call("ec2", "describe_instance_types", InstanceTypes=types)["InstanceTypes"]
    without = sorted(t["InstanceType"] for t in info if not t.get("NetworkInfo", {}).get("EfaSupported"))
    if without or len(info) < len(types):
        raise JobError(
            f"--efa: {', '.join(without) or 'some of ' + ', '.join(types)} has no Elastic Fabric Adapter "
            "(ec2:DescribeInstanceTypes); drop --efa (NCCL then talks over TCP) or pick a type that has one"
        )


def _discover(runner: StepRunner, req: SubmitRequest, prefix: s3.S3Uri, types: list[str]) -> Where:
    """Reads before planning (a real run): who we are, the bucket, the AMI, the subnets, no clash."""
    if runner.dry_run:
        runner.note(
            "A real run first reads: sts:GetCallerIdentity, s3:HeadBucket, autoscaling:DescribeAutoScalingGroups, "
            "ssm:GetParameter, ec2:DescribeImages, ec2:DescribeSubnets"
            + (", ec2:DescribeInstanceTypes" if req.efa else "")
            + " (skipped here; placeholders below)."
        )
        shown = req.subnet_ids or [SUBNETS_PLACEHOLDER if req.nodes == 1 else "<one default-VPC subnet>"]
        return Where("aws", runner.region, "<ACCOUNT_ID>", req.ami or AMI_PLACEHOLDER, ROOT_DEVICE_PLACEHOLDER, shown)
    arn = runner.call("sts", "get_caller_identity")["Arn"]
    partition, account = arn.split(":")[1], arn.split(":")[4]
    runner.call("s3", "head_bucket", Bucket=prefix.bucket)
    name = resource_name(req.name)
    if runner.call("autoscaling", "describe_auto_scaling_groups", AutoScalingGroupNames=[name])["AutoScalingGroups"]:
        raise JobError(
            f"a job named {req.name!r} exists; see it with `ec2train job status {req.name}`, "
            f"remove it with `ec2train job cancel {req.name}`, or pick another name"
        )
    if req.efa:
        _check_efa(runner, types)
    ami = req.ami or runner.call("ssm", "get_parameter", Name=DLAMI_PARAM)["Parameter"]["Value"]
    images = runner.call("ec2", "describe_images", ImageIds=[ami])["Images"]
    if not images:
        raise JobError(f"AMI {ami} not found in {runner.region}; pass --ami")
    subnets: list[dict[str, Any]]
    if req.subnet_ids:
        subnets = runner.call("ec2", "describe_subnets", SubnetIds=req.subnet_ids)["Subnets"]
    else:
        subnets = runner.call("ec2", "describe_subnets", Filters=[{"Name": "default-for-az", "Values": ["true"]}])[
            "Subnets"
        ]
        if not subnets:
            raise JobError(f"no default VPC in {runner.region}: pass --subnet-id (one or more, of one VPC)")
        subnets = sorted(subnets, key=lambda s: s.get("AvailabilityZone", ""))
    if req.nodes > 1:
        runner.note(f"{req.nodes} nodes in one zone: {subnets[0].get('AvailabilityZone')} (--subnet-id picks another)")
    return Where(
        partition,
        runner.region,
        account,
        ami,
        images[0]["RootDeviceName"],
        [s["SubnetId"] for s in subnets],
        subnets[0]["VpcId"],
    )


def summary(req: SubmitRequest, types: list[str], width: int = 110) -> list[str]:
    """What a dry run says first: what is created, the types that may run, the price, the worst case."""
    n, market = req.nodes, "spot" if req.spot else "on-demand"
    inbound = "only from its own members" if (n > 1 or req.efa) else "none"
    if req.ssh_from:
        inbound += ", SSH from one address"
    where = " in a cluster placement group (one zone)" if n > 1 else ""
    what = f"{n} {market}"
    if req.spot and len(types) > 1:
        what += (
            f", {SPOT_ALLOCATION} over {', '.join(types)} (as many GPUs as {req.instance_type}, "
            f"at most {cost.SPOT_PRICE_RATIO:g}x its on-demand price)"
        )
    else:
        what += f" {types[0]}"
    lines = [
        f"creates    an Auto Scaling group of {n} instance{'s' if n > 1 else ''}{where}, its launch template, "
        f"a security group (inbound: {inbound}), a role and instance profile (this prefix, this group), "
        "a scheduled end at --max-hours; in S3: the wheel, _job/job.json, _job/status.json",
        f"instances  {what}" + (", with EFA" if req.efa else ""),
        *cost.price_lines(types, n, req.spot, req.max_hours, req.disk_gb),
        f"ends       by itself when fit ends ({'rank 0' if n > 1 else 'its runner'} sets the group to 0), "
        f"at --max-hours {req.max_hours:g}, "
        f"or with `ec2train job cancel {req.name}`",
    ]
    if n > 1:
        lines.append(
            f"note       training starts when all {n} run at once in one zone"
            + (
                f" (spot capacity for {n} can take a while: `ec2train job status {req.name}` shows AWS's reason)"
                if req.spot
                else ""
            )
            + "; losing any node pauses all until the group is whole again"
        )
    lines.append(f"prices     {cost.REGION_OF_PRICES} list prices as of {cost.PRICES_AS_OF}; spot prices move hourly")
    wrapped = [f"summary of job {req.name}:"]
    for line in lines:  # a `command` is never split over two lines
        line = re.sub(r"`[^`]*`", lambda m: m.group(0).replace(" ", "\0"), line)
        wrapped += [w.replace("\0", " ") for w in textwrap.wrap(line, width, subsequent_indent=" " * 11)]
    return [*wrapped, ""]


# The request's settings job.json carries as they are (the runners read them).
_PASSED_ON = (
    "sync_seconds",
    "nodes",
    "efa",
    "rdzv_port",
    "heartbeat_seconds",
    "peer_timeout_seconds",
    "stop_grace_seconds",
)


def _spec(req: SubmitRequest, prefix: s3.S3Uri, fit_args: list[str], region: str) -> JobSpec:
    return JobSpec(
        req.name,
        str(prefix),
        req.data,
        fit_args,
        region,
        resource_name(req.name),
        time.time(),
        req.max_hours,
        req.max_failures,
        req.spot,
        **{name: getattr(req, name) for name in _PASSED_ON},
    )


def submit(
    req: SubmitRequest, *, region: str | None = None, dry_run: bool = False, console: Any = None
) -> dict[str, Any]:
    """Create the job: its files in S3, then role, profile, security group, placement group
    (several nodes), launch template and group. Everything is checked and planned before the
    first byte is sent."""
    prefix, fit_args, cidr = _check(req)
    types = _types(req)
    runner = _runner(_region(region), dry_run, console)
    if dry_run:
        runner.note(f"dry run: job {req.name} in {runner.region}; nothing below is sent, nothing is built or uploaded.")
        for line in summary(req, types):
            runner.note(line)
    where = _discover(runner, req, prefix, types)
    spec = _spec(req, prefix, fit_args, runner.region)
    wheel = prepare_wheel(str(prefix), wheel=req.wheel, dry_run=dry_run)
    settings = {
        "WHEEL_URI": wheel.uri,
        "WHEEL_SHA256": wheel.sha256,
        "INSTALL_SPEC": "",
        "LOGIN_USER": "ubuntu",
        "AUTOSTOP_MINUTES": "0",
        "JOB_URI": str(prefix),
        "JOB_GROUP": spec.group,
        "REGION": runner.region,
    }
    res = Resources(
        req.name,
        prefix,
        req.data,
        req.instance_type,
        types if req.spot else [],
        req.disk_gb,
        req.key_name,
        cidr,
        nodes=req.nodes,
        efa=req.efa,
        deadline=spec.deadline,
    )
    script = user_data(settings)
    steps = submit_plan(res, where, script)  # renders every policy: a bad value fails before anything is sent
    files = {
        job_file(prefix, "job.json"): spec.to_json(),
        job_file(prefix, "status.json"): json.dumps(state.new_status(req.name, spec.submitted_at, req.nodes), indent=2),
    }
    if dry_run:
        runner.note(f"would upload a wheel of this checkout to {wheel.uri}, then:")
        for uri, text in files.items():
            runner.note(f"s3:PutObject {uri}\n{text}")
        runner.note("user data of the launch template (base64 in the request):\n" + script)
    else:
        upload_wheel(wheel)
        for uri, text in files.items():
            put_text(uri, text)
    runner.run(steps)
    return {
        "name": req.name,
        "group": spec.group,
        "s3_uri": str(prefix),
        "wheel": wheel.uri,
        "spot_types": types if req.spot else [],
        "nodes": req.nodes,
        "dry_run": dry_run,
    }


# --------------------------------------------------------------------------- reading a job


def _group(asg: Any, name: str) -> dict[str, Any] | None:
    groups = asg.describe_auto_scaling_groups(AutoScalingGroupNames=[resource_name(name)])["AutoScalingGroups"]
    return groups[0] if groups else None


def job_prefix(name: str, s3_uri: str | None, group: dict[str, Any] | None) -> s3.S3Uri:
    if s3_uri:
        return s3.parse_uri(s3_uri.rstrip("/"))
    tags = {t["Key"]: t["Value"] for t in (group or {}).get("Tags", [])}
    if URI_TAG not in tags:
        raise JobError(
            f"no job named {name!r} here (no group {resource_name(name)}); "
            "for a cancelled job pass its --s3-uri, or check --region"
        )
    return s3.parse_uri(tags[URI_TAG])


def node_rows(
    doc: dict[str, Any], nodes: dict[str, dict[str, Any]], now: float, timeout: float
) -> list[dict[str, Any]]:
    """One row per instance the job ran on: its rank in the latest attempt it was part of, its
    state (lost: silent for longer than the peer timeout), its last heartbeat."""
    ranks: dict[str, tuple[int, int]] = {}
    for a in doc.get("attempts") or []:
        for m in a.get("members") or []:
            ranks[m["instance"]] = (a["n"], m["rank"])
    rows = []
    for iid, n in sorted(nodes.items(), key=lambda kv: kv[1].get("started_at") or 0):
        node_state = n.get("state") or "?"
        if node_state != "exited" and not state.fresh(n, now, timeout):
            node_state = "lost"
        attempt, rank = ranks.get(iid, (None, None))
        rows.append(
            {
                "instance": iid,
                "type": n.get("instance_type"),
                "spot": n.get("lifecycle") == "spot",
                "ip": n.get("ip"),
                "attempt": attempt,
                "rank": rank,
                "state": node_state,
                "heartbeat_at": n.get("heartbeat_at"),
                "heartbeat_age": None if n.get("heartbeat_at") is None else max(0.0, now - float(n["heartbeat_at"])),
            }
        )
    return rows


def _activities(asg: Any, name: str) -> list[dict[str, Any]]:
    try:
        acts = asg.describe_scaling_activities(AutoScalingGroupName=resource_name(name), MaxRecords=5)["Activities"]
    except Exception:  # noqa: BLE001 - activities are a nicety; the state comes from S3
        return []
    keep = ("StartTime", "StatusCode", "StatusMessage", "Description")
    return [{k: str(a.get(k, "")) for k in keep} for a in acts]


def capacity_note(group: dict[str, Any] | None, activities: list[dict[str, Any]], job_state: str) -> str | None:
    """When the group has fewer instances than it wants: say so, in AWS's own words."""
    if group is None or job_state in state.TERMINAL:
        return None
    running = [
        i for i in group["instances"] if i["state"] in ("InService", "Pending", "Pending:Wait", "Pending:Proceed")
    ]
    if len(running) >= group["desired"]:
        return None
    failed = next(
        (a for a in activities if a.get("StatusCode") in ("Failed", "Cancelled") or a.get("StatusMessage")), None
    )
    said = f"; AWS says: {failed['StatusMessage'] or failed['Description']}" if failed else ""
    return f"waiting for capacity: {len(running)} of {group['desired']} instances{said}"


def status(
    name: str, *, s3_uri: str | None = None, region: str | None = None, now: float | None = None
) -> dict[str, Any]:
    """State, epochs, each node (instance, type, spot, rank, state, heartbeat), interruptions,
    failures, the cost of every node over every attempt, the group and its last activities."""
    check_name(name)
    now = time.time() if now is None else now
    asg = aws.client("autoscaling", region=_region(region))
    group = _group(asg, name)
    prefix = job_prefix(name, s3_uri, group)
    doc = get_json(job_file(prefix, "status.json")) or state.new_status(name, 0)
    spec_text = get_text(job_file(prefix, "job.json"))
    timeout = JobSpec.from_json(spec_text).peer_timeout_seconds if spec_text else JobSpec.peer_timeout_seconds
    nodes = NodeFiles(prefix).all()
    out = {
        **doc,
        "s3_uri": str(prefix),
        "node_rows": node_rows(doc, nodes, now, timeout),
        "cost": cost.estimate(list(nodes.values()), now, timeout),
        "prices_as_of": cost.PRICES_AS_OF,
        "group": None,
        "activities": [],
    }
    if group is not None:
        out["group"] = {
            "desired": group["DesiredCapacity"],
            "instances": [
                {"id": i["InstanceId"], "state": i["LifecycleState"], "type": i.get("InstanceType")}
                for i in group.get("Instances", [])
            ],
        }
        out["activities"] = _activities(asg, name)
        out["capacity"] = capacity_note(out["group"], out["activities"], doc["state"])
        if group["DesiredCapacity"] == 0 and doc["state"] not in state.TERMINAL:
            out["reason"] = (
                out.get("reason") or "the group is at 0 but the runners never reported an end: see `ec2train job logs`"
            )
    return out


def _log_keys(prefix: s3.S3Uri, client: Any) -> list[str]:
    logs = job_file(prefix, "logs/")
    return sorted(o["Key"] for o in s3.list_objects(client, logs))


def logs(
    name: str,
    *,
    s3_uri: str | None = None,
    region: str | None = None,
    follow: bool = False,
    write: Callable[[str], None] = print,
    poll_seconds: float = 5.0,
    sleep: Callable[[float], None] = time.sleep,
) -> None:
    """Every attempt's log in order; with follow, keep printing the newest until the job ends."""
    check_name(name)
    reg = _region(region)
    prefix = job_prefix(name, s3_uri, None if s3_uri else _group(aws.client("autoscaling", region=reg), name))
    client, shown = aws.client("s3", region=reg), dict[str, int]()
    while True:
        for key in _log_keys(prefix, client):
            text = get_text(s3.S3Uri(prefix.bucket, key), client=client) or ""
            if key not in shown:
                write(f"==> {key.rsplit('/', 1)[-1]} <==")
            new = text[shown.get(key, 0) :]
            if new:
                write(new.rstrip("\n"))
            shown[key] = len(text)
        if not follow:
            return
        doc = get_json(job_file(prefix, "status.json")) or {}
        if doc.get("state") in state.TERMINAL:
            return
        sleep(poll_seconds)


# --------------------------------------------------------------------------- cancel


def _owned(tags: list[dict[str, str]] | None, name: str) -> bool:
    return any(t.get("Key") == JOB_TAG and t.get("Value") == name for t in tags or [])


def _find(runner: StepRunner, name: str, prefix: s3.S3Uri | None) -> Existing:
    """What exists of the job; IAM by name, deleted only when it carries the job's tag."""
    rname, found = resource_name(name), Existing()
    groups = runner.call("autoscaling", "describe_auto_scaling_groups", AutoScalingGroupNames=[rname])[
        "AutoScalingGroups"
    ]
    if groups:
        found.group, found.instances = True, [i["InstanceId"] for i in groups[0].get("Instances", [])]
    templates = runner.call("ec2", "describe_launch_templates", Filters=[{"Name": f"tag:{JOB_TAG}", "Values": [name]}])
    found.template = any(t["LaunchTemplateName"] == rname for t in templates["LaunchTemplates"])
    found.security_groups = [
        g["GroupId"]
        for g in runner.call("ec2", "describe_security_groups", Filters=[{"Name": f"tag:{JOB_TAG}", "Values": [name]}])[
            "SecurityGroups"
        ]
    ]
    profile = runner.read("iam", "get_instance_profile", InstanceProfileName=rname)
    if profile is not None:
        if not _owned(profile["InstanceProfile"].get("Tags"), name):
            raise JobError(f"instance profile {rname} exists but is not tagged {JOB_TAG}={name}; not deleting it")
        found.profile_roles = [r["RoleName"] for r in profile["InstanceProfile"]["Roles"]]
    role = runner.read("iam", "get_role", RoleName=rname)
    if role is not None:
        if not _owned(role["Role"].get("Tags"), name):
            raise JobError(f"role {rname} exists but is not tagged {JOB_TAG}={name}; not deleting it")
        found.role_policies = runner.call("iam", "list_role_policies", RoleName=rname)["PolicyNames"]
    groups = runner.read(
        "ec2", "describe_placement_groups", Filters=[{"Name": f"tag:{JOB_TAG}", "Values": [name]}]
    ) or {"PlacementGroups": []}
    found.placement_group = any(g.get("GroupName") == rname for g in groups["PlacementGroups"])
    if prefix is not None:
        found.dist_keys = [o["Key"] for o in s3.list_objects(runner.client("s3"), prefix.child("_dist/"))]
    return found


def cancel(
    name: str, *, s3_uri: str | None = None, region: str | None = None, dry_run: bool = False, console: Any = None
) -> dict[str, Any]:
    """Stop the job and delete everything it created (its outputs in S3 stay). Safe to repeat."""
    check_name(name)
    runner = _runner(_region(region), dry_run, console)
    if dry_run:
        runner.note(f"dry run: cancel job {name} in {runner.region}; nothing below is sent.")
        runner.note(
            f"removes    the group (terminating its instances), its launch template, security group, placement "
            f"group, role and instance profile, and the wheel in _dist/: after it, nothing of job {name} bills; "
            "its checkpoint, model, logs and status stay in S3"
        )
        runner.note(
            "A real run first finds what exists (group, launch template, security group, placement group, "
            "profile, role) and deletes only that."
        )
        found = Existing(
            True,
            ["<instance ids>"],
            True,
            ["<sg-id>"],
            [resource_name(name)],
            ["ec2train-job"],
            ["<_dist/ keys>"],
            placement_group=True,
        )
        prefix = s3.parse_uri(s3_uri) if s3_uri else None
        runner.run(cancel_plan(name, found, prefix.bucket if prefix else "<bucket>"))
        return {"name": name, "deleted": [], "dry_run": True}
    group = _group(runner.client("autoscaling"), name)
    prefix = job_prefix(name, s3_uri, group) if (s3_uri or group) else None
    found = _find(runner, name, prefix)
    steps = cancel_plan(name, found, prefix.bucket if prefix else None)
    runner.run(steps)
    if prefix is not None:
        _mark_cancelled(prefix, name)
    return {"name": name, "deleted": [s.api for s in steps], "dry_run": False}


def _mark_cancelled(prefix: s3.S3Uri, name: str) -> None:
    if get_json(job_file(prefix, "status.json")) is not None:
        StatusFile(prefix).update(lambda s: state.cancelled(s, "ec2train job cancel", time.time()))
