"""The Lambda handler end to end on loopback: event shapes in, JSON answers out.

The handler's real boto3 sagemaker-runtime client talks to a stand-in endpoint server on
127.0.0.1 (through AWS_ENDPOINT_URL_SAGEMAKER_RUNTIME, as the function would be pointed at
`ec2train serve`); URLs are fetched from a real local image server. Nothing is mocked except
DNS where a test needs a name.
"""

from __future__ import annotations

import base64
import io
import json
import socket
import time
from types import SimpleNamespace

import pytest

from tests.support.lambda_env import (
    CHUNKS_PNG,
    FUNCTION_ENV,
    JPEG,
    NOT_IMAGE,
    PNG,
    PREDICTIONS,
    SCANS_JPEG,
    STRIP_PNG,
    EndpointStandIn,
    ImageServer,
    b64,
    load_image_rules,
    load_lambda,
)

safe_fetch, handler = load_lambda()
image_rules = load_image_rules()
CONTEXT = SimpleNamespace(aws_request_id="req-1234", function_name="dog-breeds")


@pytest.fixture(scope="module")
def images():
    s = ImageServer()
    yield s
    s.stop()


@pytest.fixture(scope="module")
def endpoint():
    s = EndpointStandIn()
    yield s
    s.stop()


@pytest.fixture(autouse=True)
def fn(monkeypatch, images, endpoint):
    """The function's environment: endpoint `dogs` on the stand-in, the image server allowed."""
    for name in FUNCTION_ENV:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("ENDPOINT_NAME", "dogs")
    monkeypatch.setenv("AWS_ENDPOINT_URL_SAGEMAKER_RUNTIME", endpoint.url)
    monkeypatch.setenv("ENDPOINT_READ_TIMEOUT", "0.5")
    monkeypatch.setenv("ALLOW_HTTP", "true")
    monkeypatch.setenv("ALLOWED_PORTS", str(images.port))
    monkeypatch.setenv("SSRF_ALLOW_LOOPBACK_FOR_TESTS", "1")
    monkeypatch.setenv("FETCH_TIMEOUT", "2")
    handler.reset_client()  # settings above are read when the client is made
    endpoint.requests.clear()
    yield
    handler.reset_client()


def invoke(event, capsys, context=CONTEXT):
    """Call the handler; return (status, parsed body, log records, raw answer)."""
    capsys.readouterr()
    answer = handler.lambda_handler(event, context)
    out = capsys.readouterr().out
    logs = [json.loads(line) for line in out.splitlines() if line.strip()]
    assert set(answer) == {"statusCode", "headers", "body", "isBase64Encoded"}
    assert answer["headers"]["Content-Type"] == "application/json"
    body = json.loads(answer["body"])
    assert body["request_id"] == answer["headers"]["X-Request-Id"]
    assert len(logs) == 1, "one log line per request"
    return answer["statusCode"], body, logs[0], answer


def http_v1(body: str, content_type="application/json", b64_encoded=False, query=None):
    return {
        "resource": "/predict",
        "path": "/predict",
        "httpMethod": "POST",
        "headers": {"Content-Type": content_type},
        "queryStringParameters": query,
        "requestContext": {"requestId": "apigw-1", "stage": "prod"},
        "body": body,
        "isBase64Encoded": b64_encoded,
    }


def http_v2(body: str, content_type="application/json", b64_encoded=False, query=None):
    return {
        "version": "2.0",
        "routeKey": "$default",
        "rawPath": "/",
        "rawQueryString": "",
        "headers": {"content-type": content_type},
        "queryStringParameters": query,
        "requestContext": {"http": {"method": "POST", "path": "/"}, "requestId": "url-1"},
        "body": body,
        "isBase64Encoded": b64_encoded,
    }


EXPECTED_TOP = sorted(PREDICTIONS, key=lambda p: p["probability"], reverse=True)


# --------------------------------------------------------------------------- happy paths


def test_direct_url_event(capsys, images, endpoint):
    status, body, log, _ = invoke({"url": images.url("/dog.png")}, capsys)
    assert status == 200
    assert body == {"breed": "Poodle", "probability": 0.8, "top_k": EXPECTED_TOP[:5], "request_id": "req-1234"}
    call = endpoint.requests[-1]
    assert call["name"] == "dogs" and call["body"] == PNG
    assert call["content_type"] == "application/x-image" and call["accept"] == "application/json"
    assert call["custom_attributes"] == "top_k=5"
    assert call["signed"], "boto3 signed the request: a real client, not a hand-made POST"
    assert log["source"] == "direct:url" and log["status"] == 200 and log["bytes"] == len(PNG)


def test_direct_base64_event_with_top_k(capsys, endpoint):
    status, body, log, _ = invoke({"image": b64(JPEG), "top_k": 3}, capsys)
    assert status == 200 and body["top_k"] == EXPECTED_TOP[:3]
    assert endpoint.requests[-1]["body"] == JPEG
    assert endpoint.requests[-1]["custom_attributes"] == "top_k=3"
    assert log["source"] == "direct:image" and log["top_k"] == 3


def test_data_uri_and_wrapped_base64_are_accepted(capsys, endpoint):
    wrapped = "\n".join(b64(PNG)[i : i + 76] for i in range(0, len(b64(PNG)), 76))
    status, _, _, _ = invoke({"image": "data:image/png;base64," + wrapped}, capsys)
    assert status == 200 and endpoint.requests[-1]["body"] == PNG


def test_api_gateway_rest_v1_json_body(capsys, endpoint):
    status, body, log, _ = invoke(http_v1(json.dumps({"image": b64(PNG), "top_k": 2})), capsys)
    assert status == 200 and body["breed"] == "Poodle" and len(body["top_k"]) == 2
    assert log["source"] == "http:image"


def test_http_v2_function_url_base64_encoded_json_body(capsys, images, endpoint):
    raw = json.dumps({"url": images.url("/dog.jpg")}).encode()
    status, body, log, _ = invoke(http_v2(base64.b64encode(raw).decode(), b64_encoded=True), capsys)
    assert status == 200 and endpoint.requests[-1]["body"] == JPEG
    assert log["source"] == "http:url"


@pytest.mark.parametrize("make", [http_v1, http_v2])
def test_raw_image_body_with_top_k_in_the_query(capsys, endpoint, make):
    event = make(b64(JPEG), content_type="image/jpeg", b64_encoded=True, query={"top_k": "2"})
    status, body, _, _ = invoke(event, capsys)
    assert status == 200 and len(body["top_k"]) == 2
    assert endpoint.requests[-1]["body"] == JPEG


def test_the_client_is_made_once_per_container(capsys):
    invoke({"image": b64(PNG)}, capsys)
    first = handler.get_client()
    invoke({"image": b64(PNG)}, capsys)
    assert handler.get_client() is first
    handler.reset_client()
    assert handler.get_client() is not first


def test_request_id_is_generated_without_a_context(capsys):
    status, body, log, _ = invoke({"image": b64(PNG)}, capsys, context=None)
    assert status == 200 and len(body["request_id"]) == 36 and log["request_id"] == body["request_id"]


# --------------------------------------------------------------------------- 400 bad input


@pytest.mark.parametrize(
    "event,message",
    [
        ({}, "give a url or a base64 image"),
        ({"url": "https://example.com/a.png", "image": b64(PNG)}, "give either url or image, not both"),
        ({"image": "!!!not base64!!!"}, "image is not valid base64"),
        ({"image": 12}, "image must be a base64 string"),
        ({"image": b64(NOT_IMAGE)}, "image is not a JPEG, PNG, GIF, WebP or BMP"),
        ({"url": 5}, "url must be a string"),
        ({"image": b64(PNG), "top_k": 0}, "top_k must be an integer from 1 to 20"),
        ({"image": b64(PNG), "top_k": 21}, "top_k must be an integer from 1 to 20"),
        ({"image": b64(PNG), "top_k": "abc"}, "top_k must be an integer from 1 to 20"),
        ({"image": b64(PNG), "top_k": True}, "top_k must be an integer from 1 to 20"),
        ({"image": b64(PNG), "top_k": 2.5}, "top_k must be an integer from 1 to 20"),
        ({"url": "file:///etc/passwd"}, "url scheme must be https or http"),
        (
            {"url": "http://169.254.169.254:{port}/latest/meta-data/"},
            "url host resolves to the instance metadata address",
        ),
        ([1, 2], "event must be a JSON object"),
        (http_v1("not json"), "request body is not valid JSON"),
        (http_v1("[1, 2]"), "request body must be a JSON object"),
        (http_v1(""), "request body is empty: send JSON with url or image, or an image"),
        (http_v2("%%%", b64_encoded=True), "request body is not valid base64-encoded UTF-8"),
        (
            http_v2(b64(NOT_IMAGE), content_type="image/png", b64_encoded=True),
            "image is not a JPEG, PNG, GIF, WebP or BMP",
        ),
        # Issue 13.8: these were 500 "internal error" (ValueError, RecursionError).
        ({"url": "https://[::1/"}, "url is malformed"),
        ({"url": "http://127.0.0.1:{port}/redirect?to=https://%5B::1/"}, "redirect refused: url is malformed"),
        (http_v1("[" * 100_000 + "]" * 100_000), "request body is JSON nested too deeply"),
        (http_v1('{"image": ' + "[" * 100_000), "request body is JSON nested too deeply"),
    ],
)
def test_bad_input_is_400_with_a_reason(capsys, images, event, message):
    if isinstance(event, dict) and isinstance(event.get("url"), str):
        event = {**event, "url": event["url"].format(port=images.port)}
    status, body, log, _ = invoke(event, capsys)
    assert (status, body["error"]) == (400, message)
    assert body["request_id"] == "req-1234" and log["level"] == "WARNING" and log["error"] == message


def test_a_name_resolving_privately_is_400(capsys, monkeypatch, images):
    monkeypatch.setattr(safe_fetch, "resolve", lambda host, port: ["10.0.0.7"])
    status, body, _, _ = invoke({"url": f"http://intranet.example:{images.port}/dog.png"}, capsys)
    assert (status, body["error"]) == (400, "url host resolves to a private address")


# --------------------------------------------------------------------------- the endpoint's size rule


STRIP_ERROR = "image is 1x100000 pixels: one side is more than 20 times the other; crop it closer to the subject"


@pytest.mark.parametrize("source", ["inline", "raw", "url"])
def test_extreme_aspect_ratio_is_400_before_invoking_the_endpoint(capsys, images, endpoint, source):
    # 274 bytes that cost the endpoint 9 s and 2.3 GB (issue 13.1): refused from the header.
    event = {
        "inline": {"image": b64(STRIP_PNG)},
        "raw": http_v2(b64(STRIP_PNG), content_type="image/png", b64_encoded=True),
        "url": {"url": images.url("/strip.png")},
    }[source]
    status, body, _, _ = invoke(event, capsys)
    assert (status, body["error"]) == (400, STRIP_ERROR)
    assert endpoint.requests == []


def test_size_rule_is_the_endpoints_rule():
    # The Lambda zip cannot import ec2train: it carries a copy of the rule. Same limits, same answers.
    from ec2train import preprocess

    assert (image_rules.MAX_PIXELS, image_rules.MAX_ASPECT_RATIO) == (
        preprocess.MAX_PIXELS,
        preprocess.MAX_ASPECT_RATIO,
    )
    sides = [1, 2, 19, 20, 21, 224, 999, 1000, 6324, 6325, 20_000, 20_001, 65_535]
    for w in sides:
        for h in sides:
            assert image_rules.size_problem(w, h) == preprocess.size_problem(w, h), (w, h)
    assert image_rules.size_problem(1, 100_000) == STRIP_ERROR


@pytest.mark.parametrize("source", ["inline", "raw", "url"])
def test_a_jpeg_of_thousands_of_scans_is_400_before_invoking_the_endpoint(capsys, images, endpoint, source):
    # Issue 26.1: 44 KB that cost the endpoint about 8 s of CPU; the function sees the bytes first.
    event = {
        "inline": {"image": b64(SCANS_JPEG)},
        "raw": http_v2(b64(SCANS_JPEG), content_type="image/jpeg", b64_encoded=True),
        "url": {"url": images.url("/scans.jpg")},
    }[source]
    status, body, _, _ = invoke(event, capsys)
    assert status == 400 and body["error"].startswith("JPEG has more than 100 scans, the most allowed for 2000x2000")
    assert endpoint.requests == []
    status, body, _, _ = invoke({"image": b64(CHUNKS_PNG)}, capsys)
    assert status == 400 and body["error"].startswith("PNG has more than"), body
    assert endpoint.requests == []


def test_structure_rule_is_the_endpoints_rule():
    # The zip's copy of preprocess.structure_problem: same limits, same answers, for ordinary files,
    # each hostile shape, and files damaged at random.
    import random

    from PIL import Image

    from ec2train import preprocess
    from tests.support.images import (
        JPEG_STRAY_GAPS,
        header_flood_jpegs,
        many_chunk_png,
        many_scan_jpeg,
        phone_like_jpeg,
        photo_like,
        with_segments,
    )

    names = (
        "MAX_JPEG_SCANS",
        "MAX_SCAN_PIXELS",
        "MAX_JPEG_SEGMENTS",
        "MAX_JPEG_STRAY_BYTES",
        "MAX_JPEG_PARSED_BYTES",
        "PNG_FREE_CHUNKS",
        "PNG_BYTES_PER_CHUNK",
        "JPEG_FRAMES",
        "JPEG_DECODED",
    )
    assert [getattr(image_rules, n) for n in names] == [getattr(preprocess, n) for n in names]
    photo = photo_like(300, 200)
    samples = [
        _encode(photo, "JPEG"),
        _encode(photo, "JPEG", progressive=True),
        _encode(photo, "PNG"),
        _encode(Image.new("RGB", (5, 5)), "GIF"),
        SCANS_JPEG,
        CHUNKS_PNG,
        many_chunk_png(40, 40, 1000),
        many_chunk_png(40, 40, 1001),
        many_chunk_png(40, 40, 1001, before_data=True),
        *(many_scan_jpeg(w, h, n) for w, h, n in ((64, 64, 94), (64, 64, 95), (4000, 3000, 47), (4000, 3000, 48))),
        *(many_scan_jpeg(256, 256, 200, gap=gap) for gap in JPEG_STRAY_GAPS.values()),
        *header_flood_jpegs(600_000).values(),
        phone_like_jpeg(),
        with_segments(samples_jpeg := _encode(photo, "JPEG"), b"\xff\xf0" + b"\xff" * 5000),
    ]
    prog = samples[1]
    sof = prog.index(b"\xff\xc2")
    samples += [prog[: sof + 1] + bytes([m]) + prog[sof + 2 :] for m in (0xC3, 0xC9, 0xCE)]
    samples += [prog[: len(prog) // 2], JPEG, PNG, NOT_IMAGE, b"\xff\xd8\xff"]
    made, rng = len(samples), random.Random(0)
    for _ in range(300):  # damaged: bytes changed, cut out or put in
        data = bytearray(rng.choice((prog, samples_jpeg)))
        for _ in range(rng.randint(1, 4)):
            at = rng.randrange(len(data))
            data[at : at + rng.randint(0, 8)] = bytes(
                rng.choice((0x00, 0xFF, 0xD9, 0xDA, rng.randrange(256))) for _ in range(rng.randint(0, 8))
            )
        samples.append(bytes(data))
    answers = [image_rules.structure_problem(data) for data in samples]
    assert answers == [preprocess.structure_problem(data) for data in samples]
    refused = sum(a is not None for a in answers[:made])
    assert refused == 20, refused  # the three kinds, the marker, each scan limit, stray gap, flood and chunk rule


def _encode(img, fmt: str, **options) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **options)
    return buf.getvalue()


@pytest.mark.parametrize(
    "fmt, options",
    [
        ("JPEG", {}),
        ("JPEG", {"progressive": True}),
        ("JPEG", {"exif": b"Exif\x00\x00" + bytes(5000)}),
        ("PNG", {}),
        ("GIF", {}),
        ("BMP", {}),
        ("WEBP", {"quality": 80}),
        ("WEBP", {"lossless": True}),
        ("WEBP_ALPHA", {"quality": 80}),
    ],
)
def test_header_sizes_match_pillow(fmt, options):
    from PIL import Image

    for size in ((37, 5), (5, 37), (300, 17), (1, 1), (4000, 3)):
        mode = "RGBA" if fmt == "WEBP_ALPHA" else "RGB"
        data = _encode(Image.new(mode, size, "red"), fmt.split("_")[0], **options)
        with Image.open(io.BytesIO(data)) as img:
            assert image_rules.image_size(data) == img.size == size, (fmt, options, size)


def test_unreadable_headers_are_left_to_the_endpoint():
    for data in (JPEG, b"\xff\xd8\xff", PNG[:20], NOT_IMAGE):
        assert image_rules.image_size(data) in (None, (1, 1))
    assert image_rules.image_size(JPEG) is None  # no frame header: the endpoint's decoder decides


def test_busy_endpoint_is_503_and_not_retried(capsys, monkeypatch, endpoint):
    monkeypatch.setenv("ENDPOINT_NAME", "busy")
    status, body, _, _ = invoke({"image": b64(PNG)}, capsys)
    assert (status, body["error"]) == (503, "the endpoint is busy; retry in a moment")
    assert len(endpoint.requests) == 1


# --------------------------------------------------------------------------- 413 too large


def test_inline_image_over_the_cap_is_413(capsys, monkeypatch, endpoint):
    monkeypatch.setenv("MAX_IMAGE_BYTES", "1000")
    status, body, _, _ = invoke({"image": b64(JPEG)}, capsys)
    assert (status, body["error"]) == (413, "image is larger than 1000 bytes")
    assert endpoint.requests == []


def test_raw_body_over_the_cap_is_413(capsys, monkeypatch):
    monkeypatch.setenv("MAX_IMAGE_BYTES", "1000")
    status, _, _, _ = invoke(http_v2(b64(JPEG), content_type="image/jpeg", b64_encoded=True), capsys)
    assert status == 413


def test_fetched_image_over_the_cap_is_413(capsys, monkeypatch, images):
    monkeypatch.setenv("MAX_IMAGE_BYTES", "100000")
    status, body, _, _ = invoke({"url": images.url("/huge-chunked?bytes=500000")}, capsys)
    assert (status, body["error"]) == (413, "image is larger than 100000 bytes")


# --------------------------------------------------------------------------- 502 / 504 upstream


@pytest.mark.parametrize(
    "name,message,calls",
    [
        ("model-error", "the model failed on this image (ModelError)", 1),
        ("internal", "endpoint call failed (InternalFailure)", 3),  # 5xx: boto3 retried twice
        ("not-json", "endpoint returned a non-JSON answer", 1),
        ("bad-shape", "endpoint returned an unexpected answer", 1),
        ("no-such-endpoint", "endpoint call failed (ValidationError)", 1),
    ],
)
def test_endpoint_failures_are_502(capsys, monkeypatch, endpoint, name, message, calls):
    monkeypatch.setenv("ENDPOINT_NAME", name)
    status, body, log, answer = invoke({"image": b64(PNG)}, capsys)
    assert (status, body["error"]) == (502, message)
    assert len(endpoint.requests) == calls
    assert "secret model internals" not in answer["body"] and "secret" not in json.dumps(log)


def test_slow_endpoint_is_504_and_never_sent_the_image_twice(capsys, monkeypatch, endpoint):
    # A read timeout means the model is still working on the image: another try would double
    # the load of exactly the requests that are expensive (issue 13.1). botocore's standard
    # retry mode sent it 3 times.
    monkeypatch.setenv("ENDPOINT_NAME", "slow")
    monkeypatch.setenv("ENDPOINT_READ_TIMEOUT", "0.3")
    start = time.monotonic()
    status, body, _, _ = invoke({"image": b64(PNG)}, capsys)
    assert (status, body["error"]) == (504, "endpoint timed out")
    assert len(endpoint.requests) == 1
    assert time.monotonic() - start < 4


def test_unreachable_endpoint_is_502(capsys, monkeypatch):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    monkeypatch.setenv("AWS_ENDPOINT_URL_SAGEMAKER_RUNTIME", f"http://127.0.0.1:{port}")
    status, body, _, _ = invoke({"image": b64(PNG)}, capsys)
    assert (status, body["error"]) == (502, "could not reach the endpoint")


def test_url_failures_upstream_are_502_and_504(capsys, monkeypatch, images):
    status, body, _, _ = invoke({"url": images.url("/missing")}, capsys)
    assert (status, body["error"]) == (502, "url answered HTTP 404")
    status, body, _, _ = invoke({"url": images.url("/page.html")}, capsys)
    assert (status, body["error"]) == (400, "url did not return an image (JPEG, PNG, GIF, WebP or BMP)")
    monkeypatch.setenv("FETCH_TIMEOUT", "0.5")
    status, body, _, _ = invoke({"url": images.url("/hang")}, capsys)
    assert (status, body["error"]) == (504, "fetching the url timed out")


# --------------------------------------------------------------------------- 500 configuration / internal


def test_missing_endpoint_name_is_a_clear_500(capsys, monkeypatch):
    monkeypatch.delenv("ENDPOINT_NAME")
    status, body, log, _ = invoke({"image": b64(PNG)}, capsys)
    assert (status, body["error"]) == (500, "function is misconfigured: ENDPOINT_NAME is not set")
    assert log["level"] == "ERROR"


@pytest.mark.parametrize(
    "env,value", [("ENDPOINT_NAME", "dogs_v2!"), ("MAX_IMAGE_BYTES", "lots"), ("ALLOWED_PORTS", "https")]
)
def test_bad_settings_are_500_and_name_the_setting(capsys, monkeypatch, env, value):
    monkeypatch.setenv(env, value)
    status, body, _, _ = invoke({"image": b64(PNG)}, capsys)
    assert status == 500 and env in body["error"]


def test_unexpected_errors_never_reach_the_caller_or_the_log(capsys, monkeypatch, images):
    def resolver_that_breaks(host, port):
        raise RuntimeError("boom with token=SECRET-abc in the message")

    monkeypatch.setattr(safe_fetch, "resolve", resolver_that_breaks)
    status, body, log, answer = invoke({"url": f"http://images.example:{images.port}/dog.png"}, capsys)
    assert (status, body) == (500, {"error": "internal error", "request_id": "req-1234"})
    assert log["error_type"] == "RuntimeError"
    for text in (answer["body"], json.dumps(log)):
        assert "SECRET" not in text and "Traceback" not in text


# --------------------------------------------------------------------------- logs


def test_logs_carry_no_image_data_query_strings_or_secrets(capsys, monkeypatch, images):
    big = JPEG + bytes(range(256)) * 40
    encoded = b64(big)
    _, _, log, _ = invoke({"image": encoded}, capsys)
    text = json.dumps(log)
    assert all(encoded[i : i + 24] not in text for i in range(0, len(encoded) - 24, 24))
    assert set(log) >= {"request_id", "source", "bytes", "status", "latency_ms"}
    assert log["bytes"] == len(big) and isinstance(log["latency_ms"], float)

    _, _, log, _ = invoke({"url": images.url("/dog.png?token=SECRET-query&sig=abc")}, capsys)
    text = json.dumps(log)
    assert log["url_host"] == "127.0.0.1" and "SECRET" not in text and "/dog.png" not in text
    assert "AWS_SECRET_ACCESS_KEY" not in text and "testing" not in text

    status, _, log, _ = invoke({"url": "https://user:hunter2@images.example/dog.png"}, capsys)
    assert status == 400 and log["url_host"] == "images.example" and "hunter2" not in json.dumps(log)
