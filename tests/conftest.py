"""Fixtures (generated data, a tiny trained model, a real moto server on loopback) and the test
session's environment. Shared code that is not a fixture lives in tests/support/."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from tests.support.aws import reset_moto, start_moto_server
from tests.support.paths import ROOT
from tests.support.training import TINY_FIT

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


@pytest.fixture(scope="session")
def moto_server():
    """A real moto HTTP server on 127.0.0.1; yields its URL. Tests take `aws`, which resets it."""
    server, url = start_moto_server()
    yield url
    server.stop()


@pytest.fixture
def aws(moto_server, monkeypatch):
    """Point boto3 and the AWS CLI at a freshly reset moto server; yields its URL."""
    reset_moto(moto_server)
    monkeypatch.setenv("AWS_ENDPOINT_URL", moto_server)
    return moto_server


@pytest.fixture(scope="module")
def one_torch_thread():
    """One intra-op thread for a module (`pytestmark = pytest.mark.usefixtures(...)`). Two cores
    are shared by several test runs, so one thread is faster and keeps every run (and the
    reference) on one reduction order."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


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


@pytest.fixture(scope="session")
def wheel(tmp_path_factory):
    """One wheel of this checkout per session (building takes seconds)."""
    from ec2train.job import dist

    return dist.build_wheel(dest=tmp_path_factory.mktemp("wheel"))
