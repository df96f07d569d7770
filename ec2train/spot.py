"""Spot interruptions: watch the instance metadata service (IMDSv2 only) for the two-minute
notice. What a notice does to a run (stop at the next step, keep the checkpoint, exit 75)
is run.py's business.
"""

from __future__ import annotations

import http.client
import json
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import urlsplit

from ec2train.errors import UserError

log = logging.getLogger(__name__)

# Exit status of `ec2train fit` stopped (run.py) by a spot notice or SIGTERM: EX_TEMPFAIL from
# sysexits.h, "try again later", which is exactly what --resume auto does. Not 143 (killed by
# SIGTERM): the run did not die, it stopped at a step boundary and kept its checkpoint, and a
# supervisor can tell this from a kill (systemd: RestartForceExitStatus=75).
EXIT_INTERRUPTED = 75

ENDPOINT_ENV = "AWS_EC2_METADATA_SERVICE_ENDPOINT"  # the AWS SDKs' name for it
TIMEOUT_ENV = "AWS_METADATA_SERVICE_TIMEOUT"  # the AWS SDKs' name: seconds per request
DEFAULT_TIMEOUT = 1.0  # the SDKs' default too
DEFAULT_ENDPOINT = "http://169.254.169.254"
TOKEN_PATH = "/latest/api/token"
INSTANCE_ACTION_PATH = "/latest/meta-data/spot/instance-action"
TOKEN_TTL_SECONDS = 21600  # the most IMDS allows (6 h)
WATCH_MODES = ("auto", "on", "off")
PROBE_TRIES = 3  # auto mode's first token request, when it times out


def request_timeout(env: dict[str, str] | None = None) -> float:
    """Seconds one metadata request may take: AWS_METADATA_SERVICE_TIMEOUT, as the AWS SDKs read
    it (default 1). A busy instance may answer late; raising it trades a later "no service" for
    fewer missed polls."""
    raw = (os.environ if env is None else env).get(TIMEOUT_ENV, "").strip()
    if not raw:
        return DEFAULT_TIMEOUT
    try:
        value = float(raw)
    except ValueError:
        value = float("nan")
    if not 0 < value <= 300:
        raise UserError(f"{TIMEOUT_ENV}={raw!r}: expected seconds, more than 0 and at most 300 (the default is 1)")
    return value


class ImdsError(OSError):
    """The metadata service answered, but not as IMDSv2 should."""


@dataclass(frozen=True)
class Notice:
    action: str  # terminate | stop | hibernate
    time: str  # when AWS acts, ISO 8601 UTC
    seen_at: float  # time.monotonic() when we saw it


class Imds:
    """A minimal IMDSv2 client on http.client: session token first, never the tokenless IMDSv1."""

    def __init__(self, endpoint: str | None = None, timeout: float | None = None, token_ttl: int = TOKEN_TTL_SECONDS):
        self.endpoint = (endpoint or os.environ.get(ENDPOINT_ENV) or DEFAULT_ENDPOINT).rstrip("/")
        parts = urlsplit(self.endpoint)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise UserError(f"{ENDPOINT_ENV}={self.endpoint!r}: expected http://host[:port]")
        self._https = parts.scheme == "https"
        self._host, self._port = parts.hostname, parts.port
        self.timeout = request_timeout() if timeout is None else timeout
        self.token_ttl = max(1, int(token_ttl))
        self._token: str | None = None
        self._token_expires = 0.0

    def _request(self, method: str, path: str, headers: dict[str, str]) -> tuple[int, bytes]:
        # http.client, not urllib: the metadata service must never be reached through an HTTP proxy.
        cls = http.client.HTTPSConnection if self._https else http.client.HTTPConnection
        conn = cls(self._host, self._port, timeout=self.timeout)
        try:
            conn.request(method, path, headers=headers)
            resp = conn.getresponse()
            return resp.status, resp.read(64 * 1024)
        finally:
            conn.close()

    def token(self) -> str:
        """The session token, fetched again well before it expires."""
        now = time.monotonic()
        if self._token is None or now >= self._token_expires:
            status, body = self._request(
                "PUT", TOKEN_PATH, {"X-aws-ec2-metadata-token-ttl-seconds": str(self.token_ttl)}
            )
            if status != 200 or not body:
                raise ImdsError(f"IMDSv2 token request answered HTTP {status}")
            self._token = body.decode("ascii", "replace").strip()
            # Renew at 80% of the lifetime (at most a minute early) so a poll never sends a stale token.
            self._token_expires = now + self.token_ttl - min(60.0, self.token_ttl * 0.2)
        return self._token

    def get(self, path: str) -> str | None:
        """A metadata value, or None when it does not exist (404)."""
        for attempt in range(2):
            status, body = self._request("GET", path, {"X-aws-ec2-metadata-token": self.token()})
            if status == 401 and attempt == 0:  # token expired or revoked: get a new one, once
                self._token = None
                continue
            if status == 404:
                return None
            if status != 200:
                raise ImdsError(f"GET {path} answered HTTP {status}")
            return body.decode("utf-8", "replace")
        raise ImdsError(f"GET {path}: the new token was refused too")

    def instance_action(self) -> Notice | None:
        """The spot interruption notice, if one has been issued."""
        body = self.get(INSTANCE_ACTION_PATH)
        if body is None:
            return None
        try:
            doc = json.loads(body)
        except ValueError:
            doc = {}
        doc = doc if isinstance(doc, dict) else {}
        return Notice(str(doc.get("action", "terminate")), str(doc.get("time", "")), time.monotonic())


def metadata_disabled(environ: dict[str, str] | None = None) -> bool:
    """AWS_EC2_METADATA_DISABLED=true (the SDKs' switch) also turns the watcher's auto mode off."""
    e = os.environ if environ is None else environ
    return e.get("AWS_EC2_METADATA_DISABLED", "").strip().lower() == "true"


class SpotWatcher:
    """Polls for a spot interruption notice in a daemon thread; should_stop() turns true on one.

    auto: watch when a metadata service answers the first token request (a timeout is tried
    PROBE_TRIES times), else switch off quietly (one debug line; off the cloud that costs a few
    short timeouts, in the background).
    on: keep trying even when it does not answer at first. off: never poll.
    """

    def __init__(
        self,
        mode: str = "auto",
        poll_seconds: float = 5.0,
        *,
        endpoint: str | None = None,
        timeout: float | None = None,
        token_ttl: int = TOKEN_TTL_SECONDS,
        log_line: Callable[[str], None] | None = None,
    ):
        if mode not in WATCH_MODES:
            raise UserError(f"--spot-watch {mode!r}: must be one of {', '.join(WATCH_MODES)}")
        if not poll_seconds > 0:
            raise UserError(
                f"--spot-poll-seconds {poll_seconds}: must be greater than 0 (the notice comes 2 minutes ahead; 5 is plenty)"
            )
        self.mode = mode
        self.poll_seconds = float(poll_seconds)
        self._endpoint, self._timeout, self._token_ttl = endpoint, timeout, token_ttl
        self._log_line = log_line or (lambda msg: None)
        self.state = "off"  # off | starting | watching | disabled | notice | stopped
        self.notice: Notice | None = None
        self._noticed = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> SpotWatcher:
        if self.mode == "off" or (self.mode == "auto" and metadata_disabled()):
            return self
        self.imds = Imds(self._endpoint, self._timeout, self._token_ttl)
        self.state = "starting"
        self._thread = threading.Thread(target=self._run, name="ec2train-spot-watch", daemon=True)
        self._thread.start()
        return self

    def should_stop(self) -> bool:
        return self._noticed.is_set()

    def wait_ready(self, timeout: float) -> str:
        """Wait until the first probe decided (watching, disabled, notice); returns the state."""
        deadline = time.monotonic() + timeout
        while self.state == "starting" and time.monotonic() < deadline:
            time.sleep(0.01)
        return self.state

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.imds.timeout * 2 + 1)
        if self.state in ("starting", "watching"):
            self.state = "stopped"

    def _probe(self) -> None:
        """The first token request. In auto mode a timeout is tried again (PROBE_TRIES in all): a
        loaded instance can answer late, and a watcher switched off by one slow answer would miss
        the notice; a refusal or an unreachable address means no metadata service at once."""
        tries = PROBE_TRIES if self.mode == "auto" else 1
        for attempt in range(1, tries + 1):
            try:
                self.imds.token()
                return
            except TimeoutError:
                if attempt == tries or self._stop.is_set():
                    raise

    def _run(self) -> None:
        try:
            self._probe()
        except OSError as exc:  # refused, timed out, unreachable, or not IMDSv2
            if self.mode == "auto":
                log.debug("no IMDSv2 at %s (%s): spot interruption watcher off", self.imds.endpoint, exc)
                self.state = "disabled"
                return
            self._log_line(
                f"[yellow]--spot-watch on, but no IMDSv2 answered at {self.imds.endpoint} ({exc}); still trying[/yellow]"
            )
        self.state = "watching"
        while not self._stop.is_set():
            try:
                notice = self.imds.instance_action()
            except OSError as exc:  # a missed poll is fine: the notice comes two minutes ahead
                log.debug("spot notice poll failed: %s", exc)
                notice = None
            if notice is not None:
                self.notice, self.state = notice, "notice"
                self._noticed.set()
                self._log_line(
                    f"[bold yellow]spot interruption notice[/bold yellow]: AWS will {notice.action} this instance at "
                    f"{notice.time or 'any moment'}; stopping after the current step"
                )
                return
            self._stop.wait(self.poll_seconds)
