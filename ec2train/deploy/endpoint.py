"""A SageMaker endpoint: model, endpoint configuration, endpoint; created, updated in place, waited for."""

from __future__ import annotations

import hashlib
import json
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ec2train.deploy import prices
from ec2train.deploy.images import image_uri_for
from ec2train.deploy.names import (
    INSTANCE_TYPE_RE,
    MANAGED_TAG,
    ROLE_ARN_RE,
    S3_URI_RE,
    VARIANT,
    DeployError,
    check_sagemaker_name,
    is_managed,
    tags_list,
)
from ec2train.deploy.plan import UNKNOWN, Step, StepRunner, dry_run_header, resolve_region

SERVERLESS_MEMORY_MB = (1024, 2048, 3072, 4096, 5120, 6144)
# States in which SageMaker refuses an update: the user waits for it to settle.
_BUSY = ("Creating", "Updating", "SystemUpdating", "RollingBack", "Deleting")


@dataclass(frozen=True)
class EndpointSpec:
    name: str
    role_arn: str
    model_data: str
    instance_type: str | None = None
    instance_count: int = 1
    serverless: bool = False
    memory_mb: int = 2048
    max_concurrency: int = 5
    image_uri: str | None = None

    def check(self) -> EndpointSpec:
        check_sagemaker_name(self.name)
        if not ROLE_ARN_RE.match(self.role_arn or ""):
            raise DeployError(
                f"--role {self.role_arn!r} is not an IAM role ARN; pass the SageMaker execution role, "
                "arn:aws:iam::<account>:role/<name>"
            )
        if not S3_URI_RE.match(self.model_data or "") or not self.model_data.endswith(".tar.gz"):
            raise DeployError(
                f"--model-data {self.model_data!r} is not an s3://bucket/key.tar.gz URI; "
                "package with `ec2train export --package model.tar.gz` and upload it"
            )
        if self.serverless == bool(self.instance_type):
            raise DeployError("give exactly one of --instance-type TYPE and --serverless")
        if self.instance_type:
            if not INSTANCE_TYPE_RE.match(self.instance_type):
                raise DeployError(
                    f"--instance-type {self.instance_type!r} is not a SageMaker instance type such as ml.g4dn.xlarge"
                )
            if self.instance_count < 1:
                raise DeployError("--instance-count must be at least 1")
        else:
            if self.memory_mb not in SERVERLESS_MEMORY_MB:
                raise DeployError(
                    f"--memory must be one of {', '.join(map(str, SERVERLESS_MEMORY_MB))} (MB) for a serverless endpoint"
                )
            if not 1 <= self.max_concurrency <= 200:
                raise DeployError("--max-concurrency must be from 1 to 200")
        if self.image_uri is not None and (not self.image_uri or " " in self.image_uri or "/" not in self.image_uri):
            raise DeployError(f"--image-uri {self.image_uri!r} is not a container image URI (registry/repository:tag)")
        return self


@dataclass(frozen=True)
class EndpointNow:
    """What a real run found before planning."""

    status: str
    config: str
    managed: bool
    models: tuple[str, ...]
    config_managed: bool


def _variant(spec: EndpointSpec) -> dict[str, Any]:
    if spec.serverless:
        return {
            "VariantName": VARIANT,
            "ServerlessConfig": {"MemorySizeInMB": spec.memory_mb, "MaxConcurrency": spec.max_concurrency},
        }
    return {
        "VariantName": VARIANT,
        "InstanceType": spec.instance_type,
        "InitialInstanceCount": spec.instance_count,
        "InitialVariantWeight": 1.0,
    }


def endpoint_requests(spec: EndpointSpec, region: str) -> tuple[dict, dict]:
    """The CreateModel and CreateEndpointConfig requests; names carry a hash of their content,
    so the same deploy twice is a no-op and a changed one gets new names (and a rolling update)."""
    image = spec.image_uri or image_uri_for(region, spec.instance_type, spec.serverless)
    container = {
        "Image": image,
        "ModelDataUrl": spec.model_data,
        "Environment": {"SAGEMAKER_PROGRAM": "inference.py", "SAGEMAKER_SUBMIT_DIRECTORY": "/opt/ml/model/code"},
    }
    variant = _variant(spec)
    digest = hashlib.sha256(
        json.dumps([spec.name, spec.role_arn, container, variant], sort_keys=True).encode()
    ).hexdigest()[:8]
    versioned = f"{spec.name[:54]}-{digest}"
    model = {
        "ModelName": versioned,
        "ExecutionRoleArn": spec.role_arn,
        "PrimaryContainer": container,
        "Tags": tags_list(spec.name),
    }
    config = {
        "EndpointConfigName": versioned,
        "ProductionVariants": [{**variant, "ModelName": versioned}],
        "Tags": tags_list(spec.name),
    }
    return model, config


def _in_service(name: str, config: str) -> Step:
    return Step(
        "sagemaker", "wait:endpoint_in_service", {"EndpointName": name, "EndpointConfigName": config}, save="endpoint"
    )


def _cleanup_after_update(current: EndpointNow, new_model: str) -> list[Step]:
    """After a successful update, the previous configuration and its models are unused: remove ours."""
    gone = frozenset({"missing"})
    steps = [
        Step(
            "sagemaker",
            "delete_endpoint_config",
            {"EndpointConfigName": current.config},
            "previous configuration",
            tolerate=gone,
        )
    ]
    steps += [
        Step("sagemaker", "delete_model", {"ModelName": m}, "previous model", tolerate=gone)
        for m in current.models
        if m != new_model
    ]
    return steps


def endpoint_plan(
    spec: EndpointSpec, region: str, current: EndpointNow | None | Any, *, wait: bool = True
) -> list[Step]:
    """current: what a real run found (None: no endpoint), or UNKNOWN (a dry run cannot read)."""
    model, config = endpoint_requests(spec, region)
    name, new_config = spec.name, config["EndpointConfigName"]
    found = current if isinstance(current, EndpointNow) else None
    if found and found.config == new_config and found.status != "Failed":
        # Already serving exactly this: nothing to create (names carry a hash of the content).
        return [_in_service(name, new_config)] if wait else []
    steps = [
        Step(
            "sagemaker",
            "create_model",
            model,
            "the model: container image, model.tar.gz, role",
            tolerate=frozenset({"exists"}),
        ),
        Step("sagemaker", "create_endpoint_config", config, "how it is served", tolerate=frozenset({"exists"})),
    ]
    create = Step(
        "sagemaker",
        "create_endpoint",
        {"EndpointName": name, "EndpointConfigName": new_config, "Tags": tags_list(name)},
        "the endpoint (starts billing)",
    )
    update = Step(
        "sagemaker",
        "update_endpoint",
        {"EndpointName": name, "EndpointConfigName": new_config},
        "rolling update to the new configuration",
    )
    if current is UNKNOWN:
        create.if_exists = [update]
        steps.append(create)
    elif found is None:
        steps.append(create)
    elif found.status == "Failed":
        steps += [
            Step(
                "sagemaker",
                "delete_endpoint",
                {"EndpointName": name},
                "a failed endpoint cannot be updated",
                tolerate=frozenset({"missing"}),
            ),
            Step("sagemaker", "wait:endpoint_deleted", {"EndpointName": name}),
            create,
        ]
    elif found.config != new_config:
        steps.append(update)
    if wait:
        steps.append(_in_service(name, new_config))
        if found and found.config != new_config and found.config_managed:
            steps += _cleanup_after_update(found, model["ModelName"])
    return steps


def _discover_endpoint(runner: StepRunner, name: str) -> EndpointNow | None:
    d = runner.read("sagemaker", "describe_endpoint", EndpointName=name)
    if d is None:
        return None
    managed = is_managed(runner.call("sagemaker", "list_tags", ResourceArn=d["EndpointArn"]).get("Tags"))
    cfg = runner.read("sagemaker", "describe_endpoint_config", EndpointConfigName=d["EndpointConfigName"])
    models = tuple(v["ModelName"] for v in (cfg or {}).get("ProductionVariants", []))
    cfg_managed = bool(cfg) and is_managed(
        runner.call("sagemaker", "list_tags", ResourceArn=cfg["EndpointConfigArn"]).get("Tags")
    )
    return EndpointNow(d["EndpointStatus"], d["EndpointConfigName"], managed, models, cfg_managed)


def _current_endpoint(runner: StepRunner, spec: EndpointSpec) -> EndpointNow | Any:
    """What the plan starts from: UNKNOWN in a dry run; else the endpoint found, if it may be changed."""
    name = spec.name
    if runner.dry_run:
        kind = f"{spec.instance_count} x {spec.instance_type}" if spec.instance_type else "serverless"
        dry_run_header(
            runner,
            f"deploy endpoint {name}",
            ["sagemaker:DescribeEndpoint", "sagemaker:ListTags", "sagemaker:DescribeEndpointConfig"],
            prices.with_prices_note(
                [
                    f"creates    SageMaker model, endpoint configuration and endpoint {name} ({kind})",
                    *prices.endpoint_lines(
                        name, spec.instance_type, spec.instance_count, spec.memory_mb, spec.max_concurrency
                    ),
                ]
            ),
        )
        return UNKNOWN
    current = _discover_endpoint(runner, name)
    if current is not None and not current.managed:
        raise DeployError(
            f"endpoint {name} exists and was not created by ec2train (no {MANAGED_TAG[0]} tag); "
            "pick another --name, or delete it first"
        )
    if current is not None and current.status in _BUSY:
        raise DeployError(
            f"endpoint {name} is {current.status}; wait until it settles (ec2train deploy status --name {name}) and run again"
        )
    return current


def package_and_upload(
    model_path: str | Path, s3_uri: str, *, kms_key: str | None = None, dry_run: bool, console: Any = None
) -> str:
    """Package model.pth into model.tar.gz and upload it (encrypted); returns its s3:// URI."""
    if not re.match(r"^s3://[a-z0-9][a-z0-9.-]{1,61}[a-z0-9](/.*)?$", s3_uri or ""):
        raise DeployError(f"--s3-uri {s3_uri!r} is not an s3://bucket/prefix URI")
    target = s3_uri if s3_uri.endswith(".tar.gz") else s3_uri.rstrip("/") + "/model.tar.gz"
    if not Path(model_path).is_file():
        raise DeployError(f"--model {model_path} is not a file; pass the model.pth written by `ec2train fit`")
    if dry_run:
        if console is not None:
            console.print(
                f"dry run: would package {model_path} into model.tar.gz and upload it to {target}",
                highlight=False,
                markup=False,
            )
        return target
    # Imported here, not at the top: export imports torch, which every other deploy command can do without.
    try:
        from ec2train.export import package_model
        from ec2train.s3 import upload_file
    except ImportError:
        raise DeployError(
            "this ec2train cannot package and upload models; run `ec2train export --package model.tar.gz`, "
            "upload it, and pass --model-data s3://..."
        ) from None
    with tempfile.TemporaryDirectory() as tmp:
        package = package_model(model_path, Path(tmp) / "model.tar.gz")
        return str(upload_file(package, target, kms_key))


def deploy_endpoint(
    spec: EndpointSpec,
    *,
    region: str | None = None,
    dry_run: bool = False,
    wait: bool = True,
    wait_timeout: float = 1800.0,
    console: Any = None,
    runner: StepRunner | None = None,
) -> dict[str, Any]:
    """Create (or update) the model, endpoint configuration and endpoint; wait for InService."""
    spec.check()
    region = resolve_region(region)
    runner = runner or StepRunner(region, dry_run=dry_run, console=console, wait_timeout=wait_timeout)
    current = _current_endpoint(runner, spec)
    model, config = endpoint_requests(spec, region)
    if current not in (None, UNKNOWN) and current.config == config["EndpointConfigName"]:
        runner.note(f"endpoint {spec.name} already serves this exact configuration; nothing to update")
    runner.run(endpoint_plan(spec, region, current, wait=wait))
    return {
        "endpoint": spec.name,
        "region": region,
        "model": model["ModelName"],
        "endpoint_config": config["EndpointConfigName"],
        "image": model["PrimaryContainer"]["Image"],
        "status": (runner.results.get("endpoint") or {}).get(
            "EndpointStatus", "not waited" if not dry_run else "dry run"
        ),
    }
