"""What instances cost: a small built-in price table, the spot types a job may run on, the
summary every dry run starts with, and the estimate `job status` shows.

An estimate only: on-demand prices are AWS's us-east-1 Linux list prices as of PRICES_AS_OF;
spot prices move hourly and by zone, so the spot column is a typical price (about 40% of
on-demand) on that date. Storage, data transfer and the minutes of boot and setup before the
runner starts are not counted. For the bill, see AWS Cost Explorer (tag ec2train:job).

    python -m ec2train.job.cost --type g5.xlarge --count 2 --spot --hours 24   # the summary lines
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

PRICES_AS_OF = "2025-06"
REGION_OF_PRICES = "us-east-1"
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
    "p3dn.24xlarge": (8, 31.212, 12.48),
    "p4d.24xlarge": (8, 32.773, 13.11),
    "p5.48xlarge": (8, 98.32, 39.33),
}
# Types with an Elastic Fabric Adapter, for a dry run's --efa check (a real submit asks
# ec2:DescribeInstanceTypes instead, which knows every type).
EFA_TYPES = frozenset(
    {
        "g4dn.8xlarge",
        "g4dn.12xlarge",
        "g4dn.16xlarge",
        "g4dn.metal",
        "g5.8xlarge",
        "g5.12xlarge",
        "g5.16xlarge",
        "g5.24xlarge",
        "g5.48xlarge",
        "g6.8xlarge",
        "g6.12xlarge",
        "g6.16xlarge",
        "g6.24xlarge",
        "g6.48xlarge",
        "p3dn.24xlarge",
        "p4d.24xlarge",
        "p4de.24xlarge",
        "p5.48xlarge",
    }
)
SPOT_TYPES = 4  # how many types a spot job may run on (the asked one and bigger of its family)
# A spot job may also run on bigger sizes of its family, for deeper capacity pools, but none
# whose on-demand price is more than this times the asked type's: spot bills at most the
# on-demand price, so this bounds what one node can cost against what the user chose.
SPOT_PRICE_RATIO = 2.5
EBS_GB_MONTH = 0.08  # gp3, us-east-1
HOURS_PER_MONTH = 730


def spot_types(instance_type: str, efa: bool = False) -> list[str]:
    """The asked type, then the next bigger types of its family with as many GPUs, at most
    SPOT_PRICE_RATIO times its on-demand price, cheapest first: more pools for AWS to choose
    from, never less GPU memory or fewer GPUs than asked (with efa, only types that have it)."""
    if instance_type not in PRICES:
        return [instance_type]
    family = instance_type.split(".")[0]
    gpus, price, _ = PRICES[instance_type]
    same = [
        t
        for t, (g, p, _) in PRICES.items()
        if t.split(".")[0] == family and g == gpus and price <= p <= price * SPOT_PRICE_RATIO
    ]
    if efa:
        same = [t for t in same if t in EFA_TYPES]
    return sorted(same, key=lambda t: PRICES[t][1])[:SPOT_TYPES] or [instance_type]


def hourly(instance_type: str, lifecycle: str) -> float | None:
    row = PRICES.get(instance_type)
    if row is None:
        return None
    return row[2] if lifecycle == "spot" else row[1]


def _usd(x: float) -> str:
    return f"${x:,.2f}"


def _range(prices: list[float]) -> str:
    lo, hi = min(prices), max(prices)
    return _usd(lo) if lo == hi else f"{_usd(lo)}-{_usd(hi)}"


def price_lines(types: list[str], count: int, spot: bool, hours: float | None, disk_gb: int) -> list[str]:
    """What `count` instances of `types` cost per hour, and the worst case over `hours` (None:
    no end: per day). Spot is billed at most at the on-demand price, so the worst case uses it."""
    unknown = [t for t in types if t not in PRICES]
    if unknown:
        return [
            f"price      unknown for {', '.join(unknown)} (not in the built-in table); see "
            "https://aws.amazon.com/ec2/pricing/on-demand/"
        ]
    rates = [PRICES[t][2 if spot else 1] for t in types]
    od = [PRICES[t][1] for t in types]
    if spot:
        each = f"{_range(rates)} per instance-hour at typical spot prices ({_range(od)} on-demand)"
    else:
        each = f"{_range(od)} per instance-hour on-demand"
    if count > 1:
        each += f"; {count} nodes: {_range([r * count for r in rates])} per hour"
    lines = [f"price      {each}"]
    disk = count * disk_gb * EBS_GB_MONTH / HOURS_PER_MONTH
    if hours is None:
        day = 24 * (count * max(od) + disk)
        lines.append(
            f"worst case {_usd(day)} per day until you tear it down ({count} x {_usd(max(od))}/h"
            f"{', spot never bills above on-demand' if spot else ''}, plus {count} x {disk_gb} GB gp3)"
        )
        return lines
    worst = hours * (count * max(od) + disk)
    nodes = f"all {count} nodes run" if count > 1 else "the instance runs"
    lines.append(
        f"worst case {_usd(worst)} if {nodes} the full --max-hours {hours:g} at {_usd(max(od))}/h"
        f"{' (spot never bills above on-demand)' if spot else ''}, with {count} x {disk_gb} GB gp3 disk"
    )
    return lines


def estimate(nodes: list[dict[str, Any]], now: float | None = None, timeout: float = 60.0) -> dict[str, Any]:
    """{"usd": total or None, "hours": instance hours, "unpriced": types not in the table} over
    every instance the job's runners ran on (their node files), from the runner's start to its
    exit, or to its last heartbeat when it vanished."""
    now = time.time() if now is None else now
    usd, hours, unpriced = 0.0, 0.0, set()
    for n in nodes:
        start = float(n["started_at"]) if n.get("started_at") is not None else now
        end = n.get("exited_at")
        if end is None:
            beat = float(n["heartbeat_at"]) if n.get("heartbeat_at") is not None else start
            end = now if now - beat < timeout else beat
        ran = max(0.0, float(end) - start) / 3600
        hours += ran
        rate = hourly(n.get("instance_type", ""), n.get("lifecycle", ""))
        if rate is None:
            unpriced.add(n.get("instance_type") or "?")
        else:
            usd += ran * rate
    return {"usd": None if unpriced else usd, "hours": hours, "unpriced": sorted(unpriced)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ec2train.job.cost", description=__doc__.splitlines()[0])
    parser.add_argument("--type", required=True, help="instance type, e.g. g4dn.xlarge")
    parser.add_argument("--count", type=int, default=1, help="instances")
    parser.add_argument("--spot", action="store_true", help="spot instances (of this one type)")
    parser.add_argument("--hours", type=float, default=None, help="the most hours they run (default: no end)")
    parser.add_argument("--disk-gb", type=int, default=100, help="gp3 root volume of each")
    args = parser.parse_args(argv)
    for line in price_lines([args.type], args.count, args.spot, args.hours, args.disk_gb):
        print(line)
    print(f"prices     {REGION_OF_PRICES} list prices as of {PRICES_AS_OF} (ec2train/job/cost.py); spot moves hourly")
    return 0


if __name__ == "__main__":
    sys.exit(main())
