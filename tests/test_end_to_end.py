"""The whole path on loopback: a trained model file -> `ec2train serve` (a real subprocess) ->
boto3 sagemaker-runtime inside the Lambda handler -> a breed name out; and the deploy/export
paths that package and upload that same model file to S3 (moto)."""

from __future__ import annotations

import base64
import functools
import http.server
import json
import threading

import pytest

from tests.support.cli import run_cli
from tests.support.lambda_env import FUNCTION_ENV, load_lambda
from tests.support.serving import start_cli_server

_, handler = load_lambda()


@pytest.fixture(scope="module")
def served(trained_model):
    """`python -m ec2train serve` on a free loopback port, until the module's tests end."""
    proc, url = start_cli_server(trained_model, "--threads", "1")
    yield url
    proc.terminate()
    proc.wait(20)


@pytest.fixture(scope="module")
def image_site(demo_data):
    """A plain HTTP server publishing the demo test images (the 'internet' the Lambda fetches from)."""
    handler_cls = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(demo_data / "test"))
    handler_cls.log_message = lambda *a: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler_cls)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server.server_address[1]
    server.shutdown()


@pytest.fixture
def lambda_env(monkeypatch, served, image_site):
    for name in FUNCTION_ENV:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("ENDPOINT_NAME", "dog-breeds")
    monkeypatch.setenv("AWS_ENDPOINT_URL_SAGEMAKER_RUNTIME", served)
    monkeypatch.setenv("ALLOW_HTTP", "true")
    monkeypatch.setenv("ALLOWED_PORTS", str(image_site))
    monkeypatch.setenv("SSRF_ALLOW_LOOPBACK_FOR_TESTS", "1")
    handler.reset_client()
    yield image_site
    handler.reset_client()


def call(event: dict) -> tuple[int, dict]:
    answer = handler.lambda_handler(event, None)
    assert answer["headers"]["Content-Type"] == "application/json"
    return answer["statusCode"], json.loads(answer["body"])


def test_lambda_to_served_model_names_the_breed(lambda_env, demo_data):
    port = lambda_env
    right = total = 0
    for folder in sorted((demo_data / "test").iterdir()):
        expected = folder.name.split(".", 1)[1]
        for image in sorted(folder.glob("*.jpg"))[:4]:
            status, body = call({"url": f"http://127.0.0.1:{port}/{folder.name}/{image.name}", "top_k": 3})
            assert status == 200, body
            assert len(body["top_k"]) == 3 and body["breed"] == body["top_k"][0]["label"]
            assert 0 < body["probability"] <= 1
            right += body["breed"] == expected
            total += 1
    assert right / total >= 0.75, f"{right}/{total} right"


def test_lambda_base64_and_api_gateway_events_through_the_server(lambda_env, demo_data):
    image = sorted((demo_data / "test" / "003.Triangle").glob("*.jpg"))[0].read_bytes()
    status, body = call({"image": base64.b64encode(image).decode()})
    assert status == 200 and body["breed"] in {"Circle", "Square", "Triangle", "Cross"}
    event = {
        "version": "2.0",
        "headers": {"content-type": "application/json"},
        "isBase64Encoded": False,
        "requestContext": {"http": {"method": "POST"}, "requestId": "r-1"},
        "body": json.dumps({"image": base64.b64encode(image).decode(), "top_k": 2}),
    }
    status, body2 = call(event)
    assert status == 200 and len(body2["top_k"]) == 2 and body2["breed"] == body["breed"]


def test_lambda_reports_a_broken_image_as_a_client_error(lambda_env):
    status, body = call({"image": base64.b64encode(b"\x89PNG\r\n\x1a\n" + b"\0" * 64).decode()})
    assert status == 400 and "error" in body and "Traceback" not in json.dumps(body), body


def test_export_package_and_deploy_from_a_model_file(aws, trained_model, tmp_path):
    """`export --package --s3-uri` uploads the tarball; `deploy endpoint --model --s3-uri`
    packages, uploads and points the SageMaker model at it."""
    import boto3

    s3 = boto3.client("s3")
    s3.create_bucket(Bucket="models")
    res = run_cli(
        "export",
        "--model",
        trained_model,
        "--package",
        tmp_path / "model.tar.gz",
        "--s3-uri",
        "s3://models/dogs",
        env={**__import__("os").environ, "AWS_ENDPOINT_URL": aws},
    )
    assert res.returncode == 0, res.stderr
    head = s3.head_object(Bucket="models", Key="dogs/model.tar.gz")
    assert head["ServerSideEncryption"] == "AES256"
    assert head["ContentLength"] == (tmp_path / "model.tar.gz").stat().st_size

    from typer.testing import CliRunner

    from ec2train.cli import app

    run = CliRunner().invoke(
        app,
        [
            "deploy",
            "endpoint",
            "--name",
            "dog-breeds",
            "--role",
            "arn:aws:iam::123456789012:role/sm",
            "--model",
            str(trained_model),
            "--s3-uri",
            "s3://models/run1",
            "--instance-type",
            "ml.m5.large",
            "--no-wait",
        ],
    )
    assert run.exit_code == 0, run.output
    sm = boto3.client("sagemaker")
    (model,) = sm.list_models()["Models"]
    data_url = sm.describe_model(ModelName=model["ModelName"])["PrimaryContainer"]["ModelDataUrl"]
    assert data_url.startswith("s3://models/run1/") and data_url.endswith(".tar.gz")
    key = data_url[len("s3://models/") :]
    assert s3.head_object(Bucket="models", Key=key)["ServerSideEncryption"] == "AES256"
