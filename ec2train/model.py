"""Build torchvision classifiers, replace their head, freeze the backbone, read model files.

Imports only torch and torchvision: this module ships inside the SageMaker model package,
so the endpoint rebuilds the network from model.pth exactly as training built it.
"""

from __future__ import annotations

import difflib
import math
import re
import zipfile
from pathlib import Path
from typing import Any

import torch
import torchvision.models as tvm
from torch import nn

from ec2train.errors import UserError
from ec2train.preprocess import IMAGENET_MEAN, IMAGENET_STD

MODEL_FORMAT = "ec2train.model/1"
MODEL_FILE = "model.pth"  # the model file's name in a run's output folder and in model.tar.gz
REQUIRED_KEYS = ("format", "state_dict", "arch", "num_classes", "class_names", "image_size", "mean", "std")
# What a model file may say, checked before anything is built from it: the image sizes `fit`
# accepts (config.py's --image-size range), and more classes than any classifier has (ImageNet-21k
# has 21,841): a head is num_classes x features floats, allocated before its weights are loaded.
MIN_IMAGE_SIZE, MAX_IMAGE_SIZE = 16, 1024
MAX_CLASSES = 100_000


class ModelError(UserError):
    """An unknown architecture, unavailable weights or an unusable model file."""


def classification_archs() -> list[str]:
    return sorted(tvm.list_models(module=tvm))


def _check_arch(arch: str) -> None:
    archs = classification_archs()
    if arch not in archs:
        close = difflib.get_close_matches(arch, archs, n=3)
        hint = f" Did you mean {', '.join(close)}?" if close else " See `ec2train archs` for the list."
        raise ModelError(f"unknown --arch '{arch}': not a torchvision classification model.{hint}")


def find_head(model: nn.Module) -> tuple[str, nn.Module]:
    """The final classifier layer, whatever the architecture calls it (fc, classifier.N, heads.head...)."""
    last: tuple[str, nn.Module] | None = None
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) or (
            isinstance(module, nn.Conv2d) and module.kernel_size == (1, 1) and name.startswith("classifier")
        ):
            last = (name, module)
    if last is None:
        raise ModelError(f"cannot find a classifier layer in {type(model).__name__}")
    return last


def _set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def replace_head(model: nn.Module, num_classes: int) -> str:
    name, old = find_head(model)
    if isinstance(old, nn.Linear):
        new: nn.Module = nn.Linear(old.in_features, num_classes)
    else:  # squeezenet-style 1x1 conv classifier
        new = nn.Conv2d(old.in_channels, num_classes, kernel_size=1)
    _set_submodule(model, name, new)
    if hasattr(model, "num_classes"):
        model.num_classes = num_classes
    return name


def imagenet_weights(arch: str):
    """torchvision's default ImageNet weights enum for `arch` (no download yet)."""

    try:
        return tvm.get_model_weights(arch).DEFAULT
    except (ValueError, KeyError, AttributeError) as exc:
        raise ModelError(f"torchvision has no ImageNet weights for '{arch}'; use --weights none") from exc


def normalization_for(arch: str, weights: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Mean/std of the chosen weights (every torchvision ImageNet weight uses the ImageNet values)."""
    _check_arch(arch)
    if weights == "imagenet":
        tf = imagenet_weights(arch).transforms()
        return tuple(tf.mean), tuple(tf.std)
    return IMAGENET_MEAN, IMAGENET_STD


# Auxiliary classifiers (GoogLeNet, Inception v3) make the model return a tuple while training,
# which fit's loss cannot take; torchvision drops them when asked (pretrained weights too).
AUX_HEADS = {"googlenet": ("aux1.", "aux2."), "inception_v3": ("AuxLogits.",)}


def without_aux_heads(arch: str, state: dict[str, Any]) -> dict[str, Any]:
    """`state` without the auxiliary classifiers' tensors (older model files of these archs have them)."""
    prefixes = AUX_HEADS.get(arch, ())
    return {k: v for k, v in state.items() if not k.startswith(prefixes)} if prefixes else state


def build_model(arch: str, num_classes: int, weights: str = "none") -> nn.Module:
    """A torchvision model with a `num_classes` head. weights: imagenet | none | path to a file."""

    _check_arch(arch)
    options: dict[str, Any] = {"aux_logits": False} if arch in AUX_HEADS else {}
    if weights == "imagenet":
        w = imagenet_weights(arch)
        try:
            model = tvm.get_model(arch, weights=w, **options)
        except Exception as exc:  # urllib/ssl/socket errors differ by platform; all mean "no download"
            raise ModelError(
                f"cannot download ImageNet weights for {arch} ({type(exc).__name__}: {exc}). "
                "Offline? Pass --weights none, or --weights PATH to a local .pth file."
            ) from exc
        replace_head(model, num_classes)
        return model
    model = tvm.get_model(arch, weights=None, **options)
    if weights in ("none", "", None):
        replace_head(model, num_classes)
        return model
    return _load_backbone_file(model, Path(weights), num_classes, arch)


def _load_backbone_file(model: nn.Module, path: Path, num_classes: int, arch: str = "") -> nn.Module:
    """Start from a local checkpoint: a torchvision state_dict or an ec2train model file."""
    if not path.is_file():
        raise ModelError(f"--weights {path}: no such file. Use imagenet, none, or a path to a .pth file.")
    obj = _torch_load(path)
    state = obj.get("state_dict", obj) if isinstance(obj, dict) else None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ModelError(f"--weights {path}: not a state_dict or ec2train model file")
    head_name, _ = find_head(model)
    state = {
        k: v for k, v in without_aux_heads(arch, clean_state_dict(state)).items() if not k.startswith(head_name + ".")
    }
    missing, unexpected = model.load_state_dict(state, strict=False)
    real_missing = [k for k in missing if not k.startswith(head_name + ".")]
    if real_missing or unexpected:
        raise ModelError(
            f"--weights {path} does not fit this --arch: {len(real_missing)} missing and "
            f"{len(unexpected)} unexpected tensors (e.g. {(real_missing + list(unexpected))[:2]})"
        )
    replace_head(model, num_classes)
    return model


def clean_state_dict(state: dict[str, Any]) -> dict[str, Any]:
    """Drop the prefixes DDP (`module.`) and torch.compile (`_orig_mod.`) add."""
    out = {}
    for key, value in state.items():
        while key.startswith(("module.", "_orig_mod.")):
            key = key.split(".", 1)[1]
        out[key] = value
    return out


def freeze_backbone(model: nn.Module) -> str:
    """Train the head only; returns the head's module name."""
    head_name, head = find_head(model)
    for p in model.parameters():
        p.requires_grad_(False)
    for p in head.parameters():
        p.requires_grad_(True)
    return head_name


def _first_line(exc: Exception) -> str:

    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc))
    line = text.splitlines()[0] if text else type(exc).__name__
    return line[:160]


def _torch_load(path: Path) -> Any:
    if not zipfile.is_zipfile(path):
        raise ModelError(f"{path} is not a PyTorch file; pass a model.pth written by `ec2train fit`")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle, zip and unpickling-policy errors all mean "not ours"
        raise ModelError(
            f"cannot read {path} ({_first_line(exc)}). "
            "Is it a model file written by `ec2train fit`? (untrusted pickles are refused)"
        ) from exc


def _refuse_checkpoint(path: Path, obj: dict[str, Any]) -> None:
    """A training checkpoint (last.pt) where a model file belongs: name the model file beside it."""
    # Any version of checkpoint.CHECKPOINT_FORMAT (not imported: checkpoint imports this module).
    if str(obj.get("format", "")).startswith("ec2train.checkpoint/"):
        raise ModelError(
            f"{path} is a training checkpoint (for --resume), not a model file; "
            f"pass the model file beside it: --model {path.with_name(MODEL_FILE)}"
        )


def read_model_file(path: str | Path) -> dict[str, Any]:
    """Load and validate an ec2train model file (weights_only=True: no code can run)."""
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"no model file at {path}; train one with `ec2train fit` or pass --model PATH")
    obj = _torch_load(path)
    if isinstance(obj, dict) and obj.get("format") != MODEL_FORMAT:
        _refuse_checkpoint(path, obj)
    if not isinstance(obj, dict) or obj.get("format") != MODEL_FORMAT:
        raise ModelError(
            f"{path} is not an ec2train model file (expected format {MODEL_FORMAT}); "
            "a bare state_dict has no class names or preprocessing. Re-export with `ec2train fit`."
        )
    missing = [k for k in REQUIRED_KEYS if k not in obj]
    if missing:
        raise ModelError(f"{path} is missing {', '.join(missing)}; the file is damaged or foreign")
    problem = metadata_problem(obj)
    if problem:
        raise ModelError(f"{path}: {problem}; the file is damaged or was not written by `ec2train fit`")
    return obj


def _whole(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _numbers(value: Any) -> bool:
    return (
        isinstance(value, (list, tuple))
        and len(value) == 3
        and all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in value)
    )


def metadata_problem(meta: dict[str, Any]) -> str | None:
    """What is wrong with a model file's metadata (one phrase), or None. Checks everything a reader
    builds from before it builds anything: so a crafted file costs no memory and no traceback."""
    arch, classes, names, size = meta["arch"], meta["num_classes"], meta["class_names"], meta["image_size"]
    if not isinstance(arch, str) or arch not in classification_archs():
        return f"arch {str(arch)[:60]!r} is not a torchvision classification model"
    if not _whole(classes) or not 1 <= classes <= MAX_CLASSES:
        return f"num_classes is {str(classes)[:30]}, not a whole number from 1 to {MAX_CLASSES:,}"
    if not isinstance(names, (list, tuple)) or not all(isinstance(n, str) for n in names):
        return "class_names is not a list of strings"
    if len(names) != classes:
        return f"class_names has {len(names)} entries for {classes} classes"
    if not _whole(size) or not MIN_IMAGE_SIZE <= size <= MAX_IMAGE_SIZE:
        return f"image_size is {str(size)[:30]}, not a whole number of pixels from {MIN_IMAGE_SIZE} to {MAX_IMAGE_SIZE}"
    if not _numbers(meta["mean"]) or not _numbers(meta["std"]) or min(meta["std"]) <= 0:
        return "mean and std are not 3 finite numbers each (std above 0)"
    state = meta["state_dict"]
    if not isinstance(state, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
    ):
        return "state_dict is not a mapping of names to tensors"
    return _shape_problem(arch, classes, without_aux_heads(arch, state))


def _shape_problem(arch: str, num_classes: int, state: dict[str, torch.Tensor]) -> str | None:
    """How the weights differ from what `arch` with `num_classes` classes holds, or None. The
    network is built on the meta device: shapes only, no memory."""
    with torch.device("meta"):
        expected = build_model(arch, num_classes).state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    wrong = [k for k in expected if k in state and tuple(state[k].shape) != tuple(expected[k].shape)]
    if not (missing or unexpected or wrong):
        return None
    if wrong:
        k = wrong[0]
        example = f"{k} is {tuple(state[k].shape)}, {arch} with {num_classes} classes needs {tuple(expected[k].shape)}"
    else:
        example = f"e.g. {(missing + unexpected)[0]}"
    return (
        f"weights do not match arch {arch}: {len(missing)} missing, {len(unexpected)} unexpected and "
        f"{len(wrong)} of the wrong shape ({example})"
    )


def model_from_file(path: str | Path) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the network described by a model file, in eval mode; returns (model, metadata)."""
    meta = read_model_file(path)
    model = build_model(meta["arch"], meta["num_classes"], weights="none")
    try:
        model.load_state_dict(without_aux_heads(meta["arch"], meta["state_dict"]))
    except RuntimeError as exc:  # read_model_file compared names and shapes; a dtype can still differ
        raise ModelError(f"{path}: weights do not match arch {meta['arch']}: {str(exc).splitlines()[0]}") from exc
    model.eval()
    return model, meta
