"""ec2train's Lambda front door: validated image in, breed names out.

Handler: `handler.lambda_handler` (Python 3.12 runtime, standard library + boto3 only).
Events, settings and status codes are described in README.md beside this file.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import os
import random
import re
import sys
import time
import urllib.parse
import uuid

import image_rules
import safe_fetch
from safe_fetch import ConfigError, FetchError

DEFAULT_TOP_K = 5
MAX_TOP_K = 20
MAX_ENDPOINT_ANSWER_BYTES = 1_000_000
# Tries of one invocation; only failures that never reached the model are retried (`_retryable`).
ENDPOINT_ATTEMPTS = 3
# SageMaker's own throttling and transient errors (not ModelError: that is the container's answer).
_RETRY_CODES = {"ThrottlingException", "InternalFailure", "ServiceUnavailable"}
ENDPOINT_CONTENT_TYPE = "application/x-image"  # SageMaker's convention for "any image format"
# SageMaker's rule for endpoint names.
_ENDPOINT_NAME_RE = re.compile(r"^[a-zA-Z0-9](-*[a-zA-Z0-9]){0,62}$")
_RAW_BODY_TYPES = ("image/", "application/x-image", "application/octet-stream")
_DATA_URI_RE = re.compile(r"^data:image/[a-z0-9.+-]+;base64,", re.IGNORECASE)

_client = None  # one sagemaker-runtime client per container, made on first use


class BadRequest(Exception):
    status = 400

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.message = message
        self.status = status


# --------------------------------------------------------------------------- endpoint client


def get_client():
    """The container's sagemaker-runtime client, created on first use and then reused.

    Endpoint URL comes from boto3's own settings (AWS_ENDPOINT_URL_SAGEMAKER_RUNTIME), which is
    how tests point it at a local server. botocore's retries are off: its standard mode also
    retries read timeouts, which would send a slow (expensive) image to the model again;
    `_invoke_endpoint` retries only what never reached the model.
    """
    global _client
    if _client is None:
        import boto3
        from botocore.config import Config

        _client = boto3.client(
            "sagemaker-runtime",
            config=Config(
                connect_timeout=safe_fetch.env_number("ENDPOINT_CONNECT_TIMEOUT", 2.0),
                read_timeout=safe_fetch.env_number("ENDPOINT_READ_TIMEOUT", 5.0),
                retries={"mode": "standard", "total_max_attempts": 1},
            ),
        )
    return _client


def reset_client() -> None:
    """Forget the cached client (tests, or after changing endpoint settings in-process)."""
    global _client
    _client = None


def _model_error_reason(original_message) -> str:
    """The container's {"error": ...} text, bounded; never the raw body of something else."""
    try:
        reason = json.loads(original_message)["error"]
    except (TypeError, ValueError, KeyError):
        return "it was refused"
    return str(reason)[:200] if isinstance(reason, str) else "it was refused"


def _retryable(exc: Exception) -> bool:
    """Failures that did not reach the model: safe to try again. Never a read timeout."""
    from botocore.exceptions import ClientError, ConnectionError

    if isinstance(exc, ClientError):
        return exc.response.get("Error", {}).get("Code") in _RETRY_CODES
    return isinstance(exc, ConnectionError)  # connect timeouts and refused connections


def _call_endpoint(endpoint: str, image: bytes, top_k: int) -> bytes:
    """invoke_endpoint, with up to ENDPOINT_ATTEMPTS tries of what `_retryable` allows."""
    for attempt in range(1, ENDPOINT_ATTEMPTS + 1):
        try:
            answer = get_client().invoke_endpoint(
                EndpointName=endpoint,
                ContentType=ENDPOINT_CONTENT_TYPE,
                Accept="application/json",
                CustomAttributes=f"top_k={top_k}",
                Body=image,
            )
            return answer["Body"].read(MAX_ENDPOINT_ANSWER_BYTES + 1)
        except Exception as exc:
            if attempt == ENDPOINT_ATTEMPTS or not _retryable(exc):
                raise
            time.sleep(random.uniform(0, 0.1 * 2**attempt))  # full jitter, as botocore does


def _invoke_endpoint(endpoint: str, image: bytes, top_k: int) -> list[dict]:
    from botocore.exceptions import (
        BotoCoreError,
        ClientError,
        ConnectTimeoutError,
        EndpointConnectionError,
        NoCredentialsError,
        ReadTimeoutError,
    )

    try:
        raw = _call_endpoint(endpoint, image, top_k)
    except ClientError as exc:
        code = exc.response.get("Error", {}).get("Code", "Unknown")
        if code == "ModelError":
            # SageMaker passes the container's own status on: a 4xx there is the caller's image.
            original = exc.response.get("OriginalStatusCode")
            if original == 503:  # `ec2train serve` shedding load: the caller may retry later, we don't
                raise BadRequest("the endpoint is busy; retry in a moment", 503) from None
            if isinstance(original, int) and 400 <= original < 500:
                reason = _model_error_reason(exc.response.get("OriginalMessage"))
                raise BadRequest(
                    f"the endpoint could not use this image: {reason}", 413 if original == 413 else 400
                ) from None
            raise BadRequest("the model failed on this image (ModelError)", 502) from None
        if exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") == 413:
            raise BadRequest("image is too large for the endpoint", 413) from None
        raise BadRequest(f"endpoint call failed ({code})", 502) from None
    except (ReadTimeoutError, ConnectTimeoutError):
        raise BadRequest("endpoint timed out", 504) from None
    except EndpointConnectionError:
        raise BadRequest("could not reach the endpoint", 502) from None
    except NoCredentialsError:
        raise ConfigError("function has no AWS credentials") from None
    except BotoCoreError:
        raise BadRequest("endpoint call failed", 502) from None
    return _parse_predictions(raw, top_k)


def _parse_predictions(raw: bytes, top_k: int) -> list[dict]:
    """Validate the endpoint's answer; anything else is the endpoint's fault (502)."""
    unexpected = BadRequest("endpoint returned an unexpected answer", 502)
    if len(raw) > MAX_ENDPOINT_ANSWER_BYTES:
        raise unexpected
    try:
        doc = json.loads(raw)
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise BadRequest("endpoint returned a non-JSON answer", 502) from None
    predictions = doc.get("predictions") if isinstance(doc, dict) else None
    if not isinstance(predictions, list) or not predictions:
        raise unexpected
    clean = []
    for p in predictions:
        if not isinstance(p, dict):
            raise unexpected
        label, index, prob = p.get("label"), p.get("index"), p.get("probability")
        if (
            not isinstance(label, str)
            or not isinstance(index, int)
            or isinstance(index, bool)
            or not isinstance(prob, (int, float))
            or isinstance(prob, bool)
            or not math.isfinite(prob)
        ):
            raise unexpected
        clean.append({"label": label, "index": index, "probability": float(prob)})
    clean.sort(key=lambda p: p["probability"], reverse=True)
    return clean[:top_k]


# --------------------------------------------------------------------------- events


def _header(headers: dict | None, name: str) -> str:
    for key, value in (headers or {}).items():
        if isinstance(key, str) and key.lower() == name:
            return value if isinstance(value, str) else ""
    return ""


def _is_proxy_event(event: dict) -> bool:
    # API Gateway REST (v1), HTTP API (v2) and function URLs all carry these.
    return "requestContext" in event or "httpMethod" in event or "routeKey" in event


def _parse_top_k(value) -> int:
    if value is None:
        return DEFAULT_TOP_K
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= MAX_TOP_K:
        raise BadRequest(f"top_k must be an integer from 1 to {MAX_TOP_K}")
    return value


def _decode_image_field(value, max_bytes: int) -> bytes:
    if not isinstance(value, str) or not value:
        raise BadRequest("image must be a base64 string")
    value = _DATA_URI_RE.sub("", value, count=1)
    if len(value) * 3 // 4 > max_bytes + 3:  # refuse before spending memory on decoding
        raise BadRequest(f"image is larger than {max_bytes} bytes", 413)
    try:
        return base64.b64decode("".join(value.split()), validate=True)
    except (binascii.Error, ValueError):
        raise BadRequest("image is not valid base64") from None


def parse_event(event, max_bytes: int) -> tuple[dict, int]:
    """Turn any supported event into ({"url": str} | {"image": bytes}, top_k)."""
    if not isinstance(event, dict):
        raise BadRequest("event must be a JSON object")
    query_top_k = None
    if _is_proxy_event(event):
        query_top_k = (event.get("queryStringParameters") or {}).get("top_k")
        body = event.get("body")
        if body is None or body == "":
            raise BadRequest("request body is empty: send JSON with url or image, or an image")
        if not isinstance(body, str):
            raise BadRequest("request body must be a string")
        if _header(event.get("headers"), "content-type").lower().startswith(_RAW_BODY_TYPES):
            # A raw image upload: API Gateway and function URLs base64-encode binary bodies.
            if event.get("isBase64Encoded"):
                image = _decode_image_field(body, max_bytes)
            else:
                image = body.encode("utf-8", "surrogateescape")
            return {"image": image}, _parse_top_k(query_top_k)
        if event.get("isBase64Encoded"):
            try:
                body = base64.b64decode(body, validate=True).decode("utf-8")
            except (binascii.Error, ValueError):
                raise BadRequest("request body is not valid base64-encoded UTF-8") from None
        try:
            payload = json.loads(body)
        except ValueError:
            raise BadRequest("request body is not valid JSON") from None
        except RecursionError:  # json recurses once per nesting level
            raise BadRequest("request body is JSON nested too deeply") from None
        if not isinstance(payload, dict):
            raise BadRequest("request body must be a JSON object")
    else:
        payload = event

    has_url, has_image = payload.get("url") is not None, payload.get("image") is not None
    if has_url and has_image:
        raise BadRequest("give either url or image, not both")
    if not has_url and not has_image:
        raise BadRequest("give a url or a base64 image")
    top_k = _parse_top_k(payload.get("top_k", query_top_k))
    if has_url:
        if not isinstance(payload["url"], str):
            raise BadRequest("url must be a string")
        return {"url": payload["url"]}, top_k
    return {"image": _decode_image_field(payload["image"], max_bytes)}, top_k


# --------------------------------------------------------------------------- answers and logs


def _answer(status: int, body: dict, request_id: str) -> dict:
    return {
        "statusCode": status,
        "headers": {
            "Content-Type": "application/json",
            "Cache-Control": "no-store",
            "X-Request-Id": request_id,
        },
        "body": json.dumps(body),
        "isBase64Encoded": False,
    }


def _log(record: dict) -> None:
    """One JSON line per request. Only fields set here: never image data, URLs or secrets."""
    sys.stdout.write(json.dumps(record, separators=(",", ":")) + "\n")
    sys.stdout.flush()


def _url_host(url: str) -> str | None:
    """Host only for the log: paths and query strings can carry tokens."""
    try:
        host = urllib.parse.urlsplit(url).hostname
    except ValueError:
        return None
    return host[:253] if host else None


def lambda_handler(event, context):
    started = time.monotonic()
    log: dict = {"level": "INFO", "msg": "predict", "request_id": None, "source": None}
    try:
        request_id = str(getattr(context, "aws_request_id", "") or uuid.uuid4())
    except Exception:  # a broken context must still get an answer
        request_id = str(uuid.uuid4())
    log["request_id"] = request_id
    try:
        status, body = _handle(event, log)
    except ConfigError as exc:
        status, body = 500, {"error": f"function is misconfigured: {exc}"}
        log["level"] = "ERROR"
    except Exception as exc:  # never a traceback to the caller, nor its message in the log
        status, body = 500, {"error": "internal error"}
        log.update(level="ERROR", error_type=type(exc).__name__)
    if status >= 400:
        log["error"] = body["error"]
        if log["level"] == "INFO":
            log["level"] = "WARNING"
    body["request_id"] = request_id
    log.update(status=status, latency_ms=round((time.monotonic() - started) * 1000, 1))
    _log(log)
    return _answer(status, body, request_id)


def _check_size(image: bytes) -> None:
    """The endpoint's size and structure rules, before decoding: a refused image never costs an invocation."""
    size = image_rules.image_size(image)
    problem = (image_rules.size_problem(*size) if size else None) or image_rules.structure_problem(image)
    if problem:
        raise BadRequest(problem)


def _handle(event, log: dict) -> tuple[int, dict]:
    endpoint = os.environ.get("ENDPOINT_NAME", "").strip()
    if not endpoint:
        raise ConfigError("ENDPOINT_NAME is not set")
    if not _ENDPOINT_NAME_RE.match(endpoint):
        raise ConfigError("ENDPOINT_NAME is not a valid SageMaker endpoint name")
    settings = safe_fetch.Settings.from_env()
    try:
        if isinstance(event, dict) and _is_proxy_event(event):
            log["source"] = "http"
        request, top_k = parse_event(event, settings.max_bytes)
        log["top_k"] = top_k
        if "url" in request:
            log["source"] = (log["source"] or "direct") + ":url"
            log["url_host"] = _url_host(request["url"])
            fetched = safe_fetch.fetch_image(request["url"], settings=settings)
            image = fetched.data
            log["redirects"] = fetched.redirects
        else:
            log["source"] = (log["source"] or "direct") + ":image"
            image = request["image"]
            if len(image) > settings.max_bytes:
                raise BadRequest(f"image is larger than {settings.max_bytes} bytes", 413)
            if image_rules.sniff_image(image) is None:
                raise BadRequest("image is not a JPEG, PNG, GIF, WebP or BMP")
        log["bytes"] = len(image)
        _check_size(image)
        top = _invoke_endpoint(endpoint, image, top_k)
    except (BadRequest, FetchError) as exc:
        return exc.status, {"error": exc.message}
    best = top[0]
    return 200, {"breed": best["label"], "probability": best["probability"], "top_k": top}
