"""SageMaker endpoints, autoscaling and the Lambda front door, with boto3 only.

Every command is planned as data first: a list of `Step`s (service, operation, parameters).
One `StepRunner` either prints the steps (`--dry-run`, no request sent) or sends them, so a dry
run and a real run cannot drift apart. Everything created is tagged `ec2train:managed=true`,
and `delete` only removes what carries that tag (the endpoint itself can be forced), so no
forgotten endpoint keeps billing.

Where things live (each module imports only those above it):

    names.py      DeployError; names, ARNs, tags and the rules they follow
    images.py     the AWS PyTorch inference container for a region and instance type
    plan.py       the planner: Step, Ref, Retry, StepRunner (dry run == real run), waits, AWS errors
    endpoint.py   model, endpoint configuration, endpoint; `deploy_endpoint`
    autoscale.py  target tracking on invocations per instance; `autoscale`
    lambda_fn.py  the function's zip (source in ec2train/_lambda), role, version, alias; `deploy_lambda`
    status.py     what runs and what bills; `deployment_status`
    delete.py     remove only what ec2train made; `delete_deployment`

The names below are the package's public API: `from ec2train import deploy; deploy.autoscale(...)`.
"""

from __future__ import annotations

from ec2train.deploy.autoscale import autoscale, autoscale_plan
from ec2train.deploy.delete import DeleteTargets, delete_deployment, delete_plan
from ec2train.deploy.endpoint import (
    SERVERLESS_MEMORY_MB,
    EndpointNow,
    EndpointSpec,
    deploy_endpoint,
    endpoint_plan,
    endpoint_requests,
    package_and_upload,
)
from ec2train.deploy.images import DLC_ACCOUNTS, image_uri_for, is_gpu_instance
from ec2train.deploy.lambda_fn import (
    SERVERLESS_MAX_IMAGE_BYTES,
    LambdaSpec,
    build_lambda_zip,
    default_code_dir,
    deploy_lambda,
    lambda_invoke_policy,
    lambda_plan,
    lambda_trust_policy,
)
from ec2train.deploy.names import (
    DeployError,
    check_function_name,
    check_region,
    check_sagemaker_name,
    default_function_name,
    endpoint_arn,
    log_group_for,
    partition_of,
    resource_id,
    role_name_for,
    scaling_policy_name,
)
from ec2train.deploy.plan import UNKNOWN, Ref, Retry, Step, StepRunner, wait_for_endpoint
from ec2train.deploy.status import deployment_status, status_plan, status_tables, summarize_status

__all__ = [
    "DLC_ACCOUNTS",
    "SERVERLESS_MAX_IMAGE_BYTES",
    "SERVERLESS_MEMORY_MB",
    "UNKNOWN",
    "DeployError",
    "EndpointNow",
    "EndpointSpec",
    "DeleteTargets",
    "LambdaSpec",
    "Ref",
    "Retry",
    "StepRunner",
    "Step",
    "autoscale",
    "autoscale_plan",
    "build_lambda_zip",
    "check_function_name",
    "check_region",
    "check_sagemaker_name",
    "default_code_dir",
    "default_function_name",
    "delete_deployment",
    "delete_plan",
    "deploy_endpoint",
    "deploy_lambda",
    "deployment_status",
    "status_tables",
    "endpoint_arn",
    "endpoint_plan",
    "endpoint_requests",
    "image_uri_for",
    "is_gpu_instance",
    "lambda_invoke_policy",
    "lambda_plan",
    "lambda_trust_policy",
    "log_group_for",
    "package_and_upload",
    "partition_of",
    "resource_id",
    "role_name_for",
    "scaling_policy_name",
    "status_plan",
    "summarize_status",
    "wait_for_endpoint",
]
