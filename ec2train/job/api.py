"""submit, status, logs, cancel: the library behind `ec2train job ...`.

Nothing of ours keeps running: AWS's Auto Scaling group keeps one instance alive (and replaces
a reclaimed spot one); the runner on it trains and ends the job; these functions only read S3
and the group, or create and delete what a job is made of.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ec2train import aws, s3
from ec2train.job import cost, state
from ec2train.job.dist import publish_wheel
from ec2train.job.plan import (
    AMI_PLACEHOLDER,
    ROOT_DEVICE_PLACEHOLDER,
    SUBNETS_PLACEHOLDER,
    Existing,
    Resources,
    Runner,
    Where,
    cancel_plan,
    submit_plan,
    user_data,
)
from ec2train.job.spec import (
    JOB_TAG,
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


def _region(region: str | None) -> str:
    from ec2train.deploy import check_region

    return check_region(region or aws.region_of())


def _runner(region: str, dry_run: bool, console: Any) -> Runner:
    return Runner(region, dry_run=dry_run, console=console)


# --------------------------------------------------------------------------- submit


def _check(req: SubmitRequest) -> tuple[s3.S3Uri, list[str], str | None]:
    check_name(req.name)
    prefix = s3.parse_uri(req.s3_uri)
    if not prefix.key.strip("/"):
        raise JobError(f"--s3-uri {req.s3_uri}: name a prefix for the job (s3://bucket/prefix), not a whole bucket")
    prefix = s3.S3Uri(prefix.bucket, prefix.key.rstrip("/"))
    args = check_fit_args(req.fit_args)
    if not req.max_hours > 0 or req.max_failures < 1 or req.disk_gb < 1:
        raise JobError("--max-hours must be > 0, --max-failures >= 1 and --disk-gb >= 1")
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


def _discover(runner: Runner, req: SubmitRequest, prefix: s3.S3Uri) -> Where:
    """Reads before planning (a real run): who we are, the bucket, the AMI, the subnets, no clash."""
    if runner.dry_run:
        runner.note(
            "A real run first reads: sts:GetCallerIdentity, s3:HeadBucket, autoscaling:DescribeAutoScalingGroups, "
            "ssm:GetParameter, ec2:DescribeImages, ec2:DescribeSubnets (skipped here; placeholders below)."
        )
        return Where(
            "aws",
            runner.region,
            "<ACCOUNT_ID>",
            req.ami or AMI_PLACEHOLDER,
            ROOT_DEVICE_PLACEHOLDER,
            req.subnet_ids or [SUBNETS_PLACEHOLDER],
        )
    arn = runner.call("sts", "get_caller_identity")["Arn"]
    partition, account = arn.split(":")[1], arn.split(":")[4]
    runner.call("s3", "head_bucket", Bucket=prefix.bucket)
    name = resource_name(req.name)
    if runner.call("autoscaling", "describe_auto_scaling_groups", AutoScalingGroupNames=[name])["AutoScalingGroups"]:
        raise JobError(
            f"a job named {req.name!r} exists; see it with `ec2train job status {req.name}`, "
            f"remove it with `ec2train job cancel {req.name}`, or pick another name"
        )
    ami = req.ami or runner.call("ssm", "get_parameter", Name=DLAMI_PARAM)["Parameter"]["Value"]
    images = runner.call("ec2", "describe_images", ImageIds=[ami])["Images"]
    if not images:
        raise JobError(f"AMI {ami} not found in {runner.region}; pass --ami")
    if req.subnet_ids:
        subnets = runner.call("ec2", "describe_subnets", SubnetIds=req.subnet_ids)["Subnets"]
    else:
        subnets = runner.call("ec2", "describe_subnets", Filters=[{"Name": "default-for-az", "Values": ["true"]}])[
            "Subnets"
        ]
        if not subnets:
            raise JobError(f"no default VPC in {runner.region}: pass --subnet-id (one or more, of one VPC)")
    return Where(
        partition,
        runner.region,
        account,
        ami,
        images[0]["RootDeviceName"],
        [s["SubnetId"] for s in subnets],
        subnets[0]["VpcId"],
    )


def submit(
    req: SubmitRequest, *, region: str | None = None, dry_run: bool = False, console: Any = None
) -> dict[str, Any]:
    """Create the job: its files in S3, then role, profile, security group, launch template and group."""
    from ec2train.job.cost import spot_types

    prefix, fit_args, cidr = _check(req)
    runner = _runner(_region(region), dry_run, console)
    if dry_run:
        runner.note(f"dry run: job {req.name} in {runner.region}; nothing below is sent, nothing is built or uploaded.")
    where = _discover(runner, req, prefix)
    types = spot_types(req.instance_type) if req.spot else []
    spec = JobSpec(
        req.name,
        str(prefix),
        req.data,
        fit_args,
        runner.region,
        resource_name(req.name),
        time.time(),
        req.max_hours,
        req.max_failures,
        req.spot,
        sync_seconds=req.sync_seconds,
    )
    wheel = publish_wheel(str(prefix), wheel=req.wheel, dry_run=dry_run)
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
    res = Resources(req.name, prefix, req.data, req.instance_type, types, req.disk_gb, req.key_name, cidr)
    script = user_data(settings)
    files = {
        job_file(prefix, "job.json"): spec.to_json(),
        job_file(prefix, "status.json"): json.dumps(state.new_status(req.name, spec.submitted_at), indent=2),
    }
    if dry_run:
        runner.note(f"would upload a wheel of this checkout to {wheel.uri}, then:")
        for uri, text in files.items():
            runner.note(f"s3:PutObject {uri}\n{text}")
        runner.note("user data of the launch template (base64 in the request):\n" + script)
    else:
        for uri, text in files.items():
            put_text(uri, text)
    runner.run(submit_plan(res, where, script))
    return {
        "name": req.name,
        "group": spec.group,
        "s3_uri": str(prefix),
        "wheel": wheel.uri,
        "spot_types": types,
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


def status(
    name: str, *, s3_uri: str | None = None, region: str | None = None, now: float | None = None
) -> dict[str, Any]:
    """State, epochs, instance, interruptions, failures, cost estimate, the group's last activities."""
    check_name(name)
    asg = aws.client("autoscaling", region=_region(region))
    group = _group(asg, name)
    prefix = job_prefix(name, s3_uri, group)
    doc = get_json(job_file(prefix, "status.json")) or state.new_status(name, 0)
    out = {
        **doc,
        "s3_uri": str(prefix),
        "cost": cost.estimate(doc, now),
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
        try:
            acts = asg.describe_scaling_activities(AutoScalingGroupName=resource_name(name), MaxRecords=5)["Activities"]
            out["activities"] = [
                f"{a.get('StartTime', '')} {a.get('StatusCode', '')}: {a.get('Description', '')}" for a in acts
            ]
        except Exception:  # noqa: BLE001 - activities are a nicety; the state comes from S3
            pass
        if group["DesiredCapacity"] == 0 and doc["state"] not in state.TERMINAL:
            out["reason"] = (
                out.get("reason") or "the group is at 0 but the runner never reported an end: see `ec2train job logs`"
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
    client, shown = aws.client("s3", region=reg), {}
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


def _find(runner: Runner, name: str, prefix: s3.S3Uri | None) -> Existing:
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
        runner.note(
            f"dry run: cancel job {name} in {runner.region}; nothing below is sent. A real run first finds "
            "what exists (group, launch template, security group, profile, role) and deletes only that."
        )
        found = Existing(
            True, ["<instance ids>"], True, ["<sg-id>"], [resource_name(name)], ["ec2train-job"], ["<_dist/ keys>"]
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
    uri = job_file(prefix, "status.json")
    doc = get_json(uri)
    if doc is not None and doc.get("state") not in state.TERMINAL:
        doc.update(state="cancelled", reason="ec2train job cancel", updated_at=time.time())
        put_text(uri, json.dumps(doc, indent=2))
