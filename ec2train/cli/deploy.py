"""`ec2train deploy ...`: SageMaker endpoint, autoscaling, Lambda front door, status, delete."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.table import Table

from ec2train.cli._app import console, group

# ec2train.deploy is imported inside the commands: it adds about half to `ec2train --help`'s import time.

deploy_app = group(
    "deploy",
    help="Serve a model.tar.gz on a SageMaker endpoint, autoscale it, put a Lambda in front, and remove it all.",
)

_REGION_HELP = "AWS region. [default: from your AWS configuration]"
_DRY_RUN_HELP = "Print every request (service, operation, parameters, policy documents) and send none."


@deploy_app.command("endpoint")
def deploy_endpoint_cmd(
    name: str = typer.Option(..., help="Endpoint name (letters, digits, hyphens; up to 63)."),
    role: str = typer.Option(..., help="ARN of the SageMaker execution role that reads the model from S3."),
    model_data: str | None = typer.Option(
        None, help="s3://bucket/key/model.tar.gz made by `ec2train export --package`."
    ),
    model: Path | None = typer.Option(
        None, help="A model.pth to package and upload to --s3-uri first (instead of --model-data)."
    ),
    s3_uri: str | None = typer.Option(
        None, help="Where --model's package goes: s3://bucket/prefix (model.tar.gz is added)."
    ),
    kms_key: str | None = typer.Option(None, help="KMS key for the --model upload. [default: SSE-S3]"),
    instance_type: str | None = typer.Option(
        None, help="Real-time endpoint on this instance type, e.g. ml.g4dn.xlarge (GPU) or ml.m5.large (CPU)."
    ),
    instance_count: int = typer.Option(1, help="Instances behind a real-time endpoint."),
    serverless: bool = typer.Option(
        False, "--serverless", help="Serverless endpoint (CPU, billed per request) instead of instances."
    ),
    memory: int = typer.Option(2048, help="Serverless memory in MB: 1024-6144 in steps of 1024."),
    max_concurrency: int = typer.Option(5, help="Serverless concurrent requests (1-200)."),
    image_uri: str | None = typer.Option(
        None, help="Container image to serve with. [default: the AWS PyTorch inference image for the region]"
    ),
    region: str | None = typer.Option(None, help=_REGION_HELP),
    wait: bool = typer.Option(True, "--wait/--no-wait", help="Wait until the endpoint is InService."),
    wait_timeout: int = typer.Option(
        1800, help="Seconds to wait for InService before giving up (the endpoint keeps starting)."
    ),
    dry_run: bool = typer.Option(False, "--dry-run", help=_DRY_RUN_HELP),
):
    """Create or update a SageMaker endpoint serving a model.tar.gz with the PyTorch inference container."""
    from ec2train.deploy import DeployError, EndpointSpec, deploy_endpoint, package_and_upload

    if (model_data is None) == (model is None):
        raise DeployError("give exactly one of --model-data s3://.../model.tar.gz and --model PATH (with --s3-uri)")
    if model is not None:
        if not s3_uri:
            raise DeployError("--model needs --s3-uri s3://bucket/prefix to upload the package to")
        model_data = package_and_upload(model, s3_uri, kms_key=kms_key, dry_run=dry_run, console=console)
    assert model_data is not None  # exactly one of the two was given (checked above)
    spec = EndpointSpec(
        name=name,
        role_arn=role,
        model_data=model_data,
        instance_type=instance_type,
        instance_count=instance_count,
        serverless=serverless,
        memory_mb=memory,
        max_concurrency=max_concurrency,
        image_uri=image_uri,
    )
    out = deploy_endpoint(spec, region=region, dry_run=dry_run, wait=wait, wait_timeout=wait_timeout, console=console)
    if dry_run:
        return
    console.print(
        f"endpoint [bold]{name}[/bold] in {out['region']}: {out['status']} (image {out['image']})",
        highlight=False,
        soft_wrap=True,
    )
    if not wait:
        console.print(f"follow it with: ec2train deploy status --name {name}", highlight=False)
    console.print(f"next: ec2train deploy lambda --endpoint {name}", highlight=False)
    console.print(f"[yellow]it bills until you run: ec2train deploy delete --name {name}[/yellow]", highlight=False)


@deploy_app.command("autoscale")
def deploy_autoscale_cmd(
    name: str = typer.Option(..., help="Endpoint name."),
    min_capacity: int = typer.Option(1, "--min", help="Fewest instances."),
    max_capacity: int = typer.Option(4, "--max", help="Most instances."),
    target_invocations: float = typer.Option(70.0, help="Target invocations per instance per minute."),
    scale_in_cooldown: int = typer.Option(300, help="Seconds between scale-ins."),
    scale_out_cooldown: int = typer.Option(60, help="Seconds between scale-outs."),
    region: str | None = typer.Option(None, help=_REGION_HELP),
    dry_run: bool = typer.Option(False, "--dry-run", help=_DRY_RUN_HELP),
):
    """Target-tracking autoscaling on invocations per instance (instance endpoints only)."""
    from ec2train.deploy import autoscale

    autoscale(
        name,
        min_capacity=min_capacity,
        max_capacity=max_capacity,
        target_invocations=target_invocations,
        scale_in_cooldown=scale_in_cooldown,
        scale_out_cooldown=scale_out_cooldown,
        region=region,
        dry_run=dry_run,
        console=console,
    )
    if not dry_run:
        console.print(
            f"endpoint {name} scales between {min_capacity} and {max_capacity} instances at {target_invocations:g} invocations/instance/minute",
            highlight=False,
        )


@deploy_app.command("lambda")
def deploy_lambda_cmd(
    endpoint: str = typer.Option(..., help="The SageMaker endpoint the function calls (and the only one it may call)."),
    function_name: str | None = typer.Option(None, help="Function name. [default: ec2train-ENDPOINT]"),
    reserved_concurrency: int = typer.Option(
        10, help="Concurrency reserved for (and capping) the function; 0 removes the reservation."
    ),
    provisioned_concurrency: int | None = typer.Option(
        None, help="Warm instances on the alias (billed per hour); 0 removes them."
    ),
    alias: str = typer.Option("live", help="Alias pointing at the published version; call the function through it."),
    memory: int = typer.Option(256, help="Memory in MB (also scales its CPU)."),
    timeout: int = typer.Option(30, help="Seconds per request (URL fetch + endpoint call)."),
    allow_http: bool = typer.Option(False, "--allow-http", help="Also fetch http:// URLs (https only by default)."),
    max_image_bytes: int | None = typer.Option(
        None, help="Image size cap. [default: the function's 5.5 MB; 3.5 MB for a serverless endpoint]"
    ),
    architecture: str = typer.Option("arm64", help="arm64 (cheaper) or x86_64."),
    log_retention_days: int = typer.Option(30, help="Days its logs are kept."),
    code_dir: Path | None = typer.Option(
        None, help="Folder with handler.py. [default: the Lambda source shipped with ec2train]"
    ),
    account_id: str | None = typer.Option(None, help="Expected AWS account (checked; fills the ARNs of a --dry-run)."),
    region: str | None = typer.Option(None, help=_REGION_HELP),
    dry_run: bool = typer.Option(False, "--dry-run", help=_DRY_RUN_HELP),
):
    """Deploy the Lambda front door with a role that may only invoke this endpoint and write its own logs."""
    from ec2train.deploy import LambdaSpec, default_function_name, deploy_lambda

    spec = LambdaSpec(
        endpoint=endpoint,
        function_name=function_name or default_function_name(endpoint),
        alias=alias,
        memory_mb=memory,
        timeout_s=timeout,
        reserved_concurrency=reserved_concurrency,
        provisioned_concurrency=provisioned_concurrency,
        allow_http=allow_http,
        max_image_bytes=max_image_bytes,
        architecture=architecture,
        log_retention_days=log_retention_days,
    )
    out = deploy_lambda(spec, code_dir=code_dir, region=region, account_id=account_id, dry_run=dry_run, console=console)
    if not dry_run:
        console.print(
            f"function {out['function_arn']} -> version {out['version']} (role {out['role']})", highlight=False
        )


@deploy_app.command("status")
def deploy_status_cmd(
    name: str = typer.Option(..., help="Endpoint name."),
    lambda_name: str | None = typer.Option(None, help="Function to report on. [default: ec2train-NAME]"),
    region: str | None = typer.Option(None, help=_REGION_HELP),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of tables."),
    dry_run: bool = typer.Option(False, "--dry-run", help=_DRY_RUN_HELP),
):
    """Endpoint status, variants and instances, autoscaling, the Lambda, and what is billing."""
    from ec2train.deploy import deployment_status, status_tables

    st = deployment_status(name, function_name=lambda_name, region=region, dry_run=dry_run, console=console)
    if dry_run:
        return
    if as_json:
        print(json.dumps(st, indent=2, default=str))
        return
    if st["endpoint"] is None:
        console.print(f"endpoint {name}: not found", highlight=False)
    for title, rows in status_tables(st):
        table = Table(title=title, show_header=False)
        for label, text in rows:
            table.add_row(label, text)
        console.print(table)
    for line in st["billing"]:
        console.print(f"[yellow]billing:[/yellow] {line}", highlight=False, soft_wrap=True)


@deploy_app.command("delete")
def deploy_delete_cmd(
    name: str = typer.Option(..., help="Endpoint name."),
    lambda_name: str | None = typer.Option(
        None, help="The Lambda function to remove too. [default: ec2train-NAME, if ec2train made it]"
    ),
    force: bool = typer.Option(False, "--force", help="Also delete an endpoint that ec2train did not create."),
    region: str | None = typer.Option(None, help=_REGION_HELP),
    dry_run: bool = typer.Option(False, "--dry-run", help=_DRY_RUN_HELP),
):
    """Remove the Lambda (alias, role, log group), autoscaling, endpoint, configurations and models."""
    from ec2train.deploy import delete_deployment

    out = delete_deployment(
        name, function_name=lambda_name, region=region, force=force, dry_run=dry_run, console=console
    )
    if not dry_run:
        console.print(f"nothing of {name} is left running" if out else "", highlight=False)
