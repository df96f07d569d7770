"""Serving commands: serve (the endpoint's HTTP contract locally) and export (package, S3)."""

from __future__ import annotations

import time
from pathlib import Path

import typer

from ec2train.cli._app import DEFAULT_MODEL, MODEL_HELP, THREADS_HELP, Compile, app, console, heavy_imports
from ec2train.errors import UserError

# The server, export and s3 modules are imported inside the commands: they import torch (and
# boto3), which `ec2train --help` must not pay for.


@app.command()
def serve(
    model: Path = typer.Option(DEFAULT_MODEL, help=MODEL_HELP),
    host: str = typer.Option("127.0.0.1", help="Address to listen on (0.0.0.0 exposes it to the network)."),
    port: int = typer.Option(8080, min=1, max=65535),
    max_batch: int = typer.Option(8, min=1, help="Most requests grouped into one forward pass; 1 turns batching off."),
    max_wait_ms: float = typer.Option(5.0, min=0, help="How long a batch may wait for requests still being decoded."),
    workers: int = typer.Option(1, min=1, help="Server processes (each loads the model and batches on its own)."),
    threads: int | None = typer.Option(None, min=0, help=THREADS_HELP),
    log_level: str = typer.Option("info", help="uvicorn log level: warning hides the access log."),
    compile: Compile = typer.Option(
        "off",
        help="Compile the forward pass (torch.compile) for each batch size before /ping says ready: about "
        "1.3x the requests/s on the CPU, for a longer start: 30-100 s on 2 cores for a ResNet-18 at 64 px, "
        "80-120 s for a ResNet-50 at 224 (uncompiled: ready in seconds). auto: on the CPU, and a failure "
        "(no C++ compiler) is a warning and the uncompiled model serves; on: anywhere, and a failure stops "
        "the server.",
    ),
    request_memory_mb: float = typer.Option(
        1024,
        help="Memory for request bodies and images being decoded, per server process; past it a request "
        "gets 503 at once (decoding a 40-megapixel PNG takes 115-230 MB of it, a 6 MB body 6 MB).",
    ),
):
    """Serve a model over HTTP like the SageMaker endpoint: GET /ping, POST /invocations."""
    started = time.monotonic()  # the line that says ready counts from here: imports, loading
    with heavy_imports():
        from ec2train.server import run

    run(
        model,
        host=host,
        port=port,
        max_batch=max_batch,
        max_wait_ms=max_wait_ms,
        workers=workers,
        threads=threads,
        log_level=log_level,
        compile=compile.value,
        request_memory_mb=request_memory_mb,
        started=started,
    )


@app.command()
def export(
    model: Path = typer.Option(DEFAULT_MODEL, help=MODEL_HELP),
    package: Path | None = typer.Option(None, help="Write the SageMaker model package here (e.g. model.tar.gz)."),
    s3_uri: str | None = typer.Option(
        None,
        help="Upload to s3://bucket/prefix (prefix/model.pth, or prefix/<package name> with --package) or to s3://bucket/key.",
    ),
    kms_key: str | None = typer.Option(None, help="KMS key id/ARN/alias for SSE-KMS. [default: SSE-S3, AES256]"),
):
    """Build model.tar.gz for SageMaker (model.pth + code/inference.py) and/or upload to S3, encrypted and verified."""
    if package is None and s3_uri is None:
        raise UserError("export needs --package model.tar.gz, --s3-uri s3://bucket/prefix, or both")
    if package is not None:
        from ec2train.export import package_model

        path = package_model(model, package)
        console.print(
            f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB): model.pth, code/inference.py, code/ec2train/"
        )
    if s3_uri is not None:
        from ec2train import s3

        if package is None:
            uri = s3.export_to_s3(model, s3_uri, kms_key)
        else:
            target = s3.parse_uri(s3_uri)
            target = target if target.key.endswith((".tar.gz", ".tgz")) else target.child(package.name)
            uri = s3.upload_file(package, target, kms_key)
        console.print(f"uploaded to {uri}")
