"""Real local servers and loaders for the Lambda function's tests (loopback only).

- `load_lambda()`: the function's modules, imported from ec2train/_lambda/ (lambda/ links to it) the
  way the Lambda runtime does: its folder on sys.path, not as a package.
- `ImageServer`: an http.server on 127.0.0.1 with well-behaved and hostile routes.
- `EndpointStandIn`: speaks sagemaker-runtime's `POST /endpoints/<name>/invocations`; the
  endpoint name picks its behaviour (see `EndpointHandler`).
- `make_tls_material()`: a throwaway CA and a server certificate for one hostname.
"""

from __future__ import annotations

import base64
import datetime
import importlib.util
import json
import re
import ssl
import struct
import sys
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from tests.support.images import many_chunk_png, many_scan_jpeg, png_of_size, tiny_png
from tests.support.paths import ROOT

LAMBDA_DIR = ROOT / "ec2train" / "_lambda"  # the source `deploy lambda` zips

# Every environment variable the function reads; tests start from none of them set.
FUNCTION_ENV = (
    "ENDPOINT_NAME",
    "ALLOW_HTTP",
    "ALLOWED_PORTS",
    "MAX_IMAGE_BYTES",
    "FETCH_CONNECT_TIMEOUT",
    "FETCH_TIMEOUT",
    "MAX_REDIRECTS",
    "ENDPOINT_CONNECT_TIMEOUT",
    "ENDPOINT_READ_TIMEOUT",
    "SSRF_ALLOW_LOOPBACK_FOR_TESTS",
    "AWS_LAMBDA_RUNTIME_API",
    "AWS_ENDPOINT_URL_SAGEMAKER_RUNTIME",
    "AWS_ENDPOINT_URL",
)


def load_lambda():
    """(safe_fetch, handler) modules from the packaged Lambda source, loaded once per test session."""
    if str(LAMBDA_DIR) not in sys.path:
        sys.path.insert(0, str(LAMBDA_DIR))
    import safe_fetch  # noqa: E402  (resolved through its folder on sys.path, as in Lambda)

    name = "ec2train_lambda_handler"  # not "handler": too generic a module name to claim
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, LAMBDA_DIR / "handler.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return safe_fetch, sys.modules[name]


def load_image_rules():
    """The Lambda's image_rules module (its copy of the endpoint's size and structure rules)."""
    load_lambda()
    import image_rules  # noqa: E402  (beside safe_fetch, as in the zip)

    return image_rules


# --------------------------------------------------------------------------- images


PNG = tiny_png()
STRIP_PNG = png_of_size(1, 100_000)
SCANS_JPEG = many_scan_jpeg(2000, 2000, 2000)
CHUNKS_PNG = many_chunk_png(1000, 1000, 20_000)
JPEG = b"\xff\xd8\xff\xe0\x00\x10JFIF\x00" + bytes(range(256)) * 8 + b"\xff\xd9"
GIF = b"GIF89a\x01\x00\x01\x00\x00\x00\x00;"
WEBP = b"RIFF\x1a\x00\x00\x00WEBPVP8 " + bytes(14)
BMP = b"BM" + struct.pack("<IHHI", 58, 0, 0, 54) + struct.pack("<I", 40) + bytes(32)
NOT_IMAGE = b"<html><body>not an image</body></html>"


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


# --------------------------------------------------------------------------- servers


class _Server(ThreadingHTTPServer):
    daemon_threads = True  # a hostile route still sleeping must not block shutdown

    def __init__(self, handler, ssl_context: ssl.SSLContext | None = None):
        super().__init__(("127.0.0.1", 0), handler)
        self.requests: list[dict] = []
        self.stopping = threading.Event()
        if ssl_context is not None:
            self.socket = ssl_context.wrap_socket(self.socket, server_side=True)


class _Running:
    def __init__(self, handler, ssl_context=None):
        self.server = _Server(handler, ssl_context)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    @property
    def requests(self) -> list[dict]:
        return self.server.requests

    def stop(self) -> None:
        self.server.stopping.set()
        self.server.shutdown()
        self.server.server_close()


MAX_HOSTILE_SECONDS = 5.0  # every slow route gives up on its own after this


class ImageHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):  # keep pytest output clean
        pass

    def _send(self, status: int, body: bytes = b"", ctype: str = "image/png", headers=()):
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        for k, v in headers:
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body)

    def _drip(self, data: bytes, every: float) -> None:
        end = time.monotonic() + MAX_HOSTILE_SECONDS
        for i in range(len(data)):
            if time.monotonic() > end or self.server.stopping.is_set():
                return
            try:
                self.wfile.write(data[i : i + 1])
                self.wfile.flush()
            except OSError:
                return
            time.sleep(every)

    def do_GET(self):  # noqa: C901 - one route table, read top to bottom
        path, _, query = self.path.partition("?")
        args = dict(urllib.parse.parse_qsl(query))
        self.server.requests.append(
            {"path": self.path, "host": self.headers.get("Host"), "accept": self.headers.get("Accept")}
        )
        cap = int(args.get("bytes", "200000"))
        if path == "/dog.png":
            self._send(200, PNG)
        elif path == "/dog.jpg":
            self._send(200, JPEG, "image/jpeg")
        elif path == "/strip.png":  # 1 x 100,000 px in 274 bytes (issue 13.1)
            self._send(200, STRIP_PNG)
        elif path == "/scans.jpg":  # 2,000 scans of 2000 x 2000 px in 44 KB (issue 26.1)
            self._send(200, SCANS_JPEG, "image/jpeg")
        elif path == "/page.html":
            self._send(200, NOT_IMAGE, "text/html")
        elif path == "/missing":
            self._send(404, b"no", "text/plain")
        elif path == "/redirect":
            self._send(302, b"", "text/plain", [("Location", args["to"])])
        elif path == "/chain":  # n more redirects, then the image
            n = int(args.get("n", "0"))
            if n:
                self._send(302, b"", "text/plain", [("Location", f"/chain?n={n - 1}")])
            else:
                self._send(200, PNG)
        elif path == "/huge-declared":  # says it is big, sends nothing
            self.send_response(200)
            self.send_header("Content-Length", "100000000")
            self.end_headers()
        elif path == "/huge-chunked":
            self.send_response(200)
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            block = PNG + bytes(64 * 1024 - len(PNG))
            sent = 0
            while sent < cap and not self.server.stopping.is_set():
                try:
                    self.wfile.write(b"%x\r\n%s\r\n" % (len(block), block))
                except OSError:
                    return
                sent += len(block)
            try:
                self.wfile.write(b"0\r\n\r\n")
            except OSError:
                pass
        elif path in ("/huge-unframed", "/lying-length"):
            # No usable length: the body ends when the connection closes.
            self.send_response(200)
            if path == "/lying-length":
                self.send_header("Content-Length", "12abc")
            self.send_header("Connection", "close")
            self.end_headers()
            self.close_connection = True
            try:
                self.wfile.write(PNG + bytes(cap))
            except OSError:
                pass
        elif path == "/slow-body":
            self.send_response(200)
            self.send_header("Content-Length", "1000")
            self.end_headers()
            self._drip(PNG + bytes(1000 - len(PNG)), 0.05)
        elif path == "/slow-headers":
            self.wfile.write(b"HTTP/1.1 200 OK\r\n")
            self._drip(b"X-Slow: " + b"a" * 500, 0.05)
        elif path == "/hang":
            self.server.stopping.wait(MAX_HOSTILE_SECONDS)
        else:
            self._send(404, b"unknown route", "text/plain")


class ImageServer(_Running):
    def __init__(self, ssl_context=None):
        super().__init__(ImageHandler, ssl_context)

    def url(self, path: str, host: str = "127.0.0.1", scheme: str = "http") -> str:
        return f"{scheme}://{host}:{self.port}{path}"


PREDICTIONS = [  # deliberately not sorted: the function must sort
    {"label": "Beagle", "index": 15, "probability": 0.05},
    {"label": "Poodle", "index": 123, "probability": 0.80},
    {"label": "Affenpinscher", "index": 0, "probability": 0.02},
    {"label": "Basenji", "index": 11, "probability": 0.08},
    {"label": "Boxer", "index": 30, "probability": 0.03},
    {"label": "Collie", "index": 50, "probability": 0.015},
    {"label": "Dalmatian", "index": 56, "probability": 0.005},
]


class EndpointHandler(BaseHTTPRequestHandler):
    """sagemaker-runtime's InvokeEndpoint, as boto3 calls it. Behaviour by endpoint name:

    dogs: predictions (JSON)        model-error: 424 ModelError, as SageMaker reports a model crash
    internal: 500 (retried)         slow: answers after MAX_HOSTILE_SECONDS
    not-json: 200 HTML              bad-shape: 200 raw logits, the old endpoint's format
    busy: 424 ModelError carrying the container's 503 (`ec2train serve` shedding load)
    """

    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def _json(self, status: int, doc, headers=()):
        body = json.dumps(doc).encode() if not isinstance(doc, bytes) else doc
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        for k, v in headers:
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        match = re.fullmatch(r"/endpoints/([^/]+)/invocations", self.path)
        name = match.group(1) if match else None
        self.server.requests.append(
            {
                "name": name,
                "content_type": self.headers.get("Content-Type"),
                "accept": self.headers.get("Accept"),
                "custom_attributes": self.headers.get("X-Amzn-SageMaker-Custom-Attributes"),
                "signed": self.headers.get("Authorization", "").startswith("AWS4-HMAC-SHA256"),
                "body": body,
            }
        )
        if name == "dogs":
            self._json(200, {"predictions": PREDICTIONS})
        elif name == "model-error":
            self._json(
                424,
                {
                    "ErrorCode": "CLIENT_ERROR_FROM_MODEL",
                    "OriginalStatusCode": 500,
                    "OriginalMessage": "Traceback: secret model internals",
                    "Message": "Received server error (500) from primary",
                },
                [("x-amzn-ErrorType", "ModelError")],
            )
        elif name == "busy":
            self._json(
                424,
                {
                    "ErrorCode": "SERVER_ERROR_FROM_MODEL",
                    "OriginalStatusCode": 503,
                    "OriginalMessage": json.dumps({"error": "server is busy"}),
                    "Message": "Received server error (503) from primary",
                },
                [("x-amzn-ErrorType", "ModelError")],
            )
        elif name == "internal":
            self._json(500, {"message": "internal failure"}, [("x-amzn-ErrorType", "InternalFailure")])
        elif name == "slow":
            self.server.stopping.wait(MAX_HOSTILE_SECONDS)
            try:
                self._json(200, {"predictions": PREDICTIONS})
            except OSError:
                pass
        elif name == "not-json":
            self._json(200, b"<html>upstream proxy error</html>")
        elif name == "bad-shape":
            self._json(200, [[0.1] * 133])
        else:
            self._json(400, {"message": f"Endpoint {name} not found."}, [("x-amzn-ErrorType", "ValidationError")])


class EndpointStandIn(_Running):
    def __init__(self):
        super().__init__(EndpointHandler)
        self.url = f"http://127.0.0.1:{self.port}"


# --------------------------------------------------------------------------- TLS


def make_tls_material(directory: Path, hostname: str) -> tuple[Path, Path, Path]:
    """(ca.pem, server-cert.pem, server-key.pem): a throwaway CA and a cert for `hostname` only
    (no IP address in it, so verifying it proves the name, not the pinned IP, was checked)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "ec2train test CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                crl_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostname)]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(hostname)]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    pem = serialization.Encoding.PEM
    paths = directory / "ca.pem", directory / "server-cert.pem", directory / "server-key.pem"
    paths[0].write_bytes(ca.public_bytes(pem))
    paths[1].write_bytes(cert.public_bytes(pem))
    paths[2].write_bytes(key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    return paths
