"""Target-tracking autoscaling of an instance endpoint on invocations per instance."""

from __future__ import annotations

from typing import Any

from ec2train.deploy import prices
from ec2train.deploy.names import (
    VARIANT,
    DeployError,
    check_sagemaker_name,
    resource_id,
    scalable_target,
    scaling_policy_name,
)
from ec2train.deploy.plan import Step, StepRunner, dry_run_header, resolve_region


def autoscale_plan(
    name: str, min_capacity: int, max_capacity: int, target: float, scale_in_cooldown: int, scale_out_cooldown: int
) -> list[Step]:
    target_ids = scalable_target(name)
    return [
        Step(
            "application-autoscaling",
            "register_scalable_target",
            {**target_ids, "MinCapacity": min_capacity, "MaxCapacity": max_capacity},
            "instance count bounds",
        ),
        Step(
            "application-autoscaling",
            "put_scaling_policy",
            {
                "PolicyName": scaling_policy_name(name),
                **target_ids,
                "PolicyType": "TargetTrackingScaling",
                "TargetTrackingScalingPolicyConfiguration": {
                    "TargetValue": float(target),
                    "PredefinedMetricSpecification": {"PredefinedMetricType": "SageMakerVariantInvocationsPerInstance"},
                    "ScaleInCooldown": scale_in_cooldown,
                    "ScaleOutCooldown": scale_out_cooldown,
                },
            },
            "track invocations per instance per minute",
        ),
    ]


def _check_bounds(
    min_capacity: int, max_capacity: int, target_invocations: float, scale_in_cooldown: int, scale_out_cooldown: int
) -> None:
    if min_capacity < 1:
        raise DeployError("--min must be at least 1 (an instance endpoint cannot scale to zero)")
    if max_capacity < min_capacity:
        raise DeployError(f"--max ({max_capacity}) must be at least --min ({min_capacity})")
    if not target_invocations > 0:
        raise DeployError("--target-invocations must be greater than 0 (invocations per instance per minute)")
    if scale_in_cooldown < 0 or scale_out_cooldown < 0:
        raise DeployError("cooldowns are seconds and cannot be negative")


def _check_scalable(runner: StepRunner, name: str) -> None:
    """The endpoint exists, and its one variant runs on instances (serverless ones scale by themselves)."""
    d = runner.read("sagemaker", "describe_endpoint", EndpointName=name)
    if d is None:
        raise DeployError(
            f"endpoint {name} does not exist in {runner.region}; deploy it first with `ec2train deploy endpoint`"
        )
    cfg = runner.read("sagemaker", "describe_endpoint_config", EndpointConfigName=d["EndpointConfigName"]) or {}
    variants = {v["VariantName"]: v for v in cfg.get("ProductionVariants", [])}
    if VARIANT not in variants:
        raise DeployError(
            f"endpoint {name} has no {VARIANT} variant (it has {', '.join(variants) or 'none'}); ec2train autoscales only endpoints it deployed"
        )
    if "ServerlessConfig" in variants[VARIANT]:
        raise DeployError(
            f"endpoint {name} is serverless: it scales by itself up to its MaxConcurrency and cannot use "
            "instance autoscaling; redeploy with a higher --max-concurrency instead"
        )


def autoscale(
    name: str,
    *,
    min_capacity: int = 1,
    max_capacity: int = 4,
    target_invocations: float = 70.0,
    scale_in_cooldown: int = 300,
    scale_out_cooldown: int = 60,
    region: str | None = None,
    dry_run: bool = False,
    console: Any = None,
    runner: StepRunner | None = None,
) -> dict[str, Any]:
    """Target-tracking autoscaling on SageMakerVariantInvocationsPerInstance for an instance endpoint."""
    check_sagemaker_name(name)
    _check_bounds(min_capacity, max_capacity, target_invocations, scale_in_cooldown, scale_out_cooldown)
    region = resolve_region(region)
    runner = runner or StepRunner(region, dry_run=dry_run, console=console)
    if runner.dry_run:
        dry_run_header(
            runner,
            f"autoscale endpoint {name}",
            ["sagemaker:DescribeEndpoint", "sagemaker:DescribeEndpointConfig"],
            prices.with_prices_note(
                [
                    f"creates    a scalable target and a target-tracking policy on endpoint {name}",
                    *prices.autoscale_lines(min_capacity, max_capacity),
                ]
            ),
        )
    else:
        _check_scalable(runner, name)
    runner.run(
        autoscale_plan(name, min_capacity, max_capacity, target_invocations, scale_in_cooldown, scale_out_cooldown)
    )
    return {"endpoint": name, "resource_id": resource_id(name), "policy": scaling_policy_name(name)}
