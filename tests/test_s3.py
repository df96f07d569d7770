"""S3 artifacts against a real moto server (and a faulty HTTP proxy in front of it):
encryption, checksums, the background uploader, resume from S3 on an empty disk,
transient and permanent errors, data fetch from S3."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import threading
import zipfile
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from tests.support.aws import FaultyProxy
from tests.support.training import FIT, assert_same_weights, fit_args, reference_run, weights

BUCKET = "ec2train-test"

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture
def s3(aws):
    from ec2train import aws as aws_mod

    client = aws_mod.client("s3")
    client.create_bucket(Bucket=BUCKET)
    return client


@pytest.fixture(scope="module")
def reference(demo_data, tmp_path_factory):
    return reference_run(str(demo_data), str(tmp_path_factory.getbasetemp()))


def sha256(path: Path) -> bytes:
    return hashlib.sha256(Path(path).read_bytes()).digest()


def keys(client, prefix: str) -> set[str]:
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
    return {o["Key"] for p in pages for o in p.get("Contents", [])}


@pytest.fixture
def proxy(aws, monkeypatch):
    p = FaultyProxy(aws)
    monkeypatch.setenv("AWS_ENDPOINT_URL", p.url)
    yield p
    p.close()


# ---------------------------------------------------------------- fit --s3-uri, resume from S3


def test_fit_uploads_encrypted_verified_artifacts_and_resumes_on_an_empty_disk(s3, demo_data, reference, tmp_path):
    from ec2train.cli import app
    from ec2train.config import resolve
    from ec2train.run import fit_run

    uri = f"s3://{BUCKET}/run1"
    first = tmp_path / "instance1"
    cfg = resolve(data=str(demo_data), output=str(first / "out"), logdir=str(first / "runs"), s3_uri=uri, **FIT)
    # Stop like a spot notice would, during epoch 2 (the first step after epoch 1's checkpoint).
    result = fit_run(cfg, spot_watch="off", should_stop=lambda: (first / "out" / "last.pt").exists())
    assert result.interrupted and len(result.history) == 1

    names = keys(s3, "run1/")
    assert {"run1/last.pt", "run1/model.pth", "run1/config.toml"} <= names
    assert any(k.startswith("run1/runs/") and "tfevents" in k for k in names), names
    for key in names:
        local = (
            first / "out" / key.split("/", 1)[1] if not key.startswith("run1/runs/") else first / key.split("/", 1)[1]
        )
        head = s3.head_object(Bucket=BUCKET, Key=key, ChecksumMode="ENABLED")
        assert head["ServerSideEncryption"] == "AES256"
        # S3 checked the SHA-256 on arrival and reports the local file's; the hex copy is for downloads.
        assert base64.b64decode(head["ChecksumSHA256"].split("-")[0]) == sha256(local), key
        assert head["Metadata"]["sha256"] == sha256(local).hex()
    assert (
        sha256(first / "out" / "last.pt")
        == hashlib.sha256(s3.get_object(Bucket=BUCKET, Key="run1/last.pt")["Body"].read()).digest()
    )

    # Where --resume auto looks: the local checkpoint first, then (run.py) the S3 prefix.
    from ec2train.checkpoint import Resume, ResumeError, load_checkpoint
    from ec2train.ddp import DistEnv

    def decision(out: Path, **kw) -> Resume:
        cfg = resolve(data=str(demo_data), output=str(out), logdir=str(tmp_path / "r"), **{**FIT, **kw})
        return Resume.of(cfg, torchrun=False)

    fresh, rank0 = tmp_path / "fresh", DistEnv()
    assert decision(first / "out", resume="auto").local_source() == str(first / "out" / "last.pt")
    assert decision(fresh, resume="auto").local_source() is None  # fit itself reads local files only
    decision(tmp_path / "none", resume="auto", s3_uri=f"s3://{BUCKET}/nothing-here").fetch_remote(rank0, print)
    assert not (tmp_path / "none").exists()
    auto = decision(fresh, resume="auto", s3_uri=uri).fetch_remote(rank0, print)
    assert auto.local_source() == str(fresh / "last.pt")
    for name in ("last.pt", "model.pth"):  # the output folder is complete again
        assert (fresh / name).read_bytes() == (first / "out" / name).read_bytes()
    remote = decision(tmp_path / "explicit", resume=f"{uri}/last.pt")
    with pytest.raises(ResumeError, match="resumed through `ec2train fit`"):  # loop.fit alone reads local files
        remote.local_source()
    explicit = remote.fetch_remote(rank0, print)
    assert explicit.local_source() == str(tmp_path / "explicit" / "last.pt")  # what --resume s3://... does
    assert load_checkpoint(explicit.local_source())["epoch"] == 1
    # A run not told to resume refuses to overwrite the checkpoint in S3; torchrun restarts resume by themselves.
    with pytest.raises(ResumeError, match="already holds a run's checkpoint.*--resume auto"):
        decision(fresh, s3_uri=uri).refuse_overwrite(f"{uri}/last.pt")
    Resume.of(resolve(s3_uri=uri), torchrun=True).refuse_overwrite(f"{uri}/last.pt")
    decision(fresh, resume="never", s3_uri=uri).refuse_overwrite(f"{uri}/last.pt")

    # A new instance: empty disk, same command plus --resume auto.
    second = tmp_path / "instance2"
    args = [
        "fit",
        *fit_args(demo_data, second / "out", second / "runs"),
        "--s3-uri",
        uri,
        "--resume",
        "auto",
        "--spot-watch",
        "off",
    ]
    run = CliRunner().invoke(app, args)
    assert run.exit_code == 0, run.output
    output = " ".join(run.output.split())
    assert f"downloading {uri}/last.pt" in output and "resuming from" in output and ": 1 of 3 epochs done" in output
    metrics = json.loads((second / "out" / "metrics.json").read_text())
    assert metrics["epochs_run"] == 3 and [h["epoch"] for h in metrics["history"]] == [1, 2, 3]
    assert_same_weights(weights(second / "out" / "model.pth"), reference["model"])
    assert_same_weights(weights(second / "out" / "last.pt"), reference["last"])
    # The final artifacts are in S3 too, and they are the local ones.
    assert "run1/metrics.json" in keys(s3, "run1/")
    for name in ("model.pth", "last.pt", "metrics.json"):
        body = s3.get_object(Bucket=BUCKET, Key=f"run1/{name}")["Body"].read()
        assert hashlib.sha256(body).digest() == sha256(second / "out" / name), name


def test_fit_with_kms_key_encrypts_every_upload_with_that_key(s3, demo_data, tmp_path):
    from ec2train import aws
    from ec2train.cli import app

    key_id = aws.client("kms").create_key(Description="ec2train test")["KeyMetadata"]["Arn"]
    args = ["fit", *fit_args(demo_data, tmp_path / "out", tmp_path / "runs", epochs=1)]
    run = CliRunner().invoke(
        app, [*args, "--s3-uri", f"s3://{BUCKET}/kms-run", "--kms-key", key_id, "--spot-watch", "off"]
    )
    assert run.exit_code == 0, run.output
    names = keys(s3, "kms-run/")
    assert {"kms-run/model.pth", "kms-run/last.pt", "kms-run/metrics.json", "kms-run/config.toml"} <= names
    for key in names:
        head = s3.head_object(Bucket=BUCKET, Key=key)
        assert (head["ServerSideEncryption"], head["SSEKMSKeyId"]) == ("aws:kms", key_id), key


def test_existing_run_in_s3_is_not_overwritten_without_a_resume_choice(s3, demo_data, tmp_path):
    from ec2train.checkpoint import ResumeError
    from ec2train.config import resolve
    from ec2train.run import fit_run

    s3.put_object(Bucket=BUCKET, Key="taken/last.pt", Body=b"an earlier run")
    cfg = resolve(
        data=str(demo_data),
        output=str(tmp_path / "out"),
        logdir=str(tmp_path / "runs"),
        s3_uri=f"s3://{BUCKET}/taken",
        **FIT,
    )
    with pytest.raises(ResumeError, match="--resume auto"):
        fit_run(cfg, spot_watch="off")
    assert not (tmp_path / "out").exists()
    assert s3.get_object(Bucket=BUCKET, Key="taken/last.pt")["Body"].read() == b"an earlier run"


def test_a_refused_or_failed_start_uploads_nothing_of_the_run_that_was_in_output(s3, demo_data, reference, tmp_path):
    """An --output holding an earlier run: a fit that is refused (no --resume) or fails before its
    first epoch must not mirror that run's files into a new, empty --s3-uri."""
    import shutil

    from ec2train.checkpoint import ResumeError
    from ec2train.config import resolve
    from ec2train.run import fit_run

    out = tmp_path / "out"
    shutil.copytree(Path(reference["model_path"]).parent, out)
    settings = dict(output=str(out), logdir=str(tmp_path / "runs"), s3_uri=f"s3://{BUCKET}/new", **FIT)
    with pytest.raises(ResumeError, match="already holds a run"):
        fit_run(resolve(data=str(demo_data), **settings), spot_watch="off")
    assert keys(s3, "new/") == set()
    # Told to start anew, but the data set is missing: the failure uploads nothing either.
    with pytest.raises(Exception, match="data"):
        fit_run(resolve(data=str(tmp_path / "no-such-data"), resume="never", **settings), spot_watch="off")
    assert keys(s3, "new/") == set()


# ---------------------------------------------------------------- single objects


def test_multipart_upload_is_verified_and_a_damaged_object_is_refused_on_download(s3, tmp_path):
    from ec2train.s3 import PART_SIZE, S3Error, download_file, upload_file

    big = tmp_path / "big.bin"
    big.write_bytes(os.urandom(PART_SIZE + 1234))  # two parts
    upload_file(big, f"s3://{BUCKET}/blobs/big.bin")
    head = s3.head_object(Bucket=BUCKET, Key="blobs/big.bin", ChecksumMode="ENABLED")
    data = big.read_bytes()
    parts = hashlib.sha256(
        hashlib.sha256(data[:PART_SIZE]).digest() + hashlib.sha256(data[PART_SIZE:]).digest()
    ).digest()
    assert base64.b64decode(head["ChecksumSHA256"].split("-")[0]) == parts  # S3's composite of the parts
    assert head["ServerSideEncryption"] == "AES256" and head["ContentLength"] == len(data)

    back = download_file(f"s3://{BUCKET}/blobs/big.bin", tmp_path / "back" / "big.bin")
    assert back.read_bytes() == data

    # Same recorded digest, different bytes: the download must refuse it and leave the old file alone.
    s3.put_object(
        Bucket=BUCKET, Key="blobs/big.bin", Body=b"x" * 100, Metadata={"sha256": hashlib.sha256(data).hexdigest()}
    )
    with pytest.raises(S3Error, match="does not match its recorded SHA-256"):
        download_file(f"s3://{BUCKET}/blobs/big.bin", back)
    assert back.read_bytes() == data
    assert [p.name for p in back.parent.iterdir()] == ["big.bin"]


@pytest.mark.fast
@pytest.mark.parametrize(
    "uri, message",
    [
        ("s3://My_Bucket/x", "not a valid bucket name"),
        ("https://bucket/x", "not an S3 address"),
        ("s3://bucket//x", "empty path segment"),
    ],
)
def test_bad_s3_addresses_are_one_line_errors(uri, message):
    from ec2train.s3 import S3Error, parse_uri

    with pytest.raises(S3Error, match=message):
        parse_uri(uri)


# ---------------------------------------------------------------- background uploader


def test_background_uploader_skips_stale_versions_and_flush_waits_for_the_newest(s3, proxy, tmp_path):
    from ec2train.files import atomic_write_text
    from ec2train.s3 import BackgroundUploader, S3Uri

    target = S3Uri(BUCKET, "q/last.pt")
    release = threading.Event()
    proxy.hold = (lambda method, path: method == "PUT" and path.startswith(f"/{BUCKET}/q/last.pt"), release)
    path = tmp_path / "last.pt"
    uploader = BackgroundUploader()
    try:
        atomic_write_text(path, "epoch 1")
        uploader.submit([(path, target)])
        assert proxy.holding.wait(30)  # epoch 1's upload is in flight
        atomic_write_text(path, "epoch 2")
        uploader.submit([(path, target)])
        atomic_write_text(path, "epoch 3")
        uploader.submit([(path, target)])
        release.set()
        uploader.flush(timeout=60)
    finally:
        release.set()
        uploader.close()
    puts = [body for method, p, body in proxy.forwarded if method == "PUT" and p.startswith(f"/{BUCKET}/q/")]
    assert puts == [b"epoch 1", b"epoch 3"]  # epoch 2 was stale by the time its turn came
    assert s3.get_object(Bucket=BUCKET, Key="q/last.pt")["Body"].read() == b"epoch 3"

    # Unchanged since its last upload: not sent again.
    again = BackgroundUploader()
    again._uploaded = dict(uploader._uploaded)
    again.submit([(path, target)])
    again.flush(timeout=30)
    again.close()
    assert again.uploads == 0


def test_a_permanent_upload_failure_is_raised_by_flush_and_by_the_next_submit(s3, proxy, tmp_path):
    from ec2train.s3 import BackgroundUploader, S3Error, S3Uri

    proxy.rule = lambda method, path: (403, "AccessDenied") if method == "PUT" else None
    path = tmp_path / "last.pt"
    path.write_bytes(b"epoch 1")
    uploader = BackgroundUploader()
    try:
        uploader.submit([(path, S3Uri(BUCKET, "run/last.pt"))])
        with pytest.raises(S3Error, match="access denied to upload s3://ec2train-test/run/last.pt") as failure:
            uploader.flush(timeout=30)
        assert failure.value.permanent and "s3:PutObject on arn:aws:s3:::ec2train-test/run/*" in str(failure.value)
        with pytest.raises(S3Error, match="access denied"):  # training stops at the next epoch
            uploader.submit([(path, S3Uri(BUCKET, "run/last.pt"))])
    finally:
        uploader.close()
    assert proxy.failed == 1  # not retried: it cannot succeed
    assert path.read_bytes() == b"epoch 1" and [p.name for p in tmp_path.iterdir()] == ["last.pt"]


# ---------------------------------------------------------------- transient and permanent errors


def test_transient_500s_are_retried_until_the_upload_succeeds(s3, proxy, tmp_path):
    from ec2train.s3 import upload_file

    seen = {"n": 0}

    def first_three_fail(method, path):
        seen["n"] += 1
        return (500, "InternalError") if seen["n"] <= 3 else None

    proxy.rule = first_three_fail
    f = tmp_path / "model.pth"
    f.write_bytes(b"weights" * 1000)
    upload_file(f, f"s3://{BUCKET}/retry/model.pth")
    assert proxy.failed == 3
    assert s3.get_object(Bucket=BUCKET, Key="retry/model.pth")["Body"].read() == f.read_bytes()


def test_export_to_a_missing_bucket_is_a_one_line_error_and_exit_2(aws, reference, capsys):
    from ec2train.cli import main

    trained_model = reference["model_path"]
    before = sha256(trained_model)
    with pytest.raises(SystemExit) as exit_info:
        main(["export", "--model", str(trained_model), "--s3-uri", "s3://no-such-bucket-here/models"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "bucket 'no-such-bucket-here' does not exist" in err and "aws s3 mb" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert sha256(trained_model) == before


def test_export_uploads_a_model_file_and_refuses_other_files(s3, reference, tmp_path):
    from ec2train.model import ModelError
    from ec2train.s3 import export_to_s3

    trained_model = reference["model_path"]
    assert str(export_to_s3(trained_model, f"s3://{BUCKET}/models/dogs")) == f"s3://{BUCKET}/models/dogs/model.pth"
    assert s3.get_object(Bucket=BUCKET, Key="models/dogs/model.pth")["Body"].read() == trained_model.read_bytes()
    bare = tmp_path / "bare.pth"
    torch.save({"fc.weight": torch.zeros(2, 2)}, bare)
    with pytest.raises(ModelError, match="not an ec2train model file"):
        export_to_s3(bare, f"s3://{BUCKET}/models/bare.pth")


def test_fit_without_put_permission_stops_with_exit_2_and_keeps_local_files(s3, proxy, demo_data, tmp_path, capsys):
    from ec2train.cli import main

    proxy.rule = lambda method, path: (403, "AccessDenied") if method in ("PUT", "POST") else None
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exit_info:
        main(
            [
                "fit",
                *fit_args(demo_data, out, tmp_path / "runs", epochs=1),
                "--s3-uri",
                f"s3://{BUCKET}/denied",
                "--spot-watch",
                "off",
            ]
        )
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "access denied to upload" in err and "s3:PutObject" in err and "Traceback" not in err
    assert torch.load(out / "last.pt", map_location="cpu", weights_only=True)["epoch"] == 1  # intact
    weights(out / "model.pth")
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]  # no upload leftovers
    assert keys(s3, "denied/") == set()


# ---------------------------------------------------------------- data fetch from S3


def test_data_fetch_from_an_s3_prefix_and_an_s3_zip(s3, tmp_path):
    from ec2train.cli import app
    from ec2train.data import check_dataset, make_demo_dataset
    from ec2train.s3 import upload_file

    demo_data = make_demo_dataset(tmp_path / "src" / "demo", classes=2, per_class=4, size=16)
    files = sorted(p.relative_to(demo_data).as_posix() for p in demo_data.rglob("*") if p.is_file())
    for rel in files:
        s3.upload_file(str(demo_data / rel), BUCKET, f"datasets/demo/{rel}")
    run = CliRunner().invoke(
        app, ["data", "fetch", "--url", f"s3://{BUCKET}/datasets/demo/", "--dest", str(tmp_path / "a" / "demo")]
    )
    assert run.exit_code == 0, run.output
    got = tmp_path / "a" / "demo"
    assert sorted(p.relative_to(got).as_posix() for p in got.rglob("*") if p.is_file()) == files
    assert check_dataset(got, decode=False).ok
    assert [p.name for p in (tmp_path / "a").iterdir()] == ["demo"]  # no temp folder left

    archive = tmp_path / "demo.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for rel in files:
            zf.write(demo_data / rel, f"demo/{rel}")
    upload_file(archive, f"s3://{BUCKET}/datasets/demo.zip")
    run = CliRunner().invoke(
        app, ["data", "fetch", "--url", f"s3://{BUCKET}/datasets/demo.zip", "--dest", str(tmp_path / "b" / "demo")]
    )
    assert run.exit_code == 0, run.output
    assert (
        sorted(
            p.relative_to(tmp_path / "b" / "demo").as_posix()
            for p in (tmp_path / "b" / "demo").rglob("*")
            if p.is_file()
        )
        == files
    )
