"""`ec2train serve` under hostile load (issue 26): what one request may cost, and many at once.

Each test floods one real server (`ec2train serve` in a subprocess on 127.0.0.1, uncompiled, with
--request-memory-mb 400) with crafted requests, and asserts a bound on the figure the flood used
to blow up: CPU seconds per request, resident memory under the flood and after it, /ping latency.
Normal requests during a flood must be answered, or refused with 503, within a couple of seconds.
bench/hostile_bench.py prints the same figures against a normal-request baseline.
"""

from __future__ import annotations

import contextlib
import re
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.support.images import many_chunk_png, many_scan_jpeg, png_of_size
from tests.support.serving import (
    PingWatch,
    ProcessProbe,
    Trickle,
    http,
    one_byte_chunks,
    post,
    raw_exchange,
    stalled_bodies,
    start_cli_server,
)

BUDGET_MB = 400


@pytest.fixture(scope="module")
def served(trained_model):
    proc, url = start_cli_server(trained_model, "--request-memory-mb", str(BUDGET_MB), "--threads", "1")
    yield proc, url, ProcessProbe(proc.pid)
    proc.terminate()
    out = proc.communicate(timeout=30)[0]
    assert "Traceback" not in out, out[-3000:]


@pytest.fixture(scope="module")
def photo(demo_data) -> bytes:
    return next((demo_data / "test").rglob("*.jpg")).read_bytes()


def _port(url: str) -> int:
    return int(url.rsplit(":", 1)[1])


def _head(length: int, expect: bool = False) -> bytes:
    continue_ = "Expect: 100-continue\r\n" if expect else ""
    return (
        f"POST /invocations HTTP/1.1\r\nHost: x\r\nContent-Type: image/jpeg\r\nContent-Length: {length}\r\n"
        f"{continue_}\r\n"
    ).encode()


def _settle(probe: ProcessProbe, url: str, seconds: float = 3.0) -> float:
    """Resident MB once the server has had `seconds` to give memory back after a flood."""
    deadline = time.monotonic() + 30
    while http(url + "/stats")[1].get("memory_mb", 0) > 0 and time.monotonic() < deadline:
        time.sleep(0.1)
    time.sleep(seconds)
    return probe.rss_mb()


def test_a_jpeg_of_thousands_of_scans_costs_the_server_milliseconds(served, photo):
    # Issue 26.1: a 741 KB progressive JPEG took 63.6 s of CPU and got a 200; this 44 KB one took
    # about 8 s. Refused from its markers, before the decoder sees it.
    _, url, probe = served
    hostile = many_scan_jpeg(2000, 2000, 2000)
    assert post(url + "/invocations", photo, "image/jpeg")[0] == 200  # warm
    before = probe.cpu_seconds()
    answers = [post(url + "/invocations", hostile, "image/jpeg") for _ in range(5)]
    per_request = (probe.cpu_seconds() - before) / len(answers)
    print(f"server CPU per crafted JPEG request: {per_request * 1000:.0f} ms")
    for status, answer, _, _ in answers:
        assert status == 400 and "JPEG has more than 100 scans" in answer["error"], answer
    assert per_request < 0.2  # measured: 10-20 ms, most of it HTTP and logging
    status, answer, _, _ = post(url + "/invocations", many_chunk_png(1000, 1000, 100_000), "image/png")
    assert status == 400 and "PNG has more than" in answer["error"]


def test_concurrent_40_megapixel_pngs_stay_within_the_memory_budget(served, photo):
    # Issue 26.2: 40 such requests took the server from 5.0 to 10.9 GB, and 9.5 GB stayed held.
    _, url, probe = served
    bomb = png_of_size(7300, 5470)  # 40 MP, 5 KB
    assert post(url + "/invocations", photo, "image/jpeg")[0] == 200
    idle = _settle(probe, url, 1.0)
    probe.reset_peak()
    with ThreadPoolExecutor(24) as pool, PingWatch(url) as ping:
        flood = [pool.submit(post, url + "/invocations", bomb, "image/png") for _ in range(16)]
        time.sleep(0.3)
        normal = [post(url + "/invocations", photo, "image/jpeg") for _ in range(5)]
        results = [f.result() for f in flood]
    peak = probe.peak_mb()
    after = _settle(probe, url)
    statuses = sorted(status for status, *_ in results)
    print(
        f"16 x 40 MP PNG at once: statuses {statuses}; RSS idle {idle:.0f} MB, peak {peak:.0f} MB, "
        f"after {after:.0f} MB; normal requests {[round(t, 2) for *_, t in normal]} s; worst /ping {ping.worst:.2f} s"
    )
    assert set(statuses) <= {200, 503} and 200 in statuses and 503 in statuses
    busy = next(headers for status, _, headers, _ in results if status == 503)
    assert busy.get("retry-after") == "1"
    assert peak - idle < BUDGET_MB + 150  # measured: about 250 MB over idle
    assert after - idle < 150  # measured: within 30 MB
    for status, _, _, seconds in normal:  # answered, or refused at once
        assert status in (200, 503) and seconds < 3
    assert 200 in [status for status, *_ in normal]
    assert ping.worst < 2


def test_stalled_bodies_are_held_in_the_budget_as_they_arrive(served, photo):
    # Issue 26.3: 1,000 connections sending most of a 6 MB body and stalling took RSS from 2.2 to
    # 6.9 GB (6.2 GB held after). Here 300 send 2 MB of 6.25 MB: 600 MB if every body were read;
    # those past the budget get 503, and so does a body declared larger than the room left.
    proc, url, probe = served
    idle = _settle(probe, url, 1.0)
    probe.reset_peak()
    with PingWatch(url) as ping:
        socks = stalled_bodies(_port(url), 300, 6_250_000, 2_000_000)
    try:
        with Trickle(socks), PingWatch(url) as ping_held:  # a byte a second: never idle long enough to be let go
            deadline = time.monotonic() + 60
            # Held as they arrive, 2 MB each: full but for less than one of them.
            while (stats := http(url + "/stats")[1])["memory_mb"] < BUDGET_MB - 4:
                assert time.monotonic() < deadline, stats
                time.sleep(0.2)
            status, _, _, seconds = post(url + "/invocations", photo, "image/jpeg")  # a few KB: may still fit
            # 2 MB more than the room left (which grows as the first stalled bodies time out)
            more = min(int((stats["memory_limit_mb"] - stats["memory_mb"] + 2) * 2**20), 6_000_000)
            busy = post(url + "/invocations", b"\xff" * more, "image/jpeg")  # no room for it
            waiting = raw_exchange(_port(url), _head(6_000_000, expect=True), read_timeout=10)  # nor 6 MB
        started = time.monotonic()
        while http(url + "/stats")[1]["memory_mb"] > 0:  # stalled now: they time out (408), still open
            assert time.monotonic() < started + 30, "stalled bodies were never let go"
            time.sleep(0.2)
        released = time.monotonic() - started
    finally:
        for sock in socks:
            sock.close()
    peak = probe.peak_mb()
    after = _settle(probe, url)
    print(
        f"300 stalled 6.25 MB bodies: {stats['memory_mb']} MB held of {stats['memory_limit_mb']}, let go "
        f"{released:.1f} s after they stopped; RSS idle {idle:.0f} MB, peak {peak:.0f} MB, after {after:.0f} MB; "
        f"a normal request: {status} in {seconds:.2f} s, a {more / 2**20:.1f} MB one: {busy[0]} in {busy[3]:.2f} s; worst /ping "
        f"{ping.worst:.2f} s as they came, {ping_held.worst:.2f} s while held"
    )
    assert busy[0] == 503 and "no memory free" in busy[1]["error"] and busy[2].get("retry-after") == "1"
    assert waiting.startswith(b"HTTP/1.1 503 ") and b"100 Continue" not in waiting and b"no memory free" in waiting
    assert stats["memory_mb"] <= BUDGET_MB
    # The bodies are held as they arrive, so the budget is full of real bytes (2 MB read of each of
    # 200 bodies); on top come 300 connections' buffers and the allocator's overhead for the pieces.
    assert peak - idle < BUDGET_MB * 1.5  # measured: 500 MB over idle
    assert after - idle < 150
    # 300 connections at once, 400 MB of their bodies read as they come, cost uvicorn's event loop
    # time on 2 cores shared with the clients: /ping measured 0.15-0.3 s with the box otherwise
    # idle, and up to 2.2 s as they came and 3.5 s while held in `make test` (4 workers on 2 cores).
    assert status in (200, 503) and seconds < 3 and busy[3] < 3 and ping.worst < 5 and ping_held.worst < 5
    assert post(url + "/invocations", photo, "image/jpeg")[0] == 200


def test_expect_100_continue_with_an_oversized_body_gets_413_without_continue(served):
    _, url, _ = served
    answer = raw_exchange(_port(url), _head(7_000_000, expect=True), read_timeout=10)
    assert answer.startswith(b"HTTP/1.1 413 "), answer[:200]
    assert b"100 Continue" not in answer and b"more than the limit of 6291456" in answer


def test_a_body_of_one_byte_chunks_is_cut_short_and_ping_stays_fast(served, photo):
    # Issue 26.4: 8 connections sending 1M one-byte chunks each kept the event loop busy for
    # 43.6 s; /ping took up to 14 s.
    _, url, probe = served
    before = probe.cpu_seconds()
    with ThreadPoolExecutor(4) as pool, PingWatch(url) as ping:
        answers = list(pool.map(lambda _: one_byte_chunks(_port(url), 400_000), range(4)))
    cpu = probe.cpu_seconds() - before
    print(f"4 x 400,000 one-byte chunks: server CPU {cpu:.2f} s; worst /ping {ping.worst * 1000:.0f} ms")
    for answer in answers:
        assert answer.startswith(b"HTTP/1.1 400 ") and re.search(rb"body came in more than \d+ pieces", answer), answer
    assert ping.worst < 1 and cpu < 2  # measured: 0.1-0.2 s of CPU, /ping under 0.1 s
    assert post(url + "/invocations", photo, "image/jpeg")[0] == 200


def test_bodies_declared_but_not_sent_hold_no_memory(served, photo):
    # A declared Content-Length was held whole before a byte of it arrived: 80 connections that
    # sent only headers declaring 5 MB (and a byte now and then) held all 400 MB, and every other
    # request got 503 for up to 30 s. Bodies are held as they arrive.
    _, url, _ = served
    socks = stalled_bodies(_port(url), 80, BUDGET_MB * 2**20 // 80, 0)
    try:
        with Trickle(socks):
            time.sleep(1.5)
            stats = http(url + "/stats")[1]
            answers = [post(url + "/invocations", photo, "image/jpeg") for _ in range(3)]
    finally:
        for sock in socks:
            sock.close()
    print(
        f"80 bodies declared, not sent: {stats['memory_mb']} MB held; normal requests {[a[:1] + a[3:] for a in answers]}"
    )
    assert stats["memory_mb"] < 1
    for status, _, _, seconds in answers:
        assert status == 200 and seconds < 2


def test_memory_held_for_bodies_and_decodes_is_given_back_as_taken():
    # A chunked body was taken in 256 KB steps (none 'large') and given back in one piece (counted
    # 'large'): MemoryBudget.large went negative, which disables the rule that large holds take at
    # most three quarters. Random bodies (declared and chunked, any pieces) and decodes at once.
    import asyncio
    import random

    from starlette.requests import Request

    from ec2train.infer import RequestError
    from ec2train.preprocess import MemoryBudget, MemoryBusy
    from ec2train.request_limits import read_body

    budget, rng = MemoryBudget(32 * 2**20), random.Random(0)  # 'large': over 2 MB
    worst = []

    def request(size: int, chunked: bool) -> Request:
        body, cuts = bytes(size), sorted(rng.sample(range(1, size), rng.randint(1, 40)))
        parts = [body[a:b] for a, b in zip([0, *cuts], [*cuts, size])]
        messages = [{"type": "http.request", "body": p, "more_body": True} for p in parts]
        messages.append({"type": "http.request", "body": b"", "more_body": False})
        headers = [] if chunked else [(b"content-length", str(size).encode())]

        async def receive():
            await asyncio.sleep(0)
            return messages.pop(0)

        return Request({"type": "http", "method": "POST", "path": "/", "headers": headers}, receive)

    async def body() -> None:
        with contextlib.suppress(RequestError):
            async with read_body(request(rng.randint(1_000, 6_000_000), rng.random() < 0.5), budget, 6_291_456):
                await asyncio.sleep(rng.random() / 100)

    async def decode() -> None:
        with contextlib.suppress(MemoryBusy), budget.hold(rng.choice((50_000, 1_500_000, 3_000_000, 9_000_000))):
            await asyncio.sleep(rng.random() / 100)

    async def flood() -> None:
        tasks = [asyncio.create_task(rng.choice((body, decode))()) for _ in range(300)]
        while not all(t.done() for t in tasks):
            worst.append((budget.large, budget.used))
            assert 0 <= budget.large <= budget.used <= budget.total, (budget.large, budget.used)
            await asyncio.sleep(0)
        await asyncio.gather(*tasks)

    asyncio.run(flood())
    assert budget.used == budget.large == 0
    assert max(used for _, used in worst) > budget.total // 2  # the budget was really contended
