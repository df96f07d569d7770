"""Shared by test_s3.py and test_spot.py: the fit settings, one uninterrupted reference run,
and an HTTP proxy in front of moto that injects faults."""

from __future__ import annotations

import functools
import http.client
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import torch

from conftest import TINY_FIT, free_port


def single_torch_thread():
    """Generator for a module fixture: one intra-op thread. Two cores are shared by several test
    runs, so one thread is faster and keeps every run (and the reference) on one reduction order."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)

# TINY_FIT with a 1.4M-parameter model: its last.pt is ~6 MB instead of resnet18's ~180 MB,
# so each test uploads a few MB per epoch. Exact resume does not depend on the architecture.
# CPU even on a GPU box: bitwise-equal weights after a resume need deterministic kernels.
FIT = dict(TINY_FIT, arch="shufflenet_v2_x0_5", epochs=3, device="cpu")


def fit_args(data: Path, output: Path, logdir: Path, **overrides) -> list[str]:
    """`ec2train fit` options for FIT (overrides win)."""
    settings = {**FIT, "data": str(data), "output": str(output), "logdir": str(logdir), **overrides}
    return [a for k, v in settings.items() for a in (f"--{k.replace('_', '-')}", str(v))]


def weights(path: Path) -> dict[str, torch.Tensor]:
    """The state_dict inside model.pth or last.pt."""
    obj = torch.load(path, map_location="cpu", weights_only=True)
    return obj["state_dict"] if "state_dict" in obj else obj["model"]


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"


@functools.lru_cache(maxsize=None)
def reference_run(data: str, root: str) -> dict[str, Any]:
    """Final model.pth and last.pt weights of an uninterrupted FIT run (once per session),
    and the path of its model.pth."""
    from ec2train.config import resolve
    from ec2train.loop import fit

    out = Path(root) / "reference"
    result = fit(resolve(data=data, output=str(out / "model"), logdir=str(out / "runs"), **FIT))
    assert not result.interrupted and len(result.history) == FIT["epochs"]
    return {"model": weights(result.model_path), "last": weights(result.output / "last.pt"), "model_path": result.model_path}


class FaultyProxy:
    """Forwards HTTP to moto, except requests that `rule(method, path)` answers with
    (status, code): e.g. 500 InternalError for the first N requests, or 403 AccessDenied."""

    def __init__(self, upstream: str, rule=None):
        self.upstream = urlsplit(upstream)
        self.rule = rule or (lambda method, path: None)
        self.failed = 0
        self.forwarded: list[tuple[str, str, bytes]] = []
        self.hold = None  # (predicate(method, path), threading.Event): block matching requests until set
        self.holding = threading.Event()  # a request is being held
        self.delay = None  # (predicate(method, path), seconds): slow matching requests down
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def _handle(self):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                verdict = proxy.rule(self.command, self.path)
                if verdict is not None:
                    proxy.failed += 1
                    status, code = verdict
                    payload = f"<Error><Code>{code}</Code><Message>injected {code}</Message></Error>".encode()
                    self.send_response(status)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    if self.command != "HEAD":
                        self.wfile.write(payload)
                    return
                if proxy.hold and proxy.hold[0](self.command, self.path) and not proxy.hold[1].is_set():
                    proxy.holding.set()
                    proxy.hold[1].wait(30)
                if proxy.delay and proxy.delay[0](self.command, self.path):
                    time.sleep(proxy.delay[1])
                proxy.forwarded.append((self.command, self.path, body))
                conn = http.client.HTTPConnection(proxy.upstream.hostname, proxy.upstream.port, timeout=60)
                headers = {k: v for k, v in self.headers.items() if k.lower() not in ("expect", "connection")}
                conn.request(self.command, self.path, body=body, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
                self.send_response(resp.status)
                for k, v in resp.getheaders():
                    if k.lower() not in ("transfer-encoding", "connection", "content-length", "server", "date"):
                        self.send_header(k, v)
                # HEAD: the object's length, not the (empty) body's.
                self.send_header("Content-Length", resp.getheader("Content-Length", "0") if self.command == "HEAD" else str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)
                conn.close()

            do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _handle

        self.server = ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()
