"""Serving: the SageMaker handler, the model package in isolation and under the real
SageMaker inference toolkit, and the local server over real HTTP (urllib and boto3)."""

from __future__ import annotations

import base64
import importlib.util
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import threading
import time
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from PIL import Image

from ec2train.errors import UserError
from ec2train.infer import MAX_REQUEST_BYTES, Predictor, RequestError, parse_custom_attributes, parse_request
from tests.support.cli import assert_one_line_error, cli_in_process, run_cli
from tests.support.images import many_scan_jpeg
from tests.support.images import png_of_size as bomb_png
from tests.support.net import free_port
from tests.support.paths import ROOT
from tests.support.serving import ServerThread, http, start_cli_server

CLASSES = ("Circle", "Square", "Triangle", "Cross")
PACKAGED = {
    "model.pth",
    "code",
    "code/inference.py",
    "code/ec2train",
    *(f"code/ec2train/{m}.py" for m in ("__init__", "errors", "hw", "threads", "model", "preprocess", "infer")),
}


# ---------------------------------------------------------------- helpers


def to_png(jpeg: bytes) -> bytes:
    out = io.BytesIO()
    Image.open(io.BytesIO(jpeg)).save(out, format="PNG")
    return out.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def load_handler():
    spec = importlib.util.spec_from_file_location("ec2train_sagemaker_handler", ROOT / "serve" / "inference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def images(demo_data) -> dict[str, list[bytes]]:
    """Test-split JPEG bytes per class name."""
    out = {}
    for folder in sorted((demo_data / "test").iterdir()):
        out[folder.name.split(".", 1)[1]] = [p.read_bytes() for p in sorted(folder.iterdir())]
    return out


@pytest.fixture(scope="module")
def handler():
    return load_handler()


@pytest.fixture(scope="module")
def model(handler, trained_model):
    return handler.model_fn(str(trained_model.parent))


@pytest.fixture(scope="module")
def server(trained_model):
    from ec2train.server import create_app

    with ServerThread(create_app(trained_model, max_batch=8, max_wait_ms=20, compile="off")) as srv:
        srv.wait_ready()
        yield srv


@pytest.fixture(scope="module")
def package(trained_model, tmp_path_factory) -> Path:
    from ec2train.export import package_model

    return package_model(trained_model, tmp_path_factory.mktemp("pkg") / "model.tar.gz")


def top1(answer: dict) -> str:
    return answer["predictions"][0]["label"]


# ---------------------------------------------------------------- handler functions


def test_handler_predicts_the_right_classes(handler, model, images):
    correct = 0
    for label, jpegs in images.items():
        hits = 0
        for jpeg in jpegs:
            body, ctype = handler.output_fn(
                handler.predict_fn(handler.input_fn(jpeg, "image/jpeg"), model), "application/json"
            )
            answer = json.loads(body)
            assert ctype == "application/json"
            hits += top1(answer) == label
        assert hits > len(jpegs) / 2, (label, hits, len(jpegs))  # a clear majority for every class
        correct += hits
    assert correct / sum(map(len, images.values())) >= 0.75

    jpeg = images["Square"][0]
    answer = handler.predict_fn(handler.input_fn(jpeg, "application/x-image"), model)
    preds = answer["predictions"]
    assert len(preds) == 4  # default top 5, and there are only 4 classes
    assert {p["label"] for p in preds} == set(CLASSES) and set(preds[0]) == {"label", "index", "probability"}
    assert abs(sum(p["probability"] for p in preds) - 1) < 1e-4
    assert [p["probability"] for p in preds] == sorted((p["probability"] for p in preds), reverse=True)
    assert "logits" not in answer

    req = json.dumps({"image": b64(to_png(jpeg)), "top_k": 2, "logits": True})
    answer = handler.predict_fn(handler.input_fn(req, "application/json; charset=utf-8"), model)
    assert len(answer["predictions"]) == 2 and len(answer["logits"]) == 4
    assert max(range(4), key=answer["logits"].__getitem__) == answer["predictions"][0]["index"]
    assert answer["predictions"][0]["label"] == preds[0]["label"]  # PNG and JPEG of one image agree


@pytest.mark.parametrize(
    "body, ctype, status, needle",
    [
        (b"hello", "text/plain", 415, "unsupported content type"),
        (b"hello", None, 415, "send one of image/jpeg"),
        (b"", "image/jpeg", 400, "empty request body"),
        (b"x" * (MAX_REQUEST_BYTES + 1), "image/jpeg", 413, "more than the limit"),
        (b"{not json", "application/json", 400, "not valid json"),
        (b"[1, 2]", "application/json", 400, "must be an object"),
        (b'{"url": "http://169.254.169.254/"}', "application/json", 400, "does not fetch urls"),
        (b'{"image": "aGk=", "topk": 3}', "application/json", 400, "unknown field(s) 'topk'"),
        (b'{"top_k": 3}', "application/json", 400, 'has no "image"'),
        (b'{"image": "%%%not base64"}', "application/json", 400, "not valid base64"),
        (b'{"image": "aGk=", "top_k": 0}', "application/json", 400, "top_k"),
        (b'{"image": "aGk=", "top_k": "many"}', "application/json", 400, "top_k"),
        (b'{"image": "aGk=", "logits": "yes"}', "application/json", 400, "logits"),
        (b"[" * 100_000, "application/json", 400, "nested too deeply"),  # was a 500 RecursionError
    ],
)
def test_bad_requests_are_client_errors(handler, body, ctype, status, needle):
    with pytest.raises(RequestError) as exc:
        handler.input_fn(body, ctype)
    assert exc.value.status == status and needle in str(exc.value).lower(), str(exc.value)


@pytest.mark.fast
def test_options_from_custom_attributes_header():
    assert parse_custom_attributes("top_k=3") == {"top_k": 3}
    assert parse_custom_attributes("trace=abc-123; top_k=2, logits=true") == {"top_k": 2, "logits": True}
    assert parse_custom_attributes("an opaque id") == {}
    with pytest.raises(RequestError, match="top_k"):
        parse_custom_attributes("top_k=-1")
    # The JSON body wins over the header.
    assert parse_request(json.dumps({"image": "aGk=", "top_k": 1}), "application/json", "top_k=4").top_k == 1
    assert parse_request(b"\xff\xd8", "image/jpeg", "top_k=4").top_k == 4


def test_undecodable_images_and_decompression_bombs_are_refused(handler, model, trained_model):
    for junk in (b"definitely not an image", b"\xff\xd8\xff\xe0" + b"\x00" * 100, b"%!PS-Adobe-3.0 EPSF-3.0\n"):
        with pytest.raises(RequestError, match="not a decodable image") as exc:
            handler.predict_fn(handler.input_fn(junk, "image/jpeg"), model)
        assert exc.value.status == 400

    started = time.process_time()  # issue 26.1: about 8 s of CPU before the scan rule
    with pytest.raises(RequestError, match="JPEG has more than 100 scans") as exc:
        handler.predict_fn(handler.input_fn(many_scan_jpeg(2000, 2000, 2000), "image/jpeg"), model)
    assert exc.value.status == 400 and time.process_time() - started < 0.25

    small_but_huge = bomb_png(8000, 8000)  # 64 MP: over our 40 MP limit, under Pillow's
    assert len(small_but_huge) < 20_000
    with pytest.raises(RequestError, match="8000x8000 pixels, more than the limit"):
        handler.predict_fn(handler.input_fn(small_but_huge, "image/png"), model)

    # Without our own limit, Pillow's guard still refuses: its warning (89-179 MP) becomes
    # an error, and its error (over 179 MP) is caught. Neither is decoded.
    unguarded = Predictor(trained_model, max_pixels=None)
    for w, h in ((10_000, 10_000), (20_000, 20_000)):
        started = time.monotonic()
        with pytest.raises(RequestError, match="decompression bomb"):
            handler.predict_fn(handler.input_fn(bomb_png(w, h), "image/png"), unguarded)
        assert time.monotonic() - started < 5


# ---------------------------------------------------------------- the model package


def test_export_package_layout(package, trained_model):
    with tarfile.open(package) as tar:
        names = set(tar.getnames())
        assert names == PACKAGED  # no requirements.txt: the container has torch, torchvision, Pillow
        assert tar.extractfile("model.pth").read() == trained_model.read_bytes()
        assert tar.extractfile("code/inference.py").read() == (ROOT / "serve" / "inference.py").read_bytes()
        assert all(m.uid == 0 and m.mtime == 0 for m in tar.getmembers())
    assert not list(package.parent.glob(".*.tmp"))  # written atomically: no temp file left behind


def test_handler_ships_inside_the_wheel(tmp_path):
    link = ROOT / "serve" / "inference.py"
    assert link.is_symlink() and link.resolve() == (ROOT / "ec2train" / "_serve" / "inference.py").resolve()
    # An installed (non-editable) ec2train must still be able to build the package.
    src = tmp_path / "src"
    src.mkdir()
    for item in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / item, src / item)
    shutil.copytree(ROOT / "ec2train", src / "ec2train", ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(tmp_path),
            str(src),
        ],
        check=True,
        capture_output=True,
        env={**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"},
    )
    [wheel] = tmp_path.glob("*.whl")
    with zipfile.ZipFile(wheel) as zf:
        assert zf.read("ec2train/_serve/inference.py") == link.read_bytes()


ISOLATED = r"""
import json, os, sys
code_dir, image_dir, toolkit = sys.argv[1], sys.argv[2], sys.argv[3] == "toolkit"
sys.path.insert(0, code_dir)
model_dir = os.path.dirname(code_dir)
results = {}
images = sorted(os.path.join(d, f) for d, _, fs in os.walk(image_dir) for f in fs)
if not toolkit:
    import inference
    model = inference.model_fn(model_dir)
    for path in images:
        with open(path, "rb") as f:
            body, ctype = inference.output_fn(inference.predict_fn(inference.input_fn(f.read(), "image/jpeg"), model), "application/json")
        results[path] = json.loads(body)["predictions"][0]["label"]
else:
    # The real SageMaker inference toolkit drives the handler, as in the PyTorch container.
    from sagemaker_inference.transformer import Transformer

    class RequestProcessor:
        def __init__(self, headers): self.headers = headers
        def get_request_properties(self): return self.headers

    class Context:  # what the model server hands the toolkit: request headers in, status out
        def __init__(self): self.system_properties = {"model_dir": model_dir}; self.request_processor = []
        def set_response_content_type(self, idx, value): self.content_type = value
        def set_response_status(self, code=200, phrase="", idx=0): self.status = code

    transformer, context = Transformer(), Context()
    def call(body, headers):
        context.status, context.request_processor = 200, [RequestProcessor(headers)]
        out = transformer.transform([{"body": body}], context)[0]
        return {"status": context.status, "content_type": context.content_type, "body": json.loads(out)}
    jpeg = open(images[0], "rb").read()
    results["jpeg"] = call(jpeg, {"Content-Type": "image/jpeg", "X-Amzn-SageMaker-Custom-Attributes": "top_k=2"})
    import base64
    results["json"] = call(json.dumps({"image": base64.b64encode(jpeg).decode(), "logits": True}).encode(), {"content-type": "application/json"})
    results["text"] = call(b"hello", {"Content-Type": "text/plain"})
    results["junk"] = call(b"not an image", {"Content-Type": "application/x-image"})
    results["bomb"] = call(open(sys.argv[4], "rb").read(), {"Content-Type": "image/png"})
    results["csv"] = call(jpeg, {"Content-Type": "image/jpeg", "Accept": "text/csv"})
results["__file__"] = sys.modules["ec2train"].__file__
results["modules"] = sorted(m for m in sys.modules if m.split(".")[0] in ("typer", "rich", "boto3", "botocore", "starlette", "uvicorn", "ec2train"))
print(json.dumps(results))
"""


def run_isolated(package: Path, tmp_path: Path, image_dir: Path, *extra: str) -> dict:
    with tarfile.open(package) as tar:
        tar.extractall(tmp_path / "model", filter="data")
    code_dir = tmp_path / "model" / "code"
    # -I: no PYTHONPATH, no user site, not even the current folder; only the venv's packages.
    res = subprocess.run(
        [sys.executable, "-I", "-c", ISOLATED, str(code_dir), str(image_dir), *extra],
        capture_output=True,
        text=True,
        timeout=240,
        cwd=tmp_path,
    )
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out.pop("__file__").startswith(str(code_dir))  # the packaged copy, not this checkout
    return out


def test_packaged_code_runs_in_isolation(package, demo_data, tmp_path):
    out = run_isolated(package, tmp_path, demo_data / "test", "plain")
    modules = out.pop("modules")
    assert set(modules) <= {
        "ec2train",
        "ec2train.errors",
        "ec2train.hw",
        "ec2train.threads",
        "ec2train.model",
        "ec2train.preprocess",
        "ec2train.infer",
    }, modules
    hits = sum(Path(path).parent.name.split(".", 1)[1] == label for path, label in out.items())
    assert len(out) == 48 and hits / len(out) >= 0.75, (hits, len(out))


def test_packaged_handler_under_the_sagemaker_toolkit(package, images, demo_data, tmp_path):
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(bomb_png(10_000, 10_000))  # Pillow's warning range, refused in a clean process too
    out = run_isolated(package, tmp_path, demo_data / "test" / "002.Square", "toolkit", str(bomb))
    assert out["jpeg"]["status"] == 200 and out["jpeg"]["content_type"] == "application/json"
    assert len(out["jpeg"]["body"]["predictions"]) == 2 and top1(out["jpeg"]["body"]) == "Square"
    assert out["json"]["status"] == 200 and len(out["json"]["body"]["logits"]) == 4
    assert out["text"]["status"] == 415 and "unsupported content type" in out["text"]["body"]["error"]
    assert out["junk"]["status"] == 400 and "not a decodable image" in out["junk"]["body"]["error"]
    assert out["bomb"]["status"] == 400 and "decompression bomb" in out["bomb"]["body"]["error"]
    assert out["csv"]["status"] == 406 and "answers are application/json" in out["csv"]["body"]["error"]


def test_export_cli(trained_model, tmp_path, capsys):
    code, out, err = cli_in_process(
        capsys, "export", "--model", trained_model, "--package", tmp_path / "out" / "model.tar.gz"
    )
    assert code == 0 and "model.tar.gz" in out, err
    with tarfile.open(tmp_path / "out" / "model.tar.gz") as tar:
        assert set(tar.getnames()) == PACKAGED
    junk = tmp_path / "junk.pth"
    junk.write_text("not a model")
    code, out, err = cli_in_process(capsys, "export", "--model", junk, "--package", tmp_path / "bad.tar.gz")
    assert_one_line_error(code, err, "not a pytorch file")
    code, out, err = cli_in_process(capsys, "export", "--model", trained_model, "--package", tmp_path)
    assert_one_line_error(code, err, "is a folder")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["junk.pth", "out"]  # nothing half-written


# ---------------------------------------------------------------- the local server


def test_server_answers_every_input_kind(server, images):
    url = server.url + "/invocations"
    jpeg = images["Triangle"][1]
    for body, ctype in ((jpeg, "image/jpeg"), (to_png(jpeg), "image/png"), (jpeg, "application/x-image")):
        status, answer = http(url, body, {"Content-Type": ctype, "X-Amzn-SageMaker-Custom-Attributes": "top_k=3"})
        assert status == 200 and top1(answer) == "Triangle" and len(answer["predictions"]) == 3
    status, answer = http(
        url, json.dumps({"image": b64(jpeg), "top_k": 1, "logits": True}).encode(), {"Content-Type": "application/json"}
    )
    assert (
        status == 200 and top1(answer) == "Triangle" and len(answer["predictions"]) == 1 and len(answer["logits"]) == 4
    )


def test_server_bad_inputs_get_client_errors(server, images):
    url = server.url + "/invocations"
    cases = [
        (b"hello", {"Content-Type": "text/plain"}, 415, "unsupported content type"),
        (b"junk bytes", {"Content-Type": "image/jpeg"}, 400, "not a decodable image"),
        (b"{", {"Content-Type": "application/json"}, 400, "not valid json"),
        (b'{"url": "https://example.com/dog.jpg"}', {"Content-Type": "application/json"}, 400, "does not fetch urls"),
        (b"\0" * (MAX_REQUEST_BYTES + 1), {"Content-Type": "image/jpeg"}, 413, "more than the limit"),
        (bomb_png(20_000, 20_000), {"Content-Type": "image/png"}, 400, "pixels"),
        (
            images["Circle"][0],
            {"Content-Type": "image/jpeg", "Accept": "text/csv"},
            406,
            "answers are application/json",
        ),
        (
            images["Circle"][0],
            {"Content-Type": "image/jpeg", "X-Amzn-SageMaker-Custom-Attributes": "top_k=x"},
            400,
            "top_k",
        ),
    ]
    for body, headers, status, needle in cases:
        got, answer = http(url, body, headers)
        assert (got, list(answer)) == (status, ["error"]) and needle in answer["error"].lower(), (needle, got, answer)
        assert " at 0x" not in answer["error"], answer  # never a Python repr (issue 13.8)
    status, answer = http(url, images["Circle"][0], {"Content-Type": "image/jpeg"})  # still serving
    assert status == 200 and top1(answer) == "Circle"


def test_boto3_sagemaker_runtime_client_works_unchanged(server, images):
    import boto3
    from botocore.exceptions import ClientError

    runtime = boto3.client("sagemaker-runtime", endpoint_url=server.url, region_name="us-east-1")
    resp = runtime.invoke_endpoint(
        EndpointName="dog-breeds",
        ContentType="application/x-image",
        Accept="application/json",
        CustomAttributes="top_k=3",
        Body=images["Cross"][2],
    )
    answer = json.loads(resp["Body"].read())
    assert resp["ContentType"] == "application/json" and resp["InvokedProductionVariant"] == "AllTraffic"
    assert top1(answer) == "Cross" and len(answer["predictions"]) == 3

    # Errors come back as SageMaker reports a container's client error: ModelError (424).
    with pytest.raises(runtime.exceptions.ModelError) as exc:
        runtime.invoke_endpoint(EndpointName="dog-breeds", ContentType="image/jpeg", Body=b"not an image")
    err = exc.value.response
    assert err["OriginalStatusCode"] == 400 and "not a decodable image" in json.loads(err["OriginalMessage"])["error"]
    assert err["ResponseMetadata"]["HTTPStatusCode"] == 424
    with pytest.raises(ClientError) as exc:  # payloads over 6 MB: 413, as SageMaker refuses them
        runtime.invoke_endpoint(
            EndpointName="dog-breeds", ContentType="image/jpeg", Body=b"\0" * (MAX_REQUEST_BYTES + 10)
        )
    assert exc.value.response["ResponseMetadata"]["HTTPStatusCode"] == 413


def test_concurrent_requests_are_batched_and_correct(server, images, model):
    jobs = [(label, jpeg) for label, jpegs in images.items() for jpeg in jpegs[:4]]  # 16 images
    expected = {jpeg: model.answer(parse_request(jpeg, "image/jpeg")) for _, jpeg in jobs}  # one at a time
    before = http(server.url + "/stats")[1]

    def call(job):
        status, answer = http(server.url + "/invocations", job[1], {"Content-Type": "image/jpeg"})
        return job, status, answer

    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(call, jobs * 3))
    for (_label, jpeg), status, answer in results:
        assert status == 200
        want = expected[jpeg]["predictions"]
        assert [p["label"] for p in answer["predictions"]] == [p["label"] for p in want]
        assert all(abs(a["probability"] - b["probability"]) < 1e-4 for a, b in zip(answer["predictions"], want))
    assert sum(top1(a) == label for (label, _), _, a in results) / len(results) >= 0.75
    stats = http(server.url + "/stats")[1]
    assert stats["images"] - before["images"] == len(results)
    assert stats["max_batch_size"] > 1 and stats["batches"] - before["batches"] < len(results), stats


def test_ping_is_503_until_the_model_is_loaded(trained_model, images):
    from ec2train.server import create_app

    gate = threading.Event()

    def slow_load():
        assert gate.wait(30)
        return Predictor(trained_model)

    with ServerThread(create_app(trained_model, load=slow_load, compile="off")) as srv:
        assert http(srv.url + "/ping") == (503, {"status": "loading"})
        status, answer = http(srv.url + "/invocations", images["Circle"][0], {"Content-Type": "image/jpeg"})
        assert status == 503 and "still loading" in answer["error"]
        gate.set()
        srv.wait_ready()
        assert http(srv.url + "/ping") == (200, {"status": "ready"})
        status, answer = http(srv.url + "/invocations", images["Circle"][0], {"Content-Type": "image/jpeg"})
        assert status == 200 and top1(answer) == "Circle"


def test_run_refuses_bad_model_busy_port_and_missing_deps(tmp_path, trained_model, monkeypatch):
    import socket

    from ec2train import server

    with pytest.raises(UserError, match="no model file"):
        server.run(tmp_path / "missing.pth", port=free_port())
    junk = tmp_path / "model.pth"
    junk.write_text("not a model")
    with pytest.raises(UserError, match="not a PyTorch file"):  # the server starts, cannot load, stops
        server.run(junk, port=free_port(), log_level="critical")
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        with pytest.raises(UserError, match="cannot listen"):
            server.run(trained_model, port=busy.getsockname()[1], log_level="critical", compile="off")
    monkeypatch.setitem(sys.modules, "uvicorn", None)  # as if the serve extra were not installed
    with pytest.raises(UserError, match=r"pip install 'ec2train\[serve\]'"):
        server.create_app(trained_model)


def test_a_request_memory_of_zero_is_one_line_before_any_worker_starts(trained_model, capsys):
    # With --workers 2 the check ran only in each worker, as a traceback in uvicorn's factory.
    import socket

    with socket.socket() as busy:  # were a worker started, it would fail on the port instead
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = str(busy.getsockname()[1])
        for workers in ("2", "1"):
            code, _, err = cli_in_process(
                capsys,
                "serve",
                "--model",
                trained_model,
                "--port",
                port,
                "--workers",
                workers,
                "--request-memory-mb",
                "0",
            )
            assert_one_line_error(code, err, "--request-memory-mb must be more than 0, got 0")


def test_a_slow_upload_does_not_make_forward_passes_wait(trained_model, images):
    # A request whose body is still arriving is not being decoded: counted as "preparing", it made
    # every forward pass wait up to --max-wait-ms for it (the batcher waits for requests in
    # preparation to join the batch).
    import socket

    from ec2train.server import create_app

    app = create_app(trained_model, max_batch=8, max_wait_ms=1500, compile="off")
    jpeg = images["Circle"][0]
    with ServerThread(app) as srv:
        srv.wait_ready()
        port = int(srv.url.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port), timeout=30) as slow:
            slow.sendall(_upload_head(len(jpeg)) + jpeg[:100])  # the rest never comes (408 after 5 s)
            time.sleep(0.3)
            assert app.state.service.batcher.preparing == 0
            started = time.monotonic()
            status, _ = http(srv.url + "/invocations", jpeg, {"Content-Type": "image/jpeg"})
            took = time.monotonic() - started
    assert status == 200 and took < 1.0, took  # measured: 0.02-0.1 s; 1.5 s and more before


def _upload_head(length: int) -> bytes:
    return f"POST /invocations HTTP/1.1\r\nHost: x\r\nContent-Type: image/jpeg\r\nContent-Length: {length}\r\n\r\n".encode()


def test_serve_cli_with_two_workers(trained_model, images, tmp_path):
    proc, url = start_cli_server(trained_model, "--workers", "2", "--threads", "1")
    try:
        with ThreadPoolExecutor(4) as pool:
            answers = list(
                pool.map(lambda j: http(url + "/invocations", j, {"Content-Type": "image/jpeg"}), images["Square"][:8])
            )
        assert all(status == 200 for status, _ in answers)
        assert sum(top1(a) == "Square" for _, a in answers) >= 6
    finally:
        proc.terminate()
        out = proc.communicate(timeout=30)[0]
    assert "Traceback" not in out, out


# ---------------------------------------------------------------- the compiled forward pass (issue 14)


def test_the_compiled_pass_pads_a_batch_to_its_size_and_answers_as_the_eager_pass():
    import torch
    from torch import nn
    from torch._dynamo.utils import counters

    from ec2train.infer import BucketedForward

    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 4),
    ).eval()
    with torch.no_grad():  # statistics that folding the batch norm into the convolution must carry over
        net[1].running_mean.uniform_(-1, 1)
        net[1].running_var.uniform_(0.5, 2)
    channels_last = torch.channels_last
    forward = BucketedForward(net, (1, 2, 4), channels_last)
    built = []
    with torch.inference_mode():
        forward.build(torch.zeros(1, 3, 16, 16).contiguous(memory_format=channels_last), lambda n, s: built.append(n))
        assert built == [1, 2, 4]
        graphs = counters["stats"]["unique_graphs"]
        images = torch.randn(4, 3, 16, 16).contiguous(memory_format=channels_last)
        for n in (1, 2, 3, 4):  # 3 runs padded in the graph for 4
            torch.testing.assert_close(forward(images[:n]), net(images[:n]), rtol=1e-4, atol=1e-5)
        assert counters["stats"]["unique_graphs"] == graphs, "a request's batch compiled a new graph"
        with pytest.raises(ValueError, match="larger than the largest compiled batch size 4"):
            forward(torch.randn(5, 3, 16, 16))


JSON = {"Content-Type": "application/json"}


def test_a_model_that_cannot_compile_keeps_its_eager_pass_and_the_error_blames_no_compiler(trained_model):
    import torch
    from torch import nn

    from ec2train.infer import CompileError

    class DataDependent(nn.Module):  # a branch on a value: no whole graph can hold it
        def forward(self, x):
            return x.mean((2, 3)) if x.sum() > 0 else -x.mean((2, 3))

    predictor = Predictor(trained_model)
    image = torch.rand(1, 3, predictor.image_size, predictor.image_size)
    eager = predictor.logits(image)
    predictor.model = DataDependent()
    with pytest.raises(CompileError, match="cannot compile the forward pass: ") as info:
        predictor.compile(1)
    assert not info.value.no_compiler, info.value  # so the server's hint is not "install g++"
    assert "\n" not in str(info.value)
    assert predictor.compiled_sizes == ()
    assert torch.equal(predictor.logits(image), eager)


def test_several_workers_with_compile_on_and_no_compiler_stop_before_any_worker_starts(trained_model, monkeypatch):
    from ec2train import server

    monkeypatch.setenv("CXX", "no-such-g++")
    with pytest.raises(UserError, match="--compile on needs a C\\+\\+ compiler and no-such-g\\+\\+ is not on PATH"):
        server.run(trained_model, port=free_port(), workers=2, compile="on")


@pytest.mark.fast
def test_on_an_older_torch_the_recompile_budget_is_raised_globally(monkeypatch):
    import torch
    import torch._dynamo.config as dynamo_config

    from ec2train import infer

    def old_compile(model, *, fullgraph=False, dynamic=None, backend="inductor", mode=None, options=None):
        return model

    monkeypatch.setattr(torch, "compile", old_compile)
    name = "recompile_limit" if hasattr(dynamo_config, "recompile_limit") else "cache_size_limit"
    monkeypatch.setattr(dynamo_config, name, 8)
    assert infer._compile_options(9) == {}
    assert getattr(dynamo_config, name) == 18
    forward = infer.BucketedForward(nn_identity := torch.nn.Identity(), (1, 2), torch.channels_last)
    assert forward.compiled is nn_identity


def _logits_body(jpeg: bytes) -> bytes:
    return json.dumps({"image": b64(jpeg), "logits": True}).encode()


def test_serve_is_ready_in_seconds_by_default_and_says_so(trained_model, images):
    # Issue 27.4: at its defaults serve compiled every batch size before /ping said ready (about a
    # minute on 2 cores, long after uvicorn's "running on"). Compiling is now opt-in, and one line
    # says when the server is ready and how long that took.
    started = time.monotonic()
    proc, url = start_cli_server(trained_model, "--log-level", "info", compile=None)
    ready = time.monotonic() - started
    try:
        stats = http(url + "/stats")[1]
        status, answer = http(url + "/invocations", images["Square"][0], {"Content-Type": "image/jpeg"})
    finally:
        proc.terminate()
        out = proc.communicate(timeout=30)[0]
    print(f"ready {ready:.1f} s after the command started")
    assert (stats["compile"], stats["compiled_batch_sizes"]) == ("off", [])
    assert status == 200 and top1(answer) == "Square"
    [line] = [line for line in out.splitlines() if " ready in " in line]
    assert f"at {url}: {trained_model} (resnet18, 4 classes, 32 px)" in line, line
    assert float(line.split(" ready in ", 1)[1].split(" s ", 1)[0]) <= ready + 1
    assert "compiling" not in out and "Traceback" not in out, out


@pytest.mark.timeout(600)  # a cold compile on a loaded 2-core box
@pytest.mark.skipif(
    shutil.which(os.environ.get("CXX", "g++")) is None, reason="no C++ compiler: the test below covers that case"
)
def test_serve_compile_auto_compiles_before_ready_and_answers_as_the_eager_pass(trained_model, images):
    proc, url = start_cli_server(trained_model, "--max-batch", "2", "--log-level", "info", compile="auto")
    jpegs = images["Triangle"][:3] + images["Cross"][:3]
    try:
        stats = http(url + "/stats")[1]
        with ThreadPoolExecutor(3) as pool:  # batches of 1 and 2
            answers = list(pool.map(lambda j: http(url + "/invocations", _logits_body(j), JSON), jpegs))
    finally:
        proc.terminate()
        out = proc.communicate(timeout=30)[0]
    assert (stats["compile"], stats["compiled_batch_sizes"]) == ("compiled", [1, 2]), stats
    lines = out.splitlines()
    compiling = next(i for i, line in enumerate(lines) if "compiling the forward pass for batches of 1, 2" in line)
    assert compiling < next(i for i, line in enumerate(lines) if " ready in " in line)
    assert "before serving (--compile off skips this)" in lines[compiling]
    assert "Traceback" not in out and "CUDA_HOME" not in out, out
    eager = Predictor(trained_model)
    for jpeg, (status, answer) in zip(jpegs, answers):
        assert status == 200, answer
        expected = eager.answer(parse_request(_logits_body(jpeg), "application/json"))
        assert answer["predictions"][0]["label"] == expected["predictions"][0]["label"]
        assert answer["logits"] == pytest.approx(expected["logits"], abs=1e-3)


@pytest.mark.timeout(600)
def test_without_a_compiler_auto_serves_uncompiled_and_on_stops_with_one_line(trained_model, images, tmp_path):
    env = dict(
        os.environ,
        CXX=str(tmp_path / "no-such-g++"),
        TORCHINDUCTOR_CACHE_DIR=str(tmp_path / "inductor"),  # nothing compiled before can stand in
        TORCHINDUCTOR_FX_GRAPH_CACHE="0",
        TORCHINDUCTOR_AUTOGRAD_CACHE="0",
    )
    proc, url = start_cli_server(trained_model, "--max-batch", "1", compile="auto", env=env)
    try:
        stats = http(url + "/stats")[1]
        assert (stats["compile"], stats["compiled_batch_sizes"]) == ("failed", [])
        status, answer = http(url + "/invocations", images["Square"][0], {"Content-Type": "image/jpeg"})
        assert status == 200 and top1(answer) == "Square", answer
    finally:
        proc.terminate()
        out = proc.communicate(timeout=30)[0]
    assert "cannot compile the forward pass: InvalidCxxCompiler: No working C++ compiler" in out, out
    assert "serving the uncompiled model" in out, out
    assert "Traceback" not in out, out

    result = run_cli(
        "serve", "--model", trained_model, "--port", free_port(), "--compile", "on", "--log-level", "critical", env=env
    )
    assert_one_line_error(result.returncode, result.stderr, "cannot compile the forward pass", "--compile off")


# ---------------------------------------------------------------- hostile inputs and clients (issue 13)

STRIP_PROBE = r"""
import json, sys, time
from ec2train.infer import Predictor, RequestError, parse_request

def peak_kb():  # VmHWM: the process's peak resident memory
    return int(next(l for l in open("/proc/self/status") if l.startswith("VmHWM")).split()[1])

predictor = Predictor(sys.argv[1])
predictor.answer(parse_request(open(sys.argv[2], "rb").read(), "image/jpeg"))  # warm: first pass allocates
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # reset the peak to the current RSS
before, started = peak_kb(), time.monotonic()
try:
    predictor.answer(parse_request(open(sys.argv[3], "rb").read(), "image/png"))
    error = None
except RequestError as exc:
    error = str(exc)
print(json.dumps({"seconds": time.monotonic() - started, "peak_growth_mb": (peak_kb() - before) / 1024, "error": error}))
"""


def test_extreme_aspect_ratio_is_refused_fast_with_little_memory(trained_model, demo_data, tmp_path):
    # Issue 13.1: 274 bytes, 1 x 100,000 px, far under the pixel limit; resizing its short
    # side to the model's size used to allocate gigabytes.
    strip = tmp_path / "strip.png"
    strip.write_bytes(bomb_png(1, 100_000))
    assert len(strip.read_bytes()) < 300
    photo = next((demo_data / "test").rglob("*.jpg"))
    out = subprocess.run(
        [sys.executable, "-c", STRIP_PROBE, str(trained_model), str(photo), str(strip)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout.splitlines()[-1])
    print(f"1 x 100,000 px PNG: {got['seconds'] * 1000:.1f} ms, peak RSS growth {got['peak_growth_mb']:.1f} MB")
    assert got["error"] and "1x100000 pixels: one side is more than 20 times the other" in got["error"]
    assert got["seconds"] < 5 and got["peak_growth_mb"] < 300  # measured: about 1 ms and 0 MB


def test_server_error_bodies_carry_no_python_reprs_and_deep_json_is_400(server):
    url = server.url + "/invocations"
    for body, ctype, needle in (
        (b"junk bytes", "image/png", "not a decodable image"),
        (b"GIF89a" + bytes(20), "image/png", "not a decodable image"),
        (b"[" * 100_000, "application/json", "nested too deeply"),
        (b'{"image": ' + b"[" * 100_000, "application/json", "nested too deeply"),
        (bomb_png(1, 100_000), "image/png", "more than 20 times"),
    ):
        status, answer = http(url, body, {"Content-Type": ctype})
        assert status == 400 and needle in answer["error"], answer
        assert " at 0x" not in answer["error"] and "<_io" not in answer["error"], answer


class GatedPredictor(Predictor):
    """A Predictor whose forward pass waits for the test to open the gate."""

    gate = threading.Event()

    def predict_tensors(self, tensors, requests):
        assert self.gate.wait(60)
        return super().predict_tensors(tensors, requests)


def test_overload_gets_an_immediate_503_and_ping_stays_ready(trained_model, images):
    from ec2train.server import create_app

    GatedPredictor.gate.clear()
    app = create_app(
        trained_model, max_batch=1, max_pending=2, load=lambda: GatedPredictor(trained_model), compile="off"
    )
    jpeg = images["Circle"][0]
    with ServerThread(app) as srv, ThreadPoolExecutor(2) as pool:
        srv.wait_ready()
        admitted = [pool.submit(http, srv.url + "/invocations", jpeg, {"Content-Type": "image/jpeg"}) for _ in range(2)]
        deadline = time.monotonic() + 60
        while http(srv.url + "/stats")[1]["in_progress"] < 2:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        # Both slots are held by requests that cannot finish until the gate opens, so these
        # answers cannot have waited for them.
        for _ in range(3):
            status, answer = http(srv.url + "/invocations", jpeg, {"Content-Type": "image/jpeg"})
            assert status == 503 and "server is busy" in answer["error"], answer
        assert http(srv.url + "/ping") == (200, {"status": "ready"})
        GatedPredictor.gate.set()
        assert [f.result(timeout=60)[0] for f in admitted] == [200, 200]
        assert http(srv.url + "/invocations", jpeg, {"Content-Type": "image/jpeg"})[0] == 200


class MeetingPredictor(Predictor):
    """A Predictor whose forward passes wait (up to 3 s) for a second pass to be running too."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.both_running = threading.Barrier(2)
        self.overlapped = 0

    def predict_tensors(self, tensors, requests):
        try:
            self.both_running.wait(3)
            self.overlapped += 1
        except threading.BrokenBarrierError:
            self.both_running.reset()
        return super().predict_tensors(tensors, requests)


@pytest.mark.parametrize("cpus, lanes", [(4, 2), (1, 1)])
def test_forward_passes_run_in_as_many_lanes_as_the_plan_says(trained_model, images, monkeypatch, cpus, lanes):
    from ec2train import threads
    from ec2train.server import create_app

    monkeypatch.setattr(threads, "available_cpus", lambda: cpus)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    predictor = MeetingPredictor(trained_model)
    app = create_app(trained_model, max_batch=1, load=lambda: predictor, compile="off")
    jpeg = images["Circle"][0]
    with ServerThread(app) as srv, ThreadPoolExecutor(2) as pool:
        srv.wait_ready()
        answers = list(pool.map(lambda _: http(srv.url + "/invocations", jpeg, {"Content-Type": "image/jpeg"}), [0, 1]))
        stats = http(srv.url + "/stats")[1]
    assert [status for status, _ in answers] == [200, 200]
    assert stats["lanes"] == lanes and stats["batches"] == 2
    # Two lanes: both passes were running at the same moment. One lane: the first waited alone.
    assert predictor.overlapped == (2 if lanes == 2 else 0)


def test_a_free_lane_waits_for_its_share_while_the_other_pass_runs():
    """Lanes: a second pass takes at most its share (half of the requests in the server at the
    fullest moment of the last second) and starts only once that many are queued, or once the
    running pass has ended, so a loaded box runs equal passes rather than many small ones."""
    import asyncio

    from ec2train.batching import Batcher, BatchStats

    passes, release = [], threading.Event()

    class Blocking:
        def predict_tensors(self, tensors, requests):
            passes.append(len(tensors))
            if len(passes) == 1:
                release.wait(10)  # the first pass runs until the test lets it end
            return [{"n": t} for t in tensors]

    async def scenario():
        loop = asyncio.get_running_loop()
        with ThreadPoolExecutor(2) as pool:
            batcher = Batcher(8, 0.0, pool, BatchStats(), lanes=2)
            batcher.predictor = Blocking()
            runner = asyncio.create_task(batcher.run())
            first = asyncio.ensure_future(batcher.submit(0, None))
            while not passes:
                await asyncio.sleep(0.01)
            two = [asyncio.ensure_future(batcher.submit(i, None)) for i in (1, 2)]
            await asyncio.sleep(0.3)
            paired = list(passes)  # 3 in the server, a share of 2, and 2 queued: the free lane goes
            await asyncio.gather(*two)
            seven = [asyncio.ensure_future(batcher.submit(i, None)) for i in range(3, 10)]
            answers = await asyncio.gather(*seven[:4])
            after_seven = list(passes)  # 8 in the server: passes of 4, and 3 left over wait
            await asyncio.sleep(0.3)
            held_rest = list(passes)
            await loop.run_in_executor(None, release.set)
            rest = await asyncio.gather(first, *seven[4:])
            runner.cancel()
            return paired, answers, after_seven, held_rest, rest

    paired, answers, after_seven, held_rest, rest = asyncio.run(scenario())
    assert paired == [1, 2]
    assert after_seven == [1, 2, 4] and [a["n"] for a in answers] == [3, 4, 5, 6]
    assert held_rest == [1, 2, 4]  # three queued, fewer than the share of 4: they wait for the first pass...
    assert passes == [1, 2, 4, 3] and [a["n"] for a in rest] == [0, 7, 8, 9]  # ...and then go


@pytest.mark.fast
def test_one_lane_takes_a_whole_batch_and_the_share_follows_the_last_second():
    from ec2train.batching import Batcher, BatchStats, PeakWindow

    window = PeakWindow(1.0)
    assert [window.add(t, v) for t, v in [(0.0, 3), (0.5, 8), (0.9, 2), (1.4, 1), (1.6, 5), (2.7, 0)]] == [
        3,
        8,
        8,
        8,  # 8 was seen at 0.5, within the second
        5,  # 8 has left the window; 5 came at 1.6
        0,
    ]
    now = [0.0]
    with ThreadPoolExecutor(1) as pool:
        one = Batcher(8, 0.0, pool, BatchStats(), lanes=1, clock=lambda: now[0])
        two = Batcher(8, 0.0, pool, BatchStats(), lanes=2, clock=lambda: now[0])
        one.preparing = two.preparing = 16
        assert one.share() == 8 and two.share() == 8  # 16 in the server: half each, at most max_batch
        two.preparing = 7
        assert two.share() == 8  # the peak of the last second still counts
        now[0] = 1.5
        assert two.share() == 4  # ceil(7 / 2)
        two.preparing = 1
        now[0] = 3.0
        assert two.share() == 1


def test_predictor_runs_channels_last_and_answers_as_the_plain_model(trained_model, images):
    import torch

    from ec2train.model import model_from_file

    predictor = Predictor(trained_model)
    assert predictor.memory_format == torch.channels_last
    conv = next(m for m in predictor.model.modules() if isinstance(m, torch.nn.Conv2d))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    plain, _ = model_from_file(trained_model)
    batch = torch.stack([predictor.preprocess(jpeg) for jpegs in images.values() for jpeg in jpegs[:2]])
    with torch.inference_mode():
        want = plain.eval()(batch)
    assert torch.allclose(predictor.logits(batch), want, atol=1e-4)


def test_a_body_that_stops_arriving_gets_408(trained_model):
    import socket

    from ec2train.server import create_app

    with ServerThread(create_app(trained_model, body_timeout=0.5, compile="off")) as srv:
        srv.wait_ready()
        port = int(srv.url.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
            sock.sendall(
                b"POST /invocations HTTP/1.1\r\nHost: x\r\nContent-Type: image/jpeg\r\n"
                b"Content-Length: 1000\r\n\r\n" + b"\xff" * 10
            )
            answer = b""
            while b"did not arrive" not in answer:  # head and body may come in separate packets
                chunk = sock.recv(65536)
                if not chunk:
                    break
                answer += chunk
        assert answer.startswith(b"HTTP/1.1 408"), answer
        assert b"did not arrive within 0.5 s" in answer


def _raise_nofile(wanted: int) -> int:
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(wanted, hard), hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def _server_fd_limit(limit: int):
    def apply():
        import resource

        resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit))

    return apply


def test_ping_answers_while_1000_idle_connections_are_held(trained_model):
    # Issue 13.4: under `ulimit -n 1024`, 1,100 idle sockets starved /ping and filled the log
    # with "Too many open files". Here the server runs under the same `ulimit -n 1024` (hard
    # limit too, so it cannot raise it) and 1,000 clients connect and send nothing, or half a
    # request head.
    import selectors
    import socket

    count = min(1000, _raise_nofile(1300) - 200)
    proc, url = start_cli_server(
        trained_model, preexec_fn=_server_fd_limit(1024), env={**os.environ, "EC2TRAIN_SERVE_HEADER_TIMEOUT": "2"}
    )
    port = int(url.rsplit(":", 1)[1])
    idle: list[socket.socket] = []
    try:
        for i in range(count):
            sock = socket.create_connection(("127.0.0.1", port), timeout=10)
            if i % 2:
                sock.sendall(b"GET /ping HTTP/1.1\r\nHost: x\r\n")  # never finished
            idle.append(sock)
        started = time.monotonic()
        status, answer = http(url + "/ping")
        took = time.monotonic() - started
        print(f"/ping with {count} idle connections held: {took * 1000:.0f} ms")
        assert (status, answer) == (200, {"status": "ready"})
        assert took < 5  # measured: well under a second
        # Every idle connection is closed by the server: evicted for room, or at the head deadline.
        # epoll, not select(): the test process's own descriptors run past 1024 here.
        open_ = selectors.DefaultSelector()
        for sock in idle:
            open_.register(sock, selectors.EVENT_READ)
        deadline = time.monotonic() + 60
        while open_.get_map() and time.monotonic() < deadline:
            for key, _ in open_.select(timeout=1):
                try:
                    data = key.fileobj.recv(1024)
                except ConnectionResetError:
                    data = b""
                if not data:
                    open_.unregister(key.fileobj)
        assert not open_.get_map(), f"{len(open_.get_map())} idle connections were never closed"
        open_.close()
        assert http(url + "/ping")[0] == 200
    finally:
        for sock in idle:
            sock.close()
        proc.terminate()
        out = proc.communicate(timeout=30)[0]
    assert "Too many open files" not in out and "Traceback" not in out, out[-3000:]
