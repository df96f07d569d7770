"""AWS stand-ins on 127.0.0.1: moto's server, an IMDSv2 server that can send a spot
interruption notice, and a proxy in front of moto that injects faults."""

from __future__ import annotations

import http.client
import json
import threading
import time
import urllib.request
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

DLAMI_ID = "ami-dca37ea5"  # in moto's image catalog: "Deep Learning AMI Ubuntu Linux - 2.4_Oct2017"
NOTICE = {"action": "terminate", "time": "2026-11-22T02:00:00Z"}  # what ImdsServer sends


def start_moto_server():
    """A real moto HTTP server on 127.0.0.1: (server, its URL). Stop it with `server.stop()`."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)  # 0: the OS picks a free port
    server.start()
    host, port = server.get_host_and_port()
    return server, f"http://{host}:{port}"


def reset_moto(url: str) -> None:
    """Forget every resource the moto server at `url` holds."""
    urllib.request.urlopen(urllib.request.Request(f"{url}/moto-api/reset", method="POST"), timeout=60).read()


class ImdsServer:
    """IMDSv2 on 127.0.0.1: PUT /latest/api/token issues tokens that expire after the asked TTL;
    every GET without a valid token is 401 (no IMDSv1). The spot instance-action answers 404
    until `notice_when()` is true, then the notice JSON. The first `slow_puts` token requests
    are answered only after `slow_seconds` (a loaded instance's late answer)."""

    def __init__(self, notice_when=lambda: False, slow_puts: int = 0, slow_seconds: float = 0.0):
        self.notice_when, self.slow_puts, self.slow_seconds = notice_when, slow_puts, slow_seconds
        self.tokens: dict[str, float] = {}
        self.token_puts = 0
        self.polls = 0
        self.tokenless_gets = 0  # IMDSv1-style requests
        self.expired_gets = 0
        self.notices_sent = 0
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _send(self, status: int, body: bytes = b"", ctype: str = "text/plain"):
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_PUT(self):
                ttl = self.headers.get("X-aws-ec2-metadata-token-ttl-seconds")
                if self.path != "/latest/api/token" or not ttl or not 1 <= int(ttl) <= 21600:
                    return self._send(400)
                server.token_puts += 1
                if server.token_puts <= server.slow_puts:
                    time.sleep(server.slow_seconds)
                token = uuid.uuid4().hex
                server.tokens[token] = time.monotonic() + int(ttl)
                self._send(200, token.encode())

            def do_GET(self):
                token = self.headers.get("X-aws-ec2-metadata-token")
                if token is None:
                    server.tokenless_gets += 1
                    return self._send(401)
                if token not in server.tokens:
                    return self._send(401)
                if time.monotonic() > server.tokens[token]:
                    server.expired_gets += 1
                    return self._send(401)
                if self.path != "/latest/meta-data/spot/instance-action":
                    return self._send(404)
                server.polls += 1
                if not server.notice_when():
                    return self._send(404)
                server.notices_sent += 1
                self._send(200, json.dumps(NOTICE).encode(), "application/json")

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


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
                self.send_header(
                    "Content-Length",
                    resp.getheader("Content-Length", "0") if self.command == "HEAD" else str(len(data)),
                )
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)
                conn.close()

            do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _handle

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()
