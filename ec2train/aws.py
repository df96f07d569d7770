"""The one place that creates AWS clients.

Credentials come from boto3's usual chain (environment, profile, instance profile on EC2).
Endpoints follow boto3's own settings (`AWS_ENDPOINT_URL`, `AWS_ENDPOINT_URL_<SERVICE>`),
so tests point everything at a local moto server without code changes; `endpoint_url`
overrides them. Nothing here runs at import time.
"""

from __future__ import annotations

from typing import Any

# boto3 is imported inside the functions: s3.py imports this module on every fit (through run.py),
# and a fit that does not talk to AWS must not pay for boto3.


def client(
    service: str,
    *,
    region: str | None = None,
    endpoint_url: str | None = None,
    session: Any | None = None,
    max_attempts: int = 8,
    connect_timeout: float = 10.0,
    read_timeout: float = 60.0,
) -> Any:
    """A boto3 client with standard retries (throttling, 5xx, connection errors) and timeouts."""
    import boto3
    from botocore.config import Config

    config = Config(
        retries={"mode": "standard", "max_attempts": max_attempts},
        connect_timeout=connect_timeout,
        read_timeout=read_timeout,
    )
    sess = session or boto3.session.Session()
    kwargs: dict[str, Any] = {"config": config}
    if region:
        kwargs["region_name"] = region
    if endpoint_url:
        kwargs["endpoint_url"] = endpoint_url
    return sess.client(service, **kwargs)


def region_of(session: Any | None = None, default: str = "us-east-1") -> str:
    import boto3

    sess = session or boto3.session.Session()
    return sess.region_name or default
