"""Fixtures (generated data, a tiny trained model, a real moto server on loopback) and the test
session's environment. Shared code that is not a fixture lives in tests/support/."""

from __future__ import annotations

import os
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from filelock import FileLock

from tests.support.aws import ImdsServer, reset_moto, start_moto_server
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
if os.environ.get("PYTEST_XDIST_WORKER"):
    # Several workers (and their subprocesses) share the cores: one intra-op thread each, or
    # the threads of busy processes spin against each other (a fit ran at 1 img/s instead of ~30).
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
else:
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


@pytest.fixture
def imds(monkeypatch):
    """start(notice_when=..., **slow) -> a real IMDSv2 server on 127.0.0.1 (tests.support.aws.ImdsServer);
    the SDKs' metadata lookups, which the session switches off, are back on for the test."""
    monkeypatch.delenv("AWS_EC2_METADATA_DISABLED", raising=False)
    servers = []

    def start(notice_when=lambda: False, **slow):
        servers.append(ImdsServer(notice_when, **slow))
        return servers[-1]

    yield start
    for s in servers:
        s.close()


@pytest.fixture
def tiny_disk(tmp_path):
    """A real 1 MiB tmpfs (needs root and a kernel that lets us mount); skipped where it cannot
    be mounted, so each test that takes it has a companion that raises ENOSPC by hand."""
    mnt = tmp_path / "tiny"
    mnt.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], capture_output=True)
    if done.returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=True)  # lazy: a failed torch.save may hold its fd a while


@pytest.fixture(scope="module")
def one_torch_thread():
    """One intra-op thread for a module (`pytestmark = pytest.mark.usefixtures(...)`). Two cores
    are shared by several test runs, so one thread is faster and keeps every run (and the
    reference) on one reduction order."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def once_per_run(tmp_path_factory, name: str, build: Callable[[Path], Path]) -> Path:
    """build(an empty folder) -> a path, once per test run. Under pytest-xdist every worker is a
    session of its own: the first worker to ask builds in the run's shared temp folder (under a
    lock) and the others reuse its result, instead of each spending the CPU again. What is built
    this way is read-only to the tests."""
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        return build(tmp_path_factory.mktemp(name))
    root = tmp_path_factory.getbasetemp().parent  # shared by the run's workers
    done = root / f"{name}.path"
    with FileLock(root / f"{name}.lock"):
        if not done.exists():  # a failed build leaves none: the next worker tries (and fails) again
            done.write_text(str(build(Path(tempfile.mkdtemp(prefix=f"{name}-", dir=root)))))
        return Path(done.read_text())


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory) -> Path:
    from ec2train.data import make_demo_dataset

    return once_per_run(
        tmp_path_factory, "data", lambda d: make_demo_dataset(d / "demo", classes=4, per_class=48, size=40)
    )


def _train_tiny(data: Path, out: Path) -> Path:
    from ec2train.config import resolve
    from ec2train.loop import fit

    result = fit(resolve(data=str(data), output=str(out / "model"), logdir=str(out / "runs"), **TINY_FIT))
    assert result.metrics["valid_acc1"] >= 0.8, result.metrics
    return result.model_path


@pytest.fixture(scope="session")
def trained_model(demo_data, tmp_path_factory) -> Path:
    """A model file from a real (tiny) training run on demo_data; returns model.pth's path."""
    return once_per_run(tmp_path_factory, "trained", lambda out: _train_tiny(demo_data, out))


@pytest.fixture(scope="session")
def wheel(tmp_path_factory):
    """One wheel of this checkout per run (building takes seconds)."""
    from ec2train.job import dist

    return once_per_run(tmp_path_factory, "wheel", lambda dest: dist.build_wheel(dest=dest))


# The longest files (pytest --durations), started first: under pytest-xdist (`make test`,
# --dist loadfile) a long file that starts last runs alone at the end while the other workers idle.
SLOW_FIRST = (
    "test_job_multinode.py",
    "test_job_runner.py",
    "test_infra.py",
    "test_spot.py",
    "test_threads.py",
    "test_tune.py",
    "test_ddp.py",
    "test_serve.py",
    "test_serve_limits.py",
    "test_ctrl_c.py",
    "test_s3.py",
    "test_gpu_loader.py",
    "test_job_parts.py",
)


# What a `fast` test may ask for (besides its parameters): nothing that trains, serves or starts a
# server. `pytest -m fast` (the inner loop, under a minute) stays fast as tests are added.
FAST_FIXTURES = {"tmp_path", "tmp_path_factory", "monkeypatch", "capsys", "capfd", "caplog", "recwarn", "request"}
FAST_FIXTURES |= {"one_thread", "one_torch_thread"}


def pytest_collection_modifyitems(items):
    for item in items:
        if item.get_closest_marker("fast"):
            params = set(getattr(getattr(item, "callspec", None), "params", {}))
            heavy = set(item.fixturenames) - params - FAST_FIXTURES
            if heavy:
                raise pytest.UsageError(f"{item.nodeid} is marked fast but asks for {sorted(heavy)}")
    rank = {name: i for i, name in enumerate(SLOW_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: in-file order kept
