"""`ec2train deploy ...` against moto's threaded server (a real HTTP server on 127.0.0.1).

Moto gaps that shape these tests: update_endpoint is not implemented (so the rolling-update
branch is only shown by the dry run), put_provisioned_concurrency_config answers an HTML 404
(the clean warning path is what we test), and endpoints are InService at once.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import re
import subprocess
import sys
import zipfile

import boto3
import pytest

from ec2train import deploy
from ec2train.cli import main
from tests.support.net import free_port

ROLE = "arn:aws:iam::123456789012:role/sagemaker-exec"
MODEL_DATA = "s3://dog-models/run-1/model.tar.gz"
ACCOUNT = "123456789012"  # moto's account
HANDLER = "import json\n\ndef lambda_handler(event, context):\n    return {'statusCode': 200, 'body': json.dumps({'ok': True})}\n"


@pytest.fixture
def cli(capsys):
    """Run `ec2train ARGS` in-process; returns (exit code, stdout, stderr)."""

    def run(*args: str):
        code = 0
        try:
            main([str(a) for a in args])
        except SystemExit as exc:
            code = exc.code or 0
        out, err = capsys.readouterr()
        return code, out, err

    return run


@pytest.fixture
def code_dir(tmp_path):
    d = tmp_path / "lambda"
    (d / "__pycache__").mkdir(parents=True)
    (d / "handler.py").write_text(HANDLER)
    (d / "helper.py").write_text("X = 1\n")
    (d / "__pycache__" / "handler.cpython-312.pyc").write_bytes(b"junk")
    return d


def sm():
    return boto3.client("sagemaker", region_name="us-east-1")


def gpu_endpoint(cli, name="dog-breeds", *extra):
    code, out, err = cli(
        "deploy",
        "endpoint",
        "--name",
        name,
        "--role",
        ROLE,
        "--model-data",
        MODEL_DATA,
        "--instance-type",
        "ml.g4dn.xlarge",
        *extra,
    )
    assert code == 0, out + err
    return out


def parse_dry_run(out: str) -> list[tuple[str, dict]]:
    """[(api, params)] of the numbered steps a dry run printed."""
    steps, decoder = [], json.JSONDecoder()
    for m in re.finditer(r"^\[\d+\] (.+?)(?:  # .*)?\n", out, flags=re.M):
        params, _ = decoder.raw_decode(out[m.end() :])
        steps.append((m.group(1), params))
    return steps


# --------------------------------------------------------------------------- pure parts


@pytest.mark.fast
def test_names_partitions_and_lowercase_arns():
    for good in ("dog-breeds", "a", "A1", "x" * 63, "a--b"):
        assert deploy.check_sagemaker_name(good) == good
    for bad in ("dog_breeds", "-dogs", "dogs-", "x" * 64, "", "dögs", "a b"):
        with pytest.raises(deploy.DeployError, match="not a valid SageMaker name"):
            deploy.check_sagemaker_name(bad)
    with pytest.raises(deploy.DeployError, match="Lambda function name"):
        deploy.check_function_name("bad.name")
    assert deploy.partition_of("cn-north-1") == "aws-cn"
    assert deploy.partition_of("us-gov-west-1") == "aws-us-gov"
    assert (
        deploy.endpoint_arn("aws", "eu-west-1", ACCOUNT, "Dog-Breeds")
        == f"arn:aws:sagemaker:eu-west-1:{ACCOUNT}:endpoint/dog-breeds"
    )
    assert deploy.role_name_for("f" * 64).endswith("-role") and len(deploy.role_name_for("f" * 64)) <= 64
    with pytest.raises(deploy.DeployError, match="--function-name"):
        deploy.default_function_name("e" * 60)


@pytest.mark.fast
def test_inference_image_per_region_and_device():
    assert (
        deploy.image_uri_for("us-east-1", "ml.g4dn.xlarge")
        == "763104351884.dkr.ecr.us-east-1.amazonaws.com/pytorch-inference:2.6.0-gpu-py312"
    )
    assert deploy.image_uri_for("us-west-2", "ml.p3.2xlarge").endswith(":2.6.0-gpu-py312")
    assert deploy.image_uri_for("us-west-2", "ml.m5.large").endswith(":2.6.0-cpu-py312")
    assert deploy.image_uri_for("eu-west-1", None, serverless=True).endswith(":2.6.0-cpu-py312")
    assert deploy.image_uri_for("eu-south-1", "ml.c5.xlarge").startswith(
        "692866216735.dkr.ecr.eu-south-1.amazonaws.com/"
    )
    assert deploy.image_uri_for("cn-north-1", "ml.g4dn.xlarge").startswith(
        "727897471807.dkr.ecr.cn-north-1.amazonaws.com.cn/"
    )
    with pytest.raises(deploy.DeployError, match="--image-uri"):
        deploy.image_uri_for("xx-nowhere-1", "ml.g4dn.xlarge")
    with pytest.raises(deploy.DeployError, match="Neuron"):
        deploy.image_uri_for("us-east-1", "ml.inf2.xlarge")


@pytest.mark.fast
def test_policy_documents_grant_exactly_one_endpoint_and_own_logs():
    trust = deploy.lambda_trust_policy()
    (stmt,) = trust["Statement"]
    assert stmt["Principal"] == {"Service": "lambda.amazonaws.com"} and stmt["Action"] == "sts:AssumeRole"
    doc = deploy.lambda_invoke_policy("aws", "us-east-1", ACCOUNT, "Dog-Breeds", "front")
    grants = {}
    for s in doc["Statement"]:
        assert s["Effect"] == "Allow"
        for action in [s["Action"]] if isinstance(s["Action"], str) else s["Action"]:
            grants.setdefault(action, set()).update(
                [s["Resource"]] if isinstance(s["Resource"], str) else s["Resource"]
            )
    group = f"arn:aws:logs:us-east-1:{ACCOUNT}:log-group:/aws/lambda/front"
    assert grants == {
        "sagemaker:InvokeEndpoint": {f"arn:aws:sagemaker:us-east-1:{ACCOUNT}:endpoint/dog-breeds"},
        "logs:CreateLogGroup": {group, f"{group}:*"},
        "logs:CreateLogStream": {f"{group}:*"},
        "logs:PutLogEvents": {f"{group}:*"},
    }


def test_lambda_zip_is_deterministic_and_skips_caches(code_dir):
    a = deploy.build_lambda_zip(code_dir)
    (code_dir / "handler.py").touch()  # a newer mtime must not change the bytes
    assert deploy.build_lambda_zip(code_dir) == a
    with zipfile.ZipFile(io.BytesIO(a)) as zf:
        assert zf.namelist() == ["handler.py", "helper.py"]
        assert zf.read("handler.py").decode() == HANDLER
        assert all((i.external_attr >> 16) & 0o777 == 0o644 for i in zf.infolist())
    # The repository's own function code is what ships by default.
    with zipfile.ZipFile(io.BytesIO(deploy.build_lambda_zip(deploy.default_code_dir()))) as zf:
        assert {"handler.py", "safe_fetch.py"} <= set(zf.namelist())
        assert not any("__pycache__" in n or n.endswith(".pyc") for n in zf.namelist())
    (code_dir / "handler.py").write_text("print('no handler here')\n")
    with pytest.raises(deploy.DeployError, match="lambda_handler"):
        deploy.build_lambda_zip(code_dir)


@pytest.mark.fast
def test_wait_for_endpoint_failure_rollback_and_timeout():
    seq = iter(
        [
            {"EndpointStatus": "Creating"},
            {"EndpointStatus": "Creating"},
            {"EndpointStatus": "Failed", "FailureReason": "model.tar.gz not found in S3"},
        ]
    )
    sleeps = []
    with pytest.raises(deploy.DeployError, match="Failed: model.tar.gz not found in S3.*deploy delete"):
        deploy.wait_for_endpoint(lambda: next(seq), "dogs", sleep=sleeps.append, poll_seconds=5)
    assert sleeps == [5, 5]
    rolled_back = {"EndpointStatus": "InService", "EndpointConfigName": "old", "FailureReason": "health check failed"}
    with pytest.raises(deploy.DeployError, match="rolled back: health check failed"):
        deploy.wait_for_endpoint(lambda: rolled_back, "dogs", expect_config="new")
    now = [0.0]

    def sleep(s):
        now[0] += s

    with pytest.raises(deploy.DeployError, match="still Creating after 60 s"):
        deploy.wait_for_endpoint(
            lambda: {"EndpointStatus": "Creating"},
            "dogs",
            timeout=60,
            poll_seconds=15,
            sleep=sleep,
            clock=lambda: now[0],
        )


# --------------------------------------------------------------------------- endpoint


def test_endpoint_on_gpu_instances(aws, cli):
    out = gpu_endpoint(cli)
    assert "InService" in out and "deploy delete --name dog-breeds" in out
    ep = sm().describe_endpoint(EndpointName="dog-breeds")
    assert ep["EndpointStatus"] == "InService"
    cfg = sm().describe_endpoint_config(EndpointConfigName=ep["EndpointConfigName"])
    (variant,) = cfg["ProductionVariants"]
    assert variant["VariantName"] == "AllTraffic"
    assert variant["InstanceType"] == "ml.g4dn.xlarge" and variant["InitialInstanceCount"] == 1
    model = sm().describe_model(ModelName=variant["ModelName"])
    assert model["ExecutionRoleArn"] == ROLE
    container = model["PrimaryContainer"]
    assert container["Image"] == "763104351884.dkr.ecr.us-east-1.amazonaws.com/pytorch-inference:2.6.0-gpu-py312"
    assert container["ModelDataUrl"] == MODEL_DATA
    assert container["Environment"] == {
        "SAGEMAKER_PROGRAM": "inference.py",
        "SAGEMAKER_SUBMIT_DIRECTORY": "/opt/ml/model/code",
    }
    for arn in (ep["EndpointArn"], cfg["EndpointConfigArn"], model["ModelArn"]):
        tags = {t["Key"]: t["Value"] for t in sm().list_tags(ResourceArn=arn)["Tags"]}
        assert tags == {"ec2train:managed": "true", "ec2train:endpoint": "dog-breeds"}
    # The same deploy again changes nothing.
    out = gpu_endpoint(cli)
    assert "already serves this exact configuration" in out
    assert len(sm().list_models()["Models"]) == 1 and len(sm().list_endpoint_configs()["EndpointConfigs"]) == 1


def test_serverless_endpoint_and_it_cannot_autoscale(aws, cli):
    code, out, err = cli(
        "deploy",
        "endpoint",
        "--name",
        "dogs-sls",
        "--role",
        ROLE,
        "--model-data",
        MODEL_DATA,
        "--serverless",
        "--memory",
        "3072",
        "--max-concurrency",
        "7",
        "--image-uri",
        "123.dkr.ecr.us-east-1.amazonaws.com/mine:1",
    )
    assert code == 0, out + err
    ep = sm().describe_endpoint(EndpointName="dogs-sls")
    (variant,) = sm().describe_endpoint_config(EndpointConfigName=ep["EndpointConfigName"])["ProductionVariants"]
    assert variant["ServerlessConfig"] == {"MemorySizeInMB": 3072, "MaxConcurrency": 7}
    assert "InstanceType" not in variant
    assert (
        sm().describe_model(ModelName=variant["ModelName"])["PrimaryContainer"]["Image"]
        == "123.dkr.ecr.us-east-1.amazonaws.com/mine:1"
    )
    # Without --image-uri the serverless image is the CPU one.
    model, _ = deploy.endpoint_requests(deploy.EndpointSpec("dogs-sls", ROLE, MODEL_DATA, serverless=True), "us-east-1")
    assert model["PrimaryContainer"]["Image"].endswith("pytorch-inference:2.6.0-cpu-py312")
    code, out, err = cli("deploy", "autoscale", "--name", "dogs-sls")
    assert code == 2 and "is serverless" in err and "--max-concurrency" in err
    assert (
        boto3.client("application-autoscaling", region_name="us-east-1").describe_scalable_targets(
            ServiceNamespace="sagemaker"
        )["ScalableTargets"]
        == []
    )


def test_autoscale_registers_target_and_policy(aws, cli):
    gpu_endpoint(cli)
    code, out, err = cli(
        "deploy",
        "autoscale",
        "--name",
        "dog-breeds",
        "--min",
        "1",
        "--max",
        "4",
        "--target-invocations",
        "70",
        "--scale-in-cooldown",
        "300",
        "--scale-out-cooldown",
        "60",
    )
    assert code == 0, out + err
    aas = boto3.client("application-autoscaling", region_name="us-east-1")
    (target,) = aas.describe_scalable_targets(ServiceNamespace="sagemaker")["ScalableTargets"]
    assert (target["ResourceId"], target["ScalableDimension"], target["MinCapacity"], target["MaxCapacity"]) == (
        "endpoint/dog-breeds/variant/AllTraffic",
        "sagemaker:variant:DesiredInstanceCount",
        1,
        4,
    )
    (policy,) = aas.describe_scaling_policies(ServiceNamespace="sagemaker")["ScalingPolicies"]
    assert policy["PolicyType"] == "TargetTrackingScaling"
    assert policy["TargetTrackingScalingPolicyConfiguration"] == {
        "TargetValue": 70.0,
        "PredefinedMetricSpecification": {"PredefinedMetricType": "SageMakerVariantInvocationsPerInstance"},
        "ScaleInCooldown": 300,
        "ScaleOutCooldown": 60,
    }
    code, _, err = cli("deploy", "autoscale", "--name", "dog-breeds", "--min", "3", "--max", "2")
    assert code == 2 and "--max (2) must be at least --min (3)" in err
    code, _, err = cli("deploy", "autoscale", "--name", "no-such-endpoint")
    assert code == 2 and "does not exist" in err


@pytest.mark.fast
def test_endpoint_plan_updates_in_place_and_cleans_up():
    """The branches moto cannot run (it has no UpdateEndpoint): planned from what a real run reads."""
    spec = deploy.EndpointSpec("dogs", ROLE, MODEL_DATA, "ml.g4dn.xlarge", instance_count=2)
    _, config = deploy.endpoint_requests(spec, "us-east-1")
    new = config["EndpointConfigName"]
    serving_old = deploy.EndpointNow("InService", "dogs-0ld0ld00", True, ("dogs-0ld0ld00",), True)
    plan = [(s.api, s.params) for s in deploy.endpoint_plan(spec, "us-east-1", serving_old)]
    assert [a for a, _ in plan] == [
        "sagemaker:CreateModel",
        "sagemaker:CreateEndpointConfig",
        "sagemaker:UpdateEndpoint",
        "wait endpoint_in_service",
        "sagemaker:DeleteEndpointConfig",
        "sagemaker:DeleteModel",
    ]
    assert plan[2][1] == {"EndpointName": "dogs", "EndpointConfigName": new}
    assert plan[3][1]["EndpointConfigName"] == new  # a rolled-back update is caught, not reported as done
    assert plan[4][1] == {"EndpointConfigName": "dogs-0ld0ld00"} and plan[5][1] == {"ModelName": "dogs-0ld0ld00"}
    # Old configuration not ours: updated, but the old pieces are left alone.
    foreign_cfg = deploy.EndpointNow("InService", "handmade", True, ("handmade",), False)
    assert [s.api for s in deploy.endpoint_plan(spec, "us-east-1", foreign_cfg)][-1] == "wait endpoint_in_service"
    # Already serving exactly this: nothing but the wait.
    same = deploy.EndpointNow("InService", new, True, (new,), True)
    assert [s.api for s in deploy.endpoint_plan(spec, "us-east-1", same)] == ["wait endpoint_in_service"]
    # A failed endpoint cannot be updated: it is replaced.
    failed = deploy.EndpointNow("Failed", new, True, (new,), True)
    assert [s.api for s in deploy.endpoint_plan(spec, "us-east-1", failed, wait=False)] == [
        "sagemaker:CreateModel",
        "sagemaker:CreateEndpointConfig",
        "sagemaker:DeleteEndpoint",
        "wait endpoint_deleted",
        "sagemaker:CreateEndpoint",
    ]


# --------------------------------------------------------------------------- Lambda


def test_lambda_role_function_concurrency_version_alias(aws, cli, code_dir):
    code, out, err = cli(
        "deploy",
        "lambda",
        "--endpoint",
        "Dog-Breeds",
        "--function-name",
        "dog-front",
        "--code-dir",
        code_dir,
        "--reserved-concurrency",
        "7",
        "--provisioned-concurrency",
        "2",
        "--alias",
        "live",
        "--memory",
        "256",
        "--timeout",
        "30",
    )
    assert code == 0, out + err
    # Moto has no provisioned concurrency: a clear warning, not a failure.
    assert "deployed WITHOUT provisioned concurrency" in out and "put-provisioned-concurrency-config" in out
    assert "endpoint Dog-Breeds does not exist" in out  # it was deployed before its endpoint

    iam = boto3.client("iam", region_name="us-east-1")
    role = iam.get_role(RoleName="dog-front-role")["Role"]
    assert role["AssumeRolePolicyDocument"]["Statement"] == [
        {
            "Sid": "LambdaAssumesThisRole",
            "Effect": "Allow",
            "Principal": {"Service": "lambda.amazonaws.com"},
            "Action": "sts:AssumeRole",
        }
    ]
    assert iam.list_role_policies(RoleName="dog-front-role")["PolicyNames"] == ["invoke-endpoint"]
    assert iam.list_attached_role_policies(RoleName="dog-front-role")["AttachedPolicies"] == []
    doc = iam.get_role_policy(RoleName="dog-front-role", PolicyName="invoke-endpoint")["PolicyDocument"]
    doc = json.loads(doc) if isinstance(doc, str) else doc
    grants = {}
    for s in doc["Statement"]:
        assert s["Effect"] == "Allow" and "NotAction" not in s and "NotResource" not in s
        for a in [s["Action"]] if isinstance(s["Action"], str) else s["Action"]:
            grants.setdefault(a, set()).update([s["Resource"]] if isinstance(s["Resource"], str) else s["Resource"])
    group = f"arn:aws:logs:us-east-1:{ACCOUNT}:log-group:/aws/lambda/dog-front"
    assert grants == {
        "sagemaker:InvokeEndpoint": {f"arn:aws:sagemaker:us-east-1:{ACCOUNT}:endpoint/dog-breeds"},  # lowercase
        "logs:CreateLogGroup": {group, f"{group}:*"},
        "logs:CreateLogStream": {f"{group}:*"},
        "logs:PutLogEvents": {f"{group}:*"},
    }

    lam = boto3.client("lambda", region_name="us-east-1")
    fn = lam.get_function(FunctionName="dog-front")
    c = fn["Configuration"]
    assert (c["Runtime"], c["Handler"], c["MemorySize"], c["Timeout"]) == (
        "python3.12",
        "handler.lambda_handler",
        256,
        30,
    )
    assert c["Role"] == role["Arn"]
    assert c["Environment"]["Variables"] == {"ENDPOINT_NAME": "Dog-Breeds"}
    assert c["CodeSha256"] == base64.b64encode(hashlib.sha256(deploy.build_lambda_zip(code_dir)).digest()).decode()
    assert fn["Concurrency"]["ReservedConcurrentExecutions"] == 7
    assert fn["Tags"]["ec2train:managed"] == "true"
    assert lam.get_alias(FunctionName="dog-front", Name="live")["FunctionVersion"] == "1"
    assert (
        boto3.client("logs", region_name="us-east-1").describe_log_groups(logGroupNamePrefix="/aws/lambda/dog-front")[
            "logGroups"
        ][0]["retentionInDays"]
        == 30
    )

    # Deploying again with a change updates in place and moves the alias to a new version.
    code, out, err = cli(
        "deploy",
        "lambda",
        "--endpoint",
        "Dog-Breeds",
        "--function-name",
        "dog-front",
        "--code-dir",
        code_dir,
        "--reserved-concurrency",
        "3",
        "--memory",
        "512",
        "--allow-http",
    )
    assert code == 0, out + err
    c = lam.get_function_configuration(FunctionName="dog-front")
    assert c["MemorySize"] == 512 and c["Environment"]["Variables"] == {
        "ENDPOINT_NAME": "Dog-Breeds",
        "ALLOW_HTTP": "true",
    }
    assert lam.get_function_concurrency(FunctionName="dog-front")["ReservedConcurrentExecutions"] == 3
    assert lam.get_alias(FunctionName="dog-front", Name="live")["FunctionVersion"] == "2"


def test_lambda_for_serverless_endpoint_caps_image_size(aws, cli, code_dir):
    cli("deploy", "endpoint", "--name", "dogs-sls", "--role", ROLE, "--model-data", MODEL_DATA, "--serverless")
    code, out, err = cli("deploy", "lambda", "--endpoint", "dogs-sls", "--code-dir", code_dir)
    assert code == 0, out + err
    env = boto3.client("lambda", region_name="us-east-1").get_function_configuration(FunctionName="ec2train-dogs-sls")[
        "Environment"
    ]["Variables"]
    assert env == {"ENDPOINT_NAME": "dogs-sls", "MAX_IMAGE_BYTES": str(deploy.SERVERLESS_MAX_IMAGE_BYTES)}


def test_create_function_waits_for_iam_propagation(aws, code_dir):
    """Real IAM is eventually consistent: CreateFunction is retried while the role cannot be assumed."""
    iam = boto3.client("iam", region_name="us-east-1")
    spec = deploy.LambdaSpec(endpoint="dogs", function_name="late-role")
    create = next(
        s
        for s in deploy.lambda_plan(spec, deploy.build_lambda_zip(code_dir), region="us-east-1", account=ACCOUNT)
        if s.operation == "create_function"
    )
    sleeps = []

    def sleep(seconds):  # the role "propagates" during the first back-off
        if not sleeps:
            iam.create_role(
                RoleName="late-role-role", AssumeRolePolicyDocument=json.dumps(deploy.lambda_trust_policy())
            )
        sleeps.append(seconds)

    runner = deploy.StepRunner("us-east-1", sleep=sleep, console=_quiet())
    runner.run([create])
    assert sleeps == [2]
    assert runner.sent == ["lambda:create_function", "lambda:create_function"]
    # Bounded: a role that never appears ends in a clear error after the last back-off.
    never = deploy.Step(
        "lambda",
        "create_function",
        {**create.params, "FunctionName": "never", "Role": f"arn:aws:iam::{ACCOUNT}:role/missing"},
        retry=deploy.Retry("InvalidParameterValueException", "cannot be assumed", delays=(1, 1)),
    )
    slept = []
    with pytest.raises(deploy.DeployError, match="cannot be assumed"):
        deploy.StepRunner("us-east-1", sleep=slept.append, console=_quiet()).run([never])
    assert slept == [1, 1]


def _quiet():
    from rich.console import Console

    return Console(file=io.StringIO())


# --------------------------------------------------------------------------- status and delete


def test_status_then_delete_removes_everything(aws, cli, code_dir):
    gpu_endpoint(cli)
    assert cli("deploy", "autoscale", "--name", "dog-breeds", "--max", "3")[0] == 0
    assert cli("deploy", "lambda", "--endpoint", "dog-breeds", "--code-dir", code_dir)[0] == 0
    code, out, err = cli("deploy", "status", "--name", "dog-breeds", "--json")
    assert code == 0, err
    st = json.loads(out)
    assert st["endpoint"]["status"] == "InService" and st["endpoint"]["created"]
    assert st["endpoint"]["variants"] == [
        {
            "name": "AllTraffic",
            "model": st["endpoint"]["config"],
            "instance_type": "ml.g4dn.xlarge",
            "current_instances": 1,
            "desired_instances": 1,
        }
    ]
    assert (st["autoscaling"]["min"], st["autoscaling"]["max"]) == (1, 3)
    assert st["autoscaling"]["policies"][0]["metric"] == "SageMakerVariantInvocationsPerInstance"
    assert st["lambda"]["name"] == "ec2train-dog-breeds" and st["lambda"]["aliases"] == {"live": "1"}
    assert st["lambda"]["reserved_concurrency"] == 10
    assert any("1 x ml.g4dn.xlarge billed every hour" in b for b in st["billing"])
    code, out, _ = cli("deploy", "status", "--name", "dog-breeds")
    assert code == 0 and "InService" in out and "ml.g4dn.xlarge: 1 running" in out and "live -> 1" in out
    assert "ec2train deploy delete --name dog-breeds" in out

    code, out, err = cli("deploy", "delete", "--name", "dog-breeds")
    assert code == 0, out + err
    r = "us-east-1"
    assert sm().list_endpoints()["Endpoints"] == []
    assert sm().list_endpoint_configs()["EndpointConfigs"] == []
    assert sm().list_models()["Models"] == []
    aas = boto3.client("application-autoscaling", region_name=r)
    assert aas.describe_scalable_targets(ServiceNamespace="sagemaker")["ScalableTargets"] == []
    assert aas.describe_scaling_policies(ServiceNamespace="sagemaker")["ScalingPolicies"] == []
    assert boto3.client("lambda", region_name=r).list_functions()["Functions"] == []
    assert boto3.client("iam", region_name=r).list_roles()["Roles"] == []
    assert boto3.client("logs", region_name=r).describe_log_groups()["logGroups"] == []
    # Idempotent: nothing left is fine.
    code, out, err = cli("deploy", "delete", "--name", "dog-breeds")
    assert code == 0, out + err
    code, out, _ = cli("deploy", "status", "--name", "dog-breeds")
    assert code == 0 and "not found" in out


def test_delete_leaves_what_ec2train_did_not_create(aws, cli, code_dir):
    # Someone else's endpoint, model and config, and a function that merely shares the default name.
    s = sm()
    s.create_model(
        ModelName="theirs", ExecutionRoleArn=ROLE, PrimaryContainer={"Image": "img", "ModelDataUrl": MODEL_DATA}
    )
    s.create_endpoint_config(
        EndpointConfigName="theirs",
        ProductionVariants=[
            {
                "VariantName": "AllTraffic",
                "ModelName": "theirs",
                "InstanceType": "ml.m5.large",
                "InitialInstanceCount": 1,
            }
        ],
    )
    s.create_endpoint(EndpointName="theirs", EndpointConfigName="theirs")
    iam = boto3.client("iam", region_name="us-east-1")
    arn = iam.create_role(RoleName="r", AssumeRolePolicyDocument=json.dumps(deploy.lambda_trust_policy()))["Role"][
        "Arn"
    ]
    lam = boto3.client("lambda", region_name="us-east-1")
    lam.create_function(
        FunctionName="ec2train-theirs",
        Runtime="python3.12",
        Role=arn,
        Handler="handler.lambda_handler",
        Code={"ZipFile": deploy.build_lambda_zip(code_dir)},
    )
    code, out, err = cli("deploy", "delete", "--name", "theirs")
    assert code == 2 and "not created by ec2train" in err and "--force" in err
    assert len(s.list_endpoints()["Endpoints"]) == 1
    # And ec2train will not take over their endpoint either.
    code, _, err = cli(
        "deploy",
        "endpoint",
        "--name",
        "theirs",
        "--role",
        ROLE,
        "--model-data",
        MODEL_DATA,
        "--instance-type",
        "ml.m5.large",
    )
    assert code == 2 and "was not created by ec2train" in err
    code, out, err = cli("deploy", "delete", "--name", "theirs", "--force")
    assert code == 0, out + err
    assert "ec2train-theirs was not deployed by ec2train" in out
    assert s.list_endpoints()["Endpoints"] == [] and s.list_models()["Models"] == []
    assert [f["FunctionName"] for f in lam.list_functions()["Functions"]] == ["ec2train-theirs"]


# --------------------------------------------------------------------------- dry run and bad input


def test_dry_run_sends_nothing(monkeypatch, cli, code_dir):
    # Nothing listens here: any request would fail (and exit 2) instead of printing.
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")
    code, out, err = cli(
        "deploy",
        "endpoint",
        "--name",
        "dog-breeds",
        "--role",
        ROLE,
        "--model-data",
        MODEL_DATA,
        "--instance-type",
        "ml.g4dn.xlarge",
        "--dry-run",
    )
    assert code == 0, out + err
    steps = parse_dry_run(out)
    assert [a for a, _ in steps] == [
        "sagemaker:CreateModel",
        "sagemaker:CreateEndpointConfig",
        "sagemaker:CreateEndpoint",
        "wait endpoint_in_service",
    ]
    model, config = deploy.endpoint_requests(
        deploy.EndpointSpec("dog-breeds", ROLE, MODEL_DATA, "ml.g4dn.xlarge"), "us-east-1"
    )
    assert steps[0][1] == model and steps[1][1] == config  # exactly what a real run sends
    assert "sagemaker:UpdateEndpoint" in out  # the branch taken when it already exists

    code, out, err = cli(
        "deploy",
        "lambda",
        "--endpoint",
        "Dog-Breeds",
        "--code-dir",
        code_dir,
        "--account-id",
        ACCOUNT,
        "--provisioned-concurrency",
        "2",
        "--dry-run",
    )
    assert code == 0, out + err
    steps = dict(parse_dry_run(out))
    assert steps["iam:PutRolePolicy"]["PolicyDocument"] == deploy.lambda_invoke_policy(
        "aws", "us-east-1", ACCOUNT, "Dog-Breeds", "ec2train-Dog-Breeds"
    )
    assert steps["iam:CreateRole"]["AssumeRolePolicyDocument"] == deploy.lambda_trust_policy()
    assert steps["lambda:CreateFunction"]["Runtime"] == "python3.12"
    assert "lambda:PutProvisionedConcurrencyConfig" in steps and "lambda:CreateAlias" in steps

    for args in (
        ["autoscale", "--name", "dog-breeds"],
        ["status", "--name", "dog-breeds"],
        ["delete", "--name", "dog-breeds"],
    ):
        code, out, err = cli("deploy", *args, "--dry-run")
        assert code == 0, out + err
        assert "nothing below is sent" in out and parse_dry_run(out)
    assert "application-autoscaling:DeregisterScalableTarget" in out and "sagemaker:DeleteEndpoint" in out


def test_dry_run_leaves_moto_empty(aws, cli, code_dir):
    assert (
        cli(
            "deploy", "endpoint", "--name", "d", "--role", ROLE, "--model-data", MODEL_DATA, "--serverless", "--dry-run"
        )[0]
        == 0
    )
    code, out, _ = cli("deploy", "lambda", "--endpoint", "d", "--dry-run")  # the repository's lambda/
    assert code == 0 and "lambda:CreateFunction" in out and "<ACCOUNT_ID>" in out
    assert sm().list_models()["Models"] == [] and sm().list_endpoints()["Endpoints"] == []
    assert boto3.client("lambda", region_name="us-east-1").list_functions()["Functions"] == []
    assert boto3.client("iam", region_name="us-east-1").list_roles()["Roles"] == []


@pytest.mark.parametrize(
    "args, message",
    [
        (
            [
                "endpoint",
                "--name",
                "dog_breeds",
                "--role",
                ROLE,
                "--model-data",
                MODEL_DATA,
                "--instance-type",
                "ml.m5.large",
            ],
            "not a valid SageMaker name",
        ),
        (
            [
                "endpoint",
                "--name",
                "d",
                "--role",
                "admin",
                "--model-data",
                MODEL_DATA,
                "--instance-type",
                "ml.m5.large",
            ],
            "not an IAM role ARN",
        ),
        (
            [
                "endpoint",
                "--name",
                "d",
                "--role",
                ROLE,
                "--model-data",
                "model.tar.gz",
                "--instance-type",
                "ml.m5.large",
            ],
            "s3://bucket/key.tar.gz",
        ),
        (["endpoint", "--name", "d", "--role", ROLE, "--model-data", MODEL_DATA], "exactly one of --instance-type"),
        (
            ["endpoint", "--name", "d", "--role", ROLE, "--model-data", MODEL_DATA, "--serverless", "--memory", "1500"],
            "--memory must be one of",
        ),
        (
            [
                "endpoint",
                "--name",
                "d",
                "--role",
                ROLE,
                "--model-data",
                MODEL_DATA,
                "--instance-type",
                "ml.m5.large",
                "--region",
                "xx-nowhere-1",
            ],
            "pass --image-uri",
        ),
        (["lambda", "--endpoint", "d", "--function-name", "bad.name"], "Lambda function name"),
        (["lambda", "--endpoint", "d", "--alias", "123"], "not a valid Lambda alias"),
        (
            ["lambda", "--endpoint", "d", "--reserved-concurrency", "2", "--provisioned-concurrency", "5"],
            "exceeds --reserved-concurrency",
        ),
        (["lambda", "--endpoint", "d", "--code-dir", "/nonexistent/lambda"], "--code-dir"),
        (["delete", "--name", "-bad"], "not a valid SageMaker name"),
    ],
)
def test_bad_input_is_one_line_exit_2(monkeypatch, cli, args, message):
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")  # must fail before any request
    code, out, err = cli("deploy", *args, "--dry-run")
    assert code == 2
    assert message in err and err.startswith("error:") and len(err.strip().splitlines()) == 1, err


def test_bad_name_from_a_real_process():
    proc = subprocess.run(
        [sys.executable, "-m", "ec2train", "deploy", "status", "--name", "dogs_and_cats"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "error: --name 'dogs_and_cats' is not a valid SageMaker name: use 1-63 letters, "
        "digits and hyphens, starting and ending with a letter or digit"
    ]
    assert "Traceback" not in proc.stderr
