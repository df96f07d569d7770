"""A local HTTP server that behaves like the SageMaker endpoint, with dynamic batching.

Routes: GET /ping (200 once the model is loaded, 503 before), POST /invocations (the
container contract), POST /endpoints/{name}/invocations (so a boto3 `sagemaker-runtime`
client with `endpoint_url=` works unchanged; errors come back the way SageMaker returns
them, as ModelError), GET /stats (batching counters).

Requests are read and decoded off the event loop (thread pool); a single batcher task groups
the tensors of concurrent requests into one forward pass, run in its own thread so the loop
keeps accepting requests meanwhile. Misbehaving clients are bounded in two places: connections
(idle, slow, too many) in http_guard.py, requests in progress by `Admission` (a fast 503). Built on starlette + uvicorn (the `serve` extra),
imported lazily.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import logging
import os
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ec2train import hw
from ec2train import threads as thread_plans
from ec2train.errors import UserError, pip_install
from ec2train.infer import (
    CUSTOM_ATTRIBUTES_HEADER,
    JSON_TYPE,
    MAX_REQUEST_BYTES,
    CompileError,
    PayloadTooLarge,
    Predictor,
    Request,
    RequestError,
    check_accept,
    default_device,
    parse_request,
)

log = logging.getLogger("uvicorn.error")  # shows beside uvicorn's own lines, in its format
_ENV_CONFIG = "EC2TRAIN_SERVE_CONFIG"  # how `--workers N` hands the settings to each process
# A body over the limit is still read (and dropped) up to this much, so the client gets
# the 413 instead of a reset connection; beyond it the connection is cut.
_DRAIN_LIMIT = 64 * 1024 * 1024
# Seconds a client has to send a whole request body (6 MB in 30 s is 1.6 Mbit/s); then 408.
BODY_TIMEOUT_S = 30.0
# Requests being decoded, queued or in a forward pass, per process, as a multiple of
# --max-batch times the forward lanes; beyond it a request gets a fast 503 instead of a long wait (docs/serve.md).
PENDING_PER_BATCH = 4


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


@dataclass
class BatchStats:
    """What the batcher did: forward passes, images, and how many passes had each size."""

    batches: int = 0
    images: int = 0
    sizes: Counter = field(default_factory=Counter)

    def record(self, size: int) -> None:
        self.batches += 1
        self.images += size
        self.sizes[size] += 1

    def as_dict(self) -> dict[str, Any]:
        return {
            "batches": self.batches,
            "images": self.images,
            "max_batch_size": max(self.sizes, default=0),
            "batch_sizes": {str(k): v for k, v in sorted(self.sizes.items())},
        }


class PeakWindow:
    """The largest value added in the last `seconds` (a sliding-window maximum, O(1) amortized).

    Times are passed in, so the window is a pure function of its inputs."""

    def __init__(self, seconds: float = 1.0):
        self.seconds = seconds
        self._entries: collections.deque[tuple[float, int]] = collections.deque()  # values fall front to back

    def add(self, now: float, value: int) -> int:
        """Records `value` at time `now` and returns the peak of the window ending there."""
        entries = self._entries
        while entries and entries[-1][1] <= value:
            entries.pop()
        entries.append((now, value))
        while entries[0][0] < now - self.seconds:
            entries.popleft()
        return entries[0][1]


@dataclass
class _Item:
    tensor: Any
    request: Request
    future: asyncio.Future


class Batcher:
    """Groups concurrent requests into one forward pass (dynamic batching).

    After the first request arrives it takes the requests already queued, and waits up to
    `max_wait_ms` more only while other requests are still being read or decoded, so a lone
    request on an idle server never waits (with another pass running, see `_hold`). Under load,
    requests pile up during each forward pass and the next pass takes them (up to its share,
    see `share`). `max_batch=1` turns batching off. `lanes` passes run at once in `executor`
    (which has that many threads; threads.serve_lanes says why).
    """

    def __init__(
        self,
        max_batch: int,
        max_wait_ms: float,
        executor: ThreadPoolExecutor,
        stats: BatchStats,
        lanes: int = 1,
        clock: Callable[[], float] = time.monotonic,
    ):
        if max_batch < 1 or max_wait_ms < 0:
            raise UserError("--max-batch must be >= 1 and --max-wait-ms >= 0")
        self.max_batch = max_batch
        self.lanes = lanes
        self.max_wait = max_wait_ms / 1000.0
        self.executor = executor
        self.stats = stats
        self.predictor: Predictor | None = None
        self.preparing = 0  # requests received and still being read/decoded (event-loop only)
        self.queue: asyncio.Queue[_Item] = asyncio.Queue()
        self._changed = asyncio.Event()  # a request was queued or a pass ended
        self.in_passes = 0  # images in the forward passes running now
        self.clock = clock
        # Requests in the server: being prepared, queued or in a pass (not the few a pass is
        # still collecting, which the peak over the last second covers).
        self._in_flight = PeakWindow(1.0)

    @contextlib.contextmanager
    def preparing_one(self):
        """Counts a request as being read or decoded while inside (event-loop only)."""
        self.preparing += 1
        try:
            yield
        finally:
            self.preparing -= 1

    def share(self) -> int:
        """The most images one pass takes: with one lane `max_batch`; with several, an equal part
        of the requests in the server at its fullest moment of the last second (ceil(peak / lanes)).

        Eight clients on two lanes then run passes of 4 and 4 side by side. A greedy pass that
        takes 5 leaves the other lane 3, which wait for it (`_hold`), so on 2 cores the two lanes
        settled into 5 and 3 and only overlapped half the time (resnet18 at 64 px: 84-92 req/s
        against 95-97 with equal shares; with 4 clients 38-53 against 67-71, docs/performance.md).
        """
        if self.lanes == 1:
            return self.max_batch
        peak = self._in_flight.add(self.clock(), self.in_passes + self.queue.qsize() + self.preparing)
        return max(1, min(self.max_batch, -(-peak // self.lanes)))

    async def submit(self, tensor: Any, request: Request) -> dict[str, Any]:
        future = asyncio.get_running_loop().create_future()
        self.queue.put_nowait(_Item(tensor, request, future))
        self.share()  # the window sees every arrival
        self._changed.set()
        return await future

    async def _collect(self) -> list[_Item]:
        loop = asyncio.get_running_loop()
        items = [await self.queue.get()]
        deadline = loop.time() + self.max_wait
        limit = self.share()
        while len(items) < limit:
            if not self.queue.empty():
                items.append(self.queue.get_nowait())
                continue
            remaining = deadline - loop.time()
            if self.preparing == 0 or remaining <= 0:
                break
            try:
                items.append(await asyncio.wait_for(self.queue.get(), remaining))
            except asyncio.TimeoutError:
                break
        return [it for it in items if not it.future.done()]  # a client that went away is skipped

    async def run(self) -> None:
        """Collects a batch whenever a lane is free (after `_hold` while other passes run), so up
        to `lanes` forward passes run at once and requests pile up into bigger batches."""
        assert self.predictor is not None
        free = asyncio.Semaphore(self.lanes)
        running: set[asyncio.Task] = set()  # the loop keeps only weak references to tasks

        def done(task: asyncio.Task) -> None:
            running.discard(task)
            free.release()
            self._changed.set()

        while True:
            await free.acquire()
            await self._hold(running)
            items = await self._collect()
            if not items:
                free.release()
                continue
            self.in_passes += len(items)  # _forward counts them out
            task = asyncio.create_task(self._forward(items))
            running.add(task)
            task.add_done_callback(done)

    async def _hold(self, running: set[asyncio.Task]) -> None:
        """While other passes run, a free lane waits for half a batch (2 requests or more, but at
        most max_batch and at most its `share`) or for them to end. A one-image pass costs twice as much
        per image as a batch of 8 (resnet18 at 64 px, one thread: 17 ms against 8 ms), so on a
        busy box small passes side by side would waste the cores that bigger ones share well."""
        while running and self.queue.qsize() < min(self.max_batch, max(2, self.max_batch // 2), self.share()):
            self._changed.clear()
            await self._changed.wait()

    async def _forward(self, items: list[_Item]) -> None:
        assert self.predictor is not None
        try:
            answers = await asyncio.get_running_loop().run_in_executor(
                self.executor,
                self.predictor.predict_tensors,
                [it.tensor for it in items],
                [it.request for it in items],
            )
        except Exception as exc:  # a failed pass fails its requests (500), not the server
            log.exception("forward pass failed")
            for it in items:
                if not it.future.done():
                    it.future.set_exception(exc)
            return
        finally:
            self.in_passes -= len(items)
        self.stats.record(len(items))
        for it, answer in zip(items, answers):
            if not it.future.done():
                it.future.set_result(answer)


class RequestTimeout(RequestError):
    status = 408


class Overloaded(RequestError):
    """More requests in progress than the server takes on; the client should retry later."""

    status = 503


class Admission:
    """At most `limit` requests past reading their body; the rest are refused at once (503).

    Event-loop only. /ping never comes here: a /ping that fails makes SageMaker take the
    instance out of service, which is the opposite of shedding load.
    """

    def __init__(self, limit: int):
        if limit < 1:
            raise UserError(f"max_pending must be >= 1, got {limit}")
        self.limit = limit
        self.active = 0

    @contextlib.contextmanager
    def slot(self):
        if self.active >= self.limit:
            raise Overloaded(f"server is busy ({self.active} requests in progress); retry in a moment")
        self.active += 1
        try:
            yield
        finally:
            self.active -= 1


async def _read_body_in_time(request: Any, max_bytes: int, timeout: float) -> bytes:
    """The body, or RequestTimeout if it does not arrive within `timeout` seconds (slow clients)."""
    try:
        return await asyncio.wait_for(_read_body(request, max_bytes), timeout)
    except asyncio.TimeoutError:
        raise RequestTimeout(f"request body did not arrive within {timeout:g} s") from None


async def _read_body(request: Any, max_bytes: int) -> bytes:
    declared = request.headers.get("content-length", "")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size <= max_bytes:
            chunks.append(chunk)
        elif size > _DRAIN_LIMIT:
            break
    if size > max_bytes:
        shown = declared if declared.isdigit() else f"more than {size}"
        raise PayloadTooLarge(
            f"request body is {shown} bytes, more than the limit of {max_bytes}; send a smaller image"
        )
    return b"".join(chunks)


def _error_response(status: int, message: str, runtime_api: bool):
    """{"error": ...} with the status; on the runtime-API route, wrapped the way SageMaker does it."""
    from starlette.responses import JSONResponse

    if not runtime_api or status == 413:  # SageMaker refuses oversized payloads itself, with 413
        return JSONResponse({"error": message}, status_code=status)
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
        headers={"x-amzn-ErrorType": "ModelError"},
    )


# Long on purpose: the routes are closures over one app's batcher, admission limit and forward pool;
# as module functions they would need that state threaded through every handler.
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
    compile: str = "auto",
):
    """The ASGI app. The model loads in the background after start-up (GET /ping says when).

    `load_first` loads it before the server accepts connections instead: with several worker
    processes on one socket, a worker that is still loading then takes no requests.
    `load` replaces how the Predictor is made (default: `Predictor(model_path, device)`).
    `app.state.stats` holds the batch counters; `app.state.on_load_error`, if set, is
    called with the exception when the model cannot be loaded. `max_pending` (default
    PENDING_PER_BATCH x max_batch x forward lanes) bounds the requests in progress: see `Admission`.
    `compile` (auto, on, off; hw.compile_forward) compiles the forward pass for batches of up to
    max_batch while the model loads; with auto a failure is a warning and the eager pass serves.
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
    return app


class _Service:
    """One server process's parts (forward lanes, batcher, admission) and the app's routes."""

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
    ):
        self.model_path, self.plan, self.loader = model_path, plan, loader
        self.max_batch, self.max_wait_ms, self.max_bytes = max_batch, max_wait_ms, max_bytes
        self.body_timeout, self.load_first, self.compile = body_timeout, load_first, compile
        self.closing = False  # set when the server stops: a compile still running then ends quietly
        self.stats = BatchStats()
        self.forward_pool = ThreadPoolExecutor(max_workers=plan.lanes, thread_name_prefix="ec2train-forward")
        self.batcher = Batcher(max_batch, max_wait_ms, self.forward_pool, self.stats, plan.lanes)
        self.admission = Admission(max_pending)

    def load_model(self) -> Predictor:
        import torch

        thread_plans.apply_threads(self.plan)
        log.info("%s; torch.get_num_threads() = %d", self.plan.describe(), torch.get_num_threads())
        predictor = self.loader()
        if hw.compile_forward(self.compile, torch.device(predictor.device).type):
            self._compile(predictor)
        return predictor

    def _compile(self, predictor: Predictor) -> None:
        """Compile before /ping says ready: no client waits on a compiler. With --compile auto a
        failure leaves the eager pass serving, with a warning; with on it stops the server."""
        if self.closing:
            return
        start = time.perf_counter()
        sizes = ", ".join(map(str, hw.batch_buckets(self.max_batch)))
        log.info("compiling the forward pass for batches of %s (--compile off skips this)", sizes)

        def report(size: int, seconds: float) -> None:
            if self.closing:  # e.g. the port was taken: stop before the next batch size
                raise CompileError("the server stopped")
            log.info("compiled batches of %d in %.1f s", size, seconds)

        try:
            predictor.compile(self.max_batch, report)
        except CompileError as exc:
            if self.closing:
                return
            fix = "install a C++ compiler (g++)" if exc.no_compiler else "see the cause above"
            if self.compile == "on":
                raise UserError(f"{exc}; {fix} or pass --compile off") from None
            log.warning("%s; serving the uncompiled model (%s, or pass --compile off)", exc, fix)
            return
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
            "model %s loaded: %s, %d classes, %d px; max batch %d, max wait %g ms",
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
        from starlette.concurrency import run_in_threadpool
        from starlette.responses import Response

        state = request.app.state
        predictor = state.predictor
        if predictor is None:
            why = "the model failed to load" if state.load_error is not None else "the model is still loading"
            return _error_response(503, f"{why}; retry when GET /ping answers 200", runtime_api)
        try:
            with self.batcher.preparing_one():
                body = await _read_body_in_time(request, self.max_bytes, self.body_timeout)
                check_accept(request.headers.get("accept"))
            # A slow upload costs no slot: only decoding and the forward pass are limited.
            with self.admission.slot():
                with self.batcher.preparing_one():
                    req, tensor = await run_in_threadpool(
                        _prepare,
                        predictor,
                        body,
                        request.headers.get("content-type"),
                        request.headers.get(CUSTOM_ATTRIBUTES_HEADER),
                        self.max_bytes,
                    )
                answer = await self.batcher.submit(tensor, req)
        except RequestError as exc:
            return _error_response(exc.status, str(exc), runtime_api)
        except Exception as exc:  # never a crash: the client gets a 500 with the reason's type
            log.exception("invocation failed")
            return _error_response(500, f"internal error ({type(exc).__name__})", runtime_api)
        headers = {"x-Amzn-Invoked-Production-Variant": "AllTraffic"} if runtime_api else None
        return Response(json.dumps(answer), media_type=JSON_TYPE, headers=headers)

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
                "compiled_batch_sizes": list(predictor.compiled_sizes) if predictor else [],
                "in_progress": self.admission.active,
                "max_pending": self.admission.limit,
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
    compile: str = "auto",
) -> None:
    """Serve until interrupted. A model that cannot be loaded, or a busy port, is a UserError."""
    uvicorn = _require_serve_deps()
    hw.compile_forward(compile, "cpu")  # a bad mode fails now, not in each worker's loader
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
    app = create_app(model_path, max_batch, max_wait_ms, threads=threads, compile=compile)
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
