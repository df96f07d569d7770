"""What a deployment costs, for the summary its dry run starts with.

Estimates only: AWS's us-east-1 list prices as of PRICES_AS_OF (real-time SageMaker hosting
per instance-hour, Serverless Inference and Lambda per GB-second and request). Data transfer,
CloudWatch and the model's S3 object are left out; the bill is in Cost Explorer.
"""

from __future__ import annotations

PRICES_AS_OF = "2025-06"
# Real-time inference, USD per instance-hour.
HOSTING: dict[str, float] = {
    "ml.t2.medium": 0.056,
    "ml.m5.large": 0.115,
    "ml.m5.xlarge": 0.23,
    "ml.m5.2xlarge": 0.461,
    "ml.c5.large": 0.102,
    "ml.c5.xlarge": 0.204,
    "ml.c5.2xlarge": 0.408,
    "ml.g4dn.xlarge": 0.7364,
    "ml.g4dn.2xlarge": 1.0527,
    "ml.g5.xlarge": 1.408,
    "ml.g5.2xlarge": 1.515,
    "ml.p3.2xlarge": 3.825,
}
SERVERLESS_GB_SECOND = 0.00002  # Serverless Inference compute, per GB of memory and second
LAMBDA_GB_SECOND = {"arm64": 0.0000133334, "x86_64": 0.0000166667}
LAMBDA_PER_MILLION = 0.20
DAY = 86400


def _usd(x: float) -> str:
    return f"${x:,.2f}"


def endpoint_lines(name: str, instance_type: str | None, count: int, memory_mb: int, max_concurrency: int) -> list[str]:
    """Price and worst case of a real-time endpoint (instance_type) or a serverless one."""
    if instance_type is None:
        busy = max_concurrency * memory_mb / 1024 * SERVERLESS_GB_SECOND * DAY
        return [
            f"price      {_usd(SERVERLESS_GB_SECOND * memory_mb / 1024 * 3600)} per hour of compute while a request "
            "runs, plus data processed; nothing while idle",
            f"worst case {_usd(busy)} per day if all {max_concurrency} concurrent slots ({memory_mb} MB) stay busy",
        ]
    rate = HOSTING.get(instance_type)
    if rate is None:
        return [f"price      unknown for {instance_type} (not in the built-in table); see the SageMaker pricing page"]
    return [
        f"price      {_usd(rate)} per instance-hour; {count} instance{'s' if count > 1 else ''}: {_usd(rate * count)}"
        " per hour, busy or idle",
        f"worst case {_usd(rate * count * 24)} per day ({_usd(rate * count * 730)} a month) until "
        f"`ec2train deploy delete --name {name}`; autoscaling can add instances up to its --max",
    ]


def autoscale_lines(min_capacity: int, max_capacity: int) -> list[str]:
    example = HOSTING["ml.g4dn.xlarge"]
    return [
        f"instances  {min_capacity} to {max_capacity}, each billed every hour it runs, busy or idle",
        f"worst case {max_capacity} x the endpoint's instance-hour price around the clock (on ml.g4dn.xlarge: "
        f"{_usd(max_capacity * example * 24)} per day)",
    ]


def lambda_lines(memory_mb: int, architecture: str, reserved_concurrency: int) -> list[str]:
    rate = LAMBDA_GB_SECOND.get(architecture, LAMBDA_GB_SECOND["x86_64"])
    lines = [
        f"price      ${LAMBDA_PER_MILLION:.2f} per million requests plus {_usd(rate * memory_mb / 1024 * 3600)} per "
        f"hour of run time ({memory_mb} MB, {architecture}), and the endpoint's own price; nothing while idle"
    ]
    if reserved_concurrency:
        busy = reserved_concurrency * memory_mb / 1024 * rate * DAY
        lines.append(
            f"worst case {_usd(busy)} per day of run time if all {reserved_concurrency} reserved instances stay busy, "
            "plus the requests"
        )
    return lines


def with_prices_note(lines: list[str]) -> list[str]:
    return [*lines, f"prices     us-east-1 list prices as of {PRICES_AS_OF} (ec2train/deploy/prices.py)"]
