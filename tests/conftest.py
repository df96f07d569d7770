"""Shared fixtures: generated data, a tiny trained model, a real moto server on loopback."""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Subprocesses (torchrun, `python -m ec2train`) must import this checkout, not another install.
os.environ["PYTHONPATH"] = os.pathsep.join(
    [str(ROOT)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
)
# Never reach a real AWS account or the real metadata service from the tests.
os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
os.environ.pop("AWS_PROFILE", None)
os.environ["AWS_EC2_METADATA_DISABLED"] = "true"
os.environ.setdefault("OMP_NUM_THREADS", "2")

PYTHON = sys.executable


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def moto_server():
    """A real moto HTTP server on 127.0.0.1; yields its URL. Reset it with `moto_reset`."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()


@pytest.fixture
def aws(moto_server, monkeypatch):
    """Point boto3 and the AWS CLI at a freshly reset moto server; yields its URL."""
    import urllib.request

    urllib.request.urlopen(
        urllib.request.Request(f"{moto_server}/moto-api/reset", method="POST"), timeout=10
    ).read()
    monkeypatch.setenv("AWS_ENDPOINT_URL", moto_server)
    return moto_server


# Small and learnable: 4 classes, 48 training images each, 40 px JPEGs.
TINY_FIT = dict(arch="resnet18", weights="none", image_size=32, batch_size=16, lr=3e-3, workers=0, epochs=4)


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory) -> Path:
    from ec2train.data import make_demo_dataset

    return make_demo_dataset(tmp_path_factory.mktemp("data") / "demo", classes=4, per_class=48, size=40)


@pytest.fixture(scope="session")
def trained_model(demo_data, tmp_path_factory) -> Path:
    """A model file from a real (tiny) training run on demo_data; returns model.pth's path."""
    from ec2train.config import resolve
    from ec2train.loop import fit

    out = tmp_path_factory.mktemp("trained")
    result = fit(resolve(data=str(demo_data), output=str(out / "model"), logdir=str(out / "runs"), **TINY_FIT))
    assert result.metrics["valid_acc1"] >= 0.8, result.metrics
    return result.model_path
