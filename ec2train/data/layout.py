"""The data set's layout (as in dogImages: ROOT/{train,valid,test}/<NNN.Class_name>/<image>):
class names, scanning a split, checking the whole layout, and splitting an unsplit folder."""

from __future__ import annotations

import difflib
import itertools
import os
import random
import shutil
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ec2train.errors import UserError
from ec2train.files import disk_full_error, human_bytes, is_disk_full
from ec2train.names import name_problem, printable
from ec2train.preprocess import ImageDecodeError, load_rgb

SPLITS = ("train", "valid", "test")
IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp"}


class DataError(UserError):
    """The data set is missing, laid out wrongly, or cannot be fetched."""


class CorruptImageError(DataError):
    """One image cannot be decoded; the message names its path."""


def class_name(folder: str) -> str:
    """'001.Affenpinscher' -> 'Affenpinscher'; '124.Poodle' -> 'Poodle'; 'Great_Dane' -> 'Great Dane'."""
    head, dot, rest = folder.partition(".")
    name = rest if dot and head.isdigit() and rest else folder
    return name.replace("_", " ").strip()


def class_names(folders: Sequence[str]) -> list[str]:
    """The classes' readable names, one per folder and all different: where two folders read the
    same ('001.Poodle', '002.Poodle'), those two keep their folder names, so no answer, plot cell
    or per-class figure stands for two classes."""
    names = [class_name(f) for f in folders]
    seen = Counter(names)
    return [f if seen[n] > 1 else n for n, f in zip(names, folders)]


def folder_problem(folder: str) -> str | None:
    """Why a class folder's name cannot name a class (see `names.name_problem`), or None."""
    return name_problem(folder) or ("gives an empty class name" if not class_name(folder) else None)


def _name_problems(root: Path, listed: dict[str, list[str]]) -> list[str]:
    """One line per class folder whose name is unsafe, naming it and the fix (once for all splits)."""
    where: dict[str, list[str]] = {}
    for split, folders in listed.items():
        for folder in folders:
            where.setdefault(folder, []).append(split)
    lines = []
    for folder, splits in sorted(where.items()):
        problem = folder_problem(folder)
        if problem:
            lines.append(
                f"class folder {printable(root / splits[0] / folder)} {problem}; rename it "
                f"(in {', '.join(s + '/' for s in splits)}) to a name of letters, digits, spaces and . _ -"
            )
    return lines


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
    samples: list[tuple[Path, int]] = []
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
        report.problems.append(missing_root_problem(root))
        return report
    listed: dict[str, list[str]] = {}
    for split in splits:
        split_dir = root / split
        if not split_dir.is_dir():
            report.problems.append(f"missing split '{split}': no folder {split_dir}; {_make_split_hint(root)}")
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
                report.problems.append(f"empty class folder {printable(split_dir / folder)}")
            if decode:
                for path in images:
                    try:
                        load_rgb(path, min_side=32)
                    except ImageDecodeError as exc:
                        report.corrupt.append(printable(f"{path}: {exc}"))
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
                    f"not in train: {printable(', '.join(only_here[:5]))}" if only_here else "",
                    f"missing: {printable(', '.join(missing[:5]))}" if missing else "",
                )
                if part
            )
            report.problems.append(f"split '{split}' has different classes from 'train' ({detail})")
    report.problems[:0] = _name_problems(root, listed)  # first: fit's one line names this one
    return report


DEFAULT_ROOT = "dogImages"  # fit's --data default, and where `ec2train data fetch` unpacks


def missing_root_problem(root: Path) -> str:
    """A data folder that is not there: the folder beside it with a close name (a typo), else how
    to get one (the demo data set offered as a demo, not under the missing name)."""
    problem = f"data folder {root} does not exist"
    parent = root.parent
    if parent.is_dir() and root.name:
        try:
            with os.scandir(parent) as entries:  # the first 10,000 entries: a bound on a huge folder
                siblings = [e.name for e in itertools.islice(entries, 10_000) if e.is_dir() and e.name[:1] != "."]
        except OSError:
            siblings = []
        close = difflib.get_close_matches(root.name, siblings, n=1, cutoff=0.75)
        if close:
            return f"{problem}; did you mean --data {parent / close[0]}?"
    get = (
        "download dogImages with `ec2train data fetch`"
        if root.name == DEFAULT_ROOT
        else "`ec2train data fetch --dest DIR` downloads dogImages"
    )
    return (
        f"{problem}: {get}, or pass --data DIR, a folder with train/ valid/ test/ class folders "
        "(`ec2train data demo demo-data` writes a small demo set to try)"
    )


def _make_split_hint(root: Path) -> str:
    if (root / "train").is_dir():
        return f"`ec2train data split {root / 'train'} {root}-split` divides the train images into train/ valid/ test/"
    return f"`ec2train data split SRC {root}` makes train/ valid/ test/ from a folder of class folders"


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
    try:
        plan = _split_plan(src, dst, valid, test, seed, mode)
    except OSError as exc:  # an unreadable folder in SRC
        raise _split_error(exc, src, dst, []) from None
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
    except OSError as exc:  # a full disk, an unreadable file, a DST we may not write
        shutil.rmtree(tmp, ignore_errors=True)  # first: the free space in the message is what is left
        raise _split_error(exc, src, dst, plan) from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return SplitResult(dst, counts, copied)


def _split_error(exc: OSError, src: Path, dst: Path, plan: list[tuple[str, str, list[Path]]]) -> UserError:
    """One line for what the file system refused while splitting SRC into DST."""
    import errno

    if is_disk_full(exc):
        need = sum(_file_size(image) for _, _, images in plan for image in images)
        return disk_full_error(f"cannot copy into {dst.parent}: the images need {human_bytes(need)}", dst.parent)
    where = Path(exc.filename) if exc.filename else dst
    inside_src = where == src or src in where.parents
    if exc.errno in (errno.EACCES, errno.EPERM) and inside_src:
        return DataError(
            f"cannot read {printable(where)}: {exc.strerror}; fix its permissions (chmod a+r for a file, a+rx "
            "for a folder) or move it out of SRC"
        )
    return DataError(f"cannot split {printable(src)} into {printable(dst)}: {exc.strerror or exc} ({printable(where)})")


def _file_size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:  # gone meanwhile: counts as nothing
        return 0


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
    plan: list[tuple[str, str, list[Path]]] = []
    for folder in class_folders(src):
        problem = folder_problem(folder)
        if problem:
            raise DataError(f"class folder {printable(src / folder)} {problem}; rename it before splitting")
        images = _images_in(src / folder)
        if not images:
            continue
        if len(images) < 3:
            raise DataError(
                f"class {printable(folder)} has {len(images)} images; each class needs at least 3 (one per split)"
            )
        _inside(src, images)
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


def _inside(src: Path, images: list[Path]) -> None:
    """Refuse an image whose path leads out of SRC through a symbolic link (a linked file or
    class folder): data split reads only what SRC holds. Links within SRC are followed."""
    root = src.resolve()
    for image in images:
        real = image.resolve()
        if root not in real.parents:
            raise DataError(
                f"{printable(image)} leads to {printable(real)}, outside {printable(src)} (a symbolic link); "
                "data split reads only files inside SRC: replace the link with a copy of its file (cp -L) or remove it"
            )


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
