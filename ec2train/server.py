"""A local HTTP server that behaves like the SageMaker endpoint, with dynamic batching.

Routes: GET /ping (200 once the model is loaded, 503 before), POST /invocations (the
container contract), POST /endpoints/{name}/invocations (so a boto3 `sagemaker-runtime`
client with `endpoint_url=` works unchanged; errors come back the way SageMaker returns
them, as ModelError), GET /stats (batching, compiling and memory counters).

Requests are read and decoded off the event loop (thread pool); a single batcher task
(batching.py) groups the tensors of concurrent requests into one forward pass, run in its own
thread so the loop keeps accepting requests meanwhile. Misbehaving clients are bounded in three
places: connections (idle, slow, too many, tiny chunks) in http_guard.py; requests in progress
(`Admission`) and the memory of their bodies and images together (a MemoryBudget) in
request_limits.py, both a fast 503; and what one image may cost to decode in preprocess.py.
Built on starlette + uvicorn (the `serve` extra), imported lazily.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from ec2train import hw
from ec2train import threads as thread_plans
from ec2train.batching import Batcher, BatchStats
from ec2train.errors import UserError, pip_install
from ec2train.infer import (
    CUSTOM_ATTRIBUTES_HEADER,
    JSON_TYPE,
    MAX_REQUEST_BYTES,
    CompileError,
    Predictor,
    RequestError,
    check_accept,
    default_device,
    parse_request,
)
from ec2train.preprocess import MemoryBudget, MemoryBusy
from ec2train.request_limits import BODY_TIMEOUT_S, Admission, MemoryReturn, read_body

log = logging.getLogger("uvicorn.error")  # shows beside uvicorn's own lines, in its format
_ENV_CONFIG = "EC2TRAIN_SERVE_CONFIG"  # how `--workers N` hands the settings to each process
# Requests being decoded, queued or in a forward pass, per process, as a multiple of
# --max-batch times the forward lanes; beyond it a request gets a fast 503 instead of a long wait (docs/serve.md).
PENDING_PER_BATCH = 4
# Memory for request bodies and images being decoded, per process (--request-memory-mb): past
# it a request gets a fast 503 (docs/serve.md, "What a request may cost", has what images take).
REQUEST_MEMORY_MB = 1024
# A JSON request's base64 text is decoded into a second copy of the image, beside the body.
_JSON_COPIES = 2


def _require_serve_deps():
    try:
        import starlette  # noqa: F401
        import uvicorn
    except ImportError as exc:
        raise UserError(
            f"the local server needs starlette and uvicorn ({exc.name} is missing); "
            f"install them with: {pip_install('ec2train[serve]')}"
        ) from None
    return uvicorn


def _error_response(status: int, message: str, runtime_api: bool):
    """{"error": ...} with the status; on the runtime-API route, wrapped the way SageMaker does it."""
    from starlette.responses import JSONResponse

    retry = {"Retry-After": "1"} if status == 503 else {}
    if not runtime_api or status == 413:  # SageMaker refuses oversized payloads itself, with 413
        return JSONResponse({"error": message}, status_code=status, headers=retry)
    kind = "client" if status < 500 else "server"
    original = json.dumps({"error": message})
    return JSONResponse(
        {
            "ErrorCode": f"{kind.upper()}_ERROR_FROM_MODEL",
            "Message": f'Received {kind} error ({status}) from primary with message "{original}".',
            "OriginalStatusCode": status,
            "OriginalMessage": original,
            "error": message,
        },
        status_code=424,
        headers={"x-amzn-ErrorType": "ModelError", **retry},
    )


def create_app(
    model_path: str | Path,
    max_batch: int = 8,
    max_wait_ms: float = 5.0,
    *,
    threads: int | None = None,
    procs: int = 1,
    device: str | None = None,
    max_bytes: int = MAX_REQUEST_BYTES,
    load: Callable[[], Predictor] | None = None,
    load_first: bool = False,
    max_pending: int | None = None,
    body_timeout: float = BODY_TIMEOUT_S,
    compile: str = "off",
    request_memory_mb: float = REQUEST_MEMORY_MB,
    url: str | None = None,
    started: float | None = None,
):
    """The ASGI app. The model loads in the background after start-up (GET /ping says when).

    `load_first` loads it before the server accepts connections instead: with several worker
    processes on one socket, a worker that is still loading then takes no requests.
    `load` replaces how the Predictor is made (default: `Predictor(model_path, device)`).
    `app.state.stats` holds the batch counters; `app.state.on_load_error`, if set, is
    called with the exception when the model cannot be loaded. `max_pending` (default
    PENDING_PER_BATCH x max_batch x forward lanes) bounds the requests in progress (`Admission`),
    `request_memory_mb` the memory of their bodies and images together (a MemoryBudget).
    `compile` (off, auto, on; hw.compile_forward) compiles the forward pass for batches of up to
    max_batch before /ping says ready: auto on the CPU (a failure is a warning and the eager pass
    serves), on anywhere (a failure stops the server). `url` is named in the line that says ready, and
    the time it gives counts from `started` (time.monotonic(); default: now).
    """
    _require_serve_deps()
    from starlette.applications import Starlette
    from starlette.routing import Route

    plan = _thread_plan(threads, procs)
    hw.compile_forward(compile, "cpu")  # a bad mode fails now, not in the loader thread
    service = _Service(
        model_path,
        plan,
        load or (lambda: Predictor(model_path, device=device or default_device())),
        max_batch=max_batch,
        max_wait_ms=max_wait_ms,
        max_bytes=max_bytes,
        max_pending=max_pending or PENDING_PER_BATCH * max_batch * plan.lanes,
        body_timeout=body_timeout,
        load_first=load_first,
        compile=compile,
        budget=MemoryBudget(int(request_memory_mb * 2**20)),
        url=url,
        started=started,
    )
    app = Starlette(
        routes=[
            Route("/ping", service.ping, methods=["GET"]),
            Route("/invocations", service.invocations, methods=["POST"]),
            Route("/endpoints/{name}/invocations", service.endpoint_invocations, methods=["POST"]),
            Route("/stats", service.stats_route, methods=["GET"]),
        ],
        lifespan=service.lifespan,
    )
    app.state.predictor = None
    app.state.load_error = None
    app.state.batch_task = None
    app.state.on_load_error = None
    app.state.stats = service.stats
    app.state.service = service
    return app


class _Service:
    """One server process's parts (forward lanes, batcher, admission, memory) and the app's routes."""

    def __init__(
        self,
        model_path: str | Path,
        plan: thread_plans.ThreadPlan,
        loader: Callable[[], Predictor],
        *,
        max_batch: int,
        max_wait_ms: float,
        max_bytes: int,
        max_pending: int,
        body_timeout: float,
        load_first: bool,
        compile: str,
        budget: MemoryBudget,
        url: str | None,
        started: float | None,
    ):
        self.started = time.monotonic() if started is None else started
        self.model_path, self.plan, self.loader = model_path, plan, loader
        self.max_batch, self.max_wait_ms, self.max_bytes = max_batch, max_wait_ms, max_bytes
        self.body_timeout, self.load_first, self.compile, self.url = body_timeout, load_first, compile, url
        self.closing = False  # set when the server stops: a compile still running then ends quietly
        self.compile_state = "off"  # /stats: off, compiling, compiled or failed
        self.stats = BatchStats()
        self.forward_pool = ThreadPoolExecutor(max_workers=plan.lanes, thread_name_prefix="ec2train-forward")
        self.batcher = Batcher(max_batch, max_wait_ms, self.forward_pool, self.stats, plan.lanes)
        self.admission = Admission(max_pending)
        self.budget, self.memory = budget, MemoryReturn()
        self.memory.limit_arenas(max(2, plan.lanes))
        budget.on_idle = self.memory.soon  # a burst is over: give its memory back to the system

    def load_model(self) -> Predictor:
        import torch

        thread_plans.apply_threads(self.plan)
        log.info("%s; torch.get_num_threads() = %d", self.plan.describe(), torch.get_num_threads())
        predictor = self.loader()
        predictor.budget = self.budget
        if hw.compile_forward(self.compile, torch.device(predictor.device).type):
            self._compile(predictor)
        return predictor

    def _compile(self, predictor: Predictor) -> None:
        """Compile the forward pass, one batch size after the other, before /ping says ready: never
        beside forward passes that serve (torch.fx's tracer, which inductor runs, patches
        nn.Module.__call__ for the whole process while it traces, so an eager pass in another
        thread then fails or hangs). With --compile auto a failure leaves the eager pass serving,
        with a warning; with on it stops the server."""
        if self.closing:
            return
        self.compile_state = "compiling"
        start = time.perf_counter()
        sizes = ", ".join(map(str, hw.batch_buckets(self.max_batch)))
        log.info("compiling the forward pass for batches of %s before serving (--compile off skips this)", sizes)

        def report(size: int, seconds: float) -> None:
            if self.closing:  # e.g. the port was taken: stop before the next batch size
                raise CompileError("the server stopped")
            log.info("compiled batches of %d in %.1f s", size, seconds)

        try:
            predictor.compile(self.max_batch, report)
        except CompileError as exc:
            self.compile_state = "failed"
            if self.closing:
                return
            fix = "install a C++ compiler (g++)" if exc.no_compiler else "see the cause above"
            if self.compile == "on":
                raise UserError(f"{exc}; {fix} or pass --compile off") from None
            log.warning("%s; serving the uncompiled model (%s, or pass --compile off)", exc, fix)
            return
        self.compile_state = "compiled"
        log.info("forward pass compiled in %.0f s", time.perf_counter() - start)

    async def start(self, app) -> None:
        state = app.state
        try:
            predictor = await asyncio.get_running_loop().run_in_executor(self.forward_pool, self.load_model)
        except Exception as exc:  # a bad model file: /ping stays 503 with the reason
            state.load_error = exc
            log.error("cannot load the model: %s", exc)
            if state.on_load_error:
                state.on_load_error(exc)
            return
        self.batcher.predictor = predictor
        state.batch_task = asyncio.create_task(self.batcher.run())
        state.predictor = predictor
        log.info(
            "ready in %.1f s%s: %s (%s, %d classes, %d px); max batch %d, max wait %g ms",
            time.monotonic() - self.started,
            f" at {self.url}" if self.url else "",
            self.model_path,
            predictor.meta["arch"],
            len(predictor.class_names),
            predictor.image_size,
            self.max_batch,
            self.max_wait_ms,
        )

    @contextlib.asynccontextmanager
    async def lifespan(self, app):
        load_task = asyncio.create_task(self.start(app))
        if self.load_first:
            try:
                await load_task
            finally:  # stopped (Ctrl-C) while loading: a compile stops at its next batch size
                self.closing = app.state.predictor is None
            if app.state.load_error is not None:
                raise app.state.load_error  # uvicorn reports a failed start-up and the worker exits
        try:
            yield
        finally:
            self.closing = True
            load_task.cancel()
            if app.state.batch_task is not None:
                app.state.batch_task.cancel()
            self.forward_pool.shutdown(wait=False, cancel_futures=True)

    async def ping(self, request):
        from starlette.responses import JSONResponse

        state = request.app.state
        if state.predictor is not None:
            return JSONResponse({"status": "ready"})
        if state.load_error is not None:
            return JSONResponse({"status": "failed", "error": str(state.load_error)}, status_code=503)
        return JSONResponse({"status": "loading"}, status_code=503)

    async def invoke(self, request, runtime_api: bool):
        from starlette.requests import ClientDisconnect
        from starlette.responses import Response

        state = request.app.state
        predictor = state.predictor
        if predictor is None:
            why = "the model failed to load" if state.load_error is not None else "the model is still loading"
            return _error_response(503, f"{why}; retry when GET /ping answers 200", runtime_api)
        try:
            answer = await self._answer(request, predictor)
        except RequestError as exc:
            return _error_response(exc.status, str(exc), runtime_api)
        except MemoryBusy as exc:
            return _error_response(503, f"server is busy: {exc}", runtime_api)
        except ClientDisconnect:  # the client went away: nobody to answer
            return Response(status_code=400)
        except Exception as exc:  # never a crash: the client gets a 500 with the reason's type
            log.exception("invocation failed")
            return _error_response(500, f"internal error ({type(exc).__name__})", runtime_api)
        headers = {"x-Amzn-Invoked-Production-Variant": "AllTraffic"} if runtime_api else None
        return Response(json.dumps(answer), media_type=JSON_TYPE, headers=headers)

    async def _answer(self, request, predictor: Predictor) -> dict[str, Any]:
        """Read (its memory held in the budget until the answer), decode (a slot) and predict."""
        from starlette.concurrency import run_in_threadpool

        headers = request.headers
        async with contextlib.AsyncExitStack() as held:
            check_accept(headers.get("accept"))
            body = await held.enter_async_context(read_body(request, self.budget, self.max_bytes, self.body_timeout))
            content_type = headers.get("content-type")
            if (content_type or "").split(";")[0].strip().lower() == JSON_TYPE:
                held.enter_context(self.budget.hold(_JSON_COPIES * len(body), "this request's JSON"))
            # A slow upload costs no slot, and no forward pass waits for it (preparing_one: the
            # batcher waits up to max_wait_ms for requests being decoded): only decoding counts.
            with self.admission.slot():
                with self.batcher.preparing_one():
                    req, tensor = await run_in_threadpool(
                        _prepare, predictor, body, content_type, headers.get(CUSTOM_ATTRIBUTES_HEADER), self.max_bytes
                    )
                return await self.batcher.submit(tensor, req)

    async def invocations(self, request):
        return await self.invoke(request, runtime_api=False)

    async def endpoint_invocations(self, request):
        return await self.invoke(request, runtime_api=True)

    async def stats_route(self, request):
        from starlette.responses import JSONResponse

        predictor = request.app.state.predictor
        return JSONResponse(
            {
                **self.stats.as_dict(),
                "max_batch": self.max_batch,
                "max_wait_ms": self.max_wait_ms,
                "lanes": self.plan.lanes,
                "compile": self.compile_state,
                "compiled_batch_sizes": list(predictor.compiled_sizes) if predictor else [],
                "in_progress": self.admission.active,
                "max_pending": self.admission.limit,
                "memory_mb": round(self.budget.used / 2**20, 1),
                "memory_peak_mb": round(self.budget.peak / 2**20, 1),
                "memory_limit_mb": round(self.budget.total / 2**20, 1),
                "memory_trims": self.memory.trims,
            }
        )


def _require_compiler() -> None:
    """--compile on with several workers: a missing compiler fails here, once, with one line
    (a worker's failed start-up only reaches uvicorn's log)."""
    import shutil

    compiler = os.environ.get("CXX", "g++")
    if shutil.which(compiler) is None:
        raise UserError(
            f"--compile on needs a C++ compiler and {compiler} is not on PATH; install g++ or pass --compile off"
        )


def _thread_plan(threads: int | None, procs: int) -> thread_plans.ThreadPlan:
    """This server process's threads (threads.serve_thread_plan): its share of the box's cores (one of
    `procs` workers), one decode thread, and the lanes that share the rest; --threads wins."""
    return thread_plans.serve_thread_plan(
        thread_plans.available_cpus(), procs, threads or 0, thread_plans.launcher_share_from_env()
    )


def _prepare(predictor: Predictor, body: bytes, content_type: str | None, attributes: str | None, max_bytes: int):
    request = parse_request(body, content_type, attributes, max_bytes)
    return request, predictor.prepare(request)


def _connection_limits() -> dict[str, Any]:
    """uvicorn settings against idle, slow and too many clients (ec2train/http_guard.py)."""
    from ec2train import http_guard  # imports uvicorn: only once serving starts

    return http_guard.uvicorn_settings()


def app_from_env():
    """App factory for `--workers N` (each uvicorn worker process builds its own app)."""
    return create_app(**json.loads(os.environ[_ENV_CONFIG]), load_first=True)


def run(
    model_path: str | Path,
    host: str = "127.0.0.1",
    port: int = 8080,
    max_batch: int = 8,
    max_wait_ms: float = 5.0,
    workers: int = 1,
    threads: int | None = None,
    log_level: str = "info",
    compile: str = "off",
    request_memory_mb: float = REQUEST_MEMORY_MB,
    started: float | None = None,
) -> None:
    """Serve until interrupted. A model that cannot be loaded, or a busy port, is a UserError.
    `started` (time.monotonic()) is when the command began: the line that says ready counts from it."""
    uvicorn = _require_serve_deps()
    hw.compile_forward(compile, "cpu")  # a bad mode fails now, not in each worker's loader
    if request_memory_mb <= 0:  # here, once, not in each worker
        raise UserError(f"--request-memory-mb must be more than 0, got {request_memory_mb:g}")
    model_path = Path(model_path)
    if not model_path.is_file():
        raise UserError(f"no model file at {model_path}; train one with `ec2train fit` or pass --model PATH")
    if workers > 1:
        from ec2train.model import read_model_file

        read_model_file(model_path)  # fail here, once, rather than in every worker
        if compile == "on":
            _require_compiler()
        settings = dict(
            model_path=str(model_path),
            max_batch=max_batch,
            max_wait_ms=max_wait_ms,
            threads=threads,
            procs=workers,
            compile=compile,
            request_memory_mb=request_memory_mb,
            url=f"http://{host}:{port}",
        )
        os.environ[_ENV_CONFIG] = json.dumps(settings)
        uvicorn.run(
            "ec2train.server:app_from_env",
            factory=True,
            host=host,
            port=port,
            workers=workers,
            log_level=log_level,
            **_connection_limits(),
        )
        return
    app = create_app(
        model_path,
        max_batch,
        max_wait_ms,
        threads=threads,
        compile=compile,
        request_memory_mb=request_memory_mb,
        url=f"http://{host}:{port}",
        started=started,
    )
    server = uvicorn.Server(
        uvicorn.Config(app, host=host, port=port, log_level=log_level, lifespan="on", **_connection_limits())
    )
    app.state.on_load_error = lambda exc: setattr(server, "should_exit", True)
    try:
        server.run()
    except SystemExit:
        if not server.started:  # uvicorn exits when it cannot bind
            raise UserError(
                f"cannot listen on {host}:{port} (in use, or not an address of this machine); pick another --port"
            ) from None
        raise
    error = app.state.load_error
    if error is not None:
        if isinstance(error, UserError):
            raise error
        raise UserError(f"cannot load the model {model_path}: {type(error).__name__}: {error}") from error
