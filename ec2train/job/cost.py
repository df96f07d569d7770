"""A job's cost, estimated from the hours each attempt ran and a small built-in price table.

An estimate only: on-demand prices are AWS's us-east-1 Linux list prices as of PRICES_AS_OF;
spot prices move hourly and by zone, so the spot column is a typical price (about 40% of
on-demand) on that date. Storage, data transfer and the minutes of boot and setup before the
runner starts are not counted. For the bill, see AWS Cost Explorer (tag ec2train:job).
"""

from __future__ import annotations

import time
from typing import Any

PRICES_AS_OF = "2025-06"
# type: (GPUs, on-demand USD/hour, typical spot USD/hour)
PRICES: dict[str, tuple[int, float, float]] = {
    "g4dn.xlarge": (1, 0.526, 0.21),
    "g4dn.2xlarge": (1, 0.752, 0.30),
    "g4dn.4xlarge": (1, 1.204, 0.48),
    "g4dn.8xlarge": (1, 2.176, 0.87),
    "g4dn.16xlarge": (1, 4.352, 1.74),
    "g4dn.12xlarge": (4, 3.912, 1.56),
    "g5.xlarge": (1, 1.006, 0.40),
    "g5.2xlarge": (1, 1.212, 0.48),
    "g5.4xlarge": (1, 1.624, 0.65),
    "g5.8xlarge": (1, 2.448, 0.98),
    "g5.16xlarge": (1, 4.096, 1.64),
    "g5.12xlarge": (4, 5.672, 2.27),
    "g5.24xlarge": (4, 8.144, 3.26),
    "g5.48xlarge": (8, 16.288, 6.52),
    "g6.xlarge": (1, 0.805, 0.32),
    "g6.2xlarge": (1, 0.978, 0.39),
    "g6.4xlarge": (1, 1.323, 0.53),
    "g6.8xlarge": (1, 2.014, 0.81),
    "g6.12xlarge": (4, 4.602, 1.84),
    "p3.2xlarge": (1, 3.06, 1.22),
}
SPOT_TYPES = 4  # how many types a spot job may run on (the asked one and bigger of its family)


def spot_types(instance_type: str) -> list[str]:
    """The asked type, then the next bigger types of its family with as many GPUs, cheapest first:
    more pools for AWS to choose from, never less GPU memory or fewer GPUs than asked."""
    if instance_type not in PRICES:
        return [instance_type]
    family = instance_type.split(".")[0]
    gpus, price, _ = PRICES[instance_type]
    same = [t for t, (g, p, _) in PRICES.items() if t.split(".")[0] == family and g == gpus and p >= price]
    return sorted(same, key=lambda t: PRICES[t][1])[:SPOT_TYPES]


def hourly(instance_type: str, lifecycle: str) -> float | None:
    row = PRICES.get(instance_type)
    if row is None:
        return None
    return row[2] if lifecycle == "spot" else row[1]


def estimate(status: dict[str, Any], now: float | None = None) -> dict[str, Any]:
    """{"usd": total or None, "hours": runner hours, "unpriced": types not in the table}."""
    now = time.time() if now is None else now
    usd, hours, unpriced = 0.0, 0.0, set()
    for a in status.get("attempts") or []:
        ran = max(0.0, (a.get("ended_at") or now) - a.get("started_at", now)) / 3600
        hours += ran
        rate = hourly(a.get("instance_type", ""), a.get("lifecycle", ""))
        if rate is None:
            unpriced.add(a.get("instance_type") or "?")
        else:
            usd += ran * rate
    return {"usd": None if unpriced else usd, "hours": hours, "unpriced": sorted(unpriced)}
