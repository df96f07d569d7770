"""Names, ARNs and tags of what ec2train deploys, the rules they follow, and DeployError.

The bottom of the `deploy` package: every other module here imports from it, it imports
none of them. The name rules come from `ec2train.policies`, which checks the same names
before it writes them into an IAM document.
"""

from __future__ import annotations

import hashlib
import re

from ec2train.errors import UserError
from ec2train.policies import ACCOUNT_ID_RE, ENDPOINT_NAME_RE, FUNCTION_NAME_RE, REGION_RE


class DeployError(UserError):
    """A deploy request that cannot go ahead; the message names the problem and the fix."""


# SageMaker's rule for endpoint, endpoint-config and model names (the same as for endpoints).
SAGEMAKER_NAME_RE = ENDPOINT_NAME_RE
ACCOUNT_RE = ACCOUNT_ID_RE
# Lambda's rule for an alias: letters, digits, - and _, not all digits (that is a version).
ALIAS_RE = re.compile(r"^(?![0-9]+$)[a-zA-Z0-9_-]{1,128}$")
ROLE_ARN_RE = re.compile(r"^arn:aws(-[a-z]+)*:iam::[0-9]{12}:role/[\w+=,.@/-]{1,512}$")
S3_URI_RE = re.compile(r"^s3://[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]/\S+$")
INSTANCE_TYPE_RE = re.compile(r"^ml\.[a-z0-9-]+\.[a-z0-9]+$")

VARIANT = "AllTraffic"
MANAGED_TAG = ("ec2train:managed", "true")
ENDPOINT_TAG = "ec2train:endpoint"
ROLE_TAG = "ec2train:role"
POLICY_NAME = "invoke-endpoint"
SCALABLE_DIMENSION = "sagemaker:variant:DesiredInstanceCount"
ACCOUNT_PLACEHOLDER = "<ACCOUNT_ID>"


def check_sagemaker_name(name: str, option: str = "--name") -> str:
    if not isinstance(name, str) or not SAGEMAKER_NAME_RE.match(name):
        raise DeployError(
            f"{option} {name!r} is not a valid SageMaker name: use 1-63 letters, digits and hyphens, "
            "starting and ending with a letter or digit"
        )
    return name


def check_function_name(name: str, option: str = "--function-name") -> str:
    if not isinstance(name, str) or not FUNCTION_NAME_RE.match(name):
        raise DeployError(f"{option} {name!r} is not a valid Lambda function name: use 1-64 letters, digits, - and _")
    return name


def check_region(region: str) -> str:
    if not REGION_RE.match(region or ""):
        raise DeployError(f"--region {region!r} is not an AWS region name; pass one such as us-east-1")
    return region


def partition_of(region: str) -> str:
    if region.startswith("cn-"):
        return "aws-cn"
    if region.startswith("us-gov-"):
        return "aws-us-gov"
    return "aws"


def endpoint_arn(partition: str, region: str, account: str, endpoint: str) -> str:
    # IAM compares SageMaker ARNs in lowercase, whatever case the endpoint was created with.
    return f"arn:{partition}:sagemaker:{region}:{account}:endpoint/{endpoint.lower()}"


def default_function_name(endpoint: str) -> str:
    name = f"ec2train-{endpoint}"
    if len(name) > 64:
        raise DeployError(
            f"the default function name {name!r} is longer than Lambda's 64 characters; pass --function-name"
        )
    return name


def role_name_for(function: str) -> str:
    """The execution role's name: `<function>-role`, hashed down to IAM's 64 characters."""
    name = f"{function}-role"
    if len(name) <= 64:
        return name
    return f"{function[:50]}-{hashlib.sha256(function.encode()).hexdigest()[:8]}-role"


def log_group_for(function: str) -> str:
    return f"/aws/lambda/{function}"


def resource_id(endpoint: str) -> str:
    """The endpoint's variant as Application Auto Scaling names it."""
    return f"endpoint/{endpoint}/variant/{VARIANT}"


def scaling_policy_name(endpoint: str) -> str:
    return f"{endpoint}-invocations-per-instance"


def scalable_target(endpoint: str) -> dict[str, str]:
    """The parameters that name the endpoint's scalable target in every autoscaling request."""
    return {
        "ServiceNamespace": "sagemaker",
        "ResourceId": resource_id(endpoint),
        "ScalableDimension": SCALABLE_DIMENSION,
    }


def tags_list(endpoint: str) -> list[dict[str, str]]:
    """SageMaker's tag list for something ec2train creates for `endpoint`."""
    return [{"Key": MANAGED_TAG[0], "Value": MANAGED_TAG[1]}, {"Key": ENDPOINT_TAG, "Value": endpoint}]


def is_managed(tags: dict[str, str] | list[dict[str, str]] | None) -> bool:
    """Whether ec2train created it: tags as a dict (Lambda, logs) or a Key/Value list (SageMaker, IAM)."""
    if isinstance(tags, list):
        tags = {t["Key"]: t["Value"] for t in tags}
    return (tags or {}).get(MANAGED_TAG[0]) == MANAGED_TAG[1]
