"""What one request may cost `ec2train serve`: a slot, memory for its body and image, and time.

- `Admission`: at most N requests past reading their body (decoding, queued or in a forward
  pass); the rest get an immediate 503.
- `read_body`: the request body, held in the process's MemoryBudget (preprocess.py) as it
  arrives, so a connection that declares a body and sends none holds nothing. A declared
  Content-Length over MAX_REQUEST_BYTES gets 413, and one larger than the room left now 503
  (Retry-After), both before a byte is read (so `Expect: 100-continue` never gets "100 Continue"
  for a body that would be refused); a body that outgrows the room as it arrives gets 503, and
  one that stops arriving 408.
- `MemoryReturn`: after a burst, the memory the decodes freed goes back to the system (glibc
  keeps freed memory in its heaps, one per thread up to 8 per core, unless asked to give it back).

Connection-level limits (idle, slow or too many connections, tiny chunks) are in http_guard.py.
Event-loop code except MemoryReturn; imports starlette only inside `read_body`'s caller's types.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import gc
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from ec2train.errors import UserError
from ec2train.infer import Busy, PayloadTooLarge, RequestError
from ec2train.preprocess import MemoryBudget

log = logging.getLogger("uvicorn.error")

# Seconds a client has to send a whole request body (6 MB in 30 s is 1.6 Mbit/s), and the longest
# pause between two pieces of it; then 408. A body that stalls holds its memory until one of them.
BODY_TIMEOUT_S = 30.0
BODY_IDLE_S = 5.0
# A refused body is still read and dropped, up to this much, unless the client waits for "100
# Continue": answering while it still sends makes the server close the connection with unread
# bytes, and the client sees a reset instead of the answer. Refused as too large (413): up to
# 64 MB. Refused for want of memory (503): up to 1 MB, so an ordinary photo gets its 503, while
# under a flood of large bodies the event loop does not read megabytes only to drop them.
_DRAIN_LIMIT = 64 * 1024 * 1024
_DRAIN_BUSY_LIMIT = 1024 * 1024


class RequestTimeout(RequestError):
    status = 408


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
            raise Busy(f"server is busy ({self.active} requests in progress); retry in a moment")
        self.active += 1
        try:
            yield
        finally:
            self.active -= 1


def declared_length(headers: Any) -> int | None:
    """The Content-Length a request declares, or None (a chunked body). uvicorn has already refused
    a malformed one with 400."""
    value = headers.get("content-length")
    return int(value) if value is not None and value.strip().isdigit() else None


@contextlib.asynccontextmanager
async def read_body(
    request: Any,
    budget: MemoryBudget,
    max_bytes: int,
    timeout: float = BODY_TIMEOUT_S,
    idle_timeout: float = BODY_IDLE_S,
) -> AsyncIterator[bytes]:
    """The request's body, held in `budget` as it arrives and until the block ends (the request's
    image is decoded and answered from these bytes). 413, 503 or 408 (RequestError) as the module
    says. Body bytes are never 'large' in the budget: a body is at most max_bytes."""
    held = 0
    declared = declared_length(request.headers)

    def busy(n: int) -> Busy:
        return Busy(
            f"server is busy: no memory free for a {n}-byte request body now "
            f"({budget.used // 2**20} of {budget.total // 2**20} MB in use); retry in a moment"
        )

    def hold(n: int) -> None:
        nonlocal held
        if not budget.take(n, large=False):
            raise busy(max(declared or 0, held + n))
        held += n

    try:
        try:
            if declared is not None and declared > max_bytes:
                raise PayloadTooLarge(
                    f"request body is {declared} bytes, more than the limit of {max_bytes}; send a smaller image"
                )
            if declared is not None and not budget.fits(declared):
                raise busy(declared)
            body = await _receive(request, max_bytes, hold, timeout, idle_timeout)
        except (PayloadTooLarge, Busy) as exc:
            if "100-continue" not in request.headers.get("expect", "").lower():
                await _drain(request, timeout, _DRAIN_LIMIT if isinstance(exc, PayloadTooLarge) else _DRAIN_BUSY_LIMIT)
            raise
        yield body
    finally:
        budget.give(held, large=False)


async def _drain(request: Any, timeout: float, limit: int) -> None:
    """Read and drop what is left of a refused body, up to `limit` bytes; a client that is gone,
    slow or over the limit just has its connection closed after the answer."""
    declared = declared_length(request.headers)
    if declared is not None and declared > limit:
        return

    async def drop() -> None:
        size = 0
        async for piece in request.stream():
            size += len(piece)
            if size > limit:
                return

    with contextlib.suppress(Exception):
        await asyncio.wait_for(drop(), timeout)


async def _receive(
    request: Any, max_bytes: int, hold: Callable[[int], None], timeout: float, idle_timeout: float
) -> bytes:
    """The body's bytes; `hold(n)` takes each piece's bytes from the budget as it comes."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    pieces, size = [], 0
    stream = request.stream()
    try:
        while True:
            left = deadline - loop.time()
            try:
                piece = await asyncio.wait_for(anext(stream), min(left, idle_timeout))
            except StopAsyncIteration:
                break
            except asyncio.TimeoutError:
                why = f"within {timeout:g} s" if left <= idle_timeout else f"for {idle_timeout:g} s"
                raise RequestTimeout(f"request body did not arrive {why}") from None
            size += len(piece)
            if size > max_bytes:  # a chunked body, or one longer than it declared
                raise PayloadTooLarge(f"request body is more than {max_bytes} bytes, the limit; send a smaller image")
            hold(len(piece))
            pieces.append(piece)
        return b"".join(pieces)
    finally:
        # A refused or abandoned body's pieces are freed now, not whenever the garbage collector
        # reaches the exception's traceback (which holds this frame) in a reference cycle.
        pieces.clear()
        await stream.aclose()


class MemoryReturn:
    """Gives freed memory back to the system (glibc's malloc_trim) after a burst, in a thread of
    its own, one trim at a time; a no-op where the C library is not glibc. The trim waits `delay`
    seconds (the budget is given back a moment before a request's last bytes are freed) and runs
    the garbage collector first: failed requests leave their buffers in reference cycles
    (exception, traceback, frame), which a quiet server would otherwise keep for a long time."""

    def __init__(self, delay: float = 0.5):
        self.delay = delay
        self._libc = _glibc()
        self._running = threading.Lock()
        self.trims = 0

    def limit_arenas(self, arenas: int) -> None:
        """At most `arenas` malloc heaps (M_ARENA_MAX), set before the threads that decode start:
        each thread's heap otherwise keeps what that thread freed."""
        if self._libc is not None:
            self._libc.mallopt(-8, max(1, arenas))  # M_ARENA_MAX

    def soon(self) -> None:
        """Trim in the background, unless a trim is running already (MemoryBudget.on_idle)."""
        if self._libc is None or not self._running.acquire(blocking=False):
            return
        threading.Thread(target=self._trim, name="ec2train-malloc-trim", daemon=True).start()

    def _trim(self) -> None:
        try:
            time.sleep(self.delay)
            gc.collect()
            self._libc.malloc_trim(0)
            self.trims += 1
        except Exception:  # never worth a failed request
            log.debug("malloc_trim failed", exc_info=True)
        finally:
            self._running.release()


def _glibc():
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
        libc.malloc_trim.argtypes, libc.mallopt.argtypes = [ctypes.c_size_t], [ctypes.c_int, ctypes.c_int]
        return libc
    except (OSError, AttributeError):  # macOS, musl: no malloc_trim
        return None
