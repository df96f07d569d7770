"""What `job submit` creates and `job cancel` deletes, as plans of requests (data first).

The plans run on the deploy planner's engine (`ec2train.deploy.Runner`): a dry run prints every
request with its parameters and policy documents and sends nothing; a real run sends the very
same steps. Reads a real run needs first (account, AMI, subnets, what exists) happen before
planning; a dry run shows placeholders for them.
"""

from __future__ import annotations

import base64
import json
import re
import shlex
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

from ec2train import s3

# The one dry-run == real-run engine of the project; imported, not copied (see docs/jobs.md).
from ec2train.deploy import Ref, Retry, Runner, Step  # noqa: F401 - Runner re-exported for api.py
from ec2train.job.spec import JOB_TAG, URI_TAG, JobError, resource_name
from ec2train.policies import render_policy

_SAFE_KEY = re.compile(r"^(?!.*//)[A-Za-z0-9._=-]+(/[A-Za-z0-9._=-]+)*/?$")
AMI_PLACEHOLDER = "<ami-id from the SSM parameter>"
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

    @property
    def spot(self) -> bool:
        return bool(self.spot_types)


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
        "SecurityGroupIds": [sg],
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
    if res.key_name:
        data["KeyName"] = res.key_name
    return data


def group_request(res: Resources, where: Where) -> dict[str, Any]:
    name = resource_name(res.name)
    template = {"LaunchTemplateName": name, "Version": "$Latest"}
    req: dict[str, Any] = {
        "AutoScalingGroupName": name,
        "MinSize": 0,
        "MaxSize": 1,
        "DesiredCapacity": 1,
        "VPCZoneIdentifier": ",".join(where.subnets),
        "HealthCheckType": "EC2",
        "Tags": [
            {"Key": k, "Value": v, "PropagateAtLaunch": True, "ResourceId": name, "ResourceType": "auto-scaling-group"}
            for k, v in ((JOB_TAG, res.name), (URI_TAG, str(res.prefix)))
        ],
    }
    if not res.spot:
        req["LaunchTemplate"] = template
        return req
    # AWS, not us, replaces a reclaimed instance: from the deepest spot pools, and early on a
    # rebalance recommendation.
    req["MixedInstancesPolicy"] = {
        "LaunchTemplate": {
            "LaunchTemplateSpecification": template,
            "Overrides": [{"InstanceType": t} for t in res.spot_types],
        },
        "InstancesDistribution": {
            "OnDemandBaseCapacity": 0,
            "OnDemandPercentageAboveBaseCapacity": 0,
            "SpotAllocationStrategy": "capacity-optimized",
        },
    }
    req["CapacityRebalance"] = True
    return req


def submit_plan(res: Resources, where: Where, script: str) -> list[Step]:
    name, tags = resource_name(res.name), _tags(res.name)
    sg_params: dict[str, Any] = {
        "GroupName": name,
        "Description": f"ec2train job {res.name}: no inbound traffic but SSH when asked",
        "TagSpecifications": [{"ResourceType": "security-group", "Tags": tags}],
    }
    if where.vpc:
        sg_params["VpcId"] = where.vpc
    steps = [
        Step(
            "iam",
            "create_role",
            {
                "RoleName": name,
                "Tags": tags,
                "Description": f"ec2train job {res.name}: its prefix, its group",
                "AssumeRolePolicyDocument": json.dumps(render_policy("ec2-trust")),
            },
            why="the instance's identity",
        ),
        Step(
            "iam",
            "put_role_policy",
            {"RoleName": name, "PolicyName": "ec2train-job", "PolicyDocument": json.dumps(instance_policy(res, where))},
            why="all it may do",
        ),
        Step("iam", "create_instance_profile", {"InstanceProfileName": name, "Tags": tags}),
        Step("iam", "add_role_to_instance_profile", {"InstanceProfileName": name, "RoleName": name}),
        Step("ec2", "create_security_group", sg_params, save="sg", why="egress only"),
    ]
    sg = Ref("sg", ("GroupId",))
    if res.ssh_cidr:
        steps.append(
            Step(
                "ec2",
                "authorize_security_group_ingress",
                {
                    "GroupId": sg,
                    "IpPermissions": [
                        {
                            "IpProtocol": "tcp",
                            "FromPort": 22,
                            "ToPort": 22,
                            "IpRanges": [{"CidrIp": res.ssh_cidr, "Description": "SSH from the submitting machine"}],
                        }
                    ],
                },
            )
        )
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
            why="desired capacity 1: the job starts",
            retry=Retry("ValidationError", "nstance Profile"),
        ),
    ]
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
