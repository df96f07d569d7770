"""A recording hop in front of moto for the infra scripts' tests.

`AwsRecorder` forwards every request to moto and remembers it, so tests can say which calls
were made (none, for --dry-run) and with which parameters where moto does not show them (spot
options, placement). It also answers the three EC2 placement-group calls, which moto does not
implement at all (CreatePlacementGroup raises NotImplementedError there), and, when a test sets
`canned[action]`, answers that action itself: for what moto cannot be made to do (an Auto
Scaling group that cannot find capacity).
"""

from __future__ import annotations

import http.client
import itertools
import json
import re
import threading
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from xml.sax.saxutils import escape

# Calls that change something; read-only calls are everything else.
MUTATING = re.compile(r"^(Create|Put|Add|Attach|Authorize|Run|Terminate|Delete|Remove|Detach|Revoke)")

EC2_NS = "http://ec2.amazonaws.com/doc/2016-11-15/"


class AwsRecorder:
    """Forwards AWS requests to moto, records them, and serves EC2 placement groups."""

    PG_ACTIONS = {"CreatePlacementGroup", "DescribePlacementGroups", "DeletePlacementGroup"}

    def __init__(self, upstream: str):
        parsed = urllib.parse.urlparse(upstream)
        self.upstream = (parsed.hostname, parsed.port)
        self.calls: list[dict] = []
        self.placement_groups: dict[str, dict] = {}
        self.canned: dict[str, str] = {}  # query-protocol action -> the XML body to answer with
        self.lock = threading.Lock()
        self._ids = itertools.count(1)
        recorder = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # keep pytest output clean
                pass

            def _handle(self):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                call = recorder._describe(self.command, self.path, self.headers, body)
                with recorder.lock:
                    recorder.calls.append(call)
                if call["action"] in recorder.canned:
                    return self._reply(200, recorder.canned[call["action"]])
                if call["service"] == "ec2":
                    local = recorder._placement(call)
                    if local is not None:
                        return self._reply(*local)
                self._forward(body)

            def _forward(self, body: bytes):
                conn = http.client.HTTPConnection(*recorder.upstream, timeout=60)
                headers = {
                    k: v
                    for k, v in self.headers.items()
                    if k.lower() not in {"host", "connection", "keep-alive", "transfer-encoding"}
                }
                conn.request(self.command, self.path, body=body or None, headers=headers)
                resp = conn.getresponse()
                payload = resp.read()
                self.send_response(resp.status)
                for k, v in resp.getheaders():
                    if k.lower() not in {"connection", "transfer-encoding", "content-length"}:
                        self.send_header(k, v)
                length = resp.getheader("Content-Length") if self.command == "HEAD" else None
                self.send_header("Content-Length", length or str(len(payload)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(payload)
                conn.close()

            def _reply(self, status: int, xml: str):
                data = xml.encode()
                self.send_response(status)
                self.send_header("Content-Type", "text/xml")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_PUT = do_DELETE = do_HEAD = _handle

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()

    # -- recording ------------------------------------------------------------------------------
    @staticmethod
    def _describe(method: str, path: str, headers, body: bytes) -> dict:
        match = re.search(r"Credential=[^/]+/\d+/[^/]+/([^/]+)/", headers.get("Authorization", ""))
        service = match.group(1) if match else "?"
        target = headers.get("X-Amz-Target")
        if target:  # JSON protocol (SSM)
            return {"service": service, "action": target.split(".")[-1], "params": json.loads(body or b"{}")}
        if "x-www-form-urlencoded" in headers.get("Content-Type", ""):  # query protocol
            params = dict(urllib.parse.parse_qsl(body.decode()))
            return {"service": service, "action": params.get("Action", "?"), "params": params}
        return {"service": service, "action": f"{method} {path}", "params": {}}  # REST (S3)

    def actions(self, service: str | None = None) -> list[str]:
        return [c["action"] for c in self.calls if service in (None, c["service"])]

    def mutating(self) -> list[str]:
        return [a for a in self.actions() if MUTATING.match(a)]

    def params(self, action: str) -> dict:
        found = [c["params"] for c in self.calls if c["action"] == action]
        assert len(found) == 1, f"{action} called {len(found)} times"
        return found[0]

    def reset(self):
        with self.lock:
            self.calls.clear()

    # -- placement groups, as EC2 answers them -----------------------------------------------------
    def _placement(self, call: dict):
        """EC2's answer for a placement-group call (and for RunInstances naming an unknown
        group, which EC2 refuses), or None to let moto answer."""
        p, action = call["params"], call["action"]
        if action == "RunInstances":
            group = p.get("Placement.GroupName")
            if group and group not in self.placement_groups:
                return self._error("InvalidPlacementGroup.Unknown", f"The Placement Group '{group}' is unknown.")
            return None
        if action not in self.PG_ACTIONS:
            return None
        if action == "CreatePlacementGroup":
            name = p["GroupName"]
            if name in self.placement_groups:
                return self._error("InvalidPlacementGroup.Duplicate", f"The Placement Group '{name}' already exists.")
            tags = {}
            for i in itertools.count(1):
                if f"TagSpecification.1.Tag.{i}.Key" not in p:
                    break
                tags[p[f"TagSpecification.1.Tag.{i}.Key"]] = p[f"TagSpecification.1.Tag.{i}.Value"]
            group = {"name": name, "id": f"pg-{next(self._ids):017x}", "strategy": p["Strategy"], "tags": tags}
            self.placement_groups[name] = group
            return 200, self._ok(action, f"<placementGroup>{self._group_xml(group)}</placementGroup>")
        if action == "DeletePlacementGroup":
            if self.placement_groups.pop(p["GroupName"], None) is None:
                return self._error(
                    "InvalidPlacementGroup.Unknown", f"The Placement Group '{p['GroupName']}' is unknown."
                )
            return 200, self._ok(action, "<return>true</return>")
        groups = list(self.placement_groups.values())
        names = [v for k, v in p.items() if k.startswith("GroupName.")]
        if names:
            groups = [g for g in groups if g["name"] in names]
        for i in itertools.count(1):
            fname = p.get(f"Filter.{i}.Name")
            if fname is None:
                break
            values = [v for k, v in p.items() if k.startswith(f"Filter.{i}.Value.")]
            if fname.startswith("tag:"):
                groups = [g for g in groups if g["tags"].get(fname[4:]) in values]
            elif fname == "group-name":
                groups = [g for g in groups if g["name"] in values]
            elif fname == "strategy":
                groups = [g for g in groups if g["strategy"] in values]
        items = "".join(f"<item>{self._group_xml(g)}</item>" for g in groups)
        return 200, self._ok(action, f"<placementGroupSet>{items}</placementGroupSet>")

    @staticmethod
    def _group_xml(g: dict) -> str:
        tags = "".join(f"<item><key>{escape(k)}</key><value>{escape(v)}</value></item>" for k, v in g["tags"].items())
        return (
            f"<groupName>{escape(g['name'])}</groupName><groupId>{g['id']}</groupId>"
            f"<strategy>{escape(g['strategy'])}</strategy><state>available</state><tagSet>{tags}</tagSet>"
        )

    @staticmethod
    def _ok(action: str, inner: str) -> str:
        return (
            f'<?xml version="1.0" encoding="UTF-8"?><{action}Response xmlns="{EC2_NS}">'
            f"<requestId>ec2train-test</requestId>{inner}</{action}Response>"
        )

    @staticmethod
    def _error(code: str, message: str):
        return 400, (
            '<?xml version="1.0" encoding="UTF-8"?><Response><Errors><Error>'
            f"<Code>{code}</Code><Message>{escape(message)}</Message></Error></Errors>"
            "<RequestID>ec2train-test</RequestID></Response>"
        )
