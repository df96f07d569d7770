"""The Lambda front door: its code zip, its least-privilege role, the function, version and alias.

The function's source ships inside the package (`ec2train/_lambda/`; the repository's
`lambda/` links to it), so `ec2train deploy lambda` works the same from a checkout and
from a wheel.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import io
import json
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ec2train.deploy import prices
from ec2train.deploy.names import (
    ACCOUNT_PLACEHOLDER,
    ALIAS_RE,
    ENDPOINT_TAG,
    MANAGED_TAG,
    POLICY_NAME,
    ROLE_TAG,
    DeployError,
    check_function_name,
    check_sagemaker_name,
    is_managed,
    log_group_for,
    partition_of,
    role_name_for,
)
from ec2train.deploy.plan import Ref, Retry, Step, StepRunner, account_of, dry_run_header, resolve_region
from ec2train.policies import render_policy

# Serverless endpoints accept 4 MB per request (real-time ones 6 MB): keep the Lambda's
# image cap under it, with room for the request's framing.
SERVERLESS_MAX_IMAGE_BYTES = 3_500_000


# --------------------------------------------------------------------------- code


def default_code_dir() -> Path:
    """The Lambda source shipped with ec2train (`ec2train/_lambda`, in a checkout and in a wheel)."""
    return Path(__file__).resolve().parents[1] / "_lambda"


def build_lambda_zip(code_dir: str | Path) -> bytes:
    """A deterministic zip of the folder's files (same bytes for the same files, any machine)."""
    code_dir = Path(code_dir)
    if not (code_dir / "handler.py").is_file():
        raise DeployError(
            f"{code_dir} has no handler.py; pass --code-dir with a folder holding the function's handler.py, "
            "or leave it out to deploy the Lambda source shipped with ec2train"
        )
    if "def lambda_handler" not in (code_dir / "handler.py").read_text(encoding="utf-8", errors="replace"):
        raise DeployError(
            f"{code_dir / 'handler.py'} defines no lambda_handler; pass --code-dir with a folder whose handler.py does"
        )
    files = sorted(
        p
        for p in code_dir.rglob("*")
        if p.is_file()
        and not any(part.startswith(".") or part == "__pycache__" for part in p.relative_to(code_dir).parts)
        and p.suffix not in (".pyc", ".pyo")
    )
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for p in files:
            info = zipfile.ZipInfo(p.relative_to(code_dir).as_posix(), date_time=(1980, 1, 1, 0, 0, 0))
            info.external_attr = 0o644 << 16  # world-readable: the Lambda runtime user must read it
            info.compress_type = zipfile.ZIP_DEFLATED
            info.create_system = 3  # unix, so the permission bits above mean what they say
            zf.writestr(info, p.read_bytes(), compresslevel=9)
    return buf.getvalue()


# --------------------------------------------------------------------------- IAM documents


def lambda_trust_policy() -> dict:
    """Who may assume the function's role: the Lambda service, nobody else."""
    return render_policy("lambda-trust")


def lambda_invoke_policy(partition: str, region: str, account: str, endpoint: str, function: str) -> dict:
    """What the function may do: invoke one endpoint (ARN in lowercase), write its own log group."""
    # A dry run without --account-id shows a placeholder the renderer's 12-digit check would refuse.
    stand_in = "000000000000" if account == ACCOUNT_PLACEHOLDER else account
    doc = render_policy(
        "lambda-invoke-endpoint",
        Partition=partition,
        Region=region,
        AccountId=stand_in,
        EndpointName=endpoint,
        FunctionName=function,
    )
    if stand_in != account:
        doc = json.loads(json.dumps(doc).replace(f":{stand_in}:", f":{account}:"))
    return doc


# --------------------------------------------------------------------------- the plan


@dataclass(frozen=True)
class LambdaSpec:
    endpoint: str
    function_name: str
    alias: str = "live"
    memory_mb: int = 256
    timeout_s: int = 30
    reserved_concurrency: int = 10
    provisioned_concurrency: int | None = None
    allow_http: bool = False
    max_image_bytes: int | None = None
    architecture: str = "arm64"
    log_retention_days: int = 30

    def check(self) -> LambdaSpec:
        check_sagemaker_name(self.endpoint, "--endpoint")
        check_function_name(self.function_name)
        if not ALIAS_RE.match(self.alias):
            raise DeployError(
                f"--alias {self.alias!r} is not a valid Lambda alias: letters, digits, - and _, not only digits"
            )
        if not 128 <= self.memory_mb <= 10240:
            raise DeployError("--memory must be from 128 to 10240 MB")
        if not 1 <= self.timeout_s <= 900:
            raise DeployError("--timeout must be from 1 to 900 seconds")
        if self.reserved_concurrency < 0:
            raise DeployError("--reserved-concurrency cannot be negative (0 removes the reservation)")
        if self.provisioned_concurrency is not None:
            if self.provisioned_concurrency < 0:
                raise DeployError("--provisioned-concurrency cannot be negative (0 removes it)")
            if self.reserved_concurrency and self.provisioned_concurrency > self.reserved_concurrency:
                raise DeployError(
                    f"--provisioned-concurrency {self.provisioned_concurrency} exceeds --reserved-concurrency "
                    f"{self.reserved_concurrency}; Lambda cannot provision more than it reserves"
                )
        if self.architecture not in ("arm64", "x86_64"):
            raise DeployError("--architecture must be arm64 or x86_64")
        if self.max_image_bytes is not None and self.max_image_bytes < 1:
            raise DeployError("--max-image-bytes must be positive")
        return self

    def environment(self) -> dict[str, str]:
        env = {"ENDPOINT_NAME": self.endpoint}
        if self.allow_http:
            env["ALLOW_HTTP"] = "true"
        if self.max_image_bytes:
            env["MAX_IMAGE_BYTES"] = str(self.max_image_bytes)
        return env


def _description(spec: LambdaSpec) -> str:
    return f"ec2train front door for SageMaker endpoint {spec.endpoint}"


def _tags(spec: LambdaSpec) -> dict[str, str]:
    return {MANAGED_TAG[0]: MANAGED_TAG[1], ENDPOINT_TAG: spec.endpoint}


def _role_and_log_steps(spec: LambdaSpec, region: str, account: str) -> list[Step]:
    """The execution role with its one inline policy, and the function's log group."""
    partition, fn, role = partition_of(region), spec.function_name, role_name_for(spec.function_name)
    trust = json.dumps(lambda_trust_policy(), indent=2)
    policy = json.dumps(lambda_invoke_policy(partition, region, account, spec.endpoint, fn), indent=2)
    return [
        Step(
            "iam",
            "create_role",
            {
                "RoleName": role,
                "AssumeRolePolicyDocument": trust,
                "Description": f"Execution role of Lambda {fn} (ec2train)",
                "Tags": [{"Key": k, "Value": v} for k, v in _tags(spec).items()],
            },
            "execution role, assumable by Lambda only",
            if_exists=[Step("iam", "update_assume_role_policy", {"RoleName": role, "PolicyDocument": trust})],
        ),
        Step(
            "iam",
            "put_role_policy",
            {"RoleName": role, "PolicyName": POLICY_NAME, "PolicyDocument": policy},
            "the only rights: invoke this endpoint, write own logs",
        ),
        Step(
            "logs",
            "create_log_group",
            {"logGroupName": log_group_for(fn), "tags": _tags(spec)},
            "its log group",
            tolerate=frozenset({"exists"}),
        ),
        Step(
            "logs",
            "put_retention_policy",
            {"logGroupName": log_group_for(fn), "retentionInDays": spec.log_retention_days},
        ),
    ]


def _function_steps(spec: LambdaSpec, zip_bytes: bytes, region: str, account: str) -> list[Step]:
    """Create the function, or update its code and then its configuration; wait until it is active."""
    fn, role = spec.function_name, role_name_for(spec.function_name)
    config = {
        "Role": f"arn:{partition_of(region)}:iam::{account}:role/{role}",
        "Handler": "handler.lambda_handler",
        "Runtime": "python3.12",
        "Environment": {"Variables": spec.environment()},
        "MemorySize": spec.memory_mb,
        "Timeout": spec.timeout_s,
        "Description": _description(spec),
    }
    # A new role cannot be assumed until IAM has propagated it: retry while Lambda says so.
    role_retry = Retry("InvalidParameterValueException", "cannot be assumed")
    fn_only = {"FunctionName": fn}
    return [
        Step(
            "lambda",
            "create_function",
            {
                "FunctionName": fn,
                **config,
                "Code": {"ZipFile": zip_bytes},
                "Architectures": [spec.architecture],
                "Tags": {**_tags(spec), ROLE_TAG: role},
            },
            "the function",
            retry=role_retry,
            if_exists=[
                Step(
                    "lambda",
                    "update_function_code",
                    {"FunctionName": fn, "ZipFile": zip_bytes, "Architectures": [spec.architecture]},
                ),
                Step("lambda", "wait:function_updated_v2", fn_only),
                Step("lambda", "update_function_configuration", {"FunctionName": fn, **config}, retry=role_retry),
                Step("lambda", "wait:function_updated_v2", fn_only),
            ],
        ),
        Step("lambda", "wait:function_active_v2", fn_only),
    ]


def _publish_steps(spec: LambdaSpec, region: str) -> list[Step]:
    """Reserved concurrency, an immutable version, the alias on it, provisioned concurrency on the alias."""
    fn, version = spec.function_name, Ref("lambda:PublishVersion", ("Version",))
    if spec.reserved_concurrency:
        steps = [
            Step(
                "lambda",
                "put_function_concurrency",
                {"FunctionName": fn, "ReservedConcurrentExecutions": spec.reserved_concurrency},
                "caps its concurrency (and so the endpoint's load)",
            )
        ]
    else:
        steps = [
            Step(
                "lambda",
                "delete_function_concurrency",
                {"FunctionName": fn},
                "no reservation",
                tolerate=frozenset({"missing"}),
            )
        ]
    steps += [
        Step(
            "lambda",
            "publish_version",
            {"FunctionName": fn, "Description": _description(spec)},
            "an immutable version",
            save="lambda:PublishVersion",
        ),
        Step(
            "lambda",
            "create_alias",
            {"FunctionName": fn, "Name": spec.alias, "FunctionVersion": version, "Description": _description(spec)},
            "the name callers use",
            if_exists=[
                Step("lambda", "update_alias", {"FunctionName": fn, "Name": spec.alias, "FunctionVersion": version})
            ],
        ),
    ]
    later = (
        f"aws lambda put-provisioned-concurrency-config --function-name {fn} --qualifier {spec.alias} "
        f"--provisioned-concurrent-executions {spec.provisioned_concurrency} --region {region}"
    )
    if spec.provisioned_concurrency:
        steps.append(
            Step(
                "lambda",
                "put_provisioned_concurrency_config",
                {
                    "FunctionName": fn,
                    "Qualifier": spec.alias,
                    "ProvisionedConcurrentExecutions": spec.provisioned_concurrency,
                },
                "warm instances (billed per hour)",
                tolerate=frozenset({"unsupported"}),
                unsupported_warning=(
                    f"this AWS endpoint does not support PutProvisionedConcurrencyConfig, so {fn} is deployed "
                    f"WITHOUT provisioned concurrency; set it later with: {later}"
                ),
            )
        )
    elif spec.provisioned_concurrency == 0:
        steps.append(
            Step(
                "lambda",
                "delete_provisioned_concurrency_config",
                {"FunctionName": fn, "Qualifier": spec.alias},
                "no warm instances",
                tolerate=frozenset({"missing", "unsupported"}),
            )
        )
    return steps


def lambda_plan(spec: LambdaSpec, zip_bytes: bytes, *, region: str, account: str) -> list[Step]:
    return (
        _role_and_log_steps(spec, region, account)
        + _function_steps(spec, zip_bytes, region, account)
        + _publish_steps(spec, region)
    )


# --------------------------------------------------------------------------- the command


def function_tags(runner: StepRunner, fn: str) -> dict[str, str] | None:
    """The function's tags, or None if there is no such function."""
    got = runner.read("lambda", "get_function", FunctionName=fn)
    return None if got is None else (got.get("Tags") or {})


def _check_before_lambda(runner: StepRunner, spec: LambdaSpec) -> LambdaSpec:
    """Refuse a function or role ec2train did not make; cap images for a serverless endpoint."""
    tags = function_tags(runner, spec.function_name)
    if tags is not None and not is_managed(tags):
        raise DeployError(
            f"Lambda function {spec.function_name} exists and was not deployed by ec2train; pass another --function-name"
        )
    role = role_name_for(spec.function_name)
    existing_role = runner.read("iam", "get_role", RoleName=role)
    if existing_role is not None and not is_managed(existing_role["Role"].get("Tags")):
        raise DeployError(f"IAM role {role} exists and was not created by ec2train; pass another --function-name")
    endpoint = runner.read("sagemaker", "describe_endpoint", EndpointName=spec.endpoint)
    if endpoint is None:
        runner.warn(
            f"endpoint {spec.endpoint} does not exist in {runner.region} yet; the function answers 502 until it does"
        )
    elif spec.max_image_bytes is None:
        cfg = (
            runner.read("sagemaker", "describe_endpoint_config", EndpointConfigName=endpoint["EndpointConfigName"])
            or {}
        )
        if any("ServerlessConfig" in v for v in cfg.get("ProductionVariants", [])):
            spec = dataclasses.replace(spec, max_image_bytes=SERVERLESS_MAX_IMAGE_BYTES)
            runner.note(
                f"endpoint {spec.endpoint} is serverless (4 MB per request): MAX_IMAGE_BYTES={SERVERLESS_MAX_IMAGE_BYTES}"
            )
    return spec


def deploy_lambda(
    spec: LambdaSpec,
    *,
    code_dir: str | Path | None = None,
    region: str | None = None,
    account_id: str | None = None,
    dry_run: bool = False,
    console: Any = None,
    runner: StepRunner | None = None,
) -> dict[str, Any]:
    """Role with exactly the rights it needs, the function, concurrency, version, alias."""
    spec.check()
    region = resolve_region(region)
    code_dir = Path(code_dir) if code_dir else default_code_dir()
    if not code_dir.is_dir():
        raise DeployError(
            f"--code-dir {code_dir} is not a folder; pass a folder holding handler.py, "
            "or leave --code-dir out to deploy the Lambda source shipped with ec2train"
        )
    zip_bytes = build_lambda_zip(code_dir)
    runner = runner or StepRunner(region, dry_run=dry_run, console=console)
    account = account_of(runner, account_id)
    if runner.dry_run:
        dry_run_header(
            runner,
            f"deploy lambda {spec.function_name} for endpoint {spec.endpoint}",
            ["sts:GetCallerIdentity", "lambda:GetFunction", "iam:GetRole", "sagemaker:DescribeEndpoint"],
            prices.with_prices_note(
                [
                    f"creates    Lambda function {spec.function_name} (alias {spec.alias}), its role and log group",
                    *prices.lambda_lines(spec.memory_mb, spec.architecture, spec.reserved_concurrency),
                ]
            ),
        )
        if account == ACCOUNT_PLACEHOLDER:
            runner.note(
                f"{ACCOUNT_PLACEHOLDER} stands for the account a real run reads from sts:GetCallerIdentity (or pass --account-id)."
            )
    else:
        spec = _check_before_lambda(runner, spec)
    runner.run(lambda_plan(spec, zip_bytes, region=region, account=account))
    return {
        "function": spec.function_name,
        "alias": spec.alias,
        "version": (runner.results.get("lambda:PublishVersion") or {}).get("Version"),
        "role": role_name_for(spec.function_name),
        "function_arn": f"arn:{partition_of(region)}:lambda:{region}:{account}:function:{spec.function_name}:{spec.alias}",
        "code_sha256": base64.b64encode(hashlib.sha256(zip_bytes).digest()).decode(),
        "warnings": list(runner.warnings),
    }
