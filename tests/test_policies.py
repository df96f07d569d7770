"""IAM policy templates: least privilege, checked by a linter and by exact assertions."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

from ec2train import policies
from ec2train.config import read_toml
from ec2train.policies import PolicyTemplateError, render_policy
from tests.support.iam import lint
from tests.support.paths import ROOT

VARS = dict(
    Partition="aws",
    Region="us-east-1",
    AccountId="123456789012",
    EndpointName="Dog-Breeds-Prod",
    FunctionName="dog-breeds-front",
    Bucket="my-bucket",
    Prefix="runs/dog",
)
ENDPOINT_ARN = "arn:aws:sagemaker:us-east-1:123456789012:endpoint/dog-breeds-prod"
LOG_GROUP_ARN = "arn:aws:logs:us-east-1:123456789012:log-group:/aws/lambda/dog-breeds-front"
VARIANTS = [
    VARS,
    {**VARS, "Partition": "aws-cn", "Region": "cn-north-1", "EndpointName": "a"},
    {**VARS, "Partition": "aws-us-gov", "Region": "us-gov-west-1", "EndpointName": "x" * 63, "FunctionName": "F" * 64},
]


def statements(document: dict) -> list[dict]:
    found = document["Statement"]
    return found if isinstance(found, list) else [found]


def as_list(value) -> list[str]:
    return value if isinstance(value, list) else [value]


# --------------------------------------------------------------------------- the linter


PERMISSION_POLICIES = [n for n in policies.template_names() if not n.endswith("-trust")]
TRUST_POLICIES = [n for n in policies.template_names() if n.endswith("-trust")]


@pytest.mark.parametrize("name", PERMISSION_POLICIES)
@pytest.mark.parametrize("variables", VARIANTS, ids=["aws", "aws-cn", "aws-us-gov"])
def test_every_rendered_permission_policy_lints_clean(name, variables):
    findings = lint(render_policy(name, **variables))
    assert findings == [], [f"{f.issue}: {f.detail}" for f in findings]


@pytest.mark.fast
@pytest.mark.parametrize("name", TRUST_POLICIES)
def test_trust_policies_lint_clean_but_for_the_resource_they_must_not_have(name):
    # parliament lints identity policies; a trust policy has a Principal and, by IAM's rules,
    # no Resource. parliament checks only the Principal's shape, then reports that one
    # structural finding; test_only_lambda_may_assume_the_role pins the exact content.
    findings = lint(render_policy(name, **VARS))
    assert [(f.issue, f.detail) for f in findings] == [
        ("MALFORMED", "Statement contains neither Resource nor NotResource")
    ]


def test_the_linter_is_really_checking():
    # What the old workflow's role effectively had: any SageMaker action on anything.
    broad = {
        "Version": "2012-10-17",
        "Statement": [
            {"Effect": "Allow", "Action": "sagemaker:*", "Resource": "*"},
            {"Effect": "Allow", "Action": "sagemaker:InvokeEndpoint", "Resource": "arn:aws:s3:::bucket/key"},
        ],
    }
    issues = {f.issue for f in lint(broad)}
    assert {"RESOURCE_STAR", "RESOURCE_MISMATCH"} <= issues


# --------------------------------------------------------------------------- exact rights


@pytest.mark.fast
def test_the_function_gets_exactly_one_endpoint_and_its_own_logs():
    doc = render_policy("lambda-invoke-endpoint", **VARS)
    assert doc["Version"] == "2012-10-17"
    grants: dict[str, set[str]] = {}
    for st in statements(doc):
        assert st["Effect"] == "Allow"
        assert set(st) <= {"Sid", "Effect", "Action", "Resource"}  # no NotAction/NotResource/Principal
        for action in as_list(st["Action"]):
            grants.setdefault(action, set()).update(as_list(st["Resource"]))
    assert grants == {
        "sagemaker:InvokeEndpoint": {ENDPOINT_ARN},
        "logs:CreateLogGroup": {LOG_GROUP_ARN, LOG_GROUP_ARN + ":*"},
        "logs:CreateLogStream": {LOG_GROUP_ARN + ":*"},
        "logs:PutLogEvents": {LOG_GROUP_ARN + ":*"},
    }
    everything = [r for rs in grants.values() for r in rs]
    assert all("*" not in a for a in grants), "no wildcard action"
    assert all(r != "*" and "*" not in r.removesuffix(":*") for r in everything), "no wildcard resource"


@pytest.mark.fast
def test_the_endpoint_arn_is_lowercase_because_iam_matches_it_so():
    doc = render_policy("lambda-invoke-endpoint", **{**VARS, "EndpointName": "DogBreeds-V2"})
    [sagemaker] = [st for st in statements(doc) if as_list(st["Action"]) == ["sagemaker:InvokeEndpoint"]]
    assert sagemaker["Resource"] == "arn:aws:sagemaker:us-east-1:123456789012:endpoint/dogbreeds-v2"


@pytest.mark.fast
def test_the_instance_role_reaches_its_prefix_and_no_sibling():
    """Issue 13.9: `runs/dog` must not also list or read `runs/dog-secret/`; nothing deletes."""
    from fnmatch import fnmatchcase

    doc = render_policy("ec2-s3-access", **VARS)
    listing, objects = statements(doc)
    assert listing["Action"] == "s3:ListBucket" and listing["Resource"] == "arn:aws:s3:::my-bucket"
    assert listing["Condition"] == {"StringLike": {"s3:prefix": ["runs/dog/", "runs/dog/*"]}}
    allowed = listing["Condition"]["StringLike"]["s3:prefix"]
    # IAM's StringLike is a glob on the whole value, like fnmatchcase.
    for prefix in ("runs/dog/", "runs/dog/last.pt", "runs/dog/runs/x"):
        assert any(fnmatchcase(prefix, p) for p in allowed), prefix
    for prefix in ("runs/dog", "runs/dog-secret/", "runs/dog-secret/last.pt", "runs/do", ""):
        assert not any(fnmatchcase(prefix, p) for p in allowed), prefix
    assert set(objects["Action"]) == {"s3:GetObject", "s3:PutObject", "s3:AbortMultipartUpload"}
    assert objects["Resource"] == "arn:aws:s3:::my-bucket/runs/dog/*"


@pytest.mark.fast
@pytest.mark.parametrize(
    "var,value",
    [
        ("Prefix", "runs/*"),
        ("Prefix", "runs//dog"),
        ("Prefix", "/runs"),
        ("Prefix", "runs/"),
        ("Prefix", 'a"b'),
        ("Prefix", ""),
        ("Bucket", "My_Bucket"),
        ("Bucket", "b*"),
    ],
)
def test_bucket_and_prefix_cannot_widen_the_policy(var, value):
    with pytest.raises(PolicyTemplateError, match=var):
        render_policy("ec2-s3-access", **{**VARS, var: value})


@pytest.mark.fast
def test_only_ec2_may_assume_the_instance_role():
    [st] = statements(render_policy("ec2-trust", **VARS))
    assert st["Principal"] == {"Service": "ec2.amazonaws.com"} and st["Action"] == "sts:AssumeRole"


@pytest.mark.fast
def test_only_lambda_may_assume_the_role():
    doc = render_policy("lambda-trust", **VARS)
    [st] = statements(doc)
    assert st == {
        "Sid": "LambdaAssumesThisRole",
        "Effect": "Allow",
        "Principal": {"Service": "lambda.amazonaws.com"},
        "Action": "sts:AssumeRole",
    }


# --------------------------------------------------------------------------- rendering rules


@pytest.mark.fast
def test_missing_variables_are_named():
    with pytest.raises(PolicyTemplateError, match="needs AccountId, FunctionName"):
        render_policy("lambda-invoke-endpoint", Partition="aws", Region="us-east-1", EndpointName="dogs")


@pytest.mark.fast
@pytest.mark.parametrize(
    "var,value",
    [
        ("EndpointName", "-dogs"),
        ("EndpointName", "dogs-"),
        ("EndpointName", "dog_breeds"),
        ("EndpointName", "x" * 64),
        ("EndpointName", "dog breeds"),
        ("EndpointName", "dogs/*"),
        ("EndpointName", "*"),
        ("EndpointName", ""),
        ("EndpointName", 'a","Resource":"*'),
        ("AccountId", "12345678901"),
        ("AccountId", "*"),
        ("Region", "us-east-1*"),
        ("Region", "*"),
        ("Partition", "gcp"),
        ("FunctionName", "fn:alias"),
        ("FunctionName", "f" * 65),
        ("FunctionName", "*"),
        ("EndpointName", None),
    ],
)
def test_bad_values_are_refused(var, value):
    with pytest.raises(PolicyTemplateError, match=var):
        render_policy("lambda-invoke-endpoint", **{**VARS, var: value})


@pytest.mark.fast
def test_endpoint_names_follow_sagemakers_rule():
    """Every name SageMaker accepts renders, as the one endpoint's ARN, lowercased (IAM compares
    endpoint ARNs in lowercase: a mixed-case Resource would never match)."""
    for name in ["a", "dogs", "Dog-Breeds-2", "a--b", "x" * 63]:
        invoke = render_policy("lambda-invoke-endpoint", **{**VARS, "EndpointName": name})["Statement"][0]
        assert invoke["Action"] == "sagemaker:InvokeEndpoint"
        assert invoke["Resource"] == f"arn:aws:sagemaker:us-east-1:123456789012:endpoint/{name.lower()}"


@pytest.mark.fast
def test_unknown_templates_are_refused():
    with pytest.raises(PolicyTemplateError, match="no policy template named"):
        render_policy("../../etc/passwd")


@pytest.mark.fast
def test_templates_use_only_known_placeholders_and_leave_none_behind():
    for name in policies.template_names():
        assert policies.placeholders(name) <= set(policies._RULES)
        assert "${" not in json.dumps(render_policy(name, **VARS))


# --------------------------------------------------------------------------- one source of truth


@pytest.mark.fast
def test_infra_policies_are_links_to_the_packaged_templates():
    packaged = {p.name for p in (ROOT / "ec2train" / "_policies").glob("*.json")}
    linked = {p.name for p in (ROOT / "infra" / "policies").glob("*.json")}
    assert packaged == linked == {f"{n}.json" for n in policies.template_names()}
    for name in linked:
        link = ROOT / "infra" / "policies" / name
        assert link.is_symlink(), f"{link} must be a symlink, not a second copy"
        assert link.resolve() == (ROOT / "ec2train" / "_policies" / name).resolve()


# --------------------------------------------------------------------------- what the sdist and the wheel ship


def _pip(*args: str) -> None:
    # No index is needed: no build isolation, no dependencies.
    subprocess.run(
        [sys.executable, "-m", "pip", *args],
        check=True,
        capture_output=True,
        env={**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"},
    )


@pytest.fixture(scope="module")
def sdist(tmp_path_factory) -> Path:
    """The sdist, built (as `python -m build` does) from a copy, so the checkout gets no egg-info litter."""
    tmp = tmp_path_factory.mktemp("sdist")
    src = tmp / "src"
    src.mkdir()
    for item in ("pyproject.toml", "README.md", "LICENSE", "MANIFEST.in"):
        shutil.copy(ROOT / item, src / item)
    for folder in ("ec2train", "tests"):  # tests/ too: the sdist must leave it out
        shutil.copytree(ROOT / folder, src / folder, ignore=shutil.ignore_patterns("__pycache__"))
    code = "import sys; from setuptools import build_meta; print(build_meta.build_sdist(sys.argv[1]))"
    name = (
        subprocess.run([sys.executable, "-c", code, str(tmp)], cwd=src, check=True, capture_output=True, text=True)
        .stdout.strip()
        .splitlines()[-1]
    )
    return tmp / name


@pytest.fixture(scope="module")
def wheel(sdist, tmp_path_factory) -> Path:
    """The wheel pip builds from that sdist: what `pip install ec2train` gets either way."""
    tmp = tmp_path_factory.mktemp("wheel")
    with tarfile.open(sdist) as tar:
        tar.extractall(tmp / "unpacked", filter="data")
    [src] = (tmp / "unpacked").iterdir()
    _pip("wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(tmp), str(src))
    [built] = tmp.glob("*.whl")
    return built


@pytest.mark.fast
def test_package_data_names_only_files_that_exist():
    patterns = read_toml(ROOT / "pyproject.toml", "pyproject.toml")["tool"]["setuptools"]["package-data"]["ec2train"]
    for pattern in patterns:
        assert list((ROOT / "ec2train").glob(pattern)), f"package-data {pattern!r} matches no file"


def test_the_sdist_has_the_package_and_no_tests_it_cannot_run(sdist):
    with tarfile.open(sdist) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
    assert not any(n.startswith("tests") for n in names), sorted(n for n in names if n.startswith("tests"))
    for shipped in (
        "ec2train/py.typed",
        "ec2train/_lambda/handler.py",
        "ec2train/_lambda/safe_fetch.py",
        "ec2train/_serve/inference.py",
        "ec2train/deploy/plan.py",
    ):
        assert shipped in names


def test_the_wheel_ships_the_templates(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    for template in policies.template_names():
        assert f"ec2train/_policies/{template}.json" in names
    assert "ec2train/py.typed" in names


def test_deploy_lambda_works_from_an_installed_wheel(wheel, tmp_path):
    """The old layout kept the function in the repository's lambda/ only: from a pip install,
    `ec2train deploy lambda` found no code. Installed alone, the package zips its own copy,
    byte for byte the zip a checkout makes."""
    site = tmp_path / "site"
    _pip("install", "-q", "--no-deps", "--target", str(site), str(wheel))
    probe = (
        "import base64, hashlib, sys, ec2train; from ec2train import deploy; "
        "assert ec2train.__file__.startswith(sys.argv[1]), ec2train.__file__; "
        "sys.stdout.buffer.write(deploy.build_lambda_zip(deploy.default_code_dir()))"
    )
    # Only the installed copy on the path: not the checkout (cwd, PYTHONPATH), not the editable install.
    env = {**os.environ, "PYTHONPATH": str(site), "AWS_ENDPOINT_URL": "http://127.0.0.1:9"}
    got = subprocess.run([sys.executable, "-c", probe, str(site)], cwd=tmp_path, env=env, capture_output=True)
    assert got.returncode == 0, got.stderr.decode()
    zipped = got.stdout
    with zipfile.ZipFile(io.BytesIO(zipped)) as zf:
        assert {"handler.py", "safe_fetch.py"} <= set(zf.namelist())
        assert "def lambda_handler" in zf.read("handler.py").decode()
    from ec2train import deploy

    assert zipped == deploy.build_lambda_zip(ROOT / "lambda"), "the wheel's Lambda differs from the repository's"
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "ec2train",
            "deploy",
            "lambda",
            "--endpoint",
            "dogs",
            "--dry-run",
            "--account-id",
            "123456789012",
            "--region",
            "us-east-1",
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr
    digest = base64.b64encode(hashlib.sha256(zipped).digest()).decode()
    assert f"<zip archive: {len(zipped)} bytes, CodeSha256 {digest}>" in out.stdout


@pytest.mark.fast
def test_lambda_folder_is_a_link_to_the_packaged_source():
    link = ROOT / "lambda"
    assert link.is_symlink(), "lambda/ must link to ec2train/_lambda, not hold a second copy"
    assert link.resolve() == (ROOT / "ec2train" / "_lambda").resolve()
    assert (link / "README.md").is_file()
