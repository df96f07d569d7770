"""Data sets: layout check and split (layout), datasets, samplers and loaders (loaders), demo
data (demo), and getting dogImages onto the box (fetch).

Layout (as in dogImages): ROOT/{train,valid,test}/<NNN.Class_name>/<image>. The public names
are importable from here: `from ec2train.data import make_loader`.
"""

from ec2train.data.demo import DEMO_SHAPES, make_demo_dataset
from ec2train.data.fetch import (
    DOG_IMAGES_URL,
    UnpackLimits,
    check_archive,
    check_free_disk,
    check_redirect,
    fetch_dataset,
)
from ec2train.data.layout import (
    IMAGE_EXTS,
    SPLITS,
    CorruptImageError,
    DataError,
    DataReport,
    SplitReport,
    SplitResult,
    check_dataset,
    class_folders,
    class_name,
    class_names,
    looks_unsplit,
    require_dataset,
    scan_split,
    split_dataset,
)
from ec2train.data.loaders import (
    LOADER_SEED_TAG,
    EvalSampler,
    ImageDataset,
    SplitSampler,
    TrainSampler,
    default_workers,
    eval_dataset,
    make_loader,
    mix_seed,
    start_workers,
    train_dataset,
)

__all__ = [
    "DEMO_SHAPES",
    "DOG_IMAGES_URL",
    "IMAGE_EXTS",
    "LOADER_SEED_TAG",
    "SPLITS",
    "CorruptImageError",
    "DataError",
    "DataReport",
    "EvalSampler",
    "ImageDataset",
    "SplitReport",
    "SplitResult",
    "SplitSampler",
    "TrainSampler",
    "UnpackLimits",
    "check_archive",
    "check_dataset",
    "check_free_disk",
    "check_redirect",
    "class_folders",
    "class_name",
    "class_names",
    "default_workers",
    "eval_dataset",
    "fetch_dataset",
    "looks_unsplit",
    "make_demo_dataset",
    "make_loader",
    "mix_seed",
    "require_dataset",
    "scan_split",
    "split_dataset",
    "start_workers",
    "train_dataset",
]
