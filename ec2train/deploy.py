"""SageMaker endpoints, autoscaling and the Lambda front door, with boto3 only.

Every command is planned as data first: a list of `Step`s (service, operation, parameters).
One `Runner` either prints the steps (`--dry-run`, no request sent) or sends them, so a dry
run and a real run cannot drift apart. What a real run must read first (does the endpoint
exist? is this role ours?) is read before planning; a dry run cannot read, so the plan
shows both branches ("if it already exists: ...") and placeholders for what it would read.

Everything created is tagged `ec2train:managed=true`, and `delete` only removes what carries
that tag (the endpoint itself can be forced), so no forgotten endpoint keeps billing.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import io
import json
import re
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

from ec2train import aws
from ec2train.errors import UserError


class DeployError(UserError):
    """A deploy request that cannot go ahead; the message names the problem and the fix."""


# --------------------------------------------------------------------------- names and ARNs

# SageMaker's rule for endpoint, endpoint-config and model names.
SAGEMAKER_NAME_RE = re.compile(r"^[a-zA-Z0-9](-*[a-zA-Z0-9]){0,62}$")
# Lambda's rule for a plain function name (no ARN, no qualifier).
FUNCTION_NAME_RE = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")
# Lambda's rule for an alias: letters, digits, - and _, not all digits (that is a version).
ALIAS_RE = re.compile(r"^(?![0-9]+$)[a-zA-Z0-9_-]{1,128}$")
ROLE_ARN_RE = re.compile(r"^arn:aws(-[a-z]+)*:iam::[0-9]{12}:role/[\w+=,.@/-]{1,512}$")
S3_URI_RE = re.compile(r"^s3://[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]/\S+$")
INSTANCE_TYPE_RE = re.compile(r"^ml\.[a-z0-9-]+\.[a-z0-9]+$")
REGION_RE = re.compile(r"^[a-z]{2}(-[a-z]+)+-[0-9]+$")
ACCOUNT_RE = re.compile(r"^[0-9]{12}$")

VARIANT = "AllTraffic"
MANAGED_TAG = ("ec2train:managed", "true")
ENDPOINT_TAG = "ec2train:endpoint"
ROLE_TAG = "ec2train:role"
POLICY_NAME = "invoke-endpoint"
SCALABLE_DIMENSION = "sagemaker:variant:DesiredInstanceCount"
ACCOUNT_PLACEHOLDER = "<ACCOUNT_ID>"
# Serverless endpoints accept 4 MB per request (real-time ones 6 MB): keep the Lambda's
# image cap under it, with room for the request's framing.
SERVERLESS_MAX_IMAGE_BYTES = 3_500_000
SERVERLESS_MEMORY_MB = (1024, 2048, 3072, 4096, 5120, 6144)


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


def _tags_list(endpoint: str) -> list[dict[str, str]]:
    return [{"Key": MANAGED_TAG[0], "Value": MANAGED_TAG[1]}, {"Key": ENDPOINT_TAG, "Value": endpoint}]


def _is_managed(tags: dict[str, str] | list[dict[str, str]] | None) -> bool:
    if isinstance(tags, list):
        tags = {t["Key"]: t["Value"] for t in tags}
    return (tags or {}).get(MANAGED_TAG[0]) == MANAGED_TAG[1]


# --------------------------------------------------------------------------- container image

# Account that hosts the AWS Deep Learning Containers in each region (the same table the
# SageMaker Python SDK ships). Regions not listed: pass --image-uri.
DLC_ACCOUNTS: dict[str, str] = {
    "af-south-1": "626614931356",
    "ap-east-1": "871362719292",
    "ap-east-2": "975050140332",
    "ap-northeast-1": "763104351884",
    "ap-northeast-2": "763104351884",
    "ap-northeast-3": "364406365360",
    "ap-south-1": "763104351884",
    "ap-south-2": "772153158452",
    "ap-southeast-1": "763104351884",
    "ap-southeast-2": "763104351884",
    "ap-southeast-3": "907027046896",
    "ap-southeast-4": "457447274322",
    "ap-southeast-5": "550225433462",
    "ap-southeast-7": "590183813437",
    "ca-central-1": "763104351884",
    "ca-west-1": "204538143572",
    "cn-north-1": "727897471807",
    "cn-northwest-1": "727897471807",
    "eu-central-1": "763104351884",
    "eu-central-2": "380420809688",
    "eu-north-1": "763104351884",
    "eu-south-1": "692866216735",
    "eu-south-2": "503227376785",
    "eu-west-1": "763104351884",
    "eu-west-2": "763104351884",
    "eu-west-3": "763104351884",
    "il-central-1": "780543022126",
    "me-central-1": "914824155844",
    "me-south-1": "217643126080",
    "mx-central-1": "637423239942",
    "sa-east-1": "763104351884",
    "us-east-1": "763104351884",
    "us-east-2": "763104351884",
    "us-gov-east-1": "446045086412",
    "us-gov-west-1": "442386744353",
    "us-west-1": "763104351884",
    "us-west-2": "763104351884",
}
PYTORCH_INFERENCE_REPO = "pytorch-inference"
PYTORCH_INFERENCE_VERSION = "2.6.0"
PYTORCH_INFERENCE_PY = "py312"


def is_gpu_instance(instance_type: str) -> bool:
    family = instance_type.split(".")[1] if instance_type.count(".") >= 2 else ""
    return family.startswith(("g", "p"))


def image_uri_for(region: str, instance_type: str | None, serverless: bool = False) -> str:
    """The AWS PyTorch inference container for this region: GPU tag on ml.g*/ml.p*, else CPU."""
    if instance_type and not serverless:
        family = instance_type.split(".")[1] if instance_type.count(".") >= 2 else ""
        if family.startswith(("inf", "trn")):
            raise DeployError(
                f"{instance_type} needs a Neuron-compiled model and the pytorch-inference-neuronx image; "
                "pass --image-uri, or pick an ml.g* (GPU) or ml.c*/ml.m* (CPU) instance type"
            )
    account = DLC_ACCOUNTS.get(region)
    if account is None:
        raise DeployError(
            f"no PyTorch inference image is known for region {region}; pass --image-uri "
            f"<account>.dkr.ecr.{region}.amazonaws.com/{PYTORCH_INFERENCE_REPO}:<tag> "
            "(see the AWS Deep Learning Containers list of available images)"
        )
    device = "gpu" if (instance_type and not serverless and is_gpu_instance(instance_type)) else "cpu"
    domain = "amazonaws.com.cn" if region.startswith("cn-") else "amazonaws.com"
    tag = f"{PYTORCH_INFERENCE_VERSION}-{device}-{PYTORCH_INFERENCE_PY}"
    return f"{account}.dkr.ecr.{region}.{domain}/{PYTORCH_INFERENCE_REPO}:{tag}"


# --------------------------------------------------------------------------- IAM documents


def lambda_trust_policy() -> dict:
    """Who may assume the function's role: the Lambda service, nobody else."""
    from ec2train.policies import render_policy

    return render_policy("lambda-trust")


def lambda_invoke_policy(partition: str, region: str, account: str, endpoint: str, function: str) -> dict:
    """What the function may do: invoke one endpoint (ARN in lowercase), write its own log group."""
    from ec2train.policies import render_policy

    # A dry run without --account-id shows a placeholder the renderer's 12-digit check would refuse.
    stand_in = "000000000000" if account == ACCOUNT_PLACEHOLDER else account
    doc = render_policy("lambda-invoke-endpoint", Partition=partition, Region=region, AccountId=stand_in,
                        EndpointName=endpoint, FunctionName=function)
    if stand_in != account:
        doc = json.loads(json.dumps(doc).replace(f":{stand_in}:", f":{account}:"))
    return doc


# --------------------------------------------------------------------------- plan and runner


@dataclass(frozen=True)
class Ref:
    """A value taken from the response of an earlier step (saved under `source`)."""

    source: str
    path: tuple[str, ...]

    def __str__(self) -> str:
        return f"<{'.'.join(self.path)} from {self.source}>"


@dataclass(frozen=True)
class Retry:
    """Retry a step while AWS answers this error (eventual consistency), with bounded backoff."""

    code: str
    message_contains: str
    delays: tuple[float, ...] = (2, 4, 8, 10, 10, 10)


@dataclass
class Step:
    service: str
    operation: str  # a boto3 client method, or "wait:<name>"
    params: dict[str, Any]
    why: str = ""
    save: str | None = None  # keep the response for later Refs
    tolerate: frozenset[str] = frozenset()  # "missing", "exists", "unsupported": not an error
    if_exists: list["Step"] = field(default_factory=list)  # run instead when it already exists
    unsupported_warning: str = ""  # printed when tolerated as "unsupported"
    retry: Retry | None = None

    @property
    def api(self) -> str:
        if self.operation.startswith("wait:"):
            return f"wait {self.operation[5:]}"
        return f"{self.service}:{''.join(p.capitalize() for p in self.operation.split('_'))}"


def _error_kind(exc: Exception) -> str:
    """Classify an AWS error: missing / exists / unsupported / other."""
    resp = getattr(exc, "response", None) or {}
    err = resp.get("Error", {})
    code = str(err.get("Code", ""))
    msg = str(err.get("Message", ""))
    status = resp.get("ResponseMetadata", {}).get("HTTPStatusCode")
    if code in {"ResourceNotFoundException", "NoSuchEntity", "ObjectNotFoundException"}:
        return "missing"
    if code == "ValidationException" and any(
        s in msg for s in ("Could not find", "No scaling policy found", "No scalable target found", "does not exist")
    ):
        return "missing"
    if code in {"EntityAlreadyExists", "ResourceAlreadyExistsException"}:
        return "exists"
    if code in {"ResourceConflictException", "ConflictException", "ValidationException"} and "already exist" in msg:
        return "exists"
    # An API this AWS endpoint does not implement (moto answers an HTML 404 with code "404").
    if code in {"404", "NotImplemented", "UnknownOperationException"} or status == 501:
        return "unsupported"
    return "other"


class _Unresolved(Exception):
    pass


def _json_default(obj: Any) -> Any:
    if isinstance(obj, (bytes, bytearray)):
        digest = base64.b64encode(hashlib.sha256(obj).digest()).decode()
        return f"<zip archive: {len(obj)} bytes, CodeSha256 {digest}>"
    if isinstance(obj, Ref):
        return str(obj)
    return str(obj)


def _display_params(params: dict[str, Any]) -> dict[str, Any]:
    """Parameters as they are sent, with policy documents parsed so they print readably."""
    out = {}
    for k, v in params.items():
        if k.endswith("PolicyDocument") and isinstance(v, str):
            out[k] = json.loads(v)
        else:
            out[k] = v
    return out


def _summary(params: dict[str, Any]) -> str:
    qualifier = params.get("Qualifier", params.get("Name") if "FunctionName" in params else None)
    if "FunctionName" in params and isinstance(qualifier, str):
        return f"{params['FunctionName']}:{qualifier}"
    for key in ("EndpointName", "EndpointConfigName", "ModelName", "FunctionName", "RoleName", "logGroupName",
                "ResourceId", "PolicyName", "Name"):
        if key in params and not isinstance(params[key], Ref):
            extra = f" / {params['PolicyName']}" if key == "RoleName" and "PolicyName" in params else ""
            return f"{params[key]}{extra}"
    return ""


class Runner:
    """Prints a plan (dry run) or sends it. The one place requests leave ec2train.deploy."""

    def __init__(
        self,
        region: str,
        *,
        dry_run: bool = False,
        console: Any = None,
        session: Any = None,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.monotonic,
        wait_timeout: float = 1800.0,
        poll_seconds: float = 15.0,
    ):
        from rich.console import Console

        self.region = region
        self.dry_run = dry_run
        self.console = console or Console()
        self.session = session
        self.sleep = sleep
        self.clock = clock
        self.wait_timeout = wait_timeout
        self.poll_seconds = poll_seconds
        self.results: dict[str, Any] = {}
        self.warnings: list[str] = []
        self.sent: list[str] = []  # APIs actually called, in order
        self._clients: dict[str, Any] = {}
        self._printed = 0

    # -- clients and direct reads (used by discovery before planning; never in a dry run)
    def client(self, service: str) -> Any:
        if self.dry_run:
            raise RuntimeError("a dry run must not create AWS clients")
        if service not in self._clients:
            self._clients[service] = aws.client(service, region=self.region, session=self.session)
        return self._clients[service]

    def _send(self, service: str, operation: str, params: dict[str, Any]) -> Any:
        self.sent.append(f"{service}:{operation}")
        return getattr(self.client(service), operation)(**params)

    def call(self, service: str, operation: str, **params: Any) -> Any:
        """One request; any AWS error becomes a one-line DeployError."""
        try:
            return self._send(service, operation, params)
        except Exception as exc:  # noqa: BLE001 - every failure reaches the user as one line
            raise _as_deploy_error(exc, service, operation) from None

    def read(self, service: str, operation: str, **params: Any) -> Any:
        """A read that may find nothing: returns None when the resource is missing."""
        try:
            return self._send(service, operation, params)
        except Exception as exc:  # noqa: BLE001 - classified below, re-raised if not "missing"
            if _error_kind(exc) in ("missing", "unsupported"):
                return None
            raise _as_deploy_error(exc, service, operation) from None

    def pages(self, service: str, operation: str, key: str, **params: Any) -> list[Any]:
        """Every item of a paginated list."""
        self.sent.append(f"{service}:{operation}")
        try:
            return [item for page in self.client(service).get_paginator(operation).paginate(**params) for item in page[key]]
        except Exception as exc:  # noqa: BLE001 - every failure reaches the user as one line
            raise _as_deploy_error(exc, service, operation) from None

    # -- plans
    def note(self, text: str) -> None:
        self.console.print(text, highlight=False, markup=False, soft_wrap=True)

    def run(self, steps: Iterable[Step]) -> dict[str, Any]:
        for step in steps:
            if self.dry_run:
                self._print(step)
            else:
                self._execute(step)
        return self.results

    def _print(self, step: Step, indent: str = "") -> None:
        self._printed += 1 if not indent else 0
        number = f"[{self._printed}] " if not indent else "- "
        why = f"  # {step.why}" if step.why else ""
        self.console.out(f"{indent}{number}{step.api}{why}", highlight=False)
        body = json.dumps(_display_params(step.params), indent=2, sort_keys=False, default=_json_default)
        self.console.out("\n".join(indent + line for line in body.splitlines()), highlight=False)
        if step.if_exists:
            self.console.out(f"{indent}  if it already exists, instead:", highlight=False)
            for alt in step.if_exists:
                self._print(alt, indent + "    ")

    def _resolve(self, value: Any) -> Any:
        if isinstance(value, Ref):
            node = self.results.get(value.source)
            for key in value.path:
                if node is None:
                    break
                node = node[int(key)] if isinstance(node, list) else node.get(key)
            if node is None:
                raise _Unresolved(str(value))
            return node
        if isinstance(value, dict):
            return {k: self._resolve(v) for k, v in value.items()}
        if isinstance(value, list):
            return [self._resolve(v) for v in value]
        return value

    def _execute(self, step: Step) -> None:
        try:
            params = self._resolve(step.params)
        except _Unresolved as exc:
            self.note(f"  skipped {step.api}: {exc} is not there")
            return
        if step.operation.startswith("wait:"):
            self._wait(step, params)
            return
        delays = list(step.retry.delays) if step.retry else []
        while True:
            try:
                response = self._send(step.service, step.operation, params)
                break
            except Exception as exc:  # noqa: BLE001 - classified below
                kind = _error_kind(exc)
                err = (getattr(exc, "response", None) or {}).get("Error", {})
                if step.retry and delays and err.get("Code") == step.retry.code and step.retry.message_contains in str(err.get("Message", "")):
                    delay = delays.pop(0)
                    self.note(f"  {step.api}: {err.get('Message')} (IAM is still propagating); retrying in {delay:g} s")
                    self.sleep(delay)
                    continue
                if kind == "exists" and step.if_exists:
                    self.note(f"  {step.api} {_summary(params)}: already exists, so instead:")
                    for alt in step.if_exists:
                        self._execute(alt)
                    return
                if kind in step.tolerate:
                    if kind == "unsupported":
                        self.warnings.append(step.unsupported_warning or f"{step.api} is not supported here; skipped")
                        self.console.print(f"[yellow]warning:[/yellow] {self.warnings[-1]}", highlight=False, soft_wrap=True)
                    else:
                        self.note(f"  {step.api} {_summary(params)}: {'already there' if kind == 'exists' else 'already gone'}")
                    return
                raise _as_deploy_error(exc, step.service, step.operation) from None
        if step.save:
            self.results[step.save] = response
        self.console.print(f"[green]✓[/green] {step.api} {_summary(params)}", highlight=False, soft_wrap=True)

    def _wait(self, step: Step, params: dict[str, Any]) -> None:
        name = step.operation[5:]
        if name == "endpoint_in_service":
            describe = lambda: self.call("sagemaker", "describe_endpoint", EndpointName=params["EndpointName"])  # noqa: E731
            with self.console.status(f"endpoint {params['EndpointName']}: waiting") as status:
                result = wait_for_endpoint(
                    describe,
                    params["EndpointName"],
                    expect_config=params.get("EndpointConfigName"),
                    timeout=self.wait_timeout,
                    poll_seconds=self.poll_seconds,
                    sleep=self.sleep,
                    clock=self.clock,
                    on_status=lambda s, elapsed: status.update(f"endpoint {params['EndpointName']}: {s} ({elapsed:.0f} s)"),
                )
            if step.save:
                self.results[step.save] = result
            self.console.print(f"[green]✓[/green] endpoint {params['EndpointName']} is InService", highlight=False)
            return
        # A boto3 waiter (Lambda function state).
        self.sent.append(f"{step.service}:{name}")
        waiter = self.client(step.service).get_waiter(name)
        try:
            waiter.wait(**params, WaiterConfig={"Delay": 2, "MaxAttempts": 150})
        except Exception as exc:  # noqa: BLE001 - a waiter failure is the user's to see
            raise DeployError(f"{step.service} {name} on {_summary(params)} failed: {exc}") from None


def _as_deploy_error(exc: Exception, service: str, operation: str) -> DeployError:
    api = f"{service}:{''.join(p.capitalize() for p in operation.split('_'))}"
    err = (getattr(exc, "response", None) or {}).get("Error", {})
    code, msg = err.get("Code"), str(err.get("Message", "")).strip()
    name = type(exc).__name__
    if name in ("NoCredentialsError", "PartialCredentialsError"):
        return DeployError("no AWS credentials found; configure them (aws configure, AWS_PROFILE or an instance role)")
    if name in ("EndpointConnectionError", "ConnectTimeoutError", "ReadTimeoutError"):
        return DeployError(f"could not reach AWS for {api}: {exc}; check the network and --region")
    if code in ("AccessDenied", "AccessDeniedException", "UnauthorizedOperation"):
        return DeployError(f"{api} was denied: {msg.splitlines()[0] if msg else code}; grant your AWS identity {api}")
    if code:
        first = msg.splitlines()[0] if msg else ""
        return DeployError(f"{api} failed: {code}: {first}")
    return DeployError(f"{api} failed: {exc}")


def wait_for_endpoint(
    describe: Callable[[], dict],
    name: str,
    *,
    expect_config: str | None = None,
    timeout: float = 1800.0,
    poll_seconds: float = 15.0,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
    on_status: Callable[[str, float], None] | None = None,
) -> dict:
    """Poll until the endpoint is InService on `expect_config`; a clear error on failure or timeout."""
    start = clock()
    while True:
        d = describe()
        status = d.get("EndpointStatus", "?")
        if on_status:
            on_status(status, clock() - start)
        reason = d.get("FailureReason") or "no reason given"
        if status == "InService":
            # A failed update rolls back: InService again, on the old configuration.
            if expect_config and d.get("EndpointConfigName") != expect_config:
                raise DeployError(
                    f"the update of endpoint {name} failed and was rolled back: {reason}; "
                    "fix it and deploy again (the previous version keeps serving)"
                )
            return d
        if status in ("Failed", "UpdateRollbackFailed", "OutOfService"):
            raise DeployError(
                f"endpoint {name} is {status}: {reason}; fix the cause, then "
                f"`ec2train deploy delete --name {name}` and deploy again"
            )
        if clock() - start >= timeout:
            raise DeployError(
                f"endpoint {name} is still {status} after {timeout:.0f} s; it goes on in the background: "
                f"follow it with `ec2train deploy status --name {name}`"
            )
        sleep(poll_seconds)


def _resolve_region(region: str | None, session: Any = None) -> str:
    return check_region(region or aws.region_of(session))


def _account(runner: Runner, given: str | None) -> str:
    """The caller's account: from STS in a real run (checked against --account-id if given)."""
    if given is not None and not ACCOUNT_RE.match(given):
        raise DeployError(f"--account-id {given!r} is not a 12-digit AWS account id")
    if runner.dry_run:
        return given or ACCOUNT_PLACEHOLDER
    account = runner.call("sts", "get_caller_identity")["Account"]
    if given and given != account:
        raise DeployError(f"these credentials are for account {account}, not --account-id {given}; switch credentials")
    return account


def _dry_run_header(runner: Runner, what: str, reads: list[str]) -> None:
    runner.note(f"dry run: {what} in {runner.region}; nothing below is sent.")
    if reads:
        runner.note("A real run first reads: " + ", ".join(reads) + " (skipped here; both branches are shown).")


# --------------------------------------------------------------------------- endpoint


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

    def check(self) -> "EndpointSpec":
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
                raise DeployError(f"--instance-type {self.instance_type!r} is not a SageMaker instance type such as ml.g4dn.xlarge")
            if self.instance_count < 1:
                raise DeployError("--instance-count must be at least 1")
        else:
            if self.memory_mb not in SERVERLESS_MEMORY_MB:
                raise DeployError(f"--memory must be one of {', '.join(map(str, SERVERLESS_MEMORY_MB))} (MB) for a serverless endpoint")
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


UNKNOWN: Any = object()  # a dry run cannot read: both branches are planned


def endpoint_requests(spec: EndpointSpec, region: str) -> tuple[dict, dict]:
    """The CreateModel and CreateEndpointConfig requests; names carry a hash of their content,
    so the same deploy twice is a no-op and a changed one gets new names (and a rolling update)."""
    image = spec.image_uri or image_uri_for(region, spec.instance_type, spec.serverless)
    container = {
        "Image": image,
        "ModelDataUrl": spec.model_data,
        "Environment": {"SAGEMAKER_PROGRAM": "inference.py", "SAGEMAKER_SUBMIT_DIRECTORY": "/opt/ml/model/code"},
    }
    if spec.serverless:
        variant: dict[str, Any] = {
            "VariantName": VARIANT,
            "ServerlessConfig": {"MemorySizeInMB": spec.memory_mb, "MaxConcurrency": spec.max_concurrency},
        }
    else:
        variant = {
            "VariantName": VARIANT,
            "InstanceType": spec.instance_type,
            "InitialInstanceCount": spec.instance_count,
            "InitialVariantWeight": 1.0,
        }
    digest = hashlib.sha256(json.dumps([spec.name, spec.role_arn, container, variant], sort_keys=True).encode()).hexdigest()[:8]
    versioned = f"{spec.name[:54]}-{digest}"
    model = {"ModelName": versioned, "ExecutionRoleArn": spec.role_arn, "PrimaryContainer": container, "Tags": _tags_list(spec.name)}
    config = {
        "EndpointConfigName": versioned,
        "ProductionVariants": [{**variant, "ModelName": versioned}],
        "Tags": _tags_list(spec.name),
    }
    return model, config


def endpoint_plan(spec: EndpointSpec, region: str, current: EndpointNow | None | Any, *, wait: bool = True) -> list[Step]:
    model, config = endpoint_requests(spec, region)
    name, new_config = spec.name, config["EndpointConfigName"]
    if current not in (None, UNKNOWN) and current.config == new_config and current.status != "Failed":
        # Already serving exactly this: nothing to create (names carry a hash of the content).
        return [Step("sagemaker", "wait:endpoint_in_service", {"EndpointName": name, "EndpointConfigName": new_config}, save="endpoint")] if wait else []
    steps = [
        Step("sagemaker", "create_model", model, "the model: container image, model.tar.gz, role", tolerate=frozenset({"exists"})),
        Step("sagemaker", "create_endpoint_config", config, "how it is served", tolerate=frozenset({"exists"})),
    ]
    create = Step("sagemaker", "create_endpoint", {"EndpointName": name, "EndpointConfigName": new_config, "Tags": _tags_list(name)}, "the endpoint (starts billing)")
    update = Step("sagemaker", "update_endpoint", {"EndpointName": name, "EndpointConfigName": new_config}, "rolling update to the new configuration")
    if current is UNKNOWN:
        create.if_exists = [update]
        steps.append(create)
    elif current is None:
        steps.append(create)
    elif current.status == "Failed":
        steps += [
            Step("sagemaker", "delete_endpoint", {"EndpointName": name}, "a failed endpoint cannot be updated", tolerate=frozenset({"missing"})),
            Step("sagemaker", "wait:endpoint_deleted", {"EndpointName": name}),
            create,
        ]
    elif current.config != new_config:
        steps.append(update)
    if wait:
        steps.append(Step("sagemaker", "wait:endpoint_in_service", {"EndpointName": name, "EndpointConfigName": new_config}, save="endpoint"))
        # After a successful update, the previous configuration and model are unused: remove ours.
        if current not in (None, UNKNOWN) and current.config != new_config and current.config_managed:
            steps.append(Step("sagemaker", "delete_endpoint_config", {"EndpointConfigName": current.config}, "previous configuration", tolerate=frozenset({"missing"})))
            for m in current.models:
                if m != model["ModelName"]:
                    steps.append(Step("sagemaker", "delete_model", {"ModelName": m}, "previous model", tolerate=frozenset({"missing"})))
    return steps


def _discover_endpoint(runner: Runner, name: str) -> EndpointNow | None:
    d = runner.read("sagemaker", "describe_endpoint", EndpointName=name)
    if d is None:
        return None
    managed = _is_managed(runner.call("sagemaker", "list_tags", ResourceArn=d["EndpointArn"]).get("Tags"))
    cfg = runner.read("sagemaker", "describe_endpoint_config", EndpointConfigName=d["EndpointConfigName"])
    models = tuple(v["ModelName"] for v in (cfg or {}).get("ProductionVariants", []))
    cfg_managed = bool(cfg) and _is_managed(runner.call("sagemaker", "list_tags", ResourceArn=cfg["EndpointConfigArn"]).get("Tags"))
    return EndpointNow(d["EndpointStatus"], d["EndpointConfigName"], managed, models, cfg_managed)


def package_and_upload(model_path: str | Path, s3_uri: str, *, kms_key: str | None = None, dry_run: bool, console: Any = None) -> str:
    """Package model.pth into model.tar.gz and upload it (encrypted); returns its s3:// URI."""
    if not re.match(r"^s3://[a-z0-9][a-z0-9.-]{1,61}[a-z0-9](/.*)?$", s3_uri or ""):
        raise DeployError(f"--s3-uri {s3_uri!r} is not an s3://bucket/prefix URI")
    target = s3_uri if s3_uri.endswith(".tar.gz") else s3_uri.rstrip("/") + "/model.tar.gz"
    if not Path(model_path).is_file():
        raise DeployError(f"--model {model_path} is not a file; pass the model.pth written by `ec2train fit`")
    if dry_run:
        if console is not None:
            console.print(f"dry run: would package {model_path} into model.tar.gz and upload it to {target}", highlight=False, markup=False)
        return target
    # The packager (serving) and the uploader (S3 helpers) live in their own modules.
    try:
        from ec2train.export import package_model
        from ec2train.s3 import upload_file
    except ImportError:
        raise DeployError(
            "this ec2train cannot package and upload models; run `ec2train export --package model.tar.gz`, "
            "upload it, and pass --model-data s3://..."
        ) from None
    import tempfile

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
    runner: Runner | None = None,
) -> dict[str, Any]:
    """Create (or update) the model, endpoint configuration and endpoint; wait for InService."""
    spec.check()
    region = _resolve_region(region)
    runner = runner or Runner(region, dry_run=dry_run, console=console, wait_timeout=wait_timeout)
    if runner.dry_run:
        _dry_run_header(runner, f"deploy endpoint {spec.name}", ["sagemaker:DescribeEndpoint", "sagemaker:ListTags", "sagemaker:DescribeEndpointConfig"])
        current = UNKNOWN
    else:
        current = _discover_endpoint(runner, spec.name)
        if current is not None and not current.managed:
            raise DeployError(
                f"endpoint {spec.name} exists and was not created by ec2train (no {MANAGED_TAG[0]} tag); "
                "pick another --name, or delete it first"
            )
        if current is not None and current.status in ("Creating", "Updating", "SystemUpdating", "RollingBack", "Deleting"):
            raise DeployError(f"endpoint {spec.name} is {current.status}; wait until it settles (ec2train deploy status --name {spec.name}) and run again")
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
        "status": (runner.results.get("endpoint") or {}).get("EndpointStatus", "not waited" if not dry_run else "dry run"),
    }


# --------------------------------------------------------------------------- autoscaling


def resource_id(endpoint: str) -> str:
    return f"endpoint/{endpoint}/variant/{VARIANT}"


def scaling_policy_name(endpoint: str) -> str:
    return f"{endpoint}-invocations-per-instance"


def autoscale_plan(name: str, min_capacity: int, max_capacity: int, target: float, scale_in_cooldown: int, scale_out_cooldown: int) -> list[Step]:
    target_ids = {"ServiceNamespace": "sagemaker", "ResourceId": resource_id(name), "ScalableDimension": SCALABLE_DIMENSION}
    return [
        Step("application-autoscaling", "register_scalable_target", {**target_ids, "MinCapacity": min_capacity, "MaxCapacity": max_capacity}, "instance count bounds"),
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
    runner: Runner | None = None,
) -> dict[str, Any]:
    """Target-tracking autoscaling on SageMakerVariantInvocationsPerInstance for an instance endpoint."""
    check_sagemaker_name(name)
    if min_capacity < 1:
        raise DeployError("--min must be at least 1 (an instance endpoint cannot scale to zero)")
    if max_capacity < min_capacity:
        raise DeployError(f"--max ({max_capacity}) must be at least --min ({min_capacity})")
    if not target_invocations > 0:
        raise DeployError("--target-invocations must be greater than 0 (invocations per instance per minute)")
    if scale_in_cooldown < 0 or scale_out_cooldown < 0:
        raise DeployError("cooldowns are seconds and cannot be negative")
    region = _resolve_region(region)
    runner = runner or Runner(region, dry_run=dry_run, console=console)
    if runner.dry_run:
        _dry_run_header(runner, f"autoscale endpoint {name}", ["sagemaker:DescribeEndpoint", "sagemaker:DescribeEndpointConfig"])
    else:
        d = runner.read("sagemaker", "describe_endpoint", EndpointName=name)
        if d is None:
            raise DeployError(f"endpoint {name} does not exist in {region}; deploy it first with `ec2train deploy endpoint`")
        cfg = runner.read("sagemaker", "describe_endpoint_config", EndpointConfigName=d["EndpointConfigName"]) or {}
        variants = {v["VariantName"]: v for v in cfg.get("ProductionVariants", [])}
        if VARIANT not in variants:
            raise DeployError(f"endpoint {name} has no {VARIANT} variant (it has {', '.join(variants) or 'none'}); ec2train autoscales only endpoints it deployed")
        if "ServerlessConfig" in variants[VARIANT]:
            raise DeployError(
                f"endpoint {name} is serverless: it scales by itself up to its MaxConcurrency and cannot use "
                "instance autoscaling; redeploy with a higher --max-concurrency instead"
            )
    runner.run(autoscale_plan(name, min_capacity, max_capacity, target_invocations, scale_in_cooldown, scale_out_cooldown))
    return {"endpoint": name, "resource_id": resource_id(name), "policy": scaling_policy_name(name)}


# --------------------------------------------------------------------------- Lambda


def default_code_dir() -> Path:
    """The repository's lambda/ folder, beside the ec2train package (absent from a wheel)."""
    return Path(__file__).resolve().parent.parent / "lambda"


def build_lambda_zip(code_dir: str | Path) -> bytes:
    """A deterministic zip of the folder's files (same bytes for the same files, any machine)."""
    code_dir = Path(code_dir)
    if not (code_dir / "handler.py").is_file():
        raise DeployError(
            f"{code_dir} has no handler.py; pass --code-dir with the ec2train repository's lambda/ folder "
            "(it is not inside the installed package)"
        )
    if "def lambda_handler" not in (code_dir / "handler.py").read_text(encoding="utf-8", errors="replace"):
        raise DeployError(f"{code_dir / 'handler.py'} defines no lambda_handler; pass --code-dir with the ec2train lambda/ folder")
    files = sorted(
        p for p in code_dir.rglob("*")
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

    def check(self) -> "LambdaSpec":
        check_sagemaker_name(self.endpoint, "--endpoint")
        check_function_name(self.function_name)
        if not ALIAS_RE.match(self.alias):
            raise DeployError(f"--alias {self.alias!r} is not a valid Lambda alias: letters, digits, - and _, not only digits")
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


def lambda_plan(spec: LambdaSpec, zip_bytes: bytes, *, region: str, account: str) -> list[Step]:
    partition = partition_of(region)
    fn, role = spec.function_name, role_name_for(spec.function_name)
    role_arn = f"arn:{partition}:iam::{account}:role/{role}"
    trust = json.dumps(lambda_trust_policy(), indent=2)
    policy = json.dumps(lambda_invoke_policy(partition, region, account, spec.endpoint, fn), indent=2)
    tags = {MANAGED_TAG[0]: MANAGED_TAG[1], ENDPOINT_TAG: spec.endpoint}
    desc = f"ec2train front door for SageMaker endpoint {spec.endpoint}"
    config = {
        "Role": role_arn,
        "Handler": "handler.lambda_handler",
        "Runtime": "python3.12",
        "Environment": {"Variables": spec.environment()},
        "MemorySize": spec.memory_mb,
        "Timeout": spec.timeout_s,
        "Description": desc,
    }
    role_retry = Retry("InvalidParameterValueException", "cannot be assumed")
    fn_only = {"FunctionName": fn}
    steps = [
        Step(
            "iam", "create_role",
            {"RoleName": role, "AssumeRolePolicyDocument": trust, "Description": f"Execution role of Lambda {fn} (ec2train)",
             "Tags": [{"Key": k, "Value": v} for k, v in tags.items()]},
            "execution role, assumable by Lambda only",
            if_exists=[Step("iam", "update_assume_role_policy", {"RoleName": role, "PolicyDocument": trust})],
        ),
        Step("iam", "put_role_policy", {"RoleName": role, "PolicyName": POLICY_NAME, "PolicyDocument": policy},
             "the only rights: invoke this endpoint, write own logs"),
        Step("logs", "create_log_group", {"logGroupName": log_group_for(fn), "tags": tags}, "its log group", tolerate=frozenset({"exists"})),
        Step("logs", "put_retention_policy", {"logGroupName": log_group_for(fn), "retentionInDays": spec.log_retention_days}),
        Step(
            "lambda", "create_function",
            {"FunctionName": fn, **config, "Code": {"ZipFile": zip_bytes}, "Architectures": [spec.architecture],
             "Tags": {**tags, ROLE_TAG: role}},
            "the function",
            retry=role_retry,
            if_exists=[
                Step("lambda", "update_function_code", {"FunctionName": fn, "ZipFile": zip_bytes, "Architectures": [spec.architecture]}),
                Step("lambda", "wait:function_updated_v2", fn_only),
                Step("lambda", "update_function_configuration", {"FunctionName": fn, **config}, retry=role_retry),
                Step("lambda", "wait:function_updated_v2", fn_only),
            ],
        ),
        Step("lambda", "wait:function_active_v2", fn_only),
    ]
    if spec.reserved_concurrency:
        steps.append(Step("lambda", "put_function_concurrency", {"FunctionName": fn, "ReservedConcurrentExecutions": spec.reserved_concurrency},
                          "caps its concurrency (and so the endpoint's load)"))
    else:
        steps.append(Step("lambda", "delete_function_concurrency", fn_only, "no reservation", tolerate=frozenset({"missing"})))
    steps += [
        Step("lambda", "publish_version", {"FunctionName": fn, "Description": desc}, "an immutable version", save="lambda:PublishVersion"),
        Step(
            "lambda", "create_alias",
            {"FunctionName": fn, "Name": spec.alias, "FunctionVersion": Ref("lambda:PublishVersion", ("Version",)), "Description": desc},
            "the name callers use",
            if_exists=[Step("lambda", "update_alias", {"FunctionName": fn, "Name": spec.alias, "FunctionVersion": Ref("lambda:PublishVersion", ("Version",))})],
        ),
    ]
    later = (f"aws lambda put-provisioned-concurrency-config --function-name {fn} --qualifier {spec.alias} "
             f"--provisioned-concurrent-executions {spec.provisioned_concurrency} --region {region}")
    if spec.provisioned_concurrency:
        steps.append(Step(
            "lambda", "put_provisioned_concurrency_config",
            {"FunctionName": fn, "Qualifier": spec.alias, "ProvisionedConcurrentExecutions": spec.provisioned_concurrency},
            "warm instances (billed per hour)",
            tolerate=frozenset({"unsupported"}),
            unsupported_warning=(
                f"this AWS endpoint does not support PutProvisionedConcurrencyConfig, so {fn} is deployed "
                f"WITHOUT provisioned concurrency; set it later with: {later}"
            ),
        ))
    elif spec.provisioned_concurrency == 0:
        steps.append(Step("lambda", "delete_provisioned_concurrency_config", {"FunctionName": fn, "Qualifier": spec.alias},
                          "no warm instances", tolerate=frozenset({"missing", "unsupported"})))
    return steps


def _function_tags(runner: Runner, fn: str) -> dict[str, str] | None:
    """The function's tags, or None if there is no such function."""
    got = runner.read("lambda", "get_function", FunctionName=fn)
    return None if got is None else (got.get("Tags") or {})


def deploy_lambda(
    spec: LambdaSpec,
    *,
    code_dir: str | Path | None = None,
    region: str | None = None,
    account_id: str | None = None,
    dry_run: bool = False,
    console: Any = None,
    runner: Runner | None = None,
) -> dict[str, Any]:
    """Role with exactly the rights it needs, the function, concurrency, version, alias."""
    spec.check()
    region = _resolve_region(region)
    code_dir = Path(code_dir) if code_dir else default_code_dir()
    if not code_dir.is_dir():
        raise DeployError(
            f"the Lambda code folder {code_dir} is not there (it ships in the ec2train repository, not in the wheel); "
            "pass --code-dir PATH/TO/ec2train/lambda"
        )
    zip_bytes = build_lambda_zip(code_dir)
    runner = runner or Runner(region, dry_run=dry_run, console=console)
    account = _account(runner, account_id)
    role = role_name_for(spec.function_name)
    if runner.dry_run:
        _dry_run_header(runner, f"deploy lambda {spec.function_name} for endpoint {spec.endpoint}",
                        ["sts:GetCallerIdentity", "lambda:GetFunction", "iam:GetRole", "sagemaker:DescribeEndpoint"])
        if account == ACCOUNT_PLACEHOLDER:
            runner.note(f"{ACCOUNT_PLACEHOLDER} stands for the account a real run reads from sts:GetCallerIdentity (or pass --account-id).")
    else:
        tags = _function_tags(runner, spec.function_name)
        if tags is not None and not _is_managed(tags):
            raise DeployError(f"Lambda function {spec.function_name} exists and was not deployed by ec2train; pass another --function-name")
        existing_role = runner.read("iam", "get_role", RoleName=role)
        if existing_role is not None and not _is_managed(existing_role["Role"].get("Tags")):
            raise DeployError(f"IAM role {role} exists and was not created by ec2train; pass another --function-name")
        endpoint = runner.read("sagemaker", "describe_endpoint", EndpointName=spec.endpoint)
        if endpoint is None:
            runner.console.print(
                f"[yellow]warning:[/yellow] endpoint {spec.endpoint} does not exist in {region} yet; "
                "the function answers 502 until it does", highlight=False, soft_wrap=True)
        elif spec.max_image_bytes is None:
            cfg = runner.read("sagemaker", "describe_endpoint_config", EndpointConfigName=endpoint["EndpointConfigName"]) or {}
            if any("ServerlessConfig" in v for v in cfg.get("ProductionVariants", [])):
                spec = dataclasses.replace(spec, max_image_bytes=SERVERLESS_MAX_IMAGE_BYTES)
                runner.note(f"endpoint {spec.endpoint} is serverless (4 MB per request): MAX_IMAGE_BYTES={SERVERLESS_MAX_IMAGE_BYTES}")
    steps = lambda_plan(spec, zip_bytes, region=region, account=account)
    runner.run(steps)
    partition = partition_of(region)
    return {
        "function": spec.function_name,
        "alias": spec.alias,
        "version": (runner.results.get("lambda:PublishVersion") or {}).get("Version"),
        "role": role,
        "function_arn": f"arn:{partition}:lambda:{region}:{account}:function:{spec.function_name}:{spec.alias}",
        "code_sha256": base64.b64encode(hashlib.sha256(zip_bytes).digest()).decode(),
        "warnings": list(runner.warnings),
    }


# --------------------------------------------------------------------------- status


def status_plan(name: str, function: str | None) -> list[Step]:
    missing = frozenset({"missing"})
    target_ids = {"ServiceNamespace": "sagemaker", "ResourceIds": [resource_id(name)], "ScalableDimension": SCALABLE_DIMENSION}
    steps = [
        Step("sagemaker", "describe_endpoint", {"EndpointName": name}, save="endpoint", tolerate=missing),
        Step("sagemaker", "describe_endpoint_config", {"EndpointConfigName": Ref("endpoint", ("EndpointConfigName",))}, save="config", tolerate=missing),
        Step("application-autoscaling", "describe_scalable_targets", target_ids, save="targets"),
        Step("application-autoscaling", "describe_scaling_policies",
             {"ServiceNamespace": "sagemaker", "ResourceId": resource_id(name), "ScalableDimension": SCALABLE_DIMENSION}, save="policies"),
    ]
    if function:
        steps += [
            Step("lambda", "get_function", {"FunctionName": function}, save="function", tolerate=missing),
            Step("lambda", "list_aliases", {"FunctionName": Ref("function", ("Configuration", "FunctionName"))}, save="aliases", tolerate=missing),
            Step("lambda", "list_provisioned_concurrency_configs", {"FunctionName": Ref("function", ("Configuration", "FunctionName"))},
                 save="provisioned", tolerate=frozenset({"missing", "unsupported"}), unsupported_warning="provisioned concurrency cannot be read here"),
        ]
    return steps


def summarize_status(name: str, function: str | None, r: dict[str, Any]) -> dict[str, Any]:
    """A plain dict of what exists and what bills, from the status reads."""
    out: dict[str, Any] = {"endpoint": None, "autoscaling": None, "lambda": None, "billing": []}
    ep, cfg = r.get("endpoint"), r.get("config") or {}
    if ep:
        live = {v["VariantName"]: v for v in ep.get("ProductionVariants", [])}
        variants = []
        for v in cfg.get("ProductionVariants", []):
            row = {"name": v["VariantName"], "model": v.get("ModelName")}
            if "ServerlessConfig" in v:
                row["serverless"] = v["ServerlessConfig"]
            else:
                row["instance_type"] = v.get("InstanceType")
                row["current_instances"] = live.get(v["VariantName"], {}).get("CurrentInstanceCount")
                row["desired_instances"] = live.get(v["VariantName"], {}).get("DesiredInstanceCount")
            variants.append(row)
        created = ep.get("CreationTime")
        out["endpoint"] = {
            "name": ep["EndpointName"],
            "arn": ep.get("EndpointArn"),
            "status": ep.get("EndpointStatus"),
            "failure_reason": ep.get("FailureReason"),
            "config": ep.get("EndpointConfigName"),
            "created": created.isoformat() if hasattr(created, "isoformat") else created,
            "variants": variants,
        }
        for v in variants:
            if "serverless" in v:
                out["billing"].append(f"serverless variant {v['name']}: billed per request (compute time and data), nothing while idle")
            else:
                n = v.get("current_instances") or v.get("desired_instances") or 0
                out["billing"].append(f"variant {v['name']}: {n} x {v['instance_type']} billed every hour the endpoint exists, busy or idle")
    targets = (r.get("targets") or {}).get("ScalableTargets", [])
    policies = (r.get("policies") or {}).get("ScalingPolicies", [])
    if targets:
        t = targets[0]
        out["autoscaling"] = {"min": t["MinCapacity"], "max": t["MaxCapacity"], "policies": [
            {"name": p["PolicyName"], "type": p["PolicyType"], **(
                {"target": p["TargetTrackingScalingPolicyConfiguration"]["TargetValue"],
                 "metric": p["TargetTrackingScalingPolicyConfiguration"].get("PredefinedMetricSpecification", {}).get("PredefinedMetricType"),
                 "scale_in_cooldown": p["TargetTrackingScalingPolicyConfiguration"].get("ScaleInCooldown"),
                 "scale_out_cooldown": p["TargetTrackingScalingPolicyConfiguration"].get("ScaleOutCooldown")}
                if "TargetTrackingScalingPolicyConfiguration" in p else {})} for p in policies]}
    fn = r.get("function")
    if fn:
        c = fn["Configuration"]
        provisioned = r.get("provisioned")
        out["lambda"] = {
            "name": c["FunctionName"],
            "runtime": c.get("Runtime"),
            "state": c.get("State"),
            "memory_mb": c.get("MemorySize"),
            "timeout_s": c.get("Timeout"),
            "reserved_concurrency": (fn.get("Concurrency") or {}).get("ReservedConcurrentExecutions"),
            "aliases": {a["Name"]: a["FunctionVersion"] for a in (r.get("aliases") or {}).get("Aliases", [])},
            "provisioned_concurrency": None if provisioned is None else {
                p["FunctionArn"].rsplit(":", 1)[-1]: p.get("AllocatedProvisionedConcurrentExecutions")
                for p in provisioned.get("ProvisionedConcurrencyConfigs", [])
            },
            "managed": _is_managed(fn.get("Tags")),
        }
        out["billing"].append(f"Lambda {c['FunctionName']}: billed per request and duration; provisioned concurrency, if set, per hour")
    if out["endpoint"] or out["lambda"]:
        out["billing"].append(f"stop all of it: ec2train deploy delete --name {name}" + (f" --lambda-name {function}" if function and fn else ""))
    return out


def _deployment_names(name: str, function_name: str | None, region: str | None) -> tuple[str, str | None]:
    """Validated (region, Lambda function name) for the commands that look at a whole deployment."""
    check_sagemaker_name(name)
    if function_name is not None:
        check_function_name(function_name, "--lambda-name")
    return _resolve_region(region), function_name or _default_function_or_none(name)


def deployment_status(
    name: str,
    *,
    function_name: str | None = None,
    region: str | None = None,
    dry_run: bool = False,
    console: Any = None,
    runner: Runner | None = None,
) -> dict[str, Any]:
    region, function = _deployment_names(name, function_name, region)
    steps = status_plan(name, function)
    if dry_run:
        runner = runner or Runner(region, dry_run=True, console=console)
        _dry_run_header(runner, f"status of {name}", [])
        runner.run(steps)
        return {}
    # The reads are shown as tables by the caller, not step by step.
    runner = runner or Runner(region, console=_Silent())
    runner.run(steps)
    return summarize_status(name, function, runner.results)


def _default_function_or_none(name: str) -> str | None:
    try:
        return default_function_name(name)
    except DeployError:
        return None


class _Silent:
    """A console that drops everything: status reads are shown as a table, not step by step."""

    def print(self, *a: Any, **k: Any) -> None:
        pass

    out = print


# --------------------------------------------------------------------------- delete


@dataclass
class Found:
    """What a real delete run found to remove (only things ec2train created)."""

    endpoint: bool = False
    configs: list[str] = field(default_factory=list)
    models: list[str] = field(default_factory=list)
    function: str | None = None
    role: str | None = None
    log_group: str | None = None
    aliases: list[str] = field(default_factory=list)


def delete_plan(name: str, found: Found | Any) -> list[Step]:
    missing = frozenset({"missing"})
    target_ids = {"ServiceNamespace": "sagemaker", "ResourceId": resource_id(name), "ScalableDimension": SCALABLE_DIMENSION}
    if found is UNKNOWN:
        found = Found(
            endpoint=True,
            configs=[f"<endpoint configs tagged {ENDPOINT_TAG}={name}>"],
            models=[f"<models tagged {ENDPOINT_TAG}={name}>"],
            function=f"<ec2train-managed function: --lambda-name or ec2train-{name}>",
            role="<its role, from the function's ec2train:role tag>",
            log_group="<its log group /aws/lambda/FUNCTION>",
            aliases=["<each alias>"],
        )
    steps: list[Step] = []
    if found.function:
        steps += [Step("lambda", "delete_alias", {"FunctionName": found.function, "Name": a}, tolerate=missing) for a in found.aliases]
        steps.append(Step("lambda", "delete_function", {"FunctionName": found.function}, "function, versions, concurrency settings", tolerate=missing))
    if found.role:
        steps += [
            Step("iam", "delete_role_policy", {"RoleName": found.role, "PolicyName": POLICY_NAME}, tolerate=missing),
            Step("iam", "delete_role", {"RoleName": found.role}, tolerate=missing),
        ]
    if found.log_group:
        steps.append(Step("logs", "delete_log_group", {"logGroupName": found.log_group}, tolerate=missing))
    steps += [
        Step("application-autoscaling", "delete_scaling_policy", {"PolicyName": scaling_policy_name(name), **target_ids}, tolerate=missing),
        Step("application-autoscaling", "deregister_scalable_target", target_ids, tolerate=missing),
    ]
    if found.endpoint:
        steps.append(Step("sagemaker", "delete_endpoint", {"EndpointName": name}, "stops the billing", tolerate=missing))
    steps += [Step("sagemaker", "delete_endpoint_config", {"EndpointConfigName": c}, tolerate=missing) for c in found.configs]
    steps += [Step("sagemaker", "delete_model", {"ModelName": m}, tolerate=missing) for m in found.models]
    return steps


def _tagged_for(runner: Runner, arn: str, name: str) -> bool:
    tags = {t["Key"]: t["Value"] for t in runner.call("sagemaker", "list_tags", ResourceArn=arn).get("Tags", [])}
    return _is_managed(tags) and tags.get(ENDPOINT_TAG) == name


def _discover_delete(runner: Runner, name: str, function: str | None, function_explicit: bool, force: bool) -> Found:
    found = Found()
    d = runner.read("sagemaker", "describe_endpoint", EndpointName=name)
    if d is not None:
        if not force and not _tagged_for(runner, d["EndpointArn"], name):
            raise DeployError(
                f"endpoint {name} was not created by ec2train (no {MANAGED_TAG[0]} tag for it); "
                "pass --force to delete it anyway"
            )
        found.endpoint = True
    # Versioned names: <name[:54]>-<8 hex>. Only those tagged for this endpoint are ours;
    # --force adds the endpoint's current configuration and its models, whatever their tags.
    versioned = re.compile(rf"^{re.escape(name[:54])}-[0-9a-f]{{8}}$")
    current = d["EndpointConfigName"] if d else None
    cfg_names = {current} if current else set()
    cfg_names |= {c["EndpointConfigName"] for c in runner.pages("sagemaker", "list_endpoint_configs", "EndpointConfigs", NameContains=name[:54])
                  if versioned.match(c["EndpointConfigName"])}
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
    model_names |= {m["ModelName"] for m in runner.pages("sagemaker", "list_models", "Models", NameContains=name[:54])
                    if versioned.match(m["ModelName"])}
    for m in sorted(model_names):
        got = runner.read("sagemaker", "describe_model", ModelName=m)
        if got is not None and (m in forced_models or _tagged_for(runner, got["ModelArn"], name)):
            found.models.append(m)
    if function:
        tags = _function_tags(runner, function)
        if tags is not None:
            if not _is_managed(tags) or (not function_explicit and tags.get(ENDPOINT_TAG) != name):
                runner.console.print(f"[yellow]warning:[/yellow] Lambda function {function} was not deployed by ec2train for {name}; left alone",
                                     highlight=False, soft_wrap=True)
            else:
                found.function = function
                aliases = runner.read("lambda", "list_aliases", FunctionName=function) or {}
                found.aliases = [a["Name"] for a in aliases.get("Aliases", [])]
                role = tags.get(ROLE_TAG)
                got_role = runner.read("iam", "get_role", RoleName=role) if role else None
                if got_role is not None and _is_managed(got_role["Role"].get("Tags")):
                    found.role = role
                group = log_group_for(function)
                groups = runner.read("logs", "describe_log_groups", logGroupNamePrefix=group) or {}
                if any(g["logGroupName"] == group for g in groups.get("logGroups", [])):
                    lg_tags = runner.read("logs", "list_tags_log_group", logGroupName=group) or {}
                    if _is_managed(lg_tags.get("tags")):
                        found.log_group = group
    return found


def delete_deployment(
    name: str,
    *,
    function_name: str | None = None,
    region: str | None = None,
    force: bool = False,
    dry_run: bool = False,
    console: Any = None,
    runner: Runner | None = None,
) -> dict[str, Any]:
    """Remove the Lambda (+ alias, role, log group), autoscaling, endpoint, configs and models."""
    region, function = _deployment_names(name, function_name, region)
    runner = runner or Runner(region, dry_run=dry_run, console=console)
    if runner.dry_run:
        _dry_run_header(runner, f"delete {name}", [
            "sagemaker:DescribeEndpoint", "sagemaker:ListTags", "sagemaker:ListEndpointConfigs", "sagemaker:ListModels",
            "lambda:GetFunction", "lambda:ListAliases", "iam:GetRole", "logs:DescribeLogGroups"])
        found: Found | Any = UNKNOWN
    else:
        found = _discover_delete(runner, name, function, function_name is not None, force)
    runner.run(delete_plan(name, found))
    if found is UNKNOWN:
        return {}
    return {"endpoint": found.endpoint, "configs": found.configs, "models": found.models,
            "function": found.function, "role": found.role, "log_group": found.log_group}


def status_tables(st: dict[str, Any]) -> list[tuple[str, list[tuple[str, str]]]]:
    """deployment_status's answer for people: (title, [(label, value), ...]) per table."""
    tables = []
    ep = st["endpoint"]
    if ep is not None:
        rows = [("status", ep["status"] + (f" ({ep['failure_reason']})" if ep.get("failure_reason") else "")),
                ("created", str(ep["created"])), ("configuration", ep["config"])]
        for v in ep["variants"]:
            if "serverless" in v:
                sc = v["serverless"]
                rows.append((f"variant {v['name']}", f"serverless, {sc.get('MemorySizeInMB')} MB, max concurrency {sc.get('MaxConcurrency')}"))
            else:
                rows.append((f"variant {v['name']}", f"{v['instance_type']}: {v['current_instances']} running, {v['desired_instances']} desired"))
        sc = st["autoscaling"]
        pol = "; ".join(f"{p['name']}: {p.get('target')} {p.get('metric')} (in {p.get('scale_in_cooldown')} s, out {p.get('scale_out_cooldown')} s)"
                        for p in (sc or {}).get("policies", []))
        rows.append(("autoscaling", f"{sc['min']}-{sc['max']} instances; {pol or 'no policy'}" if sc else "off"))
        tables.append((f"endpoint {ep['name']}", rows))
    fn = st["lambda"]
    if fn:
        pc = fn["provisioned_concurrency"]
        tables.append((f"Lambda {fn['name']}", [
            ("state", f"{fn['state']} ({fn['runtime']}, {fn['memory_mb']} MB, {fn['timeout_s']} s)"),
            ("reserved concurrency", str(fn["reserved_concurrency"])),
            ("aliases", ", ".join(f"{a} -> {v}" for a, v in fn["aliases"].items()) or "none"),
            ("provisioned concurrency", "unknown (not readable here)" if pc is None else (", ".join(f"{q}: {n}" for q, n in pc.items()) or "none")),
        ]))
    return tables
