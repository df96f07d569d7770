"""Predictions from a model file: top-k class names with probabilities.

Used by `ec2train predict`, the local server and the SageMaker handler alike, together with
the one parser of prediction requests (`parse_request`). Imports only torch, torchvision,
Pillow and the standard library (it ships inside the SageMaker model package).
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import importlib
import json
import logging
import re
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ec2train.errors import UserError, first_line
from ec2train.hw import batch_buckets, bucket_for, inference_channels_last
from ec2train.model import model_from_file
from ec2train.preprocess import (
    MAX_PIXELS,
    ImageDecodeError,
    MemoryBudget,
    MemoryBusy,
    Source,
    eval_transform,
    load_rgb,
    resize_size,
)

# SageMaker's real-time InvokeEndpoint payload limit; the local server applies the same.
MAX_REQUEST_BYTES = 6 * 1024 * 1024
DEFAULT_TOP_K = 5
IMAGE_TYPES = ("image/jpeg", "image/png", "application/x-image")
JSON_TYPE = "application/json"
CUSTOM_ATTRIBUTES_HEADER = "X-Amzn-SageMaker-Custom-Attributes"
JSON_FIELDS = ("image", "top_k", "logits")
_DATA_URI = re.compile(r"^data:[\w.+/-]+;base64,", re.IGNORECASE)


# ---------------------------------------------------------------- requests


class RequestError(UserError):
    """A prediction request the client must fix; `status` is its HTTP status code."""

    status = 400


class PayloadTooLarge(RequestError):
    status = 413


class UnsupportedMediaType(RequestError):
    status = 415


class NotAcceptable(RequestError):
    status = 406


class Busy(RequestError):
    """No room for this request now (requests in progress, or memory): retry in a moment."""

    status = 503


@dataclass(frozen=True)
class Request:
    """One validated prediction request: the image's bytes and what to answer."""

    image: bytes
    top_k: int = DEFAULT_TOP_K
    logits: bool = False


def _media_type(content_type: str | None) -> str:
    return (content_type or "").split(";", 1)[0].strip().lower()


def _top_k(value: Any, where: str) -> int:
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise RequestError(f"{where} must be a whole number >= 1, got {value!r}")
    return value


def _flag(value: Any, where: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "1", "false", "0"):
        return value.strip().lower() in ("true", "1")
    raise RequestError(f"{where} must be true or false, got {value!r}")


def parse_custom_attributes(value: str | None) -> dict[str, Any]:
    """`top_k=3` (and `logits=true`) from SageMaker's custom-attributes header.

    The header is opaque to SageMaker and may carry other things (trace ids), so pairs are
    split on ',' or ';' and keys we do not know are ignored.
    """
    out: dict[str, Any] = {}
    for part in re.split(r"[;,]", value or ""):
        key, eq, val = part.partition("=")
        key = key.strip().lower()
        if not eq:
            continue
        if key == "top_k":
            out["top_k"] = _top_k(val.strip(), f"{CUSTOM_ATTRIBUTES_HEADER} top_k")
        elif key == "logits":
            out["logits"] = _flag(val, f"{CUSTOM_ATTRIBUTES_HEADER} logits")
    return out


def _decode_base64(text: Any) -> bytes:
    if not isinstance(text, str) or not text:
        raise RequestError('"image" must be a non-empty base64 string of the image file\'s bytes')
    text = _DATA_URI.sub("", text, count=1)
    try:
        # `base64 FILE` wraps lines; whitespace is not data.
        return base64.b64decode("".join(text.split()), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise RequestError(f'"image" is not valid base64 ({exc})') from None


def parse_request(
    body: bytes | str,
    content_type: str | None,
    custom_attributes: str | None = None,
    max_bytes: int = MAX_REQUEST_BYTES,
) -> Request:
    """Validate a request body (image bytes or JSON with a base64 image) into a Request.

    Options come from the custom-attributes header, then the JSON body (which wins).
    The endpoint never fetches URLs: it needs no internet, and the Lambda does that safely.
    """
    raw = body.encode("utf-8") if isinstance(body, str) else bytes(body or b"")
    if len(raw) > max_bytes:
        raise PayloadTooLarge(
            f"request body is {len(raw)} bytes, more than the limit of {max_bytes}; send a smaller image"
        )
    media = _media_type(content_type)
    options = parse_custom_attributes(custom_attributes)
    if media in IMAGE_TYPES:
        if not raw:
            raise RequestError("empty request body; send the image file's bytes")
        return Request(image=raw, **options)
    if media != JSON_TYPE:
        raise UnsupportedMediaType(
            f"unsupported content type {content_type!r}; send one of {', '.join(IMAGE_TYPES + (JSON_TYPE,))}"
        )
    try:
        doc = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise RequestError(f"body is not valid JSON ({exc})") from None
    except RecursionError:  # json recurses per nesting level: `[[[[...` is a client error, not a 500
        raise RequestError('JSON body is nested too deeply; send {"image": "<base64>"}') from None
    if not isinstance(doc, dict):
        raise RequestError('JSON body must be an object like {"image": "<base64>", "top_k": 5}')
    if "url" in doc:
        raise RequestError('this endpoint does not fetch URLs; send the image base64-encoded in "image"')
    unknown = sorted(set(doc) - set(JSON_FIELDS))
    if unknown:
        raise RequestError(f"unknown field(s) {', '.join(map(repr, unknown))}; allowed: {', '.join(JSON_FIELDS)}")
    if "image" not in doc:
        raise RequestError('JSON body has no "image" (the image file\'s bytes, base64-encoded)')
    if "top_k" in doc:
        options["top_k"] = _top_k(doc["top_k"], '"top_k"')
    if "logits" in doc:
        options["logits"] = _flag(doc["logits"], '"logits"')
    return Request(image=_decode_base64(doc["image"]), **options)


def check_accept(accept: str | None) -> None:
    """Answers are JSON; refuse an Accept header that rules JSON out."""
    kinds = [_media_type(a) for a in (accept or "").split(",")]
    if not any(k in ("", "*/*", "application/*", JSON_TYPE) for k in kinds):
        raise NotAcceptable(f"cannot answer in {accept!r}; answers are {JSON_TYPE}")


# ---------------------------------------------------------------- predictor


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


class CompileError(UserError):
    """The forward pass could not be compiled; `no_compiler` when the cause is a missing or
    broken C++ compiler (the usual one on a bare machine)."""

    def __init__(self, message: str, no_compiler: bool = False):
        super().__init__(message)
        self.no_compiler = no_compiler


@contextlib.contextmanager
def _quiet_compiler_logs():
    """Inductor's notes (e.g. "No CUDA runtime is found, using CUDA_HOME") are not the user's business."""
    logger = logging.getLogger("torch.utils.cpp_extension")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _root_cause(exc: BaseException) -> BaseException:
    """The innermost error of a chain: inductor wraps the cause (e.g. InvalidCxxCompiler) in
    BackendCompilerFailed, whose text spans pages."""
    while (inner := exc.__cause__ or getattr(exc, "inner_exception", None)) is not None and inner is not exc:
        exc = inner
    return exc


_NO_COMPILER = ("InvalidCxxCompiler", "CppCompileError")


def _compile_options(graphs: int) -> dict[str, Any]:
    """torch.compile's per-call recompile budget where this torch has it (2.12+): several models
    in one process then do not share dynamo's limit of 8 graphs per function; on an older torch
    the global limit is raised instead."""
    import inspect

    budget = 2 * graphs  # margin: an unforeseen guard recompiles (slowly) instead of failing
    if {"isolate_recompiles", "recompile_limit"} <= set(inspect.signature(torch.compile).parameters):
        return {"isolate_recompiles": True, "recompile_limit": budget}
    import torch._dynamo.config as dynamo_config

    for name in ("recompile_limit", "cache_size_limit"):  # the older name
        if hasattr(dynamo_config, name):
            setattr(dynamo_config, name, max(getattr(dynamo_config, name), budget))
            break
    return {}


class BucketedForward:
    """A model's forward pass compiled (inductor, weights frozen into the graph) for a few static
    batch sizes. A batch runs at the smallest compiled size that holds it, padded with zeros, whose
    answers are dropped (eval mode: no image's answer depends on another's). Called only once
    `build` has compiled every size (Predictor.compile serves through it from then on)."""

    def __init__(self, model: torch.nn.Module, buckets: tuple[int, ...], memory_format: torch.memory_format):
        self.buckets, self.memory_format = buckets, memory_format
        self.compiled = torch.compile(model, dynamic=False, fullgraph=True, **_compile_options(len(buckets)))

    def build(self, sample: torch.Tensor, report: Callable[[int, float], None]) -> None:
        """Compile every bucket now (not on a client's request), from one image's shape and device,
        smallest first. Freezing folds batch norm into the convolutions and pre-packs their weights:
        the speed-up (torch.compile's options={"freezing": True} measured no faster than eager; the
        patch works). Never while another thread runs the model: see server._Service._compile."""
        import torch._inductor.config as inductor_config

        with inductor_config.patch(freezing=True):
            for size in self.buckets:
                start = time.perf_counter()
                self._compiled_pass(sample.expand(size, *sample.shape[1:]), size)
                report(size, time.perf_counter() - start)

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        # A batch larger than any size asked for is a caller's bug: ValueError.
        return self._compiled_pass(batch, bucket_for(batch.shape[0], self.buckets))

    def _compiled_pass(self, batch: torch.Tensor, size: int) -> torch.Tensor:
        n = batch.shape[0]
        full = torch.empty(
            (size, *batch.shape[1:]), dtype=batch.dtype, device=batch.device, memory_format=self.memory_format
        )
        full[:n].copy_(batch)
        full[n:].zero_()
        return self.compiled(full)[:n]


class Predictor:
    """A model file loaded once, with the preprocessing that travelled inside it."""

    def __init__(
        self,
        model_path: str | Path,
        device: str = "cpu",
        max_pixels: int = MAX_PIXELS,
        budget: MemoryBudget | None = None,
    ):
        """`budget`: decodes hold their memory there (MemoryBusy, a 503 for a request, past it)."""
        self.model, self.meta = model_from_file(model_path)
        self.budget = budget
        self.device = device
        self.memory_format = (
            torch.channels_last if inference_channels_last(torch.device(device).type) else torch.contiguous_format
        )
        self.model.to(device, memory_format=self.memory_format)
        self.forward: Callable[[torch.Tensor], torch.Tensor] = self.model
        self.class_names: list[str] = list(self.meta["class_names"])
        self.image_size: int = int(self.meta["image_size"])
        self.transform = eval_transform(self.image_size, tuple(self.meta["mean"]), tuple(self.meta["std"]))
        self.max_pixels = max_pixels

    def preprocess(self, source: Source) -> torch.Tensor:
        """Decode (preprocess's decode policy) and transform one image; ImageDecodeError if unusable."""
        img = load_rgb(source, min_side=resize_size(self.image_size), max_pixels=self.max_pixels, budget=self.budget)
        return self.transform(img)

    @torch.inference_mode()
    def logits(self, batch: torch.Tensor) -> torch.Tensor:
        return self.forward(batch.to(self.device, memory_format=self.memory_format)).float().cpu()

    @property
    def compiled_sizes(self) -> tuple[int, ...]:
        """The batch sizes that run compiled (none while the eager pass serves them all)."""
        forward = self.forward
        return forward.buckets if isinstance(forward, BucketedForward) else ()

    @torch.inference_mode()
    def compile(self, max_batch: int, report: Callable[[int, float], None] = lambda size, seconds: None) -> None:
        """Compile the forward pass for batches of up to max_batch (hw.batch_buckets), smallest
        first, calling report(size, seconds) after each. Not while the Predictor serves in another
        thread (BucketedForward.build). CompileError, with the cause in one line, if it cannot; the
        eager pass then serves all."""
        size = self.image_size
        sample = torch.zeros((1, 3, size, size), device=self.device).contiguous(memory_format=self.memory_format)
        try:  # an old torch or an unsupported Python fails as early as the constructor
            forward = BucketedForward(self.model, batch_buckets(max_batch), self.memory_format)
            with _quiet_compiler_logs():
                forward.build(sample, report)
        except Exception as exc:
            with contextlib.suppress(Exception):  # drop the graphs built so far (and their frozen weights)
                importlib.import_module("torch._dynamo").reset()
            cause = _root_cause(exc)
            no_compiler = type(cause).__name__ in _NO_COMPILER or isinstance(cause, FileNotFoundError)
            raise CompileError(f"cannot compile the forward pass: {first_line(cause)[:300]}", no_compiler) from exc
        self.forward = forward  # every size compiled: no eager fallback needed

    def top_k(self, logits: torch.Tensor, k: int = 5) -> list[list[dict[str, Any]]]:
        probs = logits.softmax(dim=1)
        k = max(1, min(k, probs.shape[1]))
        values, indices = probs.topk(k, dim=1)
        return [
            [
                {"label": self.class_names[i], "index": int(i), "probability": float(p)}
                for p, i in zip(vals.tolist(), idxs.tolist())
            ]
            for vals, idxs in zip(values, indices)
        ]

    def predict(self, sources: Sequence[Source], k: int = 5) -> list[list[dict[str, Any]]]:
        batch = torch.stack([self.preprocess(s) for s in sources])
        return self.top_k(self.logits(batch), k)

    def predict_tensors(self, tensors: Sequence[torch.Tensor], requests: Sequence[Request]) -> list[dict[str, Any]]:
        """One forward pass over preprocessed images; an answer per request, each with its own top_k/logits."""
        logits = self.logits(torch.stack(list(tensors)))
        answers = []
        for row, req in zip(logits, requests):
            answer: dict[str, Any] = {"predictions": self.top_k(row[None], req.top_k)[0]}
            if req.logits:
                answer["logits"] = [float(x) for x in row.tolist()]
            answers.append(answer)
        return answers

    def prepare(self, request: Request) -> torch.Tensor:
        """A request's image as a model input; an unusable image is the client's error (400)."""
        try:
            return self.preprocess(request.image)
        except ImageDecodeError as exc:
            raise RequestError(str(exc)) from None
        except MemoryBusy as exc:
            raise Busy(f"server is busy: {exc}") from None

    def answer(self, request: Request) -> dict[str, Any]:
        """Decode, preprocess and predict one request (no batching: the SageMaker handler's path)."""
        return self.predict_tensors([self.prepare(request)], [request])[0]


# ---------------------------------------------------------------- many files


@dataclass(frozen=True)
class FileAnswer:
    """One image file's answer: its top-k predictions, or why it could not be read."""

    path: str
    predictions: list[dict[str, Any]] | None = None
    error: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {"image": self.path, **({"error": self.error} if self.error else {"predictions": self.predictions})}


def image_files(inputs: Sequence[str | Path]) -> list[Path]:
    """Files as given; each folder replaced by the images under it (recursively, sorted).

    Only names with an image extension are picked up inside folders (a README there is no
    error); a folder without any stays in the list, and predict_paths reports it.
    """
    # data.py is imported here, not at the top: infer.py ships in the SageMaker package without it.
    from ec2train.data import IMAGE_EXTS

    files: list[Path] = []
    for p in map(Path, inputs):
        found = sorted(f for f in p.rglob("*") if f.suffix.lower() in IMAGE_EXTS and f.is_file()) if p.is_dir() else []
        files += found or [p]
    return files


def _read(predictor: Predictor, path: Path) -> torch.Tensor | str:
    """The model input for one file, or the one-line reason it has none."""
    if path.is_dir():
        return "no image files in this folder"
    if not path.is_file():
        return "no such file"
    try:
        if path.stat().st_size == 0:
            return "empty file (0 bytes)"
        return predictor.preprocess(path)
    except ImageDecodeError as exc:
        return str(exc)
    except OSError as exc:  # unreadable (permissions, a vanished file)
        return f"cannot read it: {exc.strerror or exc}"


def predict_paths(
    predictor: Predictor, paths: Sequence[str | Path], k: int = DEFAULT_TOP_K, batch_size: int = 32, threads: int = 4
) -> Iterator[FileAnswer]:
    """A FileAnswer per path, in order, batch_size images per forward pass.

    Images are decoded in `threads` threads (Pillow releases the GIL while decoding). A file
    that cannot be read gets its error and the others in its batch still get their answers.
    Expand folders first with image_files().
    """
    with ThreadPoolExecutor(max(1, threads)) as pool:
        for start in range(0, len(paths), batch_size):
            chunk = [Path(p) for p in paths[start : start + batch_size]]
            inputs = list(pool.map(lambda p: _read(predictor, p), chunk))
            good = [x for x in inputs if isinstance(x, torch.Tensor)]
            answers = iter(predictor.top_k(predictor.logits(torch.stack(good)), k) if good else [])
            for path, x in zip(chunk, inputs):
                yield (
                    FileAnswer(str(path), next(answers))
                    if isinstance(x, torch.Tensor)
                    else FileAnswer(str(path), error=x)
                )
