"""What `job submit` creates and `job cancel` deletes, as plans of requests (data first).

The plans run on the deploy planner's engine (`ec2train.deploy.StepRunner`): a dry run prints every
request with its parameters and policy documents and sends nothing; a real run sends the very
same steps. Reads a real run needs first (account, AMI, subnets, what exists) happen before
planning; a dry run shows placeholders for them.
"""

from __future__ import annotations

import base64
import json
import re
import shlex
import time
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

from ec2train import s3

# The one dry-run == real-run engine of the project; imported, not copied (see docs/jobs.md).
from ec2train.deploy import Ref, Retry, Step
from ec2train.job.spec import JOB_TAG, URI_TAG, JobError, resource_name
from ec2train.policies import render_policy

_SAFE_KEY = re.compile(r"^(?!.*//)[A-Za-z0-9._=-]+(/[A-Za-z0-9._=-]+)*/?$")
AMI_PLACEHOLDER = "<ami-id from the SSM parameter>"
SPOT_ALLOCATION = "price-capacity-optimized"
# The group's own end at --max-hours, for when no runner is left to end it (every instance
# gone while the group waits for capacity): after the runners' own stop and its grace.
SCHEDULED_END = "ec2train-max-hours"
SCHEDULED_END_MARGIN_SECONDS = 600
ROOT_DEVICE_PLACEHOLDER = "<root device of the AMI>"
SUBNETS_PLACEHOLDER = "<default-VPC subnet ids>"


@dataclass(frozen=True)
class Where:
    """The account-specific values a plan needs (placeholders in a dry run)."""

    partition: str
    region: str
    account: str
    ami: str
    root_device: str
    subnets: list[str]
    vpc: str | None = None


@dataclass(frozen=True)
class Resources:
    """What a job's plan creates; the launch template's user data is built by the caller."""

    name: str
    prefix: s3.S3Uri
    data: str
    instance_type: str
    spot_types: list[str] = field(default_factory=list)  # non-empty: spot, over these types
    disk_gb: int = 100
    key_name: str | None = None
    ssh_cidr: str | None = None  # x.x.x.x/32: the one inbound rule, when SSH was asked for
    nodes: int = 1
    efa: bool = False
    deadline: float | None = None  # submit + --max-hours: the group's scheduled end, a backstop

    @property
    def spot(self) -> bool:
        return bool(self.spot_types)

    @property
    def cluster(self) -> bool:
        """Several nodes: a cluster placement group, and a security group that admits its own members."""
        return self.nodes > 1


def _tags(name: str) -> list[dict[str, str]]:
    return [{"Key": JOB_TAG, "Value": name}, {"Key": "Name", "Value": resource_name(name)}]


def _data_statements(partition: str, prefix: s3.S3Uri, data: str) -> list[dict[str, Any]]:
    """Read-only access to the training data when it is in S3 outside the job's prefix."""
    if not data.startswith("s3://"):
        return []
    uri = s3.parse_uri(data, need_key=True, option="--data")
    inside = uri.bucket == prefix.bucket and uri.key.startswith(prefix.key.rstrip("/") + "/")
    if inside:
        return []
    if not _SAFE_KEY.match(uri.key):
        raise JobError(
            f"--data {data}: keys in an IAM policy may hold only letters, digits, . _ - = and /; rename the object"
        )
    arn = f"arn:{partition}:s3:::{uri.bucket}"
    if not uri.key.endswith("/"):  # one zip
        return [{"Sid": "ReadTheData", "Effect": "Allow", "Action": "s3:GetObject", "Resource": f"{arn}/{uri.key}"}]
    return [
        {
            "Sid": "ListTheData",
            "Effect": "Allow",
            "Action": "s3:ListBucket",
            "Resource": arn,
            "Condition": {"StringLike": {"s3:prefix": [uri.key, f"{uri.key}*"]}},
        },
        {"Sid": "ReadTheData", "Effect": "Allow", "Action": "s3:GetObject", "Resource": f"{arn}/{uri.key}*"},
    ]


def group_arn(where: Where, name: str) -> str:
    # The group's id is only known once it exists; its name pins it down.
    return f"arn:{where.partition}:autoscaling:{where.region}:{where.account}:autoScalingGroup:*:autoScalingGroupName/{resource_name(name)}"


def instance_policy(res: Resources, where: Where) -> dict[str, Any]:
    """The instance role: its own prefix (the shared template), the data read-only, and
    setting its own group's desired capacity (to end the job). Nothing else."""
    doc = render_policy(
        "ec2-s3-access", Partition=where.partition, Bucket=res.prefix.bucket, Prefix=res.prefix.key.rstrip("/")
    )
    doc["Statement"] += _data_statements(where.partition, res.prefix, res.data)
    doc["Statement"].append(
        {
            "Sid": "EndItsOwnGroup",
            "Effect": "Allow",
            "Action": "autoscaling:SetDesiredCapacity",
            "Resource": group_arn(where, res.name),
        }
    )
    return doc


def user_data(settings: dict[str, str]) -> str:
    """The first-boot script: the settings as shell assignments, then job/user_data.sh."""
    body = (resources.files("ec2train.job") / "user_data.sh").read_text(encoding="utf-8")
    lines = [f"{k}={shlex.quote(v)}" for k, v in settings.items()]
    return "#!/bin/bash\n" + "\n".join(lines) + "\n" + body.split("\n", 1)[1]


def launch_template_data(res: Resources, where: Where, sg: Any, script: str) -> dict[str, Any]:
    data: dict[str, Any] = {
        "ImageId": where.ami,
        "InstanceType": res.instance_type,
        "IamInstanceProfile": {"Name": resource_name(res.name)},
        # IMDSv2 only; one hop, so containers cannot reach the role's credentials; tags in
        # IMDS, so the runner finds its group without a describe permission.
        "MetadataOptions": {
            "HttpTokens": "required",
            "HttpPutResponseHopLimit": 1,
            "HttpEndpoint": "enabled",
            "InstanceMetadataTags": "enabled",
        },
        "BlockDeviceMappings": [
            {
                "DeviceName": where.root_device,
                "Ebs": {"VolumeSize": res.disk_gb, "VolumeType": "gp3", "Encrypted": True, "DeleteOnTermination": True},
            }
        ],
        "InstanceInitiatedShutdownBehavior": "terminate",  # a power-off from inside ends the instance
        "UserData": base64.b64encode(script.encode()).decode(),
        "TagSpecifications": [{"ResourceType": t, "Tags": _tags(res.name)} for t in ("instance", "volume")],
    }
    if res.efa:  # the EFA device is the instance's first network interface, in the job's group
        data["NetworkInterfaces"] = [
            {"DeviceIndex": 0, "InterfaceType": "efa", "Groups": [sg], "DeleteOnTermination": True}
        ]
    else:
        data["SecurityGroupIds"] = [sg]
    if res.key_name:
        data["KeyName"] = res.key_name
    return data


def group_request(res: Resources, where: Where) -> dict[str, Any]:
    name = resource_name(res.name)
    template = {"LaunchTemplateName": name, "Version": "$Latest"}
    req: dict[str, Any] = {
        "AutoScalingGroupName": name,
        "MinSize": 0,
        "MaxSize": res.nodes,
        "DesiredCapacity": res.nodes,
        # A cluster placement group lives in one zone: one subnet (api.submit chose it).
        "VPCZoneIdentifier": ",".join(where.subnets[:1] if res.cluster else where.subnets),
        "HealthCheckType": "EC2",
        "Tags": [
            {"Key": k, "Value": v, "PropagateAtLaunch": True, "ResourceId": name, "ResourceType": "auto-scaling-group"}
            for k, v in ((JOB_TAG, res.name), (URI_TAG, str(res.prefix)))
        ],
    }
    if res.cluster:
        req["PlacementGroup"] = name
    if not res.spot:
        req["LaunchTemplate"] = template
        return req
    # AWS, not us, replaces a reclaimed instance: from the cheapest pools among those with
    # capacity (price-capacity-optimized; docs/jobs.md says why), and early on a rebalance
    # recommendation.
    req["MixedInstancesPolicy"] = {
        "LaunchTemplate": {
            "LaunchTemplateSpecification": template,
            "Overrides": [{"InstanceType": t} for t in res.spot_types],
        },
        "InstancesDistribution": {
            "OnDemandBaseCapacity": 0,
            "OnDemandPercentageAboveBaseCapacity": 0,
            "SpotAllocationStrategy": SPOT_ALLOCATION,
        },
    }
    req["CapacityRebalance"] = True
    return req


def _iam_steps(res: Resources, where: Where) -> list[Step]:
    name, tags = resource_name(res.name), _tags(res.name)
    return [
        Step(
            "iam",
            "create_role",
            {
                "RoleName": name,
                "Tags": tags,
                "Description": f"ec2train job {res.name}: its prefix, its group",
                "AssumeRolePolicyDocument": json.dumps(render_policy("ec2-trust")),
            },
            why="the instances' identity",
        ),
        Step(
            "iam",
            "put_role_policy",
            {"RoleName": name, "PolicyName": "ec2train-job", "PolicyDocument": json.dumps(instance_policy(res, where))},
            why="all they may do",
        ),
        Step("iam", "create_instance_profile", {"InstanceProfileName": name, "Tags": tags}),
        Step("iam", "add_role_to_instance_profile", {"InstanceProfileName": name, "RoleName": name}),
    ]


def _network_steps(res: Resources, where: Where) -> list[Step]:
    """The security group: no inbound rule but its own members (several nodes, or EFA) and SSH
    from one /32 when asked; EFA also needs the members in its outbound rules."""
    name, tags = resource_name(res.name), _tags(res.name)
    inbound = "only from its own members" if (res.cluster or res.efa) else "none"
    sg_params: dict[str, Any] = {
        "GroupName": name,
        "Description": f"ec2train job {res.name}: inbound {inbound}"
        + (", and SSH from one address" if res.ssh_cidr else ""),
        "TagSpecifications": [{"ResourceType": "security-group", "Tags": tags}],
    }
    if where.vpc:
        sg_params["VpcId"] = where.vpc
    steps = [Step("ec2", "create_security_group", sg_params, save="sg", why=f"inbound: {inbound}")]
    sg = Ref("sg", ("GroupId",))
    members: dict[str, Any] = {
        "IpProtocol": "-1",
        "UserIdGroupPairs": [{"GroupId": sg, "Description": "the job's own nodes"}],
    }
    rules: list[dict[str, Any]] = [members] if (res.cluster or res.efa) else []
    if res.ssh_cidr:
        ssh = {"CidrIp": res.ssh_cidr, "Description": "SSH from the submitting machine"}
        rules.append({"IpProtocol": "tcp", "FromPort": 22, "ToPort": 22, "IpRanges": [ssh]})
    if rules:
        why = "NCCL, gloo and rank 0's c10d store between the nodes" if (res.cluster or res.efa) else ""
        steps.append(Step("ec2", "authorize_security_group_ingress", {"GroupId": sg, "IpPermissions": rules}, why=why))
    if res.efa:
        steps.append(
            Step(
                "ec2",
                "authorize_security_group_egress",
                {"GroupId": sg, "IpPermissions": [members]},
                why="EFA needs its members in the outbound rules too",
            )
        )
    if res.cluster:
        steps.append(
            Step(
                "ec2",
                "create_placement_group",
                {
                    "GroupName": name,
                    "Strategy": "cluster",
                    "TagSpecifications": [{"ResourceType": "placement-group", "Tags": tags}],
                },
                why="the nodes close together, in one zone",
            )
        )
    return steps


def submit_plan(res: Resources, where: Where, script: str) -> list[Step]:
    name, tags = resource_name(res.name), _tags(res.name)
    steps = _iam_steps(res, where) + _network_steps(res, where)
    sg = Ref("sg", ("GroupId",))
    steps += [
        Step(
            "ec2",
            "create_launch_template",
            {
                "LaunchTemplateName": name,
                "LaunchTemplateData": launch_template_data(res, where, sg, script),
                "TagSpecifications": [{"ResourceType": "launch-template", "Tags": tags}],
            },
        ),
        # A new instance profile takes seconds to be usable: retry only that error.
        Step(
            "autoscaling",
            "create_auto_scaling_group",
            group_request(res, where),
            why=f"desired capacity {res.nodes}: the job starts",
            retry=Retry("ValidationError", "nstance Profile"),
        ),
    ]
    if res.deadline is not None:
        end = res.deadline + SCHEDULED_END_MARGIN_SECONDS
        steps.append(
            Step(
                "autoscaling",
                "put_scheduled_update_group_action",
                {
                    "AutoScalingGroupName": name,
                    "ScheduledActionName": SCHEDULED_END,
                    "StartTime": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(end)),
                    "MinSize": 0,
                    "MaxSize": 0,
                    "DesiredCapacity": 0,
                },
                why="--max-hours, even when no instance is left to end the job",
            )
        )
    return steps


@dataclass
class Existing:
    """What a cancel found of a job (real run), or assumes (dry run)."""

    group: bool = False
    instances: list[str] = field(default_factory=list)
    template: bool = False
    security_groups: list[str] = field(default_factory=list)
    profile_roles: list[str] | None = None  # None: no instance profile
    role_policies: list[str] | None = None  # None: no role
    dist_keys: list[str] = field(default_factory=list)
    placement_group: bool = False


def cancel_plan(name: str, found: Existing, bucket: str | None) -> list[Step]:
    """Instances first (everything else is in use until they are gone), IAM last."""
    rname, steps = resource_name(name), []
    if found.group:
        steps.append(
            Step(
                "autoscaling",
                "delete_auto_scaling_group",
                {"AutoScalingGroupName": rname, "ForceDelete": True},
                why="terminates its instances",
            )
        )
    if found.instances:
        steps.append(Step("ec2", "wait:instance_terminated", {"InstanceIds": found.instances}))
    if found.template:
        steps.append(Step("ec2", "delete_launch_template", {"LaunchTemplateName": rname}))
    for sg in found.security_groups:
        steps.append(
            Step(
                "ec2",
                "delete_security_group",
                {"GroupId": sg},
                retry=Retry("DependencyViolation", "", delays=(5, 10, 10, 15, 15, 20, 30, 30)),
            )
        )
    if found.placement_group:
        steps.append(
            Step(
                "ec2",
                "delete_placement_group",
                {"GroupName": rname},
                retry=Retry("InvalidPlacementGroup.InUse", "", delays=(5, 10, 10, 15, 15, 20, 30, 30)),
            )
        )
    if found.profile_roles is not None:
        steps += [
            Step("iam", "remove_role_from_instance_profile", {"InstanceProfileName": rname, "RoleName": r})
            for r in found.profile_roles
        ]
        steps.append(Step("iam", "delete_instance_profile", {"InstanceProfileName": rname}))
    if found.role_policies is not None:
        steps += [Step("iam", "delete_role_policy", {"RoleName": rname, "PolicyName": p}) for p in found.role_policies]
        steps.append(Step("iam", "delete_role", {"RoleName": rname}))
    if bucket:
        steps += [
            Step("s3", "delete_object", {"Bucket": bucket, "Key": k}, why="the wheel submit uploaded")
            for k in found.dist_keys
        ]
    return steps
