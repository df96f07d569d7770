"""How a job's runners see each other, through S3 alone (no host list, no server of ours).

    <s3-uri>/_job/status.json             the job (ec2train.job.state), changed only by
                                          conditional writes: StatusFile.update
    <s3-uri>/_job/nodes/<instance-id>.json one per instance, written by its own runner only:
                                          who it is (private IP, type, market), the attempt it
                                          waits for or trains in, its rank, its heartbeat, and
                                          how its part of an attempt ended (its report)

A runner rewrites its node file every heartbeat (Heartbeat, a thread) and at once when its
state changes; the others read the node files to find who is ready, who is lost and how an
attempt ended. S3's conditional writes (If-Match on the status's ETag, If-None-Match for the
first one) make the status a compare-and-swap register: two runners that decide at the same
moment never lose each other's change. Nothing here needs a permission beyond the prefix's
s3:GetObject, s3:PutObject and s3:ListBucket.
"""

from __future__ import annotations

import copy
import json
import logging
import random
import threading
import time
from collections.abc import Callable
from typing import Any

from ec2train import aws, s3
from ec2train.job.spec import JobError, job_file

log = logging.getLogger(__name__)
NODES_DIR = "nodes"
_CONFLICT = ("PreconditionFailed", "ConditionalRequestConflict", "412", "409")


def _client(region: str | None) -> Any:
    # Short timeouts and few retries: a heartbeat that hangs on one request for a minute would
    # look like a lost node to the others.
    return aws.client("s3", region=region, max_attempts=3, connect_timeout=5.0, read_timeout=15.0)


def _code(exc: BaseException) -> str:
    ce = s3._client_error(exc)
    return str(ce.response.get("Error", {}).get("Code", "")) if ce is not None else ""


def _put_json(client: Any, uri: s3.S3Uri, doc: dict[str, Any], **condition: str) -> None:
    client.put_object(
        Bucket=uri.bucket,
        Key=uri.key,
        Body=json.dumps(doc, indent=2).encode(),
        ContentType="application/json",
        ServerSideEncryption="AES256",
        **condition,
    )


def _get_json(client: Any, uri: s3.S3Uri) -> tuple[dict[str, Any] | None, str | None]:
    """(document, ETag), or (None, None) when there is no such object."""
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        resp = client.get_object(Bucket=uri.bucket, Key=uri.key)
        return json.loads(resp["Body"].read()), resp["ETag"]
    except (BotoCoreError, ClientError) as exc:
        if _code(exc) in ("NoSuchKey", "404", "NotFound"):
            return None, None
        raise s3.as_s3_error(exc, "download", uri) from None


class StatusFile:
    """status.json, read with its ETag and changed only by compare-and-swap."""

    def __init__(self, prefix: s3.S3Uri, region: str | None = None, client: Any = None):
        self.uri = job_file(prefix, "status.json")
        self.client = client or _client(region)

    def read(self) -> tuple[dict[str, Any] | None, str | None]:
        return _get_json(self.client, self.uri)

    def update(self, change: Callable[[dict[str, Any]], dict[str, Any] | None], tries: int = 30) -> dict[str, Any]:
        """Apply change(status) -> new status (None: no change) with a conditional write; on a
        conflict, read the newer status and apply it again. Returns the status as stored."""
        from botocore.exceptions import BotoCoreError, ClientError

        for attempt in range(tries):
            doc, etag = self.read()
            if doc is None:
                raise JobError(f"no {self.uri}: was the job submitted with this --s3-uri?")
            new = change(copy.deepcopy(doc))
            if new is None:
                return doc
            try:
                # The ETag read with it: S3 refuses the write (412) if anyone wrote since.
                _put_json(self.client, self.uri, new, **({"IfMatch": etag} if etag else {"IfNoneMatch": "*"}))
                return new
            except (BotoCoreError, ClientError) as exc:
                if _code(exc) not in _CONFLICT:
                    raise s3.as_s3_error(exc, "upload", self.uri) from None
            time.sleep(random.uniform(0.05, 0.3) * min(attempt + 1, 5))  # another runner wrote first
        raise JobError(f"{self.uri} kept changing under {tries} tries to update it; run the command again")


class NodeFiles:
    """The node files under <s3-uri>/_job/nodes/."""

    def __init__(self, prefix: s3.S3Uri, region: str | None = None, client: Any = None):
        self.dir = job_file(prefix, f"{NODES_DIR}/")
        self.client = client or _client(region)

    def uri(self, instance: str) -> s3.S3Uri:
        return s3.S3Uri(self.dir.bucket, self.dir.key + f"{instance}.json")

    def put(self, doc: dict[str, Any]) -> None:
        _put_json(self.client, self.uri(doc["instance"]), doc)

    def get(self, instance: str) -> dict[str, Any] | None:
        return _get_json(self.client, self.uri(instance))[0]

    def all(self, newer_than: float | None = None) -> dict[str, dict[str, Any]]:
        """Every node file (or only those written after `newer_than`, by S3's clock), by instance id."""
        out = {}
        for obj in s3.list_objects(self.client, self.dir):
            if newer_than is not None and obj["LastModified"].timestamp() < newer_than:
                continue
            doc = _get_json(self.client, s3.S3Uri(self.dir.bucket, obj["Key"]))[0]
            if doc and doc.get("instance"):
                out[doc["instance"]] = doc
        return out

    def some(self, instances: list[str]) -> dict[str, dict[str, Any]]:
        found = {i: self.get(i) for i in instances}
        return {i: d for i, d in found.items() if d is not None}


class Heartbeat:
    """This runner's node file: rewritten every `every` seconds (a daemon thread) with a fresh
    heartbeat_at, and at once by set() when the runner's state changes. A failed write is
    logged and tried again at the next beat. `last_ok` is the heartbeat_at of the newest write
    that S3 took: what the peers judge this node by (the runner fences itself on it)."""

    def __init__(self, files: NodeFiles, doc: dict[str, Any], every: float, clock: Callable[[], float] = time.time):
        self.files, self.doc, self.every, self.clock = files, dict(doc), every, clock
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.last_ok = clock()

    def _write(self) -> None:
        with self._lock:
            self.doc["heartbeat_at"] = self.clock()
            doc = dict(self.doc)
            try:
                self.files.put(doc)
                self.last_ok = doc["heartbeat_at"]  # when it was stamped, not when the write ended
            except Exception as exc:  # noqa: BLE001 - the next beat tries again; peers allow for a few
                log.warning("heartbeat to %s failed: %s", self.files.uri(doc["instance"]), exc)

    def set(self, **fields: Any) -> None:
        with self._lock:
            self.doc.update(fields)
        self._write()

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            self._write()

    def __enter__(self) -> Heartbeat:
        self._write()
        self._thread = threading.Thread(target=self._run, name="ec2train-heartbeat", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.every + 20)
