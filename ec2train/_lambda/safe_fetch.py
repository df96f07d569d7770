"""Fetch an image from a caller-supplied URL without becoming an SSRF proxy.

Every hop of a fetch goes through `vet_url`: scheme, userinfo, port, host syntax, then the host
is resolved ONCE (`resolve`, the test seam) and EVERY address it resolves to must be public. The
connection then goes to that vetted address (`PinnedHTTPSConnection`), so a DNS answer that
changes between check and use (DNS rebinding) cannot steer us to another address; TLS SNI,
certificate verification and the Host header still use the hostname.

Redirects are followed by hand, at most `max_redirects` hops, each re-vetted like the first URL.
One deadline covers connect, TLS, headers and body across all hops; a watchdog shuts the socket
at the deadline, so a server dripping one byte a second cannot hold us past it.

Standard library only: this file ships in the Lambda zip (with image_rules.py beside it).
"""

from __future__ import annotations

import http.client
import ipaddress
import os
import re
import socket
import ssl
import threading
import time
import urllib.parse
from dataclasses import dataclass

from image_rules import sniff_image

# Real-time endpoints take at most 6 MB per request; keep headroom for the request envelope.
# Serverless endpoints take 4 MB: set MAX_IMAGE_BYTES=3500000 for those (see README.md).
DEFAULT_MAX_IMAGE_BYTES = 5_500_000
DEFAULT_CONNECT_TIMEOUT_S = 3.0
DEFAULT_FETCH_TIMEOUT_S = 10.0
DEFAULT_MAX_REDIRECTS = 3
MAX_URL_LENGTH = 2048
_READ_CHUNK = 64 * 1024
_REDIRECT_STATUSES = {301, 302, 303, 307, 308}
_USER_AGENT = "ec2train-lambda/0.1"


class FetchError(Exception):
    """A fetch that failed for a reason the caller may see; `status` is the HTTP answer."""

    status = 502

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


class UrlRejected(FetchError):
    status = 400


class NotAnImage(FetchError):
    status = 400


class TooLarge(FetchError):
    status = 413


class UpstreamError(FetchError):
    status = 502


class FetchTimeout(FetchError):
    status = 504


class ConfigError(Exception):
    """A bad setting in the function's environment (answered as 500, never the caller's fault)."""


# --------------------------------------------------------------------------- settings


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in {"1", "true", "yes", "on"}


def env_number(name: str, default: float, cast=float, minimum: float = 0.0):
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = cast(raw)
    except ValueError:
        raise ConfigError(f"{name} must be a number, got {raw!r}") from None
    if value <= minimum:
        raise ConfigError(f"{name} must be greater than {minimum}")
    return value


@dataclass(frozen=True)
class Settings:
    allow_http: bool = False
    allowed_ports: frozenset[int] = frozenset({443})
    max_bytes: int = DEFAULT_MAX_IMAGE_BYTES
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT_S
    total_timeout: float = DEFAULT_FETCH_TIMEOUT_S
    max_redirects: int = DEFAULT_MAX_REDIRECTS

    @classmethod
    def from_env(cls) -> Settings:
        """Read per request (cheap), so a configuration change needs no code change."""
        allow_http = _env_flag("ALLOW_HTTP")
        raw_ports = os.environ.get("ALLOWED_PORTS", "").strip()
        if raw_ports:
            try:
                ports = frozenset(int(p) for p in raw_ports.split(",") if p.strip())
            except ValueError:
                raise ConfigError("ALLOWED_PORTS must be a comma-separated list of ports") from None
            if not ports or any(not 0 < p < 65536 for p in ports):
                raise ConfigError("ALLOWED_PORTS must list ports from 1 to 65535")
        else:
            ports = frozenset({443, 80}) if allow_http else frozenset({443})
        max_redirects = int(env_number("MAX_REDIRECTS", DEFAULT_MAX_REDIRECTS, int, minimum=-1))
        return cls(
            allow_http=allow_http,
            allowed_ports=ports,
            max_bytes=int(env_number("MAX_IMAGE_BYTES", DEFAULT_MAX_IMAGE_BYTES, int)),
            connect_timeout=env_number("FETCH_CONNECT_TIMEOUT", DEFAULT_CONNECT_TIMEOUT_S),
            total_timeout=env_number("FETCH_TIMEOUT", DEFAULT_FETCH_TIMEOUT_S),
            max_redirects=max_redirects,
        )


def _loopback_allowed_for_tests() -> bool:
    """Test-only: lets the test suite fetch from its own server on 127.0.0.1.

    Never honoured inside a real Lambda (AWS_LAMBDA_RUNTIME_API is set there), because the
    runtime API itself listens on loopback.
    """
    if os.environ.get("AWS_LAMBDA_RUNTIME_API"):
        return False
    return os.environ.get("SSRF_ALLOW_LOOPBACK_FOR_TESTS") == "1"


# --------------------------------------------------------------------------- addresses

_V4 = ipaddress.IPv4Address
_V6 = ipaddress.IPv6Address
_net = ipaddress.ip_network

_METADATA = {
    ipaddress.ip_address("169.254.169.254"),  # EC2/Lambda instance metadata
    ipaddress.ip_address("fd00:ec2::254"),  # the same over IPv6
    ipaddress.ip_address("169.254.170.2"),  # container credentials endpoint
}
_SHARED_V4 = _net("100.64.0.0/10")  # carrier-grade NAT; reaches VPC-internal things on AWS
_NAT64 = _net("64:ff9b::/96")  # well-known NAT64 prefix: traffic goes to the embedded IPv4
_NAT64_LOCAL = _net("64:ff9b:1::/48")  # local-use NAT64: a private translator
_SIX_TO_FOUR = _net("2002::/16")
_TEREDO = _net("2001::/32")
# Explicit, so the verdict does not depend on which Python patch release ships `is_global`.
_NON_PUBLIC = [
    (_net("0.0.0.0/8"), "an unspecified address"),
    (_net("192.0.0.0/24"), "a reserved address"),
    (_net("192.0.2.0/24"), "a reserved address"),
    (_net("192.88.99.0/24"), "a reserved address"),
    (_net("198.18.0.0/15"), "a reserved address"),
    (_net("198.51.100.0/24"), "a reserved address"),
    (_net("203.0.113.0/24"), "a reserved address"),
    (_net("240.0.0.0/4"), "a reserved address"),
    (_net("100::/64"), "a reserved address"),
    (_net("2001::/23"), "a reserved address"),
    (_net("2001:db8::/32"), "a reserved address"),
    (_net("3fff::/20"), "a reserved address"),
    (_net("fc00::/7"), "a private address"),
    (_net("fec0::/10"), "a site-local address"),
]


def address_problem(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str | None:
    """Why `ip` must not be fetched from (e.g. "a loopback address"), or None if it is public."""
    if isinstance(ip, _V6):
        if ip.scope_id:
            ip = _V6(str(ip).split("%", 1)[0])
        # Addresses that carry an IPv4 address inside: judge the IPv4 part, and refuse the
        # tunnel/mapping forms outright (a Lambda has no business fetching through them).
        embedded = ip.ipv4_mapped
        if embedded is not None:
            return (address_problem(embedded) or "a public address") + " inside an IPv4-mapped IPv6 address"
        if ip in _SIX_TO_FOUR:
            return "a 6to4 tunnel address"
        if ip in _TEREDO:
            return "a Teredo tunnel address"
        if ip in _NAT64_LOCAL:
            return "a private NAT64 address"
        if ip in _NAT64:
            inner = address_problem(_V4(int(ip) & 0xFFFFFFFF))
            return f"{inner} inside a NAT64 address" if inner else None
    if ip.is_unspecified:
        return "an unspecified address"
    if ip.is_loopback:
        return "a loopback address"
    if ip in _METADATA:
        return "the instance metadata address"
    if ip.is_link_local:
        return "a link-local address"
    if ip.is_multicast:
        return "a multicast address"
    if isinstance(ip, _V4) and ip in _SHARED_V4:
        return "a shared (carrier-grade NAT) address"
    if isinstance(ip, _V6) and ip.is_site_local:
        return "a site-local address"
    for network, problem in _NON_PUBLIC:
        if ip.version == network.version and ip in network:
            return problem
    if ip.is_private:
        return "a private address"
    if ip.is_reserved:
        return "a reserved address"
    if not ip.is_global:
        return "a non-public address"
    return None


def resolve(host: str, port: int) -> list[str]:
    """Every address `host` resolves to, as strings (the seam tests replace; no DNS there).

    getaddrinfo also normalises odd IPv4 spellings (0x7f.1, 2130706433, 017700000001, 127.1)
    exactly as the C library would when connecting, so checking its answer covers them.
    """
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP)
    seen: list[str] = []
    for _family, _type, _proto, _canon, sockaddr in infos:
        if sockaddr[0] not in seen:
            seen.append(sockaddr[0])
    return seen


# --------------------------------------------------------------------------- URLs

_HOST_RE = re.compile(r"^[a-z0-9_]([a-z0-9_-]*[a-z0-9_])?(\.[a-z0-9_]([a-z0-9_-]*[a-z0-9_])?)*\.?$")


@dataclass(frozen=True)
class Target:
    """A vetted hop: connect to `ip`, speak to `host`."""

    scheme: str
    host: str
    port: int
    ip: str
    path: str  # request target: path and query, never the fragment


def _normalise_host(host: str) -> str:
    try:
        ip = ipaddress.ip_address(host)
        return str(ip) if not isinstance(ip, _V6) else host
    except ValueError:
        pass
    if not host.isascii():
        try:
            host = host.encode("idna").decode("ascii")
        except UnicodeError:
            raise UrlRejected("url host is not a valid hostname") from None
    host = host.lower()
    if len(host) > 253 or not _HOST_RE.match(host):
        raise UrlRejected("url host is not a valid hostname")
    return host


def vet_url(url: str, settings: Settings) -> Target:
    """Check one URL and resolve its host; raise UrlRejected saying why it is refused."""
    if not isinstance(url, str) or not url:
        raise UrlRejected("url must be a non-empty string")
    if len(url) > MAX_URL_LENGTH:
        raise UrlRejected(f"url is longer than {MAX_URL_LENGTH} characters")
    if any(ord(c) < 0x21 or ord(c) == 0x7F for c in url):
        raise UrlRejected("url contains whitespace or control characters")
    try:
        parts = urllib.parse.urlsplit(url)
        raw_host = parts.hostname
    except ValueError:  # e.g. "https://[::1/": an unclosed IPv6 bracket
        raise UrlRejected("url is malformed") from None
    scheme = parts.scheme.lower()
    allowed = ("https", "http") if settings.allow_http else ("https",)
    if scheme not in allowed:
        raise UrlRejected("url scheme must be " + " or ".join(allowed))
    if "@" in parts.netloc or parts.username is not None or parts.password is not None:
        raise UrlRejected("url must not contain a username or password")
    if "\\" in parts.netloc:
        raise UrlRejected("url host is not a valid hostname")
    if not raw_host:
        raise UrlRejected("url has no host")
    try:
        explicit_port = parts.port
    except ValueError:
        raise UrlRejected("url port is not valid") from None
    port = explicit_port if explicit_port is not None else (443 if scheme == "https" else 80)
    if port not in settings.allowed_ports:
        raise UrlRejected(f"url port {port} is not allowed")
    host = _normalise_host(raw_host)

    try:
        addresses = [ipaddress.ip_address(host)]
    except ValueError:
        try:
            addresses = [ipaddress.ip_address(a) for a in resolve(host, port)]
        except (OSError, UnicodeError, ValueError):
            raise UrlRejected("url host could not be resolved") from None
    if not addresses:
        raise UrlRejected("url host could not be resolved")
    for ip in addresses:
        problem = address_problem(ip)
        if problem == "a loopback address" and _loopback_allowed_for_tests():
            continue
        if problem:
            raise UrlRejected(f"url host resolves to {problem}")

    path = parts.path or "/"
    if parts.query:
        path += "?" + parts.query
    # http.client sends the request line as ASCII: percent-encode anything else (as browsers do).
    path = urllib.parse.quote(path, safe="!#$%&'()*+,/:;=?@[]~")
    return Target(scheme, host, port, str(addresses[0]).split("%", 1)[0], path)


# --------------------------------------------------------------------------- connections


class PinnedHTTPConnection(http.client.HTTPConnection):
    """Plain HTTP to a vetted IP (only when ALLOW_HTTP is set)."""

    # http.client drops self.sock once a response owns the connection (Connection: close);
    # the deadline code keeps using the socket, so it is kept here as well.
    live_sock: socket.socket | None = None

    def __init__(self, host: str, port: int, *, pinned_ip: str, timeout: float):
        super().__init__(host, port, timeout=timeout)
        self.pinned_ip = pinned_ip

    def connect(self) -> None:
        # Never re-resolve self.host: that is what would reopen the DNS-rebinding hole.
        self.sock = self.live_sock = socket.create_connection((self.pinned_ip, self.port), self.timeout)


class PinnedHTTPSConnection(http.client.HTTPSConnection):
    """HTTPS to a vetted IP; SNI, certificate hostname check and Host header use the name."""

    live_sock: socket.socket | None = None  # as in PinnedHTTPConnection

    def __init__(self, host: str, port: int, *, pinned_ip: str, timeout: float, context: ssl.SSLContext):
        super().__init__(host, port, timeout=timeout, context=context)
        self.pinned_ip = pinned_ip
        self.tls_context = context

    def connect(self) -> None:
        raw = socket.create_connection((self.pinned_ip, self.port), self.timeout)
        self.live_sock = raw  # visible to the watchdog during the handshake
        try:
            self.sock = self.live_sock = self.tls_context.wrap_socket(raw, server_hostname=self.host)
        except BaseException:
            raw.close()
            raise


def _abort(conn: http.client.HTTPConnection, expired: threading.Event) -> None:
    """Watchdog: the deadline passed; make any blocked read return at once."""
    expired.set()
    sock = conn.live_sock
    if sock is not None:
        try:
            # The C-level shutdown, bypassing SSLSocket's, so the TLS object stays intact
            # for the thread that is reading.
            socket.socket.shutdown(sock, socket.SHUT_RDWR)
        except OSError:
            pass


@dataclass(frozen=True)
class Fetched:
    data: bytes
    kind: str  # "jpeg", "png", ...
    redirects: int


def _read_capped(resp: http.client.HTTPResponse, conn, max_bytes: int, deadline: float) -> bytes:
    declared = resp.getheader("Content-Length")
    if declared is not None and declared.strip().isdigit() and int(declared) > max_bytes:
        raise TooLarge(f"image is larger than {max_bytes} bytes")
    chunks: list[bytes] = []
    total = 0
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise FetchTimeout("fetching the url timed out")
        conn.live_sock.settimeout(remaining)
        # read1: at most one socket read, so the deadline is checked between small reads.
        chunk = resp.read1(min(_READ_CHUNK, max_bytes + 1 - total))
        if not chunk:
            return b"".join(chunks)
        total += len(chunk)
        if total > max_bytes:  # Content-Length is never trusted: count what arrives
            raise TooLarge(f"image is larger than {max_bytes} bytes")
        chunks.append(chunk)


def _get(target: Target, settings: Settings, deadline: float, ssl_context: ssl.SSLContext | None):
    """One GET; returns (status, location, body). Body is read only for a 200."""
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        raise FetchTimeout("fetching the url timed out")
    timeout = min(settings.connect_timeout, remaining)
    if target.scheme == "https":
        conn = PinnedHTTPSConnection(
            target.host,
            target.port,
            pinned_ip=target.ip,
            timeout=timeout,
            context=ssl_context or ssl.create_default_context(),
        )
    else:
        conn = PinnedHTTPConnection(target.host, target.port, pinned_ip=target.ip, timeout=timeout)
    expired = threading.Event()
    watchdog = threading.Timer(remaining, _abort, (conn, expired))
    watchdog.daemon = True
    watchdog.start()
    try:
        conn.connect()
        conn.live_sock.settimeout(max(deadline - time.monotonic(), 0.001))
        conn.putrequest("GET", target.path, skip_accept_encoding=True)
        conn.putheader("User-Agent", _USER_AGENT)
        conn.putheader("Accept", "image/*")
        conn.putheader("Accept-Encoding", "identity")
        conn.putheader("Connection", "close")
        conn.endheaders()
        resp = conn.getresponse()
        if resp.status in _REDIRECT_STATUSES:
            return resp.status, resp.getheader("Location"), b""
        if resp.status != 200:
            return resp.status, None, b""
        body = _read_capped(resp, conn, settings.max_bytes, deadline)
        if expired.is_set():  # a shut-down socket reads as a clean end: don't trust it
            raise FetchTimeout("fetching the url timed out")
        return 200, None, body
    except FetchError:
        raise
    except ssl.SSLCertVerificationError:
        raise UpstreamError("url host's TLS certificate could not be verified") from None
    except (OSError, http.client.HTTPException) as exc:
        if expired.is_set() or isinstance(exc, TimeoutError) or time.monotonic() >= deadline:
            raise FetchTimeout("fetching the url timed out") from None
        if isinstance(exc, ssl.SSLError):
            raise UpstreamError("TLS with the url host failed") from None
        if isinstance(exc, ConnectionRefusedError):
            raise UpstreamError("could not connect to the url host") from None
        raise UpstreamError("fetching the url failed") from None
    finally:
        watchdog.cancel()
        conn.close()


def fetch_image(url: str, *, settings: Settings | None = None, ssl_context: ssl.SSLContext | None = None) -> Fetched:
    """GET `url` under the SSRF guard; return its bytes if they are an image within the cap."""
    settings = settings or Settings.from_env()
    deadline = time.monotonic() + settings.total_timeout
    current = url
    for hop in range(settings.max_redirects + 1):
        try:
            target = vet_url(current, settings)
        except UrlRejected as exc:
            if hop:
                raise UrlRejected(f"redirect refused: {exc.message}") from None
            raise
        status, location, body = _get(target, settings, deadline, ssl_context)
        if status in _REDIRECT_STATUSES:
            if not location:
                raise UpstreamError("url answered a redirect without a Location")
            try:
                current = urllib.parse.urljoin(current, location.strip())
            except ValueError:
                raise UrlRejected("redirect refused: url is malformed") from None
            continue
        if status != 200:
            raise UpstreamError(f"url answered HTTP {status}")
        kind = sniff_image(body)
        if kind is None:
            raise NotAnImage("url did not return an image (JPEG, PNG, GIF, WebP or BMP)")
        return Fetched(body, kind, hop)
    if settings.max_redirects == 0:
        raise UpstreamError("url answered a redirect; redirects are not followed")
    raise UpstreamError(f"url redirected more than {settings.max_redirects} times")
