"""The optimizer and its schedule: parameter groups (head and backbone at their own lrs, no
weight decay on biases and norms), SGD or AdamW with a fast update kernel, warm-up then cosine,
and the lr scaling rules of --scale-lr and --backbone-lr-scale."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from ec2train import hw
from ec2train.config import TrainConfig


def lr_lambda(steps_per_epoch: int, epochs: int, warmup_epochs: int) -> Callable[[int], float]:
    """Linear warm-up, then cosine decay to zero, per optimizer step."""
    total = max(1, steps_per_epoch * epochs)
    warm = steps_per_epoch * warmup_epochs

    def f(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        progress = (step - warm) / max(1, total - warm)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return f


def param_groups(model: nn.Module, head_name: str, lr: float, backbone_lr: float, weight_decay: float) -> list[dict]:
    """Head at lr, backbone at backbone_lr; no weight decay on biases and norm weights.
    Each group names its role ("head" or "backbone") so the logs can tell the two lrs apart."""
    groups: dict[tuple[bool, bool], list] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        is_head = name.startswith(head_name + ".")
        decay = p.ndim > 1
        groups.setdefault((is_head, decay), []).append(p)
    return [
        {
            "params": ps,
            "lr": lr if is_head else backbone_lr,
            "weight_decay": weight_decay if decay else 0.0,
            "role": "head" if is_head else "backbone",
        }
        for (is_head, decay), ps in groups.items()
    ]


def make_optimizer(
    name: str, groups: list[dict], lr: float, momentum: float, device_type: str
) -> torch.optim.Optimizer:
    """SGD (Nesterov) or AdamW, with the fused or multi-tensor update (hw.optimizer_kernel)
    rather than a Python loop over every parameter."""
    kernel = hw.optimizer_kernel(device_type, hw.torch_version())
    fused, foreach = (True, None) if kernel == "fused" else (None, True)  # None: torch's default
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum, nesterov=True, fused=fused, foreach=foreach)
    return torch.optim.AdamW(groups, lr=lr, fused=fused, foreach=foreach)


def group_lrs(optimizer: torch.optim.Optimizer, peak: bool = False) -> dict[str, float]:
    """{"lr": the head's lr, "lr_backbone": the backbone's (when it trains)}: now, or the
    schedule's peak (`initial_lr`, what --lr asked for) with peak=True."""
    lrs: dict[str, float] = {}
    for group in optimizer.param_groups:
        key = "lr_backbone" if group.get("role") == "backbone" else "lr"
        lrs.setdefault(key, group.get("initial_lr", group["lr"]) if peak else group["lr"])
    return lrs


def effective_lr(cfg: TrainConfig, world_size: int) -> float:
    """--scale-lr: --lr is meant for one process's batch; multiply by the number of processes."""
    return cfg.lr * world_size if cfg.scale_lr else cfg.lr


def backbone_lr(cfg: TrainConfig, lr: float) -> float:
    """--backbone-lr-scale protects pretrained features; a backbone trained from scratch
    (--weights none) has nothing to protect, so every layer trains at lr."""
    return lr * cfg.backbone_lr_scale if cfg.weights != "none" else lr
