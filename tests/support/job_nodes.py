"""Stand-ins for a job's instances on one machine: each with its own IMDSv2 server and its own
runner process (`python -m ec2train.job.runner`), which can be stopped as an instance stops:
frozen (an instance that vanishes: no FIN, no RST, its sockets just go quiet) or killed."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

NOTICE = {"action": "terminate", "time": "2026-11-29T12:00:00Z"}


def job_spec(**changes):
    """A job.json's settings for tests of the runner's pieces (changes win)."""
    from ec2train.job.spec import JobSpec

    base = dict(
        name="dogs",
        s3_uri="s3://b/dogs",
        data="s3://b/d.zip",
        fit_args=[],
        region="us-east-1",
        group="ec2train-job-dogs",
        submitted_at=1000.0,
        max_hours=1.0,
        max_failures=2,
    )
    return JobSpec(**{**base, **changes})


class FakeInstance:
    """IMDSv2 on 127.0.0.1 for one instance: tokens first (a tokenless GET is 401), its id,
    private IP (127.0.0.1), type, market and group tag, and the spot notice once `notice_when()`
    is true or send_notice() was called."""

    def __init__(
        self,
        instance_id: str,
        lifecycle: str = "spot",
        notice_when=lambda: False,
        group: str = "ec2train-job-demo",
        instance_type: str = "g4dn.xlarge",
    ):
        self.notice_when, self.tokens, self.tokenless_gets = notice_when, set(), 0
        self.noticed = threading.Event()
        self.instance_id = instance_id
        meta = {
            "instance-id": instance_id,
            "local-ipv4": "127.0.0.1",
            "instance-type": instance_type,
            "instance-life-cycle": lifecycle,
            "tags/instance/aws:autoscaling:groupName": group,
        }
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _send(self, status: int, body: bytes = b""):
                self.send_response(status)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_PUT(self):
                if self.path != "/latest/api/token" or not self.headers.get("X-aws-ec2-metadata-token-ttl-seconds"):
                    return self._send(400)
                token = uuid.uuid4().hex
                server.tokens.add(token)
                self._send(200, token.encode())

            def do_GET(self):
                if self.headers.get("X-aws-ec2-metadata-token") not in server.tokens:
                    server.tokenless_gets += 1
                    return self._send(401)
                key = self.path.removeprefix("/latest/meta-data/")
                if key == "spot/instance-action":
                    if server.noticed.is_set() or server.notice_when():
                        server.noticed.set()
                        return self._send(200, json.dumps(NOTICE).encode())
                    return self._send(404)
                return self._send(200, meta[key].encode()) if key in meta else self._send(404)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def send_notice(self) -> None:
        self.noticed.set()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def descendants(pid: int) -> list[int]:
    """pid and every process below it (by parent pid, from /proc), parents first."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        p = todo.pop(0)
        out.append(p)
        todo += children.get(p, [])
    return out


class RunnerProcess:
    """One instance's runner, a real process in a session of its own, logging to WORKDIR/runner.log."""

    def __init__(self, job_uri: str, workdir: Path, imds: FakeInstance, env: dict[str, str] | None = None):
        self.workdir, self.imds = Path(workdir), imds
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.started = time.monotonic()
        self.out = open(self.workdir / "runner.log", "w")  # noqa: SIM115 - closed in wait/kill
        full_env = {**os.environ, "AWS_EC2_METADATA_SERVICE_ENDPOINT": imds.url, **(env or {})}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "ec2train.job.runner", "--job-uri", job_uri, "--workdir", str(self.workdir)],
            env=full_env,
            stdout=self.out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.ended: float | None = None

    def log(self, attempt: int = 1) -> str:
        path = self.workdir / f"attempt-{attempt:03d}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def wait(self, timeout: float) -> int:
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(
                f"runner {self.imds.instance_id} still running after {timeout} s:\n{self.tail()}"
            ) from None
        self.ended = self.ended or time.monotonic()
        self.out.close()
        return code

    def tail(self, lines: int = 60) -> str:
        text = (self.workdir / "runner.log").read_text(errors="replace")
        logs = "".join(self.log(n) for n in range(1, 4))
        return "\n".join((text + logs).splitlines()[-lines:])

    def freeze(self) -> list[int]:
        """SIGSTOP the runner and its training processes: the instance is gone, its sockets silent."""
        pids = descendants(self.proc.pid)
        for pid in pids:
            try:
                os.kill(pid, signal.SIGSTOP)
            except ProcessLookupError:
                pass
        return pids

    def kill(self) -> None:
        for pid in descendants(self.proc.pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.proc.wait()
        self.ended = self.ended or time.monotonic()
        self.out.close()


def wait_for(predicate, timeout: float, what: str, poll: float = 0.25):
    """Poll until predicate() is truthy; returns its value."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(poll)
