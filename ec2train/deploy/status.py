"""What a deployment has running and what bills: endpoint, autoscaling, Lambda."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from ec2train.deploy.names import is_managed, scalable_target
from ec2train.deploy.plan import Ref, Step, StepRunner, deployment_names, dry_run_header


def status_plan(name: str, function: str | None) -> list[Step]:
    missing = frozenset({"missing"})
    target = scalable_target(name)
    targets = {
        "ServiceNamespace": target["ServiceNamespace"],
        "ResourceIds": [target["ResourceId"]],
        "ScalableDimension": target["ScalableDimension"],
    }
    steps = [
        Step("sagemaker", "describe_endpoint", {"EndpointName": name}, save="endpoint", tolerate=missing),
        Step(
            "sagemaker",
            "describe_endpoint_config",
            {"EndpointConfigName": Ref("endpoint", ("EndpointConfigName",))},
            save="config",
            tolerate=missing,
        ),
        Step("application-autoscaling", "describe_scalable_targets", targets, save="targets"),
        Step("application-autoscaling", "describe_scaling_policies", target, save="policies"),
    ]
    if function:
        found_name = Ref("function", ("Configuration", "FunctionName"))
        steps += [
            Step("lambda", "get_function", {"FunctionName": function}, save="function", tolerate=missing),
            Step("lambda", "list_aliases", {"FunctionName": found_name}, save="aliases", tolerate=missing),
            Step(
                "lambda",
                "list_provisioned_concurrency_configs",
                {"FunctionName": found_name},
                save="provisioned",
                tolerate=frozenset({"missing", "unsupported"}),
                unsupported_warning="provisioned concurrency cannot be read here",
            ),
        ]
    return steps


def _variant_rows(ep: dict[str, Any], cfg: dict[str, Any]) -> list[dict[str, Any]]:
    live = {v["VariantName"]: v for v in ep.get("ProductionVariants", [])}
    rows = []
    for v in cfg.get("ProductionVariants", []):
        row = {"name": v["VariantName"], "model": v.get("ModelName")}
        if "ServerlessConfig" in v:
            row["serverless"] = v["ServerlessConfig"]
        else:
            row["instance_type"] = v.get("InstanceType")
            row["current_instances"] = live.get(v["VariantName"], {}).get("CurrentInstanceCount")
            row["desired_instances"] = live.get(v["VariantName"], {}).get("DesiredInstanceCount")
        rows.append(row)
    return rows


def _endpoint_summary(ep: dict[str, Any], cfg: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """The endpoint as a plain dict, and a line per variant on how it bills."""
    variants = _variant_rows(ep, cfg)
    created = ep.get("CreationTime")
    summary = {
        "name": ep["EndpointName"],
        "arn": ep.get("EndpointArn"),
        "status": ep.get("EndpointStatus"),
        "failure_reason": ep.get("FailureReason"),
        "config": ep.get("EndpointConfigName"),
        "created": created.isoformat() if isinstance(created, datetime) else created,
        "variants": variants,
    }
    billing = []
    for v in variants:
        if "serverless" in v:
            billing.append(
                f"serverless variant {v['name']}: billed per request (compute time and data), nothing while idle"
            )
        else:
            n = v.get("current_instances") or v.get("desired_instances") or 0
            billing.append(
                f"variant {v['name']}: {n} x {v['instance_type']} billed every hour the endpoint exists, busy or idle"
            )
    return summary, billing


def _policy_summary(p: dict[str, Any]) -> dict[str, Any]:
    tt = p.get("TargetTrackingScalingPolicyConfiguration")
    row = {"name": p["PolicyName"], "type": p["PolicyType"]}
    if tt is not None:
        row.update(
            target=tt["TargetValue"],
            metric=tt.get("PredefinedMetricSpecification", {}).get("PredefinedMetricType"),
            scale_in_cooldown=tt.get("ScaleInCooldown"),
            scale_out_cooldown=tt.get("ScaleOutCooldown"),
        )
    return row


def _lambda_summary(
    fn: dict[str, Any], aliases: dict[str, Any] | None, provisioned: dict[str, Any] | None
) -> dict[str, Any]:
    c = fn["Configuration"]
    return {
        "name": c["FunctionName"],
        "runtime": c.get("Runtime"),
        "state": c.get("State"),
        "memory_mb": c.get("MemorySize"),
        "timeout_s": c.get("Timeout"),
        "reserved_concurrency": (fn.get("Concurrency") or {}).get("ReservedConcurrentExecutions"),
        "aliases": {a["Name"]: a["FunctionVersion"] for a in (aliases or {}).get("Aliases", [])},
        "provisioned_concurrency": None
        if provisioned is None
        else {
            p["FunctionArn"].rsplit(":", 1)[-1]: p.get("AllocatedProvisionedConcurrentExecutions")
            for p in provisioned.get("ProvisionedConcurrencyConfigs", [])
        },
        "managed": is_managed(fn.get("Tags")),
    }


def summarize_status(name: str, function: str | None, r: dict[str, Any]) -> dict[str, Any]:
    """A plain dict of what exists and what bills, from the status reads."""
    out: dict[str, Any] = {"endpoint": None, "autoscaling": None, "lambda": None, "billing": []}
    if r.get("endpoint"):
        out["endpoint"], billing = _endpoint_summary(r["endpoint"], r.get("config") or {})
        out["billing"] += billing
    targets = (r.get("targets") or {}).get("ScalableTargets", [])
    if targets:
        policies = (r.get("policies") or {}).get("ScalingPolicies", [])
        out["autoscaling"] = {
            "min": targets[0]["MinCapacity"],
            "max": targets[0]["MaxCapacity"],
            "policies": [_policy_summary(p) for p in policies],
        }
    fn = r.get("function")
    if fn:
        out["lambda"] = _lambda_summary(fn, r.get("aliases"), r.get("provisioned"))
        out["billing"].append(
            f"Lambda {out['lambda']['name']}: billed per request and duration; provisioned concurrency, if set, per hour"
        )
    if out["endpoint"] or out["lambda"]:
        out["billing"].append(
            f"stop all of it: ec2train deploy delete --name {name}"
            + (f" --lambda-name {function}" if function and fn else "")
        )
    return out


class _Silent:
    """A console that drops everything: status reads are shown as a table, not step by step."""

    def print(self, *a: Any, **k: Any) -> None:
        pass

    out = print


def deployment_status(
    name: str,
    *,
    function_name: str | None = None,
    region: str | None = None,
    dry_run: bool = False,
    console: Any = None,
    runner: StepRunner | None = None,
) -> dict[str, Any]:
    region, function = deployment_names(name, function_name, region)
    steps = status_plan(name, function)
    if dry_run:
        runner = runner or StepRunner(region, dry_run=True, console=console)
        dry_run_header(runner, f"status of {name}", [])
        runner.run(steps)
        return {}
    # The reads are shown as tables by the caller, not step by step.
    runner = runner or StepRunner(region, console=_Silent())
    runner.run(steps)
    return summarize_status(name, function, runner.results)


def status_tables(st: dict[str, Any]) -> list[tuple[str, list[tuple[str, str]]]]:
    """deployment_status's answer for people: (title, [(label, value), ...]) per table."""
    tables = []
    ep = st["endpoint"]
    if ep is not None:
        rows = [
            ("status", ep["status"] + (f" ({ep['failure_reason']})" if ep.get("failure_reason") else "")),
            ("created", str(ep["created"])),
            ("configuration", ep["config"]),
        ]
        for v in ep["variants"]:
            if "serverless" in v:
                sc = v["serverless"]
                rows.append(
                    (
                        f"variant {v['name']}",
                        f"serverless, {sc.get('MemorySizeInMB')} MB, max concurrency {sc.get('MaxConcurrency')}",
                    )
                )
            else:
                rows.append(
                    (
                        f"variant {v['name']}",
                        f"{v['instance_type']}: {v['current_instances']} running, {v['desired_instances']} desired",
                    )
                )
        sc = st["autoscaling"]
        pol = "; ".join(
            f"{p['name']}: {p.get('target')} {p.get('metric')} (in {p.get('scale_in_cooldown')} s, out {p.get('scale_out_cooldown')} s)"
            for p in (sc or {}).get("policies", [])
        )
        rows.append(("autoscaling", f"{sc['min']}-{sc['max']} instances; {pol or 'no policy'}" if sc else "off"))
        tables.append((f"endpoint {ep['name']}", rows))
    fn = st["lambda"]
    if fn:
        pc = fn["provisioned_concurrency"]
        tables.append(
            (
                f"Lambda {fn['name']}",
                [
                    ("state", f"{fn['state']} ({fn['runtime']}, {fn['memory_mb']} MB, {fn['timeout_s']} s)"),
                    ("reserved concurrency", str(fn["reserved_concurrency"])),
                    ("aliases", ", ".join(f"{a} -> {v}" for a, v in fn["aliases"].items()) or "none"),
                    (
                        "provisioned concurrency",
                        "unknown (not readable here)"
                        if pc is None
                        else (", ".join(f"{q}: {n}" for q, n in pc.items()) or "none"),
                    ),
                ],
            )
        )
    return tables
