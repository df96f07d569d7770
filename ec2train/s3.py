"""S3: encrypted, verified uploads and downloads, and the background mirror of a fit's output.

Every upload is server-side encrypted (SSE-S3 by default, SSE-KMS with a key) and checked
twice: S3 verifies a SHA-256 of every part as it arrives (boto3 flexible checksums), and
head_object afterwards must report our size and digest. The file's SHA-256 also travels as
object metadata, so downloads verify end to end. Transient errors (5xx, throttling, dropped
connections) are retried by the client from `ec2train.aws`; the rest become an `S3Error`
naming the fix. Only s3:// addresses are logged: never credentials or presigned URLs.
"""

from __future__ import annotations

import base64
import hashlib
import os
import re
import shutil
import socket
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ec2train import aws
from ec2train.errors import UserError

# ec2train.checkpoint and ec2train.model (torch, torchvision: seconds) are imported inside the
# functions that need them too: the job runner and `ec2train job status` use this module only
# for small files.

# boto3, botocore and s3transfer are imported inside functions: run.py imports this module for
# every fit, and a fit without --s3-uri must not pay for them.

MB = 1024 * 1024
# Files from this size on go up in parts of this size (S3 checks each part's SHA-256).
PART_SIZE = 16 * MB
DIGEST_KEY = "sha256"  # object metadata (x-amz-meta-sha256): hex SHA-256 of the whole file
# TensorBoard files go under runs/ beside the output folder's files (checkpoint.RUN_FILES).
RUNS_PREFIX = "runs"

_BUCKET_RE = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
_CREDENTIAL_CODES = {
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "ExpiredToken",
    "InvalidToken",
    "TokenRefreshRequired",
}


class S3Error(UserError):
    """An S3 address, permission or transfer problem; `permanent` ones will not go away by retrying."""

    def __init__(self, message: str, permanent: bool = True):
        super().__init__(message)
        self.permanent = permanent


# ---------------------------------------------------------------- addresses


@dataclass(frozen=True)
class S3Uri:
    bucket: str
    key: str = ""

    def __str__(self) -> str:
        return f"s3://{self.bucket}/{self.key}"

    def child(self, name: str) -> S3Uri:
        """`prefix/name` (the key is treated as a folder)."""
        prefix = self.key.rstrip("/")
        return S3Uri(self.bucket, f"{prefix}/{name}" if prefix else name)

    def parent(self) -> S3Uri:
        return S3Uri(self.bucket, self.key.rstrip("/").rpartition("/")[0])


def parse_uri(uri: str, *, need_key: bool = False, option: str = "--s3-uri") -> S3Uri:
    """Validate s3://bucket[/key]; need_key: an object, not a bucket."""
    if not isinstance(uri, str) or not uri.startswith("s3://"):
        raise S3Error(f"{option} {uri!r}: not an S3 address; use s3://bucket/prefix")
    bucket, _, key = uri[len("s3://") :].partition("/")
    if not _BUCKET_RE.match(bucket) or ".." in bucket or re.fullmatch(r"[\d.]+", bucket):
        raise S3Error(
            f"{option} {uri!r}: {bucket!r} is not a valid bucket name "
            "(3-63 lowercase letters, digits, dots and hyphens); use s3://bucket/prefix"
        )
    if key.startswith("/") or "//" in key:
        raise S3Error(f"{option} {uri!r}: empty path segment in the key; use s3://{bucket}/some/prefix")
    if need_key and not key.rstrip("/"):
        raise S3Error(f"{option} {uri!r}: name an object, e.g. s3://{bucket}/path/file")
    return S3Uri(bucket, key)


def _s3(client: Any | None) -> Any:
    if client is not None:
        return client
    return aws.client("s3")


# ---------------------------------------------------------------- errors


def _client_error(exc: BaseException | None) -> Any | None:
    """The botocore ClientError behind exc (boto3's transfer layer wraps it), if any."""
    from botocore.exceptions import ClientError

    seen = 0
    while exc is not None and seen < 5:
        if isinstance(exc, ClientError):
            return exc
        exc = exc.__cause__ or exc.__context__
        seen += 1
    return None


def as_s3_error(exc: BaseException, action: str, uri: S3Uri | str, kms_key: str | None = None) -> S3Error:
    """One line naming what failed and how to fix it (permission, bucket, key, credentials)."""
    from botocore.exceptions import BotoCoreError, NoCredentialsError, PartialCredentialsError

    uri = uri if isinstance(uri, S3Uri) else parse_uri(str(uri))
    folder = uri.key.rstrip("/") if action == "list" else uri.parent().key
    perm = {
        "upload": "s3:PutObject on arn:aws:s3:::{b}/{p}*",
        "verify": "s3:GetObject on arn:aws:s3:::{b}/{p}* (to check what it uploaded)",
        "download": "s3:GetObject on arn:aws:s3:::{b}/{p}*",
        "list": "s3:ListBucket on arn:aws:s3:::{b} (prefix {p})",
    }[action].format(b=uri.bucket, p=f"{folder}/" if folder else "")
    if isinstance(exc, (NoCredentialsError, PartialCredentialsError)):
        return S3Error(
            f"no AWS credentials to {action} {uri}: on EC2 attach an instance profile with {perm} "
            "(infra/launch_ec2.sh does), elsewhere run `aws configure`"
        )
    ce = _client_error(exc)
    if ce is not None:
        err = ce.response.get("Error", {})
        code = str(err.get("Code", ""))
        status = int(ce.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
        message = str(err.get("Message", "")) or code
        if code == "NoSuchBucket":
            return S3Error(
                f"cannot {action} {uri}: bucket '{uri.bucket}' does not exist; "
                f"create it (aws s3 mb s3://{uri.bucket}) or fix the s3:// address"
            )
        if code in ("NoSuchKey", "404", "NotFound") or (status == 404 and action == "download"):
            return S3Error(f"cannot {action} {uri}: no such object; check the address (aws s3 ls {uri.parent()}/)")
        if code.startswith("KMS") or "kms" in message.lower():
            return S3Error(
                f"cannot {action} {uri} with KMS key {kms_key or '(bucket default)'}: {code}: {message}; "
                "check the key id/ARN and that the role has kms:GenerateDataKey and kms:Decrypt on it"
            )
        if code in _CREDENTIAL_CODES:
            return S3Error(
                f"AWS rejected the credentials ({code}) to {action} {uri}; refresh them (`aws configure`, or the instance profile)"
            )
        if code in ("AccessDenied", "403", "Forbidden", "AllAccessDisabled") or status == 403:
            extra = " and kms:GenerateDataKey/kms:Decrypt on the key" if kms_key else ""
            return S3Error(
                f"access denied to {action} {uri}: the instance role or credentials need {perm}{extra} (see docs/s3-spot.md)"
            )
        transient = status >= 500 or status in (408, 429) or code in ("SlowDown", "RequestTimeout", "InternalError")
        return S3Error(f"cannot {action} {uri}: {code or status}: {message}", permanent=not transient)
    if isinstance(exc, BotoCoreError):  # connection refused/reset, timeouts, after retries
        return S3Error(f"cannot reach S3 to {action} {uri} (after retries): {exc}", permanent=False)
    return S3Error(f"cannot {action} {uri}: {exc}", permanent=False)


# ---------------------------------------------------------------- digests


def _b64(digest: bytes) -> str:
    return base64.b64encode(digest).decode("ascii")


@dataclass(frozen=True)
class FileDigest:
    size: int
    sha256_hex: str
    sha256_b64: str  # as S3 reports a single-part upload's ChecksumSHA256
    composite_b64: str | None  # as S3 reports a multipart upload's (SHA-256 of the parts' SHA-256s)


def _part_size(size: int) -> int:
    from s3transfer.utils import ChunksizeAdjuster

    return ChunksizeAdjuster().adjust_chunksize(PART_SIZE, size)


def file_digest(path: Path) -> FileDigest:
    """SHA-256 of the file and of each upload part, in one pass."""
    size = path.stat().st_size
    part = _part_size(size)
    whole, parts = hashlib.sha256(), []
    with open(path, "rb") as f:
        while chunk := f.read(part):
            whole.update(chunk)
            parts.append(hashlib.sha256(chunk).digest())
    multipart = size >= PART_SIZE
    return FileDigest(
        size,
        whole.hexdigest(),
        _b64(whole.digest()),
        _b64(hashlib.sha256(b"".join(parts)).digest()) if multipart else None,
    )


def _transfer_config():
    from boto3.s3.transfer import TransferConfig

    return TransferConfig(multipart_threshold=PART_SIZE, multipart_chunksize=PART_SIZE)


def _snapshot(path: Path) -> tuple[Path, bool]:
    """A stable copy of a file that training may change mid-upload; returns (path, temporary?).

    Small files (TensorBoard events are appended to) are copied; large ones are only ever
    replaced whole (atomic writes swap in a new inode), so a hard link beside them is enough.
    """
    if path.stat().st_size >= PART_SIZE:
        snap = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.s3upload")
        try:
            os.link(path, snap)
            return snap, True
        except OSError:  # no hard links here: copy instead
            pass
    fd, tmp = tempfile.mkstemp(prefix="ec2train-", suffix=".s3upload")
    os.close(fd)
    try:
        shutil.copyfile(path, tmp)
    except BaseException:
        os.unlink(tmp)
        raise
    return Path(tmp), True


# ---------------------------------------------------------------- single objects


def upload_file(
    local: str | Path,
    s3_uri: str | S3Uri,
    kms_key: str | None = None,
    *,
    client: Any | None = None,
    metadata: dict[str, str] | None = None,
) -> S3Uri:
    """Upload one file, encrypted (SSE-S3, or SSE-KMS with kms_key) and verified; returns its address."""
    from boto3.exceptions import Boto3Error
    from botocore.exceptions import BotoCoreError, ClientError

    uri = s3_uri if isinstance(s3_uri, S3Uri) else parse_uri(s3_uri, need_key=True)
    local = Path(local)
    if not local.is_file():
        raise S3Error(f"cannot upload {local}: no such file")
    s3 = _s3(client)
    snap, temporary = _snapshot(local)
    try:
        digest = file_digest(snap)
        extra: dict[str, Any] = {
            "ChecksumAlgorithm": "SHA256",
            "Metadata": {**(metadata or {}), DIGEST_KEY: digest.sha256_hex},
        }
        if kms_key:
            extra.update(ServerSideEncryption="aws:kms", SSEKMSKeyId=kms_key)
        else:
            extra["ServerSideEncryption"] = "AES256"
        try:  # boto3 wraps the ClientError of a failed upload in its own S3UploadFailedError
            s3.upload_file(str(snap), uri.bucket, uri.key, ExtraArgs=extra, Config=_transfer_config())
        except (BotoCoreError, ClientError, Boto3Error, OSError) as exc:
            raise as_s3_error(exc, "upload", uri, kms_key) from None
        try:
            head = s3.head_object(Bucket=uri.bucket, Key=uri.key, ChecksumMode="ENABLED")
        except (BotoCoreError, ClientError) as exc:
            raise as_s3_error(exc, "verify", uri, kms_key) from None
    finally:
        if temporary:
            snap.unlink(missing_ok=True)
    _verify(head, digest, uri)
    return uri


def _verify(head: dict[str, Any], digest: FileDigest, uri: S3Uri) -> None:
    problems = []
    if head.get("ContentLength") != digest.size:
        problems.append(f"size {head.get('ContentLength')} != {digest.size}")
    if head.get("Metadata", {}).get(DIGEST_KEY) != digest.sha256_hex:
        problems.append("recorded SHA-256 differs")
    reported = head.get("ChecksumSHA256")
    if reported:
        # Multipart: S3 reports the SHA-256 of the parts' SHA-256s, suffixed "-<parts>".
        expected = digest.composite_b64 or digest.sha256_b64
        if reported.split("-")[0] not in (expected, digest.sha256_b64):
            problems.append("S3's SHA-256 checksum differs")
    if problems:
        raise S3Error(f"upload to {uri} did not verify ({'; '.join(problems)}); run it again", permanent=False)


def download_file(
    s3_uri: str | S3Uri,
    local: str | Path,
    *,
    progress: Callable[[int, int | None], None] | None = None,
    client: Any | None = None,
) -> Path:
    """Download one object to `local` (all or nothing), checking size and, when recorded, SHA-256."""
    from boto3.exceptions import Boto3Error
    from botocore.exceptions import BotoCoreError, ClientError

    uri = s3_uri if isinstance(s3_uri, S3Uri) else parse_uri(s3_uri, need_key=True, option="s3 address")
    local = Path(local)
    local.parent.mkdir(parents=True, exist_ok=True)
    s3 = _s3(client)
    tmp = local.with_name(f".{local.name}.{uuid.uuid4().hex[:8]}.s3download")
    try:
        try:
            head = s3.head_object(Bucket=uri.bucket, Key=uri.key)
            total, done = head["ContentLength"], 0

            def on_bytes(n: int) -> None:
                nonlocal done
                done += n
                if progress:
                    progress(done, total)

            s3.download_file(uri.bucket, uri.key, str(tmp), Callback=on_bytes, Config=_transfer_config())
        except (BotoCoreError, ClientError, Boto3Error, OSError) as exc:
            raise as_s3_error(exc, "download", uri) from None
        size = tmp.stat().st_size
        if size != total:
            raise S3Error(f"download of {uri} is incomplete ({size} of {total} bytes); run it again", permanent=False)
        recorded = head.get("Metadata", {}).get(DIGEST_KEY)
        if recorded and file_digest(tmp).sha256_hex != recorded:
            raise S3Error(f"download of {uri} does not match its recorded SHA-256; the object is damaged, re-upload it")
        os.replace(tmp, local)
    finally:
        tmp.unlink(missing_ok=True)
    return local


def list_objects(s3: Any, uri: S3Uri, action_uri: S3Uri | None = None) -> Iterable[dict[str, Any]]:
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        for page in s3.get_paginator("list_objects_v2").paginate(Bucket=uri.bucket, Prefix=uri.key):
            yield from page.get("Contents", [])
    except (BotoCoreError, ClientError) as exc:
        raise as_s3_error(exc, "list", action_uri or uri) from None


def download_prefix(
    s3_uri: str | S3Uri,
    dest: str | Path,
    *,
    progress: Callable[[int, int | None], None] | None = None,
    client: Any | None = None,
    workers: int = 8,
) -> Path:
    """Download every object under a prefix (a folder) into dest, keeping relative paths.

    Files already in dest with the listed size are kept, so a rerun continues."""
    uri = s3_uri if isinstance(s3_uri, S3Uri) else parse_uri(s3_uri, option="--url")
    if uri.key and not uri.key.endswith("/"):
        uri = S3Uri(uri.bucket, uri.key + "/")
    dest = Path(dest)
    s3 = _s3(client)
    objects = [o for o in list_objects(s3, uri) if not o["Key"].endswith("/")]
    if not objects:
        raise S3Error(f"nothing under {uri}; check the prefix (aws s3 ls {uri})")
    root = dest.resolve()
    jobs = []
    for o in objects:
        target = (dest / o["Key"][len(uri.key) :]).resolve()
        if root not in target.parents:  # keys like '../x' must not write outside dest
            raise S3Error(f"refusing to download {o['Key']!r}: it points outside {dest}")
        jobs.append((o, target))
    total = sum(o["Size"] for o in objects)
    done, lock = 0, threading.Lock()

    def fetch(job: tuple[dict[str, Any], Path]) -> None:
        nonlocal done
        o, target = job
        if not (target.is_file() and target.stat().st_size == o["Size"]):
            download_file(S3Uri(uri.bucket, o["Key"]), target, client=s3)
        with lock:
            done += o["Size"]
            if progress:
                progress(done, total)

    with ThreadPoolExecutor(max(1, workers)) as pool:
        list(pool.map(fetch, jobs))
    return dest


def find_checkpoint(s3_uri: str | S3Uri, *, client: Any | None = None) -> str | None:
    """s3://.../last.pt under the run prefix, or None when there is none yet."""
    from ec2train.checkpoint import CHECKPOINT_FILE

    prefix = s3_uri if isinstance(s3_uri, S3Uri) else parse_uri(s3_uri)
    target = prefix.child(CHECKPOINT_FILE)
    for o in list_objects(_s3(client), target, prefix):
        if o["Key"] == target.key:
            return str(target)
    return None


def download_run(checkpoint_uri: str | S3Uri, dest: str | Path, *, client: Any | None = None) -> Path:
    """Fetch a run's checkpoint into dest/last.pt, and its model.pth beside it when there is one,
    so a fresh instance's output folder is complete. Returns the local checkpoint."""
    from ec2train.checkpoint import CHECKPOINT_FILE, MODEL_FILE

    uri = (
        checkpoint_uri
        if isinstance(checkpoint_uri, S3Uri)
        else parse_uri(checkpoint_uri, need_key=True, option="--resume")
    )
    s3 = _s3(client)
    dest = Path(dest)
    local = download_file(uri, dest / CHECKPOINT_FILE, client=s3)
    model = uri.parent().child(MODEL_FILE)
    if any(o["Key"] == model.key for o in list_objects(s3, model)):
        download_file(model, dest / MODEL_FILE, client=s3)
    return local


def export_to_s3(model_path: str | Path, s3_uri: str, kms_key: str | None = None) -> S3Uri:
    """Upload a model file (checked first) to s3_uri: a key ending in .pth, or a prefix (then prefix/model.pth)."""
    from ec2train.model import MODEL_FILE, read_model_file

    read_model_file(model_path)
    uri = parse_uri(s3_uri)
    target = uri if uri.key.endswith(".pth") else uri.child(MODEL_FILE)
    return upload_file(model_path, target, kms_key or None)


# ---------------------------------------------------------------- background uploads


class BackgroundUploader:
    """One thread that uploads the newest version of each submitted file.

    Newest wins: a file submitted again while still queued is uploaded once, from what is
    on disk when its turn comes (epoch 3's checkpoint replaces a queued epoch 2). Files
    unchanged since their last upload are skipped. flush() waits until everything submitted
    is in S3 and raises the first failure; a permanent failure (access denied, no bucket) is
    raised by the next submit() too, so training stops instead of running unsaved for hours.
    """

    def __init__(
        self, kms_key: str | None = None, *, client: Any | None = None, log: Callable[[str], None] | None = None
    ):
        self.kms_key = kms_key or None
        self._client = client
        self._log = log or (lambda msg: None)
        self._cond = threading.Condition()
        self._pending: dict[S3Uri, Path] = {}
        self._busy = False
        self._closed = False
        self._failed: dict[S3Uri, S3Error] = {}
        self._fatal: S3Error | None = None
        self._uploaded: dict[S3Uri, tuple[int, int, int]] = {}
        self.uploads = 0  # completed uploads (for tests and logs)
        self._thread = threading.Thread(target=self._run, name="ec2train-s3-upload", daemon=True)
        self._thread.start()

    def submit(self, files: Iterable[tuple[str | Path, S3Uri]]) -> None:
        with self._cond:
            if self._fatal is not None:
                raise self._fatal
            for path, uri in files:
                self._pending.pop(uri, None)  # re-queue at the end, keeping the caller's order
                self._pending[uri] = Path(path)
            self._cond.notify_all()

    def flush(self, timeout: float | None = None) -> None:
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while self._pending or self._busy:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    raise S3Error(f"uploads to S3 still running after {timeout:.0f} s", permanent=False)
                self._cond.wait(left)
            if self._failed:
                raise next(iter(self._failed.values()))

    def close(self, discard: bool = False) -> None:
        """Stop the thread once the queue is empty (discard: drop what is queued, do not wait)."""
        with self._cond:
            self._closed = True
            if discard:
                self._pending.clear()
            self._cond.notify_all()
        if not discard:
            self._thread.join(timeout=5)

    @staticmethod
    def _signature(path: Path) -> tuple[int, int, int] | None:
        try:
            st = path.stat()
        except FileNotFoundError:
            return None
        return (st.st_size, st.st_mtime_ns, st.st_ino)

    def _run(self) -> None:
        client = None
        while True:
            with self._cond:
                while not self._pending and not self._closed:
                    self._cond.wait()
                if not self._pending:
                    return
                uri, path = next(iter(self._pending.items()))
                del self._pending[uri]
                self._busy = True
            try:
                sig = self._signature(path)
                if sig is not None and self._uploaded.get(uri) != sig:
                    client = client or _s3(self._client)
                    upload_file(path, uri, self.kms_key, client=client)
                    self._uploaded[uri] = sig
                    self.uploads += 1
                self._failed.pop(uri, None)
            except S3Error as exc:
                self._failed[uri] = exc
                if exc.permanent:
                    self._fatal = self._fatal or exc
                self._log(
                    f"[yellow]S3 upload failed[/yellow] ({'stopping' if exc.permanent else 'will retry next epoch'}): {exc}"
                )
            except Exception as exc:  # never let the thread die silently
                self._failed[uri] = as_s3_error(exc, "upload", uri, self.kms_key)
                self._log(f"[yellow]S3 upload failed[/yellow]: {self._failed[uri]}")
            finally:
                with self._cond:
                    self._busy = False
                    self._cond.notify_all()


class RunSync:
    """Mirrors a fit to s3://bucket/prefix on rank 0: the output folder's files and the run's
    TensorBoard events every epoch (in the background), and everything at exit (flushed)."""

    def __init__(
        self,
        s3_uri: str,
        output: str | Path,
        logdir: str | Path,
        kms_key: str | None = None,
        *,
        client: Any | None = None,
        log: Callable[[str], None] | None = None,
    ):
        self.prefix = parse_uri(s3_uri)
        self.output = Path(output)
        self.logdir = Path(logdir)
        self._log = log or (lambda msg: None)
        self.uploader = BackgroundUploader(kms_key, client=client, log=self._log)
        self._client = client
        self.epochs_mirrored = 0  # by this process: until then --output may hold another run's files

    def preflight(self) -> str | None:
        """Check the bucket answers now (not after the first epoch); returns the run checkpoint
        already under the prefix, if any (checkpoint.Resume decides whether it may be overwritten)."""
        return find_checkpoint(self.prefix, client=self._client)

    def _own_event_files(self) -> list[Path]:
        """TensorBoard files this process writes (their names carry host and pid)."""
        tag = f".{socket.gethostname()}.{os.getpid()}."
        return [p for p in self.logdir.rglob("events.out.tfevents.*") if tag in p.name] if self.logdir.is_dir() else []

    def _files(self, run_dir: Path | None = None) -> list[tuple[Path, S3Uri]]:
        events = (
            sorted(run_dir.rglob("events.out.tfevents.*")) if run_dir and run_dir.is_dir() else self._own_event_files()
        )
        files = [(p, self.prefix.child(f"{RUNS_PREFIX}/{p.relative_to(self.logdir).as_posix()}")) for p in events]
        from ec2train.checkpoint import RUN_FILES

        files += [(self.output / name, self.prefix.child(name)) for name in RUN_FILES if (self.output / name).is_file()]
        return files

    def on_epoch(self, epoch: int, record: dict[str, Any]) -> None:
        self.epochs_mirrored += 1
        self.uploader.submit(self._files())

    def finish(self, run_dir: Path | None = None) -> float:
        """Upload everything and wait; returns the seconds it took."""
        t0 = time.perf_counter()
        try:
            self.uploader.submit(self._files(run_dir))
            self.uploader.flush()
        finally:
            self.uploader.close()
        return time.perf_counter() - t0

    def abort(self) -> None:
        """After a failed fit: upload what its epochs left (best effort, never raises). A fit that
        failed before its first epoch uploads nothing: what --output holds then is not its work."""
        if not self.epochs_mirrored:
            self.uploader.close(discard=True)
            return
        try:
            self.finish()
        except Exception as exc:  # the original error matters more
            self._log(f"[yellow]S3 upload at exit failed:[/yellow] {exc}")
