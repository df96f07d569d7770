"""The planner: every deploy command is a list of `Step`s, which one `StepRunner` prints or sends.

A dry run prints the steps (service, operation, parameters) and sends nothing; a real run
sends the very same steps, so the two cannot drift apart. What a real run must read first
(does the endpoint exist? is this role ours?) is read before planning; a dry run cannot read,
so its plan shows both branches (`Step.if_exists`) and placeholders (`UNKNOWN`, `Ref`).
"""

from __future__ import annotations

import base64
import hashlib
import json
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from rich.console import Console

from ec2train import aws
from ec2train.deploy.names import (
    ACCOUNT_PLACEHOLDER,
    ACCOUNT_RE,
    DeployError,
    check_function_name,
    check_region,
    check_sagemaker_name,
    default_function_name,
)

UNKNOWN: Any = object()  # what a dry run found: it cannot read, so both branches are planned


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
    if_exists: list[Step] = field(default_factory=list)  # run instead when it already exists
    unsupported_warning: str = ""  # printed when tolerated as "unsupported"
    retry: Retry | None = None

    @property
    def api(self) -> str:
        if self.operation.startswith("wait:"):
            return f"wait {self.operation[5:]}"
        return api_name(self.service, self.operation)


def api_name(service: str, operation: str) -> str:
    """ "sagemaker:CreateEndpoint" for ("sagemaker", "create_endpoint"): the name IAM and the docs use."""
    return f"{service}:{''.join(p.capitalize() for p in operation.split('_'))}"


# --------------------------------------------------------------------------- AWS errors


def _error(exc: Exception) -> dict[str, Any]:
    return (getattr(exc, "response", None) or {}).get("Error", {})


def error_kind(exc: Exception) -> str:
    """Classify an AWS error: missing / exists / unsupported / other."""
    resp = getattr(exc, "response", None) or {}
    code, msg = str(_error(exc).get("Code", "")), str(_error(exc).get("Message", ""))
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


def as_deploy_error(exc: Exception, service: str, operation: str) -> DeployError:
    """Any failure of a request as one line that names the API and, where it can, the fix."""
    api = api_name(service, operation)
    code, msg = _error(exc).get("Code"), str(_error(exc).get("Message", "")).strip()
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


# --------------------------------------------------------------------------- how a step prints


class _Unresolved(Exception):
    pass


def _json_default(obj: Any) -> Any:
    if isinstance(obj, (bytes, bytearray)):
        digest = base64.b64encode(hashlib.sha256(obj).digest()).decode()
        return f"<zip archive: {len(obj)} bytes, CodeSha256 {digest}>"
    return str(obj)  # a Ref prints as "<path from source>"


def _display_params(params: dict[str, Any]) -> dict[str, Any]:
    """Parameters as they are sent, with policy documents parsed so they print readably."""
    return {k: json.loads(v) if k.endswith("PolicyDocument") and isinstance(v, str) else v for k, v in params.items()}


def _summary(params: dict[str, Any]) -> str:
    qualifier = params.get("Qualifier", params.get("Name") if "FunctionName" in params else None)
    if "FunctionName" in params and isinstance(qualifier, str):
        return f"{params['FunctionName']}:{qualifier}"
    for key in (
        "EndpointName",
        "EndpointConfigName",
        "ModelName",
        "FunctionName",
        "RoleName",
        "logGroupName",
        "ResourceId",
        "PolicyName",
        "Name",
    ):
        if key in params and not isinstance(params[key], Ref):
            extra = f" / {params['PolicyName']}" if key == "RoleName" and "PolicyName" in params else ""
            return f"{params[key]}{extra}"
    return ""


# --------------------------------------------------------------------------- the runner


class StepRunner:
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
            raise as_deploy_error(exc, service, operation) from None

    def read(self, service: str, operation: str, **params: Any) -> Any:
        """A read that may find nothing: returns None when the resource is missing."""
        try:
            return self._send(service, operation, params)
        except Exception as exc:  # noqa: BLE001 - classified below, re-raised if not "missing"
            if error_kind(exc) in ("missing", "unsupported"):
                return None
            raise as_deploy_error(exc, service, operation) from None

    def pages(self, service: str, operation: str, key: str, **params: Any) -> list[Any]:
        """Every item of a paginated list."""
        self.sent.append(f"{service}:{operation}")
        try:
            return [
                item for page in self.client(service).get_paginator(operation).paginate(**params) for item in page[key]
            ]
        except Exception as exc:  # noqa: BLE001 - every failure reaches the user as one line
            raise as_deploy_error(exc, service, operation) from None

    # -- plans
    def note(self, text: str) -> None:
        self.console.print(text, highlight=False, markup=False, soft_wrap=True)

    def warn(self, text: str) -> None:
        self.console.print(f"[yellow]warning:[/yellow] {text}", highlight=False, soft_wrap=True)

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
            except Exception as exc:  # noqa: BLE001 - classified by the two steps below
                if self._retrying(step, exc, delays):
                    continue
                self._recover(step, params, exc)
                return
        if step.save:
            self.results[step.save] = response
        self.console.print(f"[green]✓[/green] {step.api} {_summary(params)}", highlight=False, soft_wrap=True)

    def _retrying(self, step: Step, exc: Exception, delays: list[float]) -> bool:
        """Sleep and say so if the step retries on this error and has delays left."""
        err = _error(exc)
        if not (
            step.retry
            and delays
            and err.get("Code") == step.retry.code
            and step.retry.message_contains in str(err.get("Message", ""))
        ):
            return False
        delay = delays.pop(0)
        self.note(f"  {step.api}: {err.get('Message')} (IAM is still propagating); retrying in {delay:g} s")
        self.sleep(delay)
        return True

    def _recover(self, step: Step, params: dict[str, Any], exc: Exception) -> None:
        """Run the step's "if it exists" branch or tolerate the error; anything else is the user's."""
        kind = error_kind(exc)
        if kind == "exists" and step.if_exists:
            self.note(f"  {step.api} {_summary(params)}: already exists, so instead:")
            for alt in step.if_exists:
                self._execute(alt)
        elif kind in step.tolerate and kind == "unsupported":
            self.warnings.append(step.unsupported_warning or f"{step.api} is not supported here; skipped")
            self.warn(self.warnings[-1])
        elif kind in step.tolerate:
            self.note(f"  {step.api} {_summary(params)}: {'already there' if kind == 'exists' else 'already gone'}")
        else:
            raise as_deploy_error(exc, step.service, step.operation) from None

    def _wait(self, step: Step, params: dict[str, Any]) -> None:
        name = step.operation[5:]
        if name == "endpoint_in_service":
            self._wait_in_service(step, params)
            return
        # A boto3 waiter (Lambda function state, endpoint deleted).
        self.sent.append(f"{step.service}:{name}")
        waiter = self.client(step.service).get_waiter(name)
        try:
            waiter.wait(**params, WaiterConfig={"Delay": 2, "MaxAttempts": 150})
        except Exception as exc:  # noqa: BLE001 - a waiter failure is the user's to see
            raise DeployError(f"{step.service} {name} on {_summary(params)} failed: {exc}") from None

    def _wait_in_service(self, step: Step, params: dict[str, Any]) -> None:
        endpoint = params["EndpointName"]
        with self.console.status(f"endpoint {endpoint}: waiting") as status:
            result = wait_for_endpoint(
                lambda: self.call("sagemaker", "describe_endpoint", EndpointName=endpoint),
                endpoint,
                expect_config=params.get("EndpointConfigName"),
                timeout=self.wait_timeout,
                poll_seconds=self.poll_seconds,
                sleep=self.sleep,
                clock=self.clock,
                on_status=lambda s, elapsed: status.update(f"endpoint {endpoint}: {s} ({elapsed:.0f} s)"),
            )
        if step.save:
            self.results[step.save] = result
        self.console.print(f"[green]✓[/green] endpoint {endpoint} is InService", highlight=False)


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
    """Poll until the endpoint is InService on `expect_config`; a clear error on failure or timeout.

    The runner's own waiter, not boto3's: it tells a rolled-back update from a successful one."""
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


# --------------------------------------------------------------------------- what every command does first


def resolve_region(region: str | None, session: Any = None) -> str:
    """--region, else the AWS configuration's; checked."""
    return check_region(region or aws.region_of(session))


def account_of(runner: StepRunner, given: str | None) -> str:
    """The caller's account: from STS in a real run (checked against --account-id if given)."""
    if given is not None and not ACCOUNT_RE.match(given):
        raise DeployError(f"--account-id {given!r} is not a 12-digit AWS account id")
    if runner.dry_run:
        return given or ACCOUNT_PLACEHOLDER
    account = runner.call("sts", "get_caller_identity")["Account"]
    if given and given != account:
        raise DeployError(f"these credentials are for account {account}, not --account-id {given}; switch credentials")
    return account


def dry_run_header(runner: StepRunner, what: str, reads: list[str], summary: Iterable[str] = ()) -> None:
    """The first lines of a dry run: what it is, a short summary (what it creates, what it costs),
    and what a real run reads first."""
    runner.note(f"dry run: {what} in {runner.region}; nothing below is sent.")
    for line in summary:
        runner.note(line)
    if reads:
        runner.note("A real run first reads: " + ", ".join(reads) + " (skipped here; both branches are shown).")


def deployment_names(name: str, function_name: str | None, region: str | None) -> tuple[str, str | None]:
    """Validated (region, Lambda function name) for the commands that look at a whole deployment."""
    check_sagemaker_name(name)
    if function_name is not None:
        check_function_name(function_name, "--lambda-name")
    return resolve_region(region), function_name or _default_function_or_none(name)


def _default_function_or_none(name: str) -> str | None:
    try:
        return default_function_name(name)
    except DeployError:
        return None
