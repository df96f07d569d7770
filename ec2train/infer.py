"""Predictions from a model file: top-k class names with probabilities.

Used by `ec2train predict`, the local server and the SageMaker handler alike. Imports only
torch, torchvision and Pillow (it ships inside the SageMaker model package).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import torch

from ec2train.model import model_from_file
from ec2train.preprocess import Source, eval_transform, load_rgb, resize_size

# Refuse images above this many pixels before decoding them (decompression bombs).
MAX_PIXELS = 40_000_000


class Predictor:
    """A model file loaded once, with the preprocessing that travelled inside it."""

    def __init__(self, model_path: str | Path, device: str = "cpu"):
        self.model, self.meta = model_from_file(model_path)
        self.device = device
        self.model.to(device)
        self.class_names: list[str] = list(self.meta["class_names"])
        self.image_size: int = int(self.meta["image_size"])
        self.transform = eval_transform(self.image_size, tuple(self.meta["mean"]), tuple(self.meta["std"]))

    def preprocess(self, source: Source) -> torch.Tensor:
        img = load_rgb(source, min_side=resize_size(self.image_size), max_pixels=MAX_PIXELS)
        return self.transform(img)

    @torch.inference_mode()
    def logits(self, batch: torch.Tensor) -> torch.Tensor:
        return self.model(batch.to(self.device)).float().cpu()

    def top_k(self, logits: torch.Tensor, k: int = 5) -> list[list[dict[str, Any]]]:
        probs = logits.softmax(dim=1)
        k = max(1, min(k, probs.shape[1]))
        values, indices = probs.topk(k, dim=1)
        return [
            [
                {"label": self.class_names[i], "index": int(i), "probability": float(p)}
                for p, i in zip(vals.tolist(), idxs.tolist())
            ]
            for vals, idxs in zip(values, indices)
        ]

    def predict(self, sources: Sequence[Source], k: int = 5) -> list[list[dict[str, Any]]]:
        batch = torch.stack([self.preprocess(s) for s in sources])
        return self.top_k(self.logits(batch), k)
