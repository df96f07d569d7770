"""Getting a data set onto the box: download (https, file, s3; resumable), verify, and unpack a
zip within limits (no links, no paths outside, no bombs, enough disk), all or nothing."""

from __future__ import annotations

import os
import shutil
import zipfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ec2train.data.layout import SPLITS, DataError
from ec2train.errors import first_line
from ec2train.files import human_bytes

DOG_IMAGES_URL = "https://s3-us-west-1.amazonaws.com/udacity-aind/dog-project/dogImages.zip"


class DownloadInterrupted(DataError):
    """A download that stopped for a reason that may pass (the network, the server's 5xx or 429,
    a connection cut off): running it again resumes it. Unattended jobs retry these."""


def _download_http(url: str, part: Path, progress: Callable[[int, int | None], None] | None, timeout: float) -> None:
    """Download to `part`, resuming a previous partial download with an HTTP Range request."""
    import http.client
    import socket
    import urllib.error
    import urllib.request

    have = part.stat().st_size if part.exists() else 0
    req = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
    try:
        resp = urllib.request.build_opener(_redirect_handler()).open(req, timeout=timeout)
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and have:  # already complete
            return
        passing = exc.code >= 500 or exc.code in (408, 429)
        raise (DownloadInterrupted if passing else DataError)(
            f"download of {url} failed: HTTP {exc.code} {exc.reason}"
        ) from None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        no_such_host = isinstance(reason, socket.gaierror) and reason.errno == socket.EAI_NONAME
        raise (DataError if no_such_host else DownloadInterrupted)(
            f"cannot reach {url} ({reason}). Offline? Copy dogImages.zip here and pass --url file:///path/dogImages.zip, "
            "or put it in S3 and pass --url s3://bucket/key"
        ) from None
    with resp:
        if have and getattr(resp, "status", None) != 206:  # Range ignored (or file://): start over
            have = 0
        length = resp.headers.get("Content-Length")
        total = int(length) + have if length is not None else None
        done = have
        with open(part, "ab" if have else "wb") as f:
            try:
                while chunk := resp.read(1 << 20):
                    f.write(chunk)
                    done += len(chunk)
                    if progress:
                        progress(done, total)
            except (OSError, http.client.HTTPException):
                pass  # judged by the byte count below
    if total is not None and done < total:
        raise DownloadInterrupted(
            f"download of {url} stopped at {done} of {total} bytes; run the same command again to resume it"
        )


def check_redirect(old_url: str, new_url: str) -> None:
    """Follow a redirect only if it keeps TLS: an https download never continues over http."""
    old_scheme, new_scheme = (u.split(":", 1)[0].lower() for u in (old_url, new_url))
    if new_scheme not in ("http", "https") or (old_scheme == "https" and new_scheme != "https"):
        raise DataError(
            f"refusing the redirect from {old_url} to {new_url}: it leaves https; use the https address directly"
        )


def _redirect_handler():
    import urllib.request

    class NoDowngradeRedirects(urllib.request.HTTPRedirectHandler):
        def redirect_request(self, req, fp, code, msg, headers, newurl):
            check_redirect(req.full_url, newurl)
            return super().redirect_request(req, fp, code, msg, headers, newurl)

    return NoDowngradeRedirects


@dataclass(frozen=True)
class UnpackLimits:
    """What an archive may expand to: checked from its directory before anything is written,
    and again by counting the bytes as they are written (a directory can lie).

    dogImages.zip: 1.1 GB -> 1.1 GB (JPEGs do not compress), about 8,500 entries.
    """

    max_bytes: int = 64 << 30  # uncompressed total
    max_entries: int = 200_000
    max_ratio: float = 100.0  # uncompressed / compressed, for any entry over 1 MiB and for the whole
    disk_margin: int = 1 << 30  # left free after unpacking


_METHODS = (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED, zipfile.ZIP_BZIP2, zipfile.ZIP_LZMA)
_LOCAL_HEADER = 30  # bytes before an entry's name in its local header
# What reading a broken or lying entry raises (EOFError: its data runs past the file's end,
# which click used to print as "Aborted!"; RuntimeError: encrypted).
_UNREADABLE = (zipfile.BadZipFile, EOFError, zlib.error, NotImplementedError, RuntimeError)


def _member_problem(member: zipfile.ZipInfo, dest: Path) -> str | None:
    """Why one entry cannot be unpacked as a plain file or folder under dest (None: it can)."""
    import stat

    mode = member.external_attr >> 16
    if stat.S_ISLNK(mode):
        return "is a symbolic link"
    if stat.S_IFMT(mode) not in (0, stat.S_IFREG, stat.S_IFDIR):  # 0: no type recorded (writestr, Windows)
        return "is not a plain file or folder"
    if member.flag_bits & 0x1:
        return "is encrypted"
    if member.compress_type not in _METHODS:
        return f"uses compression method {member.compress_type}, which is not stored, deflate, bzip2 or lzma"
    target, root = (dest / member.filename).resolve(), dest.resolve()
    if target != root and root not in target.parents:
        return f"points outside {dest}"
    return None


def check_archive(zf: zipfile.ZipFile, dest: Path, limits: UnpackLimits = UnpackLimits()) -> None:
    """Refuse zip bombs, links, odd and clashing members with one line each, before unpacking."""
    members = zf.infolist()
    if len(members) > limits.max_entries:
        raise DataError(
            f"the archive has {len(members)} entries, over the limit of {limits.max_entries}; refusing to unpack it"
        )
    files: dict[str, str] = {}
    folders: set[str] = set()
    rooms = _rooms(zf)
    for member in members:
        problem = _member_problem(member, dest) or _size_problem(member, rooms.get(member.header_offset, 0))
        if problem:
            raise DataError(f"refusing to unpack {member.filename!r}: it {problem}")
        name = member.filename.rstrip("/")
        folders.update(str(p) for p in Path(name).parents if str(p) != ".")
        if member.is_dir():
            folders.add(name)
        elif name in files:
            raise DataError(f"refusing to unpack {member.filename!r}: the archive holds it twice")
        else:
            files[name] = member.filename
        ratio = member.file_size / max(1, member.compress_size)
        if member.file_size > (1 << 20) and ratio > limits.max_ratio:
            raise DataError(
                f"refusing to unpack {member.filename!r}: it expands {ratio:.0f}x (limit {limits.max_ratio:.0f}x); a zip bomb?"
            )
    clash = sorted(folders & files.keys())
    if clash:
        raise DataError(f"refusing to unpack {files[clash[0]]!r}: the archive has a file and a folder of that name")
    total = sum(m.file_size for m in members)
    packed = sum(m.compress_size for m in members)
    if total > limits.max_bytes or (total > (1 << 20) and total / max(1, packed) > limits.max_ratio):
        raise DataError(
            f"the archive expands to {total / 2**30:.2f} GiB from {packed / 2**30:.2f} GiB "
            f"(limits {limits.max_bytes / 2**30:.0f} GiB, {limits.max_ratio:.0f}x); refusing to unpack it"
        )


def _rooms(zf: zipfile.ZipFile) -> dict[int, int]:
    """Each entry's local header offset -> the bytes from it to the next entry (or the central
    directory): all the room its header and data have in the file. Two entries at one offset
    get 0, so the second is refused."""
    offsets = sorted(m.header_offset for m in zf.infolist())
    ends = [*offsets[1:], getattr(zf, "start_dir", offsets[-1] if offsets else 0)]
    return {start: end - start for start, end in zip(offsets, ends)}


def _size_problem(member: zipfile.ZipInfo, room: int) -> str | None:
    """A compressed size the file cannot hold is a lie: reading it runs into the entries after
    it (and the ratio computed from it is no bound) or off the end of the file."""
    need = _LOCAL_HEADER + len(member.filename.encode()) + member.compress_size
    if need > room:
        return (
            f"declares {member.compress_size} compressed bytes, more than the {max(0, room - _LOCAL_HEADER)} "
            "the archive holds for it (its sizes lie, or it overlaps another entry)"
        )
    return None


def extract_within_limits(zf: zipfile.ZipFile, dest: Path, limits: UnpackLimits, packed: int) -> int:
    """Unpack every entry under dest, counting the bytes as they are written: past the total
    limit, or past the ratio limit against the archive's real size (`packed` bytes), it stops
    with a DataError (the caller removes dest). Returns the bytes written. An unreadable entry
    raises one of _UNREADABLE; the disk's errors are OSError."""
    budget = min(limits.max_bytes, max(1 << 20, int(limits.max_ratio * packed)))
    written = 0
    for member in zf.infolist():
        target = dest / member.filename
        if member.is_dir():
            target.mkdir(parents=True, exist_ok=True)
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        with zf.open(member) as src, open(target, "wb") as out:
            while chunk := src.read(1 << 20):
                written += len(chunk)
                if written > budget:
                    limit = (
                        f"the limit of {human_bytes(limits.max_bytes)}"
                        if budget == limits.max_bytes
                        else f"{limits.max_ratio:.0f}x the archive's {human_bytes(packed)}"
                    )
                    raise DataError(
                        f"refusing to unpack {member.filename!r}: stopped after {human_bytes(written - len(chunk))}: "
                        f"past {limit}; a zip bomb?"
                    )
                out.write(chunk)
    return written


class NoSpaceError(DataError):
    """The archive is fine but the disk is too small for it: the download stays for the rerun."""


def check_free_disk(zf: zipfile.ZipFile, dest: Path, limits: UnpackLimits = UnpackLimits()) -> None:
    total = sum(m.file_size for m in zf.infolist())
    free = shutil.disk_usage(dest.parent).free
    if total + limits.disk_margin > free:
        raise NoSpaceError(
            f"unpacking needs {total / 2**30:.2f} GiB plus {limits.disk_margin / 2**30:.1f} GiB spare in {dest.parent}, "
            f"which has {free / 2**30:.2f} GiB free; free some space or pick another --dest"
        )


def _find_layout_root(folder: Path) -> Path:
    for candidate in [folder, *sorted(p for p in folder.rglob("*") if p.is_dir())]:
        if all((candidate / s).is_dir() for s in SPLITS):
            return candidate
    raise DataError(f"the archive has no {'/'.join(SPLITS)} folders; not a data set in the dogImages layout")


def fetch_dataset(
    url: str = DOG_IMAGES_URL,
    dest: str | Path = "dogImages",
    progress: Callable[[int, int | None], None] | None = None,
    timeout: float = 15.0,
    keep_archive: bool = False,
    sha256: str | None = None,
    limits: UnpackLimits = UnpackLimits(),
) -> Path:
    """Download a zip of a data set (https, file or s3), verify it and unpack it as the folder
    DEST; an s3://bucket/prefix/ (trailing slash) is a folder in the dogImages layout, copied as is.

    DEST appears only once fully unpacked (temp folder beside it, then rename); an interrupted
    download resumes from DEST.zip.part. With sha256 the zip must have that digest. The
    archive's directory is checked against `limits` and the free disk before anything is unpacked.
    """
    target = Path(dest)
    if target.is_dir() and all((target / s).is_dir() for s in SPLITS):
        return target
    if target.exists():
        raise DataError(f"--dest {target} exists but is not a data set; remove it or pick another --dest")
    work, name = target.parent, target.name
    work.mkdir(parents=True, exist_ok=True)
    scheme = url.split(":", 1)[0].lower()
    if scheme == "s3" and url.endswith("/"):  # a folder laid out as train/valid/test
        from ec2train import s3

        if sha256:
            raise DataError("--sha256 checks a zip archive; an s3://bucket/prefix/ folder has none")
        tmp = work / f".{name}.downloading"  # kept on failure: a rerun skips the files it has
        s3.download_prefix(url, tmp, progress=progress)
        os.replace(_find_layout_root(tmp), target)
        shutil.rmtree(tmp, ignore_errors=True)
        return target
    archive = work / f"{name}.zip"
    if not archive.exists():
        _download(url, scheme, work / f"{name}.zip.part", progress, timeout)
        os.replace(work / f"{name}.zip.part", archive)
    _verify_archive(archive, url, sha256)
    _unpack(archive, target, limits)
    if not keep_archive:
        archive.unlink()
    return target


def _download(url: str, scheme: str, part: Path, progress, timeout: float) -> None:
    if scheme == "s3":
        from ec2train import s3

        s3.download_file(url, part, progress=progress)
    elif scheme in ("https", "http", "file"):
        _download_http(url, part, progress, timeout)
    else:
        raise DataError(f"--url {url}: unsupported scheme; use https://, file:// or s3://")


def _verify_archive(archive: Path, url: str, sha256: str | None) -> None:
    """The download is a zip (and has the expected digest); a bad one is deleted so a rerun fetches anew."""
    if sha256:
        import hashlib

        h = hashlib.sha256()  # (hashlib.file_digest is Python 3.11+; this package supports 3.10)
        with open(archive, "rb") as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
        digest = h.hexdigest()
        if digest != sha256.strip().lower():
            archive.unlink()
            raise DataError(
                f"{url} has sha256 {digest}, not the expected {sha256} (deleted the download); check the URL and --sha256"
            )
    if not zipfile.is_zipfile(archive):
        archive.unlink()
        raise DataError(f"{url} is not a zip archive (deleted the download); check the URL")


def _unpack(archive: Path, target: Path, limits: UnpackLimits) -> None:
    """Unpack into a temp folder beside target, then rename its dogImages-layout root to target.

    Every refusal is one line and deletes the archive (a rerun would only refuse it again),
    except for lack of space or another error of the disk: free space and rerun."""
    tmp = target.parent / f".{target.name}.unpacking"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        with zipfile.ZipFile(archive) as zf:
            check_archive(zf, tmp, limits)
            check_free_disk(zf, tmp, limits)
            extract_within_limits(zf, tmp, limits, archive.stat().st_size)
        os.replace(_find_layout_root(tmp), target)
    except NoSpaceError:
        raise
    except DataError as exc:
        archive.unlink(missing_ok=True)  # hostile or broken: a rerun must not reuse it
        raise DataError(f"{exc} (deleted the download)") from None
    except (*_UNREADABLE, ValueError) as exc:  # the directory or an entry cannot be read
        archive.unlink(missing_ok=True)
        raise DataError(f"{archive} is corrupt ({first_line(exc)}); deleted it, run the fetch again") from None
    except OSError as exc:  # the disk filled meanwhile, permissions, ...
        raise DataError(f"cannot unpack {archive.name} into {target.parent}: {exc.strerror or exc}") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # partial output never stays behind
