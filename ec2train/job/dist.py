"""The safe install path for a new instance: the exact wheel of this checkout, from S3, hash-checked.

`pip install ec2train` on a box would resolve a name against the public index, where whoever
registers it gets code execution as root with the instance's role. Instead the launching
machine builds a wheel of the checkout it runs from, uploads it under `<s3-uri>/_dist/<hash>/`
(inside the prefix the instance role may read), and the instance's user data installs that
file only after `sha256sum -c` accepts it.

    python -m ec2train.job.dist --s3-uri s3://bucket/prefix      # prints: WHEEL_URI SHA256
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from ec2train import s3
from ec2train.errors import UserError

DIST_PREFIX = "_dist"
# What a wheel build needs from the checkout (pyproject names README.md as the readme).
BUILD_INPUTS = ("pyproject.toml", "README.md", "LICENSE")


class DistError(UserError):
    """The wheel could not be built or published; the message says why and what to do."""


@dataclass(frozen=True)
class Wheel:
    path: Path | None  # None in a dry run (nothing was built)
    sha256: str
    uri: str  # s3://bucket/prefix/_dist/<sha256 head>/<wheel file name>


def checkout_root() -> Path:
    """The checkout this ec2train runs from (the folder with its pyproject.toml)."""
    import ec2train

    root = Path(ec2train.__file__).resolve().parent.parent
    pyproject = root / "pyproject.toml"
    if not pyproject.is_file() or 'name = "ec2train"' not in pyproject.read_text(encoding="utf-8"):
        raise DistError(
            f"ec2train runs from {root}, which is not a checkout of it (no pyproject.toml): "
            "pass a wheel you built (--wheel FILE) or run from a git clone"
        )
    return root


def _can_build_offline() -> bool:
    """True when this Python has a setuptools new enough for pyproject.toml: then the build
    needs no index at all (no build isolation)."""
    try:
        from importlib.metadata import version

        return int(version("setuptools").split(".")[0]) >= 77
    except Exception:  # noqa: BLE001 - not installed, or an odd version string
        return False


def build_wheel(src: Path | None = None, dest: Path | None = None) -> Path:
    """A wheel of the checkout `src`, built from a copy so the checkout gets no build litter."""
    src = src or checkout_root()
    dest = Path(dest or tempfile.mkdtemp(prefix="ec2train-dist-"))
    with tempfile.TemporaryDirectory(prefix="ec2train-build-") as tmp:
        copy = Path(tmp) / "src"
        copy.mkdir()
        for name in BUILD_INPUTS:
            if (src / name).is_file():
                shutil.copy(src / name, copy / name)
        shutil.copytree(src / "ec2train", copy / "ec2train", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        cmd = [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(dest), str(copy)]
        if _can_build_offline():
            cmd.insert(4, "--no-build-isolation")
        done = subprocess.run(
            cmd, capture_output=True, text=True, env={**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
        )
        if done.returncode != 0:
            last = (done.stderr.strip().splitlines() or ["(no output)"])[-1]
            raise DistError(f"building the wheel of {src} failed: {last}; fix it, or pass --wheel FILE")
    wheels = sorted(dest.glob("ec2train-*.whl"))
    if len(wheels) != 1:
        raise DistError(f"the wheel build left {len(wheels)} ec2train wheels in {dest}, expected 1")
    return wheels[0]


def wheel_uri(prefix: str | s3.S3Uri, wheel_name: str, sha256: str) -> s3.S3Uri:
    """Where a wheel goes: its hash in the key, so a relaunch of an older job never meets a newer
    build of the same version (its user data would refuse it)."""
    base = prefix if isinstance(prefix, s3.S3Uri) else s3.parse_uri(prefix)
    return base.child(f"{DIST_PREFIX}/{sha256[:16]}/{wheel_name}")


def prepare_wheel(s3_uri: str, *, wheel: str | Path | None = None, dry_run: bool = False) -> Wheel:
    """Build (unless `wheel` is given) and hash the wheel, and say where it goes; uploads nothing.

    A dry run builds nothing and returns placeholders."""
    prefix = s3.parse_uri(s3_uri)
    if dry_run and wheel is None:
        return Wheel(None, "<sha256 of the wheel>", str(prefix.child(f"{DIST_PREFIX}/<sha256>/<ec2train wheel>")))
    path = Path(wheel) if wheel is not None else build_wheel()
    if not path.is_file() or not path.name.endswith(".whl"):
        raise DistError(f"--wheel {path}: not a wheel file (*.whl)")
    sha256 = s3.file_digest(path).sha256_hex
    return Wheel(path, sha256, str(wheel_uri(prefix, path.name, sha256)))


def upload_wheel(wheel: Wheel, *, client=None) -> None:
    if wheel.path is None:
        raise DistError("a dry run's wheel has no file to upload")
    s3.upload_file(wheel.path, wheel.uri, client=client)


def publish_wheel(s3_uri: str, *, wheel: str | Path | None = None, dry_run: bool = False, client=None) -> Wheel:
    """Build (unless `wheel` is given), hash and upload the wheel under `<s3_uri>/_dist/`.

    A dry run builds and uploads nothing and returns placeholders."""
    prepared = prepare_wheel(s3_uri, wheel=wheel, dry_run=dry_run)
    if not dry_run:
        upload_wheel(prepared, client=client)
    return prepared


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ec2train.job.dist", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--s3-uri", required=True, help="the instance's S3 prefix; the wheel goes under <s3-uri>/_dist/"
    )
    parser.add_argument("--wheel", help="upload this wheel instead of building one of the checkout")
    args = parser.parse_args(argv)
    try:
        published = publish_wheel(args.s3_uri, wheel=args.wheel)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(published.uri, published.sha256)
    return 0


if __name__ == "__main__":
    sys.exit(main())
