"""Every deploy dry run starts with what it creates and what that costs (issue 27, item 5);
the job and launch_ec2.sh dry runs are checked in test_job.py and test_infra.py."""

from __future__ import annotations

import pytest

from ec2train.deploy import prices
from tests.support.cli import cli_in_process
from tests.support.net import free_port

ROLE = "arn:aws:iam::123456789012:role/sagemaker-exec"
MODEL_DATA = "s3://ec2train-models/dogs/model.tar.gz"


@pytest.fixture
def dry(capsys, monkeypatch):
    """A deploy dry run, in this process; nothing listens at the endpoint, so a request would fail."""
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")

    def run(*args: str) -> list[str]:
        code, out, err = cli_in_process(capsys, "deploy", *args, "--region", "us-east-1", "--dry-run")
        assert code == 0, out + err
        head = out.split("A real run first reads")[0]
        return [" ".join(line.split()) for line in head.splitlines()]

    return run


def test_an_instance_endpoint_says_it_bills_every_hour_until_deleted(dry):
    lines = dry(
        "endpoint", "--name", "dogs", "--role", ROLE, "--model-data", MODEL_DATA,
        "--instance-type", "ml.g4dn.xlarge", "--instance-count", "2",
    )  # fmt: skip
    rate = prices.HOSTING["ml.g4dn.xlarge"]
    assert lines[1] == "creates SageMaker model, endpoint configuration and endpoint dogs (2 x ml.g4dn.xlarge)"
    assert lines[2] == f"price ${rate:.2f} per instance-hour; 2 instances: ${2 * rate:.2f} per hour, busy or idle"
    assert lines[3].startswith(f"worst case ${48 * rate:,.2f} per day (${2 * rate * 730:,.2f} a month) until")
    assert "`ec2train deploy delete --name dogs`" in lines[3]


def test_a_serverless_endpoint_costs_nothing_idle_and_its_worst_case_is_its_concurrency(dry):
    lines = dry(
        "endpoint", "--name", "dogs", "--role", ROLE, "--model-data", MODEL_DATA,
        "--serverless", "--memory", "4096", "--max-concurrency", "10",
    )  # fmt: skip
    assert lines[1].endswith("endpoint dogs (serverless)") and "nothing while idle" in lines[2]
    busy = 10 * 4 * prices.SERVERLESS_GB_SECOND * 86400  # 10 requests at once, 4 GB each, all day
    assert lines[3] == f"worst case ${busy:,.2f} per day if all 10 concurrent slots (4096 MB) stay busy"


def test_autoscaling_lambda_and_delete_say_what_they_do_to_the_bill(dry):
    lines = dry("autoscale", "--name", "dogs", "--min", "1", "--max", "3")
    assert lines[2] == "instances 1 to 3, each billed every hour it runs, busy or idle"
    assert f"(on ml.g4dn.xlarge: ${3 * prices.HOSTING['ml.g4dn.xlarge'] * 24:,.2f} per day)" in lines[3]
    lines = dry("lambda", "--endpoint", "dogs")
    assert lines[1] == "creates Lambda function ec2train-dogs (alias live), its role and log group"
    assert lines[2].startswith("price $0.20 per million requests") and "nothing while idle" in lines[2]
    assert "if all 10 reserved instances stay busy" in lines[3]
    lines = dry("delete", "--name", "dogs")
    assert "nothing of this deployment bills" in " ".join(lines[1:3])
