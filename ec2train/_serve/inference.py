"""The SageMaker inference handler: model_fn, input_fn, predict_fn, output_fn.

Runs inside the AWS PyTorch inference container, where only torch, torchvision and Pillow
exist: `ec2train export --package` ships this file as code/inference.py beside the small,
import-free part of ec2train it needs (code/ec2train/{errors,hw,threads,model,preprocess,infer}.py).
It also runs unchanged locally; `ec2train serve` uses the same parser and Predictor.
It lives in ec2train/_serve/ so an installed ec2train can package it; serve/inference.py
is a link to it.

Bad input is the client's error, never a crash. In the container each function gets the
toolkit's request context (it passes one to functions that take an extra argument): a bad
request then gets its HTTP status (400, 406, 413, 415) and a JSON body {"error": "..."}.
Called directly without a context, the functions raise ec2train.infer.RequestError instead.
"""

from __future__ import annotations

import json
import os
from typing import Any

from ec2train.infer import (
    CUSTOM_ATTRIBUTES_HEADER,
    JSON_TYPE,
    Predictor,
    Request,
    RequestError,
    check_accept,
    default_device,
    parse_request,
)
from ec2train.model import MODEL_FILE
from ec2train.threads import ThreadPlan, apply_threads, available_cpus, launcher_share_from_env, thread_plan

_PHRASES = {400: "Bad Request", 406: "Not Acceptable", 413: "Payload Too Large", 415: "Unsupported Media Type"}


class Rejected:
    """A request refused with a client error; carried through predict_fn to output_fn."""

    def __init__(self, error: RequestError):
        self.status = error.status
        self.message = str(error)


def _reject(error: RequestError, context: Any) -> Rejected:
    if context is None:
        raise error
    # The toolkit's own error path does the same, but also appends a traceback to the body.
    context.set_response_status(code=error.status, phrase=_PHRASES.get(error.status, "Client Error"))
    return Rejected(error)


def _header(context: Any, name: str) -> str | None:
    """A request header from the toolkit's context, whatever case the model server gives it."""
    try:
        props = context.request_processor[0].get_request_properties() or {}
    except (AttributeError, IndexError, TypeError):
        return None
    for key, value in props.items():
        if str(key).lower() == name.lower():
            return value.decode() if isinstance(value, (bytes, bytearray)) else str(value)
    return None


def container_thread_plan(environ=None) -> ThreadPlan:
    """Torch's threads in one model-server worker: the container runs SAGEMAKER_MODEL_SERVER_WORKERS
    of them (unset: the toolkit starts one per CPU), each decoding and predicting in one thread."""
    environ = os.environ if environ is None else environ
    cpus = available_cpus()
    workers = environ.get("SAGEMAKER_MODEL_SERVER_WORKERS", "")
    procs = int(workers) if workers.strip().isdigit() and int(workers) > 0 else cpus
    return thread_plan(cpus, procs, launcher_share=launcher_share_from_env(environ))


def model_fn(model_dir: str, context: Any = None) -> Predictor:
    """Load model.pth (weights_only=True) once per worker; the network is rebuilt from its metadata."""
    apply_threads(container_thread_plan())
    return Predictor(os.path.join(model_dir, MODEL_FILE), device=default_device())


def input_fn(request_body: bytes | str, request_content_type: str, context: Any = None) -> Request | Rejected:
    """Image bytes (image/jpeg, image/png, application/x-image) or JSON {"image": base64, "top_k", "logits"}."""
    try:
        attributes = _header(context, CUSTOM_ATTRIBUTES_HEADER) if context is not None else None
        return parse_request(request_body, request_content_type, attributes)
    except RequestError as exc:
        return _reject(exc, context)


def predict_fn(data: Request | Rejected, model: Predictor, context: Any = None) -> dict[str, Any] | Rejected:
    if isinstance(data, Rejected):
        return data
    try:
        return model.answer(data)
    except RequestError as exc:  # undecodable image, too many pixels
        return _reject(exc, context)


def output_fn(prediction: dict[str, Any] | Rejected, accept: str | None, context: Any = None) -> tuple[str, str]:
    """JSON {"predictions": [{"label", "index", "probability"}, ...]} (+ "logits"), or {"error": ...}."""
    if isinstance(prediction, Rejected):
        return json.dumps({"error": prediction.message}), JSON_TYPE
    try:
        check_accept(accept)
    except RequestError as exc:
        return json.dumps({"error": _reject(exc, context).message}), JSON_TYPE
    return json.dumps(prediction), JSON_TYPE
