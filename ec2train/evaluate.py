"""`ec2train evaluate`: a model file's accuracy, per class, and its confusion matrix on one split."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ec2train import ddp, hw
from ec2train.data import EvalSampler, eval_dataset, make_loader, scan_split
from ec2train.errors import UserError
from ec2train.loop import StepContext, evaluate
from ec2train.model import model_from_file


def evaluate_model_file(
    model_path: str | Path,
    data: str | Path,
    split: str = "test",
    batch_size: int = 64,
    workers: int = 0,
    device: str = "auto",
) -> dict[str, Any]:
    """Top-1/top-5, per-class accuracy and the confusion matrix of a model file on one split."""
    net, meta = model_from_file(model_path)
    folders = meta.get("class_folders") or meta["class_names"]
    found, samples = scan_split(data, split)
    if sorted(found) != sorted(folders):
        raise UserError(
            f"the classes in {Path(data) / split} differ from the model's {len(folders)} classes; "
            "evaluate on the data set the model was trained on"
        )
    _, samples = scan_split(data, split, folders)
    dev = ddp.select_device(device, 0, hw.cuda_device_count())
    ctx = StepContext(dev, hw.amp_policy("off", dev.split(":")[0]), False, normalization=(meta["mean"], meta["std"]))
    ds = eval_dataset(samples, meta["image_size"])
    loader = make_loader(ds, EvalSampler(len(ds)), batch_size, workers, hw.use_pin_memory(dev.split(":")[0]))
    summary, confusion = evaluate(net.to(dev), loader, ctx, meta["num_classes"])
    totals = confusion.sum(dim=1)
    per_class = {
        name: (float(confusion[i, i] / totals[i]) if totals[i] else None) for i, name in enumerate(meta["class_names"])
    }
    return {
        "split": split,
        **summary,
        "per_class_acc1": per_class,
        "confusion": confusion.long().tolist(),
        "class_names": meta["class_names"],
    }
