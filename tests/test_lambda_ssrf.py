"""The Lambda's URL fetcher against SSRF: every forbidden address class, spelled every way,
reached directly, through DNS or through a redirect; plus size, time and content limits.

Only the DNS resolver is faked (`safe_fetch.resolve`, there is no DNS here); the allowed cases
fetch from a real HTTP(S) server on 127.0.0.1, reachable only through the test-only switch.
"""

from __future__ import annotations

import ipaddress
import socket
import ssl
import time

import pytest

from tests.support.lambda_env import (
    FUNCTION_ENV,
    JPEG,
    PNG,
    ImageServer,
    load_image_rules,
    load_lambda,
    make_tls_material,
)
from tests.support.net import free_port

safe_fetch, _ = load_lambda()
image_rules = load_image_rules()
UrlRejected = safe_fetch.UrlRejected


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    for name in FUNCTION_ENV:
        monkeypatch.delenv(name, raising=False)


@pytest.fixture(scope="module")
def server():
    s = ImageServer()
    yield s
    s.stop()


@pytest.fixture
def local(monkeypatch, server):
    """Settings that let the fetcher reach the test server (plain http, its port, loopback)."""
    monkeypatch.setenv("ALLOW_HTTP", "true")
    monkeypatch.setenv("ALLOWED_PORTS", str(server.port))
    monkeypatch.setenv("SSRF_ALLOW_LOOPBACK_FOR_TESTS", "1")
    monkeypatch.setenv("FETCH_TIMEOUT", "2")
    return server


class FakeDNS(dict):
    """A fake zone {name: [addresses]} that records every lookup."""

    def __init__(self):
        super().__init__()
        self.calls: list[str] = []

    def resolve(self, host, port):
        self.calls.append(host)
        if host in self:
            return list(self[host])
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")


@pytest.fixture
def dns(monkeypatch):
    """Replace the module's resolver seam (there is no DNS here)."""
    zone = FakeDNS()
    monkeypatch.setattr(safe_fetch, "resolve", zone.resolve)
    return zone


def rejected(url: str, settings=None) -> str:
    with pytest.raises(UrlRejected) as info:
        safe_fetch.fetch_image(url, settings=settings)
    assert info.value.status == 400
    return info.value.message


# --------------------------------------------------------------------------- address classes

BAD_ADDRESSES = [
    ("127.0.0.1", "a loopback address"),
    ("127.255.255.254", "a loopback address"),
    ("10.0.0.1", "a private address"),
    ("172.16.5.4", "a private address"),
    ("172.31.255.255", "a private address"),
    ("192.168.0.1", "a private address"),
    ("169.254.169.254", "the instance metadata address"),
    ("169.254.170.2", "the instance metadata address"),
    ("169.254.10.10", "a link-local address"),
    ("224.0.0.251", "a multicast address"),
    ("239.255.255.250", "a multicast address"),
    ("240.0.0.1", "a reserved address"),
    ("255.255.255.255", "a reserved address"),
    ("0.0.0.0", "an unspecified address"),
    ("0.1.2.3", "an unspecified address"),
    ("100.64.0.1", "a shared (carrier-grade NAT) address"),
    ("100.127.255.254", "a shared (carrier-grade NAT) address"),
    ("192.0.0.170", "a reserved address"),
    ("192.0.2.1", "a reserved address"),
    ("198.18.0.1", "a reserved address"),
    ("::1", "a loopback address"),
    ("::", "an unspecified address"),
    ("fe80::1", "a link-local address"),
    ("fe80::1%25eth0", "a link-local address"),
    ("fd00:ec2::254", "the instance metadata address"),
    ("fc00::1", "a private address"),
    ("fd12:3456::1", "a private address"),
    ("fec0::1", "a site-local address"),
    ("ff02::1", "a multicast address"),
    ("::ffff:127.0.0.1", "a loopback address inside an IPv4-mapped IPv6 address"),
    ("::ffff:10.0.0.1", "a private address inside an IPv4-mapped IPv6 address"),
    ("::ffff:169.254.169.254", "the instance metadata address inside an IPv4-mapped IPv6 address"),
    ("::ffff:8.8.8.8", "a public address inside an IPv4-mapped IPv6 address"),
    ("64:ff9b::7f00:1", "a loopback address inside a NAT64 address"),
    ("64:ff9b::a9fe:a9fe", "the instance metadata address inside a NAT64 address"),
    ("64:ff9b::a00:1", "a private address inside a NAT64 address"),
    ("64:ff9b:1::1", "a private NAT64 address"),
    ("2002:7f00:1::1", "a 6to4 tunnel address"),
    ("2002:a9fe:a9fe::1", "a 6to4 tunnel address"),
    ("2001:0:4136:e378:8000:63bf:3fff:fdd2", "a Teredo tunnel address"),
    ("::127.0.0.1", "a reserved address"),  # deprecated IPv4-compatible form
    ("2001:db8::1", "a reserved address"),
    ("100::1", "a reserved address"),
]


def _literal_url(address: str) -> str:
    return f"https://[{address}]/dog.png" if ":" in address else f"https://{address}/dog.png"


@pytest.mark.parametrize("address,problem", BAD_ADDRESSES)
def test_literal_forbidden_addresses_are_refused_with_the_reason(address, problem):
    assert rejected(_literal_url(address)) == f"url host resolves to {problem}"


@pytest.mark.parametrize("address", ["8.8.8.8", "1.1.1.1", "2606:4700:4700::1111", "64:ff9b::808:808"])
def test_public_addresses_pass_the_address_check(address):
    assert safe_fetch.address_problem(ipaddress.ip_address(address)) is None


@pytest.mark.parametrize(
    "host,problem",
    [
        ("0x7f.1", "a loopback address"),
        ("2130706433", "a loopback address"),
        ("017700000001", "a loopback address"),
        ("127.1", "a loopback address"),
        ("0x7f000001", "a loopback address"),
        ("0177.0.0.1", "a loopback address"),
        ("localhost", "a loopback address"),
        ("LOCALHOST", "a loopback address"),
        ("0", "an unspecified address"),
        ("0x0a.0.0.1", "a private address"),
        ("2852039166", "the instance metadata address"),  # 169.254.169.254 as one number
        ("0xa9.0xfe.0xa9.0xfe", "the instance metadata address"),
        ("127\u30020\u30020\u30021", "a loopback address"),  # ideographic full stops
        ("\uff11\uff12\uff17.0.0.1", "a loopback address"),  # full-width digits
    ],
)
def test_odd_spellings_are_normalised_by_the_real_resolver_and_refused(host, problem):
    # No fake DNS here: the real getaddrinfo turns these into the addresses a socket would use.
    assert rejected(f"https://{host}/dog.png") == f"url host resolves to {problem}"


@pytest.mark.parametrize(
    "addresses,problem",
    [
        (["169.254.169.254"], "the instance metadata address"),
        (["10.1.2.3"], "a private address"),
        (["::1"], "a loopback address"),
        (["fd00:ec2::254"], "the instance metadata address"),
        (["::ffff:192.168.1.1"], "a private address inside an IPv4-mapped IPv6 address"),
        (["100.100.100.200"], "a shared (carrier-grade NAT) address"),
        # Every address counts, not just the first: one bad record poisons the name.
        (["8.8.8.8", "10.0.0.5"], "a private address"),
        (["2606:4700:4700::1111", "fe80::1"], "a link-local address"),
    ],
)
def test_names_resolving_to_forbidden_addresses_are_refused(dns, addresses, problem):
    dns["images.example"] = addresses
    assert rejected("https://images.example/dog.png") == f"url host resolves to {problem}"


def test_unresolvable_host_is_refused(dns):
    assert rejected("https://nowhere.example/dog.png") == "url host could not be resolved"


def test_a_public_name_is_vetted_to_its_first_address_without_connecting(dns):
    dns["images.example"] = ["8.8.8.8", "2606:4700:4700::1111"]
    target = safe_fetch.vet_url("https://Images.Example/a/b.png?x=1#frag", safe_fetch.Settings())
    assert (target.scheme, target.host, target.port, target.ip) == ("https", "images.example", 443, "8.8.8.8")
    assert target.path == "/a/b.png?x=1"  # the fragment is never sent


# --------------------------------------------------------------------------- URL shape


@pytest.mark.parametrize(
    "url",
    [
        "file:///etc/passwd",
        "ftp://example.com/dog.png",
        "gopher://127.0.0.1:70/_GET",
        "http://example.com/dog.png",
        "data:image/png;base64,iVBORw0KGgo=",
        "javascript:alert(1)",
        "//example.com/dog.png",
        "dog.png",
        "dict://127.0.0.1:11211/",
    ],
)
def test_only_https_by_default(url):
    assert rejected(url) == "url scheme must be https"


def test_http_needs_the_explicit_setting(monkeypatch):
    monkeypatch.setenv("ALLOW_HTTP", "true")
    assert rejected("ftp://example.com/dog.png") == "url scheme must be https or http"
    assert safe_fetch.Settings.from_env().allowed_ports == {80, 443}


@pytest.mark.parametrize(
    "url",
    [
        "https://user:pass@example.com/dog.png",
        "https://user@example.com/dog.png",
        "https://example.com@127.0.0.1/dog.png",
        "https://:@example.com/dog.png",
    ],
)
def test_userinfo_is_refused(url):
    assert rejected(url) == "url must not contain a username or password"


@pytest.mark.parametrize(
    "url,message",
    [
        ("https://example.com:8443/dog.png", "url port 8443 is not allowed"),
        ("https://example.com:80/dog.png", "url port 80 is not allowed"),
        ("https://example.com:0/dog.png", "url port 0 is not allowed"),
        ("https://example.com:99999/dog.png", "url port is not valid"),
        ("https://example.com:x/dog.png", "url port is not valid"),
        ("https://example.com/a b.png", "url contains whitespace or control characters"),
        ("https://example.com/a\r\nHost: evil/", "url contains whitespace or control characters"),
        ("https://127.0.0.1\\@example.com/", "url must not contain a username or password"),
        ("https://example.com\\127.0.0.1/", "url host is not a valid hostname"),
        ("https://exa$mple.com/", "url host is not a valid hostname"),
        ("https:///dog.png", "url has no host"),
        ("https://example.com/" + "a" * 2100, "url is longer than 2048 characters"),
    ],
)
def test_malformed_urls_are_refused(url, message):
    assert rejected(url) == message


def test_allowed_ports_is_a_setting(monkeypatch, dns):
    dns["images.example"] = ["8.8.8.8"]
    monkeypatch.setenv("ALLOWED_PORTS", "8443")
    settings = safe_fetch.Settings.from_env()
    assert safe_fetch.vet_url("https://images.example:8443/", settings).port == 8443
    assert rejected("https://images.example/", settings) == "url port 443 is not allowed"


# --------------------------------------------------------------------------- the test-only switch


def test_loopback_is_refused_without_the_test_switch(monkeypatch, server):
    monkeypatch.setenv("ALLOW_HTTP", "true")
    monkeypatch.setenv("ALLOWED_PORTS", str(server.port))
    before = len(server.requests)
    assert rejected(server.url("/dog.png")) == "url host resolves to a loopback address"
    assert len(server.requests) == before  # refused before any connection


def test_the_test_switch_is_ignored_inside_a_real_lambda(local, monkeypatch):
    monkeypatch.setenv("AWS_LAMBDA_RUNTIME_API", "127.0.0.1:9001")
    assert rejected(local.url("/dog.png")) == "url host resolves to a loopback address"


@pytest.mark.parametrize(
    "address,problem",
    [
        ("10.0.0.1", "a private address"),
        ("169.254.169.254", "the instance metadata address"),
        ("::ffff:127.0.0.1", "a loopback address inside an IPv4-mapped IPv6 address"),
    ],
)
def test_the_test_switch_relaxes_plain_loopback_only(local, address, problem):
    host = f"[{address}]" if ":" in address else address
    assert rejected(f"http://{host}:{local.port}/dog.png") == f"url host resolves to {problem}"


# --------------------------------------------------------------------------- allowed fetches


def test_fetches_an_image_from_an_allowed_server(local):
    got = safe_fetch.fetch_image(local.url("/dog.png?size=small"))
    assert (got.data, got.kind, got.redirects) == (PNG, "png", 0)
    seen = local.requests[-1]
    assert seen["path"] == "/dog.png?size=small" and seen["host"] == f"127.0.0.1:{local.port}"
    assert seen["accept"] == "image/*"


def test_connects_to_the_vetted_address_and_resolves_once(local, dns):
    # `images.test` exists only in the fake zone: the system resolver cannot find it, so this
    # fetch works only because the connection goes to the address we checked.
    dns["images.test"] = ["127.0.0.1"]
    got = safe_fetch.fetch_image(f"http://images.test:{local.port}/dog.jpg")
    assert got.data == JPEG and got.kind == "jpeg"
    assert dns.calls == ["images.test"]
    assert local.requests[-1]["host"] == f"images.test:{local.port}"


# --------------------------------------------------------------------------- redirects


def test_redirects_are_followed_up_to_three_hops(local):
    got = safe_fetch.fetch_image(local.url("/chain?n=3"))
    assert got.data == PNG and got.redirects == 3


def test_a_fourth_redirect_is_refused(local):
    with pytest.raises(safe_fetch.UpstreamError, match="redirected more than 3 times"):
        safe_fetch.fetch_image(local.url("/chain?n=4"))


def test_redirects_can_be_switched_off(local, monkeypatch):
    monkeypatch.setenv("MAX_REDIRECTS", "0")
    with pytest.raises(safe_fetch.UpstreamError, match="redirects are not followed"):
        safe_fetch.fetch_image(local.url("/chain?n=1"))


@pytest.mark.parametrize(
    "target,problem",
    [
        ("http://169.254.169.254:{port}/latest/meta-data/", "url host resolves to the instance metadata address"),
        ("http://[fd00:ec2::254]:{port}/latest/meta-data/", "url host resolves to the instance metadata address"),
        ("http://10.0.0.1:{port}/admin", "url host resolves to a private address"),
        ("http://0xa9fea9fe:{port}/", "url host resolves to the instance metadata address"),
        (
            "http://[::ffff:7f00:1]:{port}/",
            "url host resolves to a loopback address inside an IPv4-mapped IPv6 address",
        ),
        ("file:///etc/passwd", "url scheme must be https or http"),
        ("http://user:pw@127.0.0.1:{port}/dog.png", "url must not contain a username or password"),
        ("http://127.0.0.1:22/", "url port 22 is not allowed"),
    ],
)
def test_each_redirect_hop_is_vetted_again(local, target, problem):
    import urllib.parse

    to = urllib.parse.quote(target.format(port=local.port), safe="")
    assert rejected(local.url(f"/redirect?to={to}")) == f"redirect refused: {problem}"


def test_redirect_to_a_name_resolving_privately_is_refused(local, dns):
    dns["intranet.example"] = ["10.20.30.40"]
    msg = rejected(local.url(f"/redirect?to=http://intranet.example:{local.port}/"))
    assert msg == "redirect refused: url host resolves to a private address"
    assert dns.calls == ["intranet.example"]


# --------------------------------------------------------------------------- size, time, content


@pytest.fixture
def small_cap(local, monkeypatch):
    monkeypatch.setenv("MAX_IMAGE_BYTES", "100000")
    return local


def test_declared_oversize_is_refused_before_reading(small_cap, monkeypatch):
    monkeypatch.setenv("FETCH_TIMEOUT", "10")  # far above the bound below, so load cannot blur the two
    start = time.monotonic()
    with pytest.raises(safe_fetch.TooLarge) as info:
        safe_fetch.fetch_image(small_cap.url("/huge-declared"))
    assert info.value.status == 413 and info.value.message == "image is larger than 100000 bytes"
    assert time.monotonic() - start < 5  # the server sends no body: we did not wait for one (10 s deadline)


@pytest.mark.parametrize("route", ["/huge-chunked", "/huge-unframed", "/lying-length"])
def test_the_cap_is_enforced_while_streaming(small_cap, route):
    with pytest.raises(safe_fetch.TooLarge):
        safe_fetch.fetch_image(small_cap.url(f"{route}?bytes=3000000"))


def test_a_body_exactly_at_the_cap_is_accepted_and_one_byte_more_is_not(local, monkeypatch):
    monkeypatch.setenv("MAX_IMAGE_BYTES", "65536")  # /huge-chunked?bytes=1 sends one 64 KiB chunk
    assert len(safe_fetch.fetch_image(local.url("/huge-chunked?bytes=1")).data) == 65536
    monkeypatch.setenv("MAX_IMAGE_BYTES", "65535")
    with pytest.raises(safe_fetch.TooLarge):
        safe_fetch.fetch_image(local.url("/huge-chunked?bytes=1"))


@pytest.mark.parametrize("route", ["/slow-body", "/slow-headers", "/hang"])
def test_one_deadline_covers_the_whole_fetch(local, monkeypatch, route):
    monkeypatch.setenv("FETCH_TIMEOUT", "0.8")
    start = time.monotonic()
    with pytest.raises(safe_fetch.FetchTimeout) as info:
        safe_fetch.fetch_image(local.url(route))
    elapsed = time.monotonic() - start
    assert info.value.status == 504 and info.value.message == "fetching the url timed out"
    # Dripping bytes does not keep the fetch alive: it ends near the 0.8 s deadline, not when the
    # server gives up (MAX_HOSTILE_SECONDS, 5 s); 4 s leaves room for a loaded box.
    assert 0.7 < elapsed < 4.0


def test_non_image_bytes_are_refused(local):
    with pytest.raises(safe_fetch.NotAnImage) as info:
        safe_fetch.fetch_image(local.url("/page.html"))
    assert info.value.status == 400


def test_upstream_error_status_is_reported(local):
    with pytest.raises(safe_fetch.UpstreamError, match="url answered HTTP 404"):
        safe_fetch.fetch_image(local.url("/missing"))


def test_refused_connection_is_an_upstream_error(local, monkeypatch):
    port = free_port()  # nothing listens there
    monkeypatch.setenv("ALLOWED_PORTS", str(port))
    with pytest.raises(safe_fetch.UpstreamError, match="could not connect to the url host"):
        safe_fetch.fetch_image(f"http://127.0.0.1:{port}/dog.png")


@pytest.mark.parametrize(
    "data,kind",
    [
        (PNG, "png"),
        (JPEG, "jpeg"),
        (b"GIF87a\x01\x00", "gif"),
        (b"GIF89a\x01\x00", "gif"),
        (b"RIFF\x10\x00\x00\x00WEBPVP8 ", "webp"),
        (b"BM" + bytes(12) + (40).to_bytes(4, "little") + bytes(8), "bmp"),
        (b"", None),
        (b"BM not a bitmap, just text....", None),
        (b"RIFF\x10\x00\x00\x00WAVEfmt ", None),
        (b"<svg xmlns='http://www.w3.org/2000/svg'/>", None),
        (b"%PDF-1.7", None),
        (b"\xff\xd8", None),
    ],
)
def test_magic_bytes(data, kind):
    assert image_rules.sniff_image(data) == kind


# --------------------------------------------------------------------------- HTTPS


@pytest.fixture(scope="module")
def tls(tmp_path_factory):
    """An HTTPS image server on 127.0.0.1 whose certificate names only `images.test`."""
    ca, cert, key = make_tls_material(tmp_path_factory.mktemp("tls"), "images.test")
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(cert, key)
    sni: list[str | None] = []
    server_ctx.sni_callback = lambda sock, name, ctx: sni.append(name)
    s = ImageServer(server_ctx)
    s.sni = sni
    s.client_ctx = ssl.create_default_context(cafile=str(ca))
    yield s
    s.stop()


@pytest.fixture
def tls_env(tls, dns, monkeypatch):
    monkeypatch.setenv("ALLOWED_PORTS", str(tls.port))
    monkeypatch.setenv("SSRF_ALLOW_LOOPBACK_FOR_TESTS", "1")
    monkeypatch.setenv("FETCH_TIMEOUT", "3")
    dns["images.test"] = ["127.0.0.1"]
    dns["other.test"] = ["127.0.0.1"]
    return tls


def test_https_verifies_the_hostname_while_connecting_to_the_pinned_ip(tls_env):
    got = safe_fetch.fetch_image(
        tls_env.url("/dog.png", host="images.test", scheme="https"), ssl_context=tls_env.client_ctx
    )
    assert got.data == PNG
    assert tls_env.sni[-1] == "images.test"
    assert tls_env.requests[-1]["host"] == f"images.test:{tls_env.port}"


def test_https_refuses_a_certificate_for_another_name(tls_env):
    with pytest.raises(safe_fetch.UpstreamError, match="certificate could not be verified"):
        safe_fetch.fetch_image(
            tls_env.url("/dog.png", host="other.test", scheme="https"), ssl_context=tls_env.client_ctx
        )


def test_https_refuses_an_untrusted_ca_by_default(tls_env):
    with pytest.raises(safe_fetch.UpstreamError, match="certificate could not be verified"):
        safe_fetch.fetch_image(tls_env.url("/dog.png", host="images.test", scheme="https"))


def test_https_redirect_to_plain_http_is_refused(tls_env):
    url = tls_env.url(f"/redirect?to=http://images.test:{tls_env.port}/dog.png", host="images.test", scheme="https")
    with pytest.raises(UrlRejected, match="^redirect refused: url scheme must be https$"):
        safe_fetch.fetch_image(url, ssl_context=tls_env.client_ctx)
