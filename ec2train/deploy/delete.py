"""Remove a deployment: only what ec2train created (tagged `ec2train:managed=true`), so nothing
of someone else's is touched and no forgotten endpoint keeps billing. The endpoint itself can be forced."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from ec2train.deploy.lambda_fn import function_tags
from ec2train.deploy.names import (
    ENDPOINT_TAG,
    MANAGED_TAG,
    POLICY_NAME,
    ROLE_TAG,
    DeployError,
    is_managed,
    log_group_for,
    scalable_target,
    scaling_policy_name,
)
from ec2train.deploy.plan import UNKNOWN, Step, StepRunner, deployment_names, dry_run_header


@dataclass
class DeleteTargets:
    """What a real delete run found to remove (only things ec2train created)."""

    endpoint: bool = False
    configs: list[str] = field(default_factory=list)
    models: list[str] = field(default_factory=list)
    function: str | None = None
    role: str | None = None
    log_group: str | None = None
    aliases: list[str] = field(default_factory=list)


def _placeholders(name: str) -> DeleteTargets:
    """What a dry run shows in place of what a real run would find."""
    return DeleteTargets(
        endpoint=True,
        configs=[f"<endpoint configs tagged {ENDPOINT_TAG}={name}>"],
        models=[f"<models tagged {ENDPOINT_TAG}={name}>"],
        function=f"<ec2train-managed function: --lambda-name or ec2train-{name}>",
        role="<its role, from the function's ec2train:role tag>",
        log_group="<its log group /aws/lambda/FUNCTION>",
        aliases=["<each alias>"],
    )


def delete_plan(name: str, found: DeleteTargets | Any) -> list[Step]:
    missing = frozenset({"missing"})
    target_ids = scalable_target(name)
    if found is UNKNOWN:
        found = _placeholders(name)
    steps: list[Step] = []
    if found.function:
        steps += [
            Step("lambda", "delete_alias", {"FunctionName": found.function, "Name": a}, tolerate=missing)
            for a in found.aliases
        ]
        steps.append(
            Step(
                "lambda",
                "delete_function",
                {"FunctionName": found.function},
                "function, versions, concurrency settings",
                tolerate=missing,
            )
        )
    if found.role:
        steps += [
            Step("iam", "delete_role_policy", {"RoleName": found.role, "PolicyName": POLICY_NAME}, tolerate=missing),
            Step("iam", "delete_role", {"RoleName": found.role}, tolerate=missing),
        ]
    if found.log_group:
        steps.append(Step("logs", "delete_log_group", {"logGroupName": found.log_group}, tolerate=missing))
    steps += [
        Step(
            "application-autoscaling",
            "delete_scaling_policy",
            {"PolicyName": scaling_policy_name(name), **target_ids},
            tolerate=missing,
        ),
        Step("application-autoscaling", "deregister_scalable_target", target_ids, tolerate=missing),
    ]
    if found.endpoint:
        steps.append(
            Step("sagemaker", "delete_endpoint", {"EndpointName": name}, "stops the billing", tolerate=missing)
        )
    steps += [
        Step("sagemaker", "delete_endpoint_config", {"EndpointConfigName": c}, tolerate=missing) for c in found.configs
    ]
    steps += [Step("sagemaker", "delete_model", {"ModelName": m}, tolerate=missing) for m in found.models]
    return steps


def _tagged_for(runner: StepRunner, arn: str, name: str) -> bool:
    tags = {t["Key"]: t["Value"] for t in runner.call("sagemaker", "list_tags", ResourceArn=arn).get("Tags", [])}
    return is_managed(tags) and tags.get(ENDPOINT_TAG) == name


def _find_configs(runner: StepRunner, name: str, current: str | None, force: bool, found: DeleteTargets) -> None:
    """Adds this endpoint's configurations and models to `found` (tagged for it, or forced)."""
    # Versioned names: <name[:54]>-<8 hex>. Only those tagged for this endpoint are ours;
    # --force adds the endpoint's current configuration and its models, whatever their tags.
    versioned = re.compile(rf"^{re.escape(name[:54])}-[0-9a-f]{{8}}$")
    cfg_names = {current} if current else set()
    cfg_names |= {
        c["EndpointConfigName"]
        for c in runner.pages("sagemaker", "list_endpoint_configs", "EndpointConfigs", NameContains=name[:54])
        if versioned.match(c["EndpointConfigName"])
    }
    model_names: set[str] = set()
    forced_models: set[str] = set()
    for cfg_name in sorted(cfg_names):
        cfg = runner.read("sagemaker", "describe_endpoint_config", EndpointConfigName=cfg_name)
        if cfg is None:
            continue
        forced = force and cfg_name == current
        if forced or _tagged_for(runner, cfg["EndpointConfigArn"], name):
            found.configs.append(cfg_name)
            cfg_models = {v["ModelName"] for v in cfg.get("ProductionVariants", [])}
            model_names |= cfg_models
            forced_models |= cfg_models if forced else set()
    model_names |= {
        m["ModelName"]
        for m in runner.pages("sagemaker", "list_models", "Models", NameContains=name[:54])
        if versioned.match(m["ModelName"])
    }
    for m in sorted(model_names):
        got = runner.read("sagemaker", "describe_model", ModelName=m)
        if got is not None and (m in forced_models or _tagged_for(runner, got["ModelArn"], name)):
            found.models.append(m)


def _find_function(runner: StepRunner, name: str, function: str, function_explicit: bool, found: DeleteTargets) -> None:
    """Adds the Lambda function, its aliases, role and log group to `found`, if ec2train made them."""
    tags = function_tags(runner, function)
    if tags is None:
        return
    if not is_managed(tags) or (not function_explicit and tags.get(ENDPOINT_TAG) != name):
        runner.warn(f"Lambda function {function} was not deployed by ec2train for {name}; left alone")
        return
    found.function = function
    aliases = runner.read("lambda", "list_aliases", FunctionName=function) or {}
    found.aliases = [a["Name"] for a in aliases.get("Aliases", [])]
    role = tags.get(ROLE_TAG)
    got_role = runner.read("iam", "get_role", RoleName=role) if role else None
    if got_role is not None and is_managed(got_role["Role"].get("Tags")):
        found.role = role
    group = log_group_for(function)
    groups = runner.read("logs", "describe_log_groups", logGroupNamePrefix=group) or {}
    if any(g["logGroupName"] == group for g in groups.get("logGroups", [])):
        lg_tags = runner.read("logs", "list_tags_log_group", logGroupName=group) or {}
        if is_managed(lg_tags.get("tags")):
            found.log_group = group


def _discover_delete(
    runner: StepRunner, name: str, function: str | None, function_explicit: bool, force: bool
) -> DeleteTargets:
    found = DeleteTargets()
    d = runner.read("sagemaker", "describe_endpoint", EndpointName=name)
    if d is not None:
        if not force and not _tagged_for(runner, d["EndpointArn"], name):
            raise DeployError(
                f"endpoint {name} was not created by ec2train (no {MANAGED_TAG[0]} tag for it); "
                "pass --force to delete it anyway"
            )
        found.endpoint = True
    _find_configs(runner, name, d["EndpointConfigName"] if d else None, force, found)
    if function:
        _find_function(runner, name, function, function_explicit, found)
    return found


def delete_deployment(
    name: str,
    *,
    function_name: str | None = None,
    region: str | None = None,
    force: bool = False,
    dry_run: bool = False,
    console: Any = None,
    runner: StepRunner | None = None,
) -> dict[str, Any]:
    """Remove the Lambda (+ alias, role, log group), autoscaling, endpoint, configs and models."""
    region, function = deployment_names(name, function_name, region)
    runner = runner or StepRunner(region, dry_run=dry_run, console=console)
    if runner.dry_run:
        dry_run_header(
            runner,
            f"delete {name}",
            [
                "sagemaker:DescribeEndpoint",
                "sagemaker:ListTags",
                "sagemaker:ListEndpointConfigs",
                "sagemaker:ListModels",
                "lambda:GetFunction",
                "lambda:ListAliases",
                "iam:GetRole",
                "logs:DescribeLogGroups",
            ],
            [
                f"removes    endpoint {name} with its configurations and models (ec2train's only), its autoscaling,",
                "           and the Lambda with its alias, role and log group: after it, nothing of this deployment bills",
            ],
        )
        found: DeleteTargets | Any = UNKNOWN
    else:
        found = _discover_delete(runner, name, function, function_name is not None, force)
    runner.run(delete_plan(name, found))
    if found is UNKNOWN:
        return {}
    return {
        "endpoint": found.endpoint,
        "configs": found.configs,
        "models": found.models,
        "function": found.function,
        "role": found.role,
        "log_group": found.log_group,
    }
