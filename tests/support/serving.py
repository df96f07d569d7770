"""A server to test against: `ec2train serve` in a subprocess, or the app in a thread of the
test process, on a free loopback port; and a small HTTP client for them."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.support.net import free_port


def http(url: str, body: bytes | None = None, headers: dict | None = None) -> tuple[int, dict]:
    req = urllib.request.Request(url, data=body, headers=headers or {}, method="POST" if body is not None else "GET")
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


class ServerThread:
    """uvicorn serving an app on a free loopback port, in a thread of this process."""

    def __init__(self, app):
        import uvicorn

        self.app = app
        self.url = f"http://127.0.0.1:{free_port()}"
        port = int(self.url.rsplit(":", 1)[1])
        self.server = uvicorn.Server(
            uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on")
        )
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self):
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "server did not start"
            time.sleep(0.02)
        return self

    def wait_ready(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while http(self.url + "/ping")[0] != 200:
            assert time.monotonic() < deadline, "model never loaded"
            time.sleep(0.05)

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(10)


def start_cli_server(trained_model, *args: str, compile: str | None = "off", **popen) -> tuple[subprocess.Popen, str]:
    """`ec2train serve` in a subprocess on a free port, once /ping answers 200; (process, url).
    Uncompiled unless `compile` says otherwise (None: serve's default), as compiling takes tens
    of seconds."""
    port = free_port()
    args = args if compile is None else (*args, "--compile", compile)
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "ec2train",
            "serve",
            "--model",
            str(trained_model),
            "--port",
            str(port),
            "--log-level",
            "warning",
            *args,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        **popen,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300  # a cold compile on a loaded 2-core box
    while True:
        try:
            if http(url + "/ping")[0] == 200:
                return proc, url
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"server did not come up: {proc.communicate(timeout=30)[0]}")
        time.sleep(0.2)


# ---------------------------------------------------------------- hostile load (issue 26)


class ProcessProbe:
    """A server process's CPU time and resident memory, from /proc (Linux)."""

    def __init__(self, pid: int):
        self.pid = pid
        self._ticks = os.sysconf("SC_CLK_TCK")

    def cpu_seconds(self) -> float:
        with open(f"/proc/{self.pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / self._ticks  # utime + stime

    def _status_mb(self, key: str) -> float:
        with open(f"/proc/{self.pid}/status") as f:
            return int(next(line for line in f if line.startswith(key)).split()[1]) / 1024

    def rss_mb(self) -> float:
        return self._status_mb("VmRSS")

    def peak_mb(self) -> float:
        """The most resident memory since reset_peak()."""
        return self._status_mb("VmHWM")

    def reset_peak(self) -> None:
        with open(f"/proc/{self.pid}/clear_refs", "w") as f:
            f.write("5")


class PingWatch:
    """GET /ping every `every` seconds in a thread while inside; `worst` is its slowest answer."""

    def __init__(self, url: str, every: float = 0.05):
        self.url, self.every, self.times = url + "/ping", every, []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            started = time.monotonic()
            try:
                http(self.url)
            except OSError:
                pass
            self.times.append(time.monotonic() - started)
            self._stop.wait(self.every)

    @property
    def worst(self) -> float:
        return max(self.times, default=0.0)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(60)


def post(url: str, body: bytes, content_type: str, timeout: float = 120) -> tuple[int, dict, dict, float]:
    """POST body; (status, JSON answer, headers with lowercase names, seconds taken)."""
    req = urllib.request.Request(url, data=body, headers={"Content-Type": content_type}, method="POST")
    started = time.monotonic()
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, json.loads(resp.read()), _lower(resp.headers), time.monotonic() - started
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read()), _lower(exc.headers), time.monotonic() - started


def raw_exchange(port: int, head: bytes, body_parts=(), read_timeout: float = 30) -> bytes:
    """Send a request head (and body parts) on a fresh connection; everything the server answers
    until it closes the connection or goes quiet for read_timeout."""
    with socket.create_connection(("127.0.0.1", port), timeout=read_timeout) as sock:
        sock.sendall(head)
        try:
            for part in body_parts:
                sock.sendall(part)
        except OSError:  # the server answered and closed while we were still sending
            pass
        answer = b""
        try:
            while chunk := sock.recv(65536):
                answer += chunk
        except OSError:
            pass
        return answer


def stalled_bodies(port: int, connections: int, declared: int, sent: int) -> list[socket.socket]:
    """`connections` requests that declare a body of `declared` bytes, send `sent` of them and stall.
    Returns the sockets (the caller closes them)."""
    head = (
        f"POST /invocations HTTP/1.1\r\nHost: x\r\nContent-Type: image/jpeg\r\nContent-Length: {declared}\r\n\r\n"
    ).encode()
    payload = b"\xff" * sent
    socks: list[socket.socket] = []

    def one(_):
        sock = socket.create_connection(("127.0.0.1", port), timeout=60)
        socks.append(sock)
        try:
            sock.sendall(head + payload)
        except OSError:
            pass

    with ThreadPoolExecutor(32) as pool:
        list(pool.map(one, range(connections)))
    return socks


class Trickle:
    """While inside, send one more byte on each socket every `every` seconds (a body that keeps
    arriving, too slowly to finish, never hits the server's idle timeout)."""

    def __init__(self, socks: list[socket.socket], every: float = 1.0):
        self.socks, self.every = socks, every
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            for sock in self.socks:
                try:
                    sock.send(b"\xff")
                except OSError:
                    pass

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(30)


def one_byte_chunks(port: int, chunks: int) -> bytes:
    """A chunked request whose body comes in `chunks` chunks of one byte; the server's answer."""
    head = b"POST /invocations HTTP/1.1\r\nHost: x\r\nContent-Type: image/jpeg\r\nTransfer-Encoding: chunked\r\n\r\n"
    return raw_exchange(port, head, [b"1\r\n\xff\r\n" * 4096] * (chunks // 4096) + [b"0\r\n\r\n"])


def _lower(headers) -> dict[str, str]:
    return {k.lower(): v for k, v in headers.items()}
