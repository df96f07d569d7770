"""Dynamic batching for `ec2train serve`: the images of concurrent requests in one forward pass.

One Batcher per server process, driven by its event loop; the forward passes run in a thread
pool of `lanes` threads, so the loop keeps accepting requests meanwhile.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from ec2train.errors import UserError
from ec2train.infer import Predictor, Request

log = logging.getLogger("uvicorn.error")  # shows beside uvicorn's own lines, in its format


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
