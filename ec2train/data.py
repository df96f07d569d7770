"""Dataset layout, loading, sharding, demo data, and getting dogImages onto the box.

Layout (as in dogImages): ROOT/{train,valid,test}/<NNN.Class_name>/<image>.
"""

from __future__ import annotations

import itertools
import json
import os
import random
import shutil
import zipfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from ec2train.errors import UserError
from ec2train.preprocess import ImageDecodeError, load_rgb

SPLITS = ("train", "valid", "test")
IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp"}
LOADER_SEED_TAG = 0x10AD  # keeps the loader's stream apart from the sampler's (seed, epoch) ones
DOG_IMAGES_URL = "https://s3-us-west-1.amazonaws.com/udacity-aind/dog-project/dogImages.zip"


class DataError(UserError):
    """The data set is missing, laid out wrongly, or cannot be fetched."""


class CorruptImageError(DataError):
    """One image cannot be decoded; the message names its path."""


def class_name(folder: str) -> str:
    """'001.Affenpinscher' -> 'Affenpinscher'; '124.Poodle' -> 'Poodle'; 'Great_Dane' -> 'Great Dane'."""
    head, dot, rest = folder.partition(".")
    name = rest if dot and head.isdigit() and rest else folder
    return name.replace("_", " ").strip()


def _images_in(folder: Path) -> list[Path]:
    return sorted(
        p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTS and not p.name.startswith(".")
    )


def class_folders(split_dir: Path) -> list[str]:
    return sorted(p.name for p in split_dir.iterdir() if p.is_dir() and not p.name.startswith("."))


def scan_split(
    root: str | Path, split: str, classes: Sequence[str] | None = None
) -> tuple[list[str], list[tuple[Path, int]]]:
    """(class folders, [(image path, label)]) for one split; labels follow `classes` when given."""
    split_dir = Path(root) / split
    if not split_dir.is_dir():
        raise DataError(f"missing split folder {split_dir}; expected {Path(root)}/{{train,valid,test}}/<class>/<image>")
    folders = list(classes) if classes is not None else class_folders(split_dir)
    samples = []
    for label, folder in enumerate(folders):
        d = split_dir / folder
        if d.is_dir():
            samples.extend((p, label) for p in _images_in(d))
    return folders, samples


@dataclass
class SplitReport:
    images: int = 0
    classes: int = 0
    empty_classes: list[str] = field(default_factory=list)


@dataclass
class DataReport:
    root: Path
    splits: dict[str, SplitReport] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    corrupt: list[str] = field(default_factory=list)
    class_folders: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems and not self.corrupt


def check_dataset(
    root: str | Path,
    splits: Sequence[str] = SPLITS,
    decode: bool = False,
    on_image: Callable[[], None] | None = None,
) -> DataReport:
    """Every layout problem (and with decode=True every unreadable image) in one report."""
    root = Path(root)
    report = DataReport(root=root)
    if not root.is_dir():
        report.problems.append(
            f"data folder {root} does not exist (run `ec2train data fetch` or `ec2train data demo {root}`)"
        )
        return report
    listed: dict[str, list[str]] = {}
    for split in splits:
        split_dir = root / split
        if not split_dir.is_dir():
            report.problems.append(f"missing split '{split}': no folder {split_dir}")
            continue
        folders = class_folders(split_dir)
        listed[split] = folders
        sr = SplitReport(classes=len(folders))
        if not folders:
            report.problems.append(f"split '{split}' has no class folders")
        for folder in folders:
            images = _images_in(split_dir / folder)
            sr.images += len(images)
            if not images:
                sr.empty_classes.append(folder)
                report.problems.append(f"empty class folder {split_dir / folder}")
            if decode:
                for path in images:
                    try:
                        load_rgb(path, min_side=32)
                    except ImageDecodeError as exc:
                        report.corrupt.append(f"{path}: {exc}")
                    if on_image:
                        on_image()
        report.splits[split] = sr
    reference = listed.get("train") or next(iter(listed.values()), [])
    report.class_folders = reference
    for split, folders in listed.items():
        if folders != reference and folders:
            only_here = sorted(set(folders) - set(reference))
            missing = sorted(set(reference) - set(folders))
            detail = "; ".join(
                part
                for part in (
                    f"not in train: {', '.join(only_here[:5])}" if only_here else "",
                    f"missing: {', '.join(missing[:5])}" if missing else "",
                )
                if part
            )
            report.problems.append(f"split '{split}' has different classes from 'train' ({detail})")
    return report


def require_dataset(root: str | Path, splits: Sequence[str] = SPLITS) -> list[str]:
    """Fail fast (before any training) on a bad layout; returns the class folders."""
    report = check_dataset(root, splits)
    if report.problems and looks_unsplit(root):
        raise DataError(
            f"missing split 'train': {root} holds class folders, not train/ valid/ test/; "
            f"split it with `ec2train data split {root} {root}-split`, then train with --data {root}-split"
        )
    if report.problems:
        more = (
            f" (and {len(report.problems) - 1} more; run `ec2train data check {root}`)"
            if len(report.problems) > 1
            else ""
        )
        raise DataError(report.problems[0] + more)
    return report.class_folders


def looks_unsplit(root: str | Path) -> bool:
    """A folder of class folders with images (no split folders): what `split_dataset` takes."""
    root = Path(root)
    if not root.is_dir() or any((root / s).is_dir() for s in SPLITS):
        return False
    return any(_images_in(root / folder) for folder in class_folders(root))


@dataclass
class SplitResult:
    root: Path
    counts: dict[str, dict[str, int]]  # split -> class folder -> images
    copied: int  # files copied because a hard link was not possible (or mode="copy")


def split_dataset(
    src: str | Path, dst: str | Path, valid: float = 0.1, test: float = 0.1, seed: int = 0, mode: str = "link"
) -> SplitResult:
    """Split SRC/<class>/<image> into DST/{train,valid,test}/<class>/<image>, stratified per class.

    Deterministic for a given seed; every class gets at least one image in each split. Images are
    hard-linked (copied where the file system cannot link) or, with mode="copy", copied. DST is
    built in a temp folder beside it and renamed, and never overwritten.
    """
    src, dst = Path(src), Path(dst)
    plan = _split_plan(src, dst, valid, test, seed, mode)
    tmp = dst.parent / f".{dst.name}.splitting-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    counts: dict[str, dict[str, int]] = {split: {} for split in SPLITS}
    copied = 0
    try:
        for split, folder, images in plan:
            (tmp / split / folder).mkdir(parents=True)
            for image in images:
                copied += _link_or_copy(image, tmp / split / folder / image.name, mode)
            counts[split][folder] = len(images)
        if dst.exists():  # made by someone else while we worked
            raise DataError(f"{dst} already exists; pick a new DST (data split never overwrites)")
        os.replace(tmp, dst)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return SplitResult(dst, counts, copied)


def _split_plan(
    src: Path, dst: Path, valid: float, test: float, seed: int, mode: str
) -> list[tuple[str, str, list[Path]]]:
    """[(split, class folder, images)], after checking the arguments; writes nothing."""
    if mode not in ("link", "copy"):
        raise DataError(f"mode {mode!r}: use 'link' or 'copy'")
    if not (0 < valid < 1 and 0 < test < 1 and valid + test < 1):
        raise DataError(f"--valid {valid} --test {test}: each must be above 0, and together below 1")
    if dst.exists():
        raise DataError(f"{dst} already exists; pick a new DST (data split never overwrites)")
    if not looks_unsplit(src):
        why = (
            "is already split (it has train/ valid/ test/)"
            if any((src / s).is_dir() for s in SPLITS)
            else "holds no class folders with images"
        )
        raise DataError(f"{src} {why}; data split takes SRC/<class>/<image>")
    plan = []
    for folder in class_folders(src):
        images = _images_in(src / folder)
        if not images:
            continue
        if len(images) < 3:
            raise DataError(f"class {folder} has {len(images)} images; each class needs at least 3 (one per split)")
        random.Random(f"{seed}:{folder}").shuffle(images)  # str seed: the same on every Python
        n = len(images)  # at least one image each for valid and test, and one left for train
        n_valid = min(max(1, int(n * valid + 0.5)), n - 2)
        n_test = min(max(1, int(n * test + 0.5)), n - 1 - n_valid)
        parts = {
            "valid": images[:n_valid],
            "test": images[n_valid : n_valid + n_test],
            "train": images[n_valid + n_test :],
        }
        plan.extend((split, folder, sorted(parts[split])) for split in SPLITS)
    return plan


def _link_or_copy(src: Path, dst: Path, mode: str) -> int:
    """1 if the file was copied, 0 if hard-linked."""
    if mode == "link":
        try:
            os.link(src, dst)
            return 0
        except OSError:  # another file system (EXDEV) or one without hard links
            pass
    shutil.copy2(src, dst)
    return 1


def mix_seed(*parts: int) -> int:
    """A well-spread 63-bit seed from small integers (seed, epoch, index)."""
    h = 0x243F6A8885A308D3
    for p in parts:
        h = (h ^ (p & 0xFFFFFFFFFFFFFFFF)) * 0x100000001B3 & 0xFFFFFFFFFFFFFFFF
        h ^= h >> 29
    return h & 0x7FFFFFFFFFFFFFFF


class ImageDataset(Dataset):
    """Images and labels; keys may carry a per-sample seed so augmentation is reproducible.

    A key `(index, seed)` makes the random transform of that sample a function of the seed
    alone, whatever the number of workers or processes and across a resume.
    """

    def __init__(self, samples: Sequence[tuple[Path, int]], transform, min_side: int | None = None):
        self.samples = list(samples)
        self.transform = transform
        self.min_side = min_side

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, key):
        index, seed = key if isinstance(key, tuple) else (key, None)
        path, label = self.samples[index]
        try:
            img = load_rgb(path, min_side=self.min_side)
        except ImageDecodeError as exc:
            raise CorruptImageError(
                f"cannot decode image {path} ({exc}); remove or replace it (list all with `ec2train data check`)"
            ) from None
        if seed is None:
            return self.transform(img), label
        # The CPU generator alone (what the transforms draw from), restored afterwards:
        # torch.manual_seed would also queue seeds for every accelerator backend, formatting a
        # stack trace each time (a third of the loader's time on small images).
        state = torch.random.get_rng_state()
        torch.random.default_generator.manual_seed(seed)
        try:
            return self.transform(img), label
        finally:
            torch.random.set_rng_state(state)


class TrainSampler(Sampler):
    """Shuffled, sharded over ranks (disjoint; padded by wrap-around so every rank steps equally).

    Yields (index, per-sample seed). Shuffling depends on (seed, epoch) only: call set_epoch.
    With batch_size > 1, a shard that would end in a batch of one image leaves that image out
    (a different one each epoch): BatchNorm cannot train on a batch of one.
    """

    def __init__(self, n: int, rank: int = 0, world: int = 1, seed: int = 0, shuffle: bool = True, batch_size: int = 0):
        self.n, self.rank, self.world, self.seed, self.shuffle = n, rank, world, seed, shuffle
        self.batch_size = batch_size
        self.epoch = 0
        self.idle = False  # yields nothing while set (start_workers)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def indices(self) -> list[int]:
        if self.shuffle:
            g = torch.Generator().manual_seed(mix_seed(self.seed, self.epoch))
            order = torch.randperm(self.n, generator=g).tolist()
        else:
            order = list(range(self.n))
        total = -(-self.n // self.world) * self.world
        order += order[: total - self.n]
        return order[self.rank :: self.world][: len(self)]

    def __iter__(self) -> Iterator[tuple[int, int]]:
        if self.idle:
            return
        for i in self.indices():
            yield i, mix_seed(self.seed, self.epoch, i)

    def __len__(self) -> int:
        shard = -(-self.n // self.world)
        return shard - 1 if self.batch_size > 1 and shard > 1 and shard % self.batch_size == 1 else shard


class EvalSampler(Sampler):
    """Disjoint shards with no padding, so metrics summed over ranks count every image once."""

    def __init__(self, n: int, rank: int = 0, world: int = 1):
        self.n, self.rank, self.world = n, rank, world

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, self.n, self.world))

    def __len__(self) -> int:
        return len(range(self.rank, self.n, self.world))


class SplitSampler(Sampler):
    """EvalSampler over one split at a time of a data set that holds several, one after the
    other (`sizes`, in order). One loader, and so one set of persistent workers, then serves
    the valid split every epoch and the test split at the end, instead of forking new workers
    for the test pass. `use(split)` picks the split the next pass reads."""

    def __init__(self, sizes: dict[str, int], rank: int = 0, world: int = 1):
        starts = itertools.accumulate(sizes.values(), initial=0)
        self.ranges = {name: range(start, start + n) for (name, n), start in zip(sizes.items(), starts)}
        self.rank, self.world = rank, world
        self.split = next(iter(sizes))
        self.idle = False  # yields nothing while set (start_workers)

    def use(self, split: str) -> None:
        self.split = split

    def __iter__(self) -> Iterator[int]:
        return iter(() if self.idle else self.ranges[self.split][self.rank :: self.world])

    def __len__(self) -> int:
        return len(self.ranges[self.split][self.rank :: self.world])


def start_workers(loader: DataLoader) -> None:
    """Fork the loader's persistent workers now, with nothing to load (its sampler, a
    TrainSampler or SplitSampler, is idle meanwhile); the next pass reuses them.

    A process forked later shares every page of the trainer's heap copy-on-write, so the
    trainer then pays a page fault for each page it writes again: forked after the model and a
    first epoch, 60-85 thousand faults, 0.4-0.8 s of system time in the next step (resnet18 at
    64 px, batch 32, on this project's 2-CPU build VM). Forked before the model exists, they
    share little that the trainer writes."""
    if loader.num_workers == 0:
        return
    sampler = loader.sampler
    if not hasattr(sampler, "idle"):
        raise TypeError(f"start_workers needs a sampler that can be idle (TrainSampler, SplitSampler), not {sampler!r}")
    sampler.idle = True
    try:
        iter(loader)  # workers start; the empty pass ends at once and they wait for the next
    finally:
        sampler.idle = False


def default_workers(cpus: int | None, procs_per_node: int) -> int:
    """Loader workers per process: the CPUs this process can use, minus one for the main loop."""
    cpus = cpus or 1
    return max(0, min(8, cpus // max(1, procs_per_node) - 1))


def make_loader(dataset: Dataset, sampler: Sampler, batch_size: int, workers: int, pin_memory: bool) -> DataLoader:
    """A DataLoader with a generator of its own, seeded from the sampler's seed.

    Without one, every new iterator draws its workers' base seed from the global RNG; a resumed
    run makes new iterators where an uninterrupted one reuses its persistent workers, so the
    global RNG (dropout) would drift and resume would not be bit-exact. Worker seeds do not
    change the samples: each sample's augmentation is seeded by (seed, epoch, index).
    """
    generator = torch.Generator().manual_seed(mix_seed(getattr(sampler, "seed", 0), LOADER_SEED_TAG))
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=workers,
        pin_memory=pin_memory,
        persistent_workers=workers > 0,
        prefetch_factor=4 if workers > 0 else None,
        generator=generator,
    )


# ---------------------------------------------------------------- demo data

DEMO_SHAPES = ("Circle", "Square", "Triangle", "Cross", "Stripes", "Ring", "Diamond", "Dots")


def _draw_demo(cls: int, size: int, rng: random.Random):
    from PIL import Image, ImageDraw

    # Each class: its own shape and hue family; position, scale, shade and background vary.
    hue = (cls * 360 // 8 + rng.randint(-12, 12)) % 360
    fg = tuple(int(c) for c in _hsv(hue, 0.8, rng.uniform(0.7, 1.0)))
    bg = tuple(rng.randint(0, 90) for _ in range(3))
    img = Image.new("RGB", (size, size), bg)
    d = ImageDraw.Draw(img)
    r = rng.uniform(0.25, 0.42) * size
    cx, cy = rng.uniform(r, size - r), rng.uniform(r, size - r)
    box = [cx - r, cy - r, cx + r, cy + r]
    shape = DEMO_SHAPES[cls % len(DEMO_SHAPES)]
    w = max(2, size // 10)
    if shape == "Circle":
        d.ellipse(box, fill=fg)
    elif shape == "Square":
        d.rectangle(box, fill=fg)
    elif shape == "Triangle":
        d.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fg)
    elif shape == "Cross":
        d.rectangle([cx - r, cy - w, cx + r, cy + w], fill=fg)
        d.rectangle([cx - w, cy - r, cx + w, cy + r], fill=fg)
    elif shape == "Stripes":
        for x in range(0, size, 2 * w):
            d.rectangle([x, 0, x + w - 1, size], fill=fg)
    elif shape == "Ring":
        d.ellipse(box, outline=fg, width=w)
    elif shape == "Diamond":
        d.polygon([(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)], fill=fg)
    else:
        for _ in range(6):
            x, y = rng.uniform(0, size), rng.uniform(0, size)
            d.ellipse([x - w, y - w, x + w, y + w], fill=fg)
    return img


def _hsv(h: float, s: float, v: float) -> tuple[float, float, float]:
    import colorsys

    return tuple(255 * c for c in colorsys.hsv_to_rgb(h / 360, s, v))


def make_demo_dataset(
    root: str | Path,
    classes: int = 4,
    per_class: int = 40,
    size: int = 64,
    seed: int = 0,
    eval_per_class: int | None = None,
    force: bool = False,
) -> Path:
    """A small learnable data set in the dogImages layout (JPEGs; classes differ by content).

    Idempotent: the same call on an existing demo folder does nothing. Written to a temp
    folder and renamed, so an interrupted run never leaves a half-made data set.
    """
    if not 2 <= classes <= len(DEMO_SHAPES):
        raise DataError(f"--classes {classes}: must be between 2 and {len(DEMO_SHAPES)}")
    if per_class < 1 or size < 16:
        raise DataError("--per-class must be at least 1 and --size at least 16")
    root = Path(root)
    eval_n = eval_per_class if eval_per_class is not None else max(3, per_class // 4)
    params = {"classes": classes, "per_class": per_class, "size": size, "seed": seed, "eval_per_class": eval_n}
    marker = root / ".ec2train-demo.json"
    if root.exists():
        if marker.is_file() and json.loads(marker.read_text()) == params and not force:
            return root
        if not force and (any(root.iterdir()) if root.is_dir() else True):
            raise DataError(f"{root} already exists and is not this demo data set; pass --force to replace it")
    tmp = root.with_name(f".{root.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    rng = random.Random(seed)
    for split, n in (("train", per_class), ("valid", eval_n), ("test", eval_n)):
        for c in range(classes):
            folder = tmp / split / f"{c + 1:03d}.{DEMO_SHAPES[c]}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                _draw_demo(c, size, rng).save(folder / f"{DEMO_SHAPES[c]}_{split}_{i:04d}.jpg", quality=90)
    (tmp / marker.name).write_text(json.dumps(params))
    if root.exists():
        shutil.rmtree(root)
    root.parent.mkdir(parents=True, exist_ok=True)
    os.replace(tmp, root)
    return root


# ---------------------------------------------------------------- fetch


def _download_http(url: str, part: Path, progress: Callable[[int, int | None], None] | None, timeout: float) -> None:
    """Download to `part`, resuming a previous partial download with an HTTP Range request."""
    import http.client
    import urllib.error
    import urllib.request

    have = part.stat().st_size if part.exists() else 0
    req = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
    try:
        resp = urllib.request.build_opener(_redirect_handler()).open(req, timeout=timeout)
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and have:  # already complete
            return
        raise DataError(f"download of {url} failed: HTTP {exc.code} {exc.reason}") from None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise DataError(
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
        raise DataError(
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
    """What an archive may expand to; checked from its directory before anything is written.

    dogImages.zip: 1.1 GB -> 1.1 GB (JPEGs do not compress), about 8,500 entries.
    """

    max_bytes: int = 64 << 30  # uncompressed total
    max_entries: int = 200_000
    max_ratio: float = 100.0  # uncompressed / compressed, for any entry over 1 MiB and for the whole
    disk_margin: int = 1 << 30  # left free after unpacking


def _member_problem(member: zipfile.ZipInfo, dest: Path) -> str | None:
    """Why one entry cannot be unpacked as a plain file or folder under dest (None: it can)."""
    import stat

    mode = member.external_attr >> 16
    if stat.S_ISLNK(mode):
        return "is a symbolic link"
    if stat.S_IFMT(mode) not in (0, stat.S_IFREG, stat.S_IFDIR):  # 0: no type recorded (writestr, Windows)
        return "is not a plain file or folder"
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
    for member in members:
        problem = _member_problem(member, dest)
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


def check_free_disk(zf: zipfile.ZipFile, dest: Path, limits: UnpackLimits = UnpackLimits()) -> None:
    total = sum(m.file_size for m in zf.infolist())
    free = shutil.disk_usage(dest.parent).free
    if total + limits.disk_margin > free:
        raise DataError(
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

        with open(archive, "rb") as f:
            digest = hashlib.file_digest(f, "sha256").hexdigest()
        if digest != sha256.strip().lower():
            archive.unlink()
            raise DataError(
                f"{url} has sha256 {digest}, not the expected {sha256} (deleted the download); check the URL and --sha256"
            )
    if not zipfile.is_zipfile(archive):
        archive.unlink()
        raise DataError(f"{url} is not a zip archive (deleted the download); check the URL")


def _unpack(archive: Path, target: Path, limits: UnpackLimits) -> None:
    """Unpack into a temp folder beside target, then rename its dogImages-layout root to target."""
    tmp = target.parent / f".{target.name}.unpacking"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        with zipfile.ZipFile(archive) as zf:
            try:
                check_archive(zf, tmp, limits)
            except DataError as exc:  # hostile or broken: a rerun must not reuse it
                archive.unlink()
                raise DataError(f"{exc} (deleted the download)") from None
            check_free_disk(zf, tmp, limits)  # the archive stays: free space and rerun
            bad = zf.testzip()
            if bad is not None:
                archive.unlink()
                raise DataError(f"{archive} is corrupt (bad CRC in {bad}); deleted it, run the fetch again")
            try:
                zf.extractall(tmp)
            except OSError as exc:  # the disk filled meanwhile, permissions, ...
                raise DataError(f"cannot unpack {archive.name} into {target.parent}: {exc.strerror or exc}") from None
        os.replace(_find_layout_root(tmp), target)
    except zipfile.BadZipFile as exc:
        raise DataError(f"{archive} is not a readable zip ({exc}); delete it and run the fetch again") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # partial output never stays behind
