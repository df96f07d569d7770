"""`ec2train job ...`: thin; parses options, calls ec2train.job.api, prints."""

from __future__ import annotations

import json

import typer
from rich.table import Table

from ec2train.cli._app import console, group

job_app = group(
    "job",
    help="Unattended training jobs on EC2: submit, status, logs, cancel. No SageMaker, nothing of ours left running.",
)
_REGION = "AWS region. [default: your AWS configuration]"
_S3_URI = "The job's S3 prefix; needed only once its group is gone (after cancel). [default: read from the group's tag]"


@job_app.command("submit")
def submit_cmd(
    name: str = typer.Argument(..., help="Job name: 1-31 lowercase letters, digits and '-'."),
    fit_args: list[str] | None = typer.Argument(None, help="After --: `fit` and its options, e.g. -- fit --epochs 10."),
    s3_uri: str = typer.Option(
        ...,
        help="S3 prefix for the job: checkpoints, model, logs, status. The instance reaches only this (and --data).",
    ),
    data: str = typer.Option(
        ..., help="The data set: s3://bucket/key.zip, s3://bucket/prefix/ (train/ valid/ test/) or an https:// zip."
    ),
    instance_type: str = typer.Option(
        "g4dn.xlarge",
        "--type",
        help="Instance type; with --spot, bigger types of its family with as many GPUs (at most 2.5x its price) too.",
    ),
    nodes: int = typer.Option(
        1,
        help="Instances that train together. N > 1: one fit process per GPU on each, a cluster placement group, "
        "and losing any node stops all of them until the group is whole again, then training resumes from S3.",
    ),
    efa: bool = typer.Option(
        False, help="Elastic Fabric Adapter between the nodes (only types that have one; refused otherwise)."
    ),
    spot: bool = typer.Option(
        False, help="Spot capacity: price-capacity-optimized over several types, capacity rebalance, resume from S3."
    ),
    max_hours: float = typer.Option(24.0, help="End the job this many hours after submit, even if training hangs."),
    max_failures: int = typer.Option(
        2,
        help="Failed attempts before the job ends 'failed': fit fails (exit not 0 or 75) with every node alive, "
        "the data cannot be fetched (a permanent error), every node of an attempt vanishes, or a 3rd attempt in a "
        "row loses a node before an epoch ends. Spot notices never count.",
    ),
    disk_gb: int = typer.Option(100, help="Encrypted gp3 root volume size."),
    ami: str | None = typer.Option(
        None, help="AMI id. [default: the PyTorch Deep Learning AMI from its public SSM parameter]"
    ),
    subnet_id: list[str] | None = typer.Option(
        None, help="Subnet(s) to launch in (repeatable). [default: the default VPC's]"
    ),
    ssh_from: str | None = typer.Option(
        None, help="Allow SSH from this IPv4 address (/32) only. [default: no inbound rule at all]"
    ),
    key_name: str | None = typer.Option(None, help="EC2 key pair for SSH."),
    wheel: str | None = typer.Option(None, help="Install this wheel instead of one built from this checkout."),
    region: str | None = typer.Option(None, help=_REGION),
    dry_run: bool = typer.Option(
        False, "--dry-run", help="Print every request and policy document; create, build and upload nothing."
    ),
):
    """Create a job: an Auto Scaling group of N instances that trains, uploads to S3 and ends itself."""
    from ec2train.job.api import SubmitRequest, submit

    req = SubmitRequest(
        name,
        s3_uri,
        data,
        list(fit_args or []),
        instance_type,
        spot,
        max_hours,
        max_failures,
        disk_gb,
        ami,
        list(subnet_id or []) or None,
        ssh_from,
        key_name,
        wheel,
        nodes=nodes,
        efa=efa,
    )
    out = submit(req, region=region, dry_run=dry_run, console=console)
    if not dry_run:
        types = f" (spot: {', '.join(out['spot_types'])})" if out["spot_types"] else ""
        size = f"{nodes} nodes" if nodes > 1 else "1 node"
        console.print(
            f"job {name} submitted, {size}{types}: group {out['group']}, files in {out['s3_uri']}", highlight=False
        )
        console.print(f"follow it: ec2train job status {name}; ec2train job logs {name} --follow", highlight=False)


@job_app.command("status")
def status_cmd(
    name: str = typer.Argument(..., help="Job name."),
    s3_uri: str | None = typer.Option(None, help=_S3_URI),
    region: str | None = typer.Option(None, help=_REGION),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
):
    """State, epochs done, each node (instance, type, spot, rank, state, last heartbeat), interruptions, failures, and an estimate of the cost so far."""
    from ec2train.job.api import status

    st = status(name, s3_uri=s3_uri, region=region)
    if as_json:
        print(json.dumps(st, indent=2, default=str))
        return
    console.print(_status_table(name, st))
    if st["node_rows"]:
        console.print(_nodes_table(st["node_rows"]))
    for line in st.get("log_tail") or [] if st["state"] == "failed" else []:
        console.print(line, highlight=False, markup=False)


def _status_table(name: str, st: dict) -> Table:
    table = Table(title=f"job {name}", show_header=False)
    table.add_row("state", st["state"] + (f" ({st['reason']})" if st.get("reason") else ""))
    table.add_row("epochs done", f"{st.get('epoch') or 0}" + (f" of {st['epochs']}" if st.get("epochs") else ""))
    waiting = st.get("waiting")
    if waiting and st["state"] not in ("succeeded", "failed", "cancelled"):
        table.add_row(
            "waiting",
            f"attempt {waiting['attempt']}: {len(waiting['ready'])} of {waiting['need']} nodes ready"
            + (f" ({', '.join(waiting['ready'])})" if waiting["ready"] else ""),
        )
    if st.get("capacity"):
        table.add_row("capacity", st["capacity"])
    attempts = st.get("attempts") or []
    lost = [i for a in attempts for i in a.get("lost") or []]
    table.add_row(
        "attempts",
        f"{len(attempts)}: {st['interruptions']} interrupted, {st['failures']} failed"
        + (f"; nodes lost: {', '.join(lost)}" if lost else ""),
    )
    if st.get("exit_code") is not None:
        table.add_row("exit code", str(st["exit_code"]))
    c = st["cost"]
    usd = f"${c['usd']:.2f}" if c["usd"] is not None else f"unknown (no price for {', '.join(c['unpriced'])})"
    table.add_row(
        "cost so far",
        f"{usd} for {c['hours']:.2f} instance-hours over every node and attempt: an estimate from list prices of "
        f"{st['prices_as_of']}",
    )
    group = st["group"]
    table.add_row(
        "group",
        "gone"
        if group is None
        else f"desired {group['desired']}; "
        + (", ".join(f"{i['id']} {i['state']}" for i in group["instances"]) or "no instances"),
    )
    table.add_row("files", st["s3_uri"])
    return table


def _nodes_table(rows: list) -> Table:
    table = Table(title="nodes")
    for col in ("instance", "type", "market", "rank", "state", "last heartbeat"):
        table.add_column(col)
    for r in rows:
        rank = "-" if r["rank"] is None else f"{r['rank']} (attempt {r['attempt']})"
        age = "-" if r["heartbeat_age"] is None else f"{r['heartbeat_age']:.0f} s ago"
        table.add_row(r["instance"], r["type"] or "?", "spot" if r["spot"] else "on-demand", rank, r["state"], age)
    return table


@job_app.command("logs")
def logs_cmd(
    name: str = typer.Argument(..., help="Job name."),
    follow: bool = typer.Option(False, "--follow", "-f", help="Keep printing new lines until the job ends."),
    s3_uri: str | None = typer.Option(None, help=_S3_URI),
    region: str | None = typer.Option(None, help=_REGION),
):
    """Every attempt's log (the runner's lines and fit's output), mirrored to S3 every few seconds."""
    from ec2train.job.api import logs

    logs(name, s3_uri=s3_uri, region=region, follow=follow, write=lambda text: console.out(text, highlight=False))


@job_app.command("cancel")
def cancel_cmd(
    name: str = typer.Argument(..., help="Job name."),
    s3_uri: str | None = typer.Option(None, help=_S3_URI),
    region: str | None = typer.Option(None, help=_REGION),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print every request; delete nothing."),
):
    """Stop the job and delete everything it created (the outputs in S3 stay). Safe to run twice."""
    from ec2train.job.api import cancel

    out = cancel(name, s3_uri=s3_uri, region=region, dry_run=dry_run, console=console)
    if not dry_run:
        console.print(
            f"job {name}: nothing left running or billing" + ("" if out["deleted"] else " (nothing was there)"),
            highlight=False,
        )
