"""The image sizes each torchvision architecture can take, checked before a run writes anything.

A network downsamples its input many times over: below some size a pooling layer is left with
nothing (inception_v3 under 75 px: "Output size is too small"), and the vision transformers are
built for one size (vit_b_16's position embeddings and maxvit_t's attention windows fit 224 px
only: "Wrong image height!"). Without this check such a run starts, writes its config and dies
in the first forward pass with a long traceback.

The rules are a table (pure Python: config validation uses it without importing torch), kept
true by tests/test_arch_sizes.py, which runs every architecture `ec2train archs` lists at the
size its rule accepts and the size just below it. An architecture the table does not know (a
newer torchvision) gets the minimum torchvision documents for its weights (`min_size`); the
table differs from those where a real forward pass does (efficientnet_v2 runs from 16 px, not
33; swin_t from 16, not 224).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ec2train.errors import UserError

SMALLEST = 16  # TrainConfig's own floor for --image-size


class ImageSizeError(UserError):
    """An image size the architecture cannot take."""


@dataclass(frozen=True)
class SizeRule:
    """The sizes one architecture takes: from `minimum`, up to `maximum` for the transformers
    built for one size (maxvit_t's stem rounds 221-223 px up to the 224 px it was built for)."""

    minimum: int = SMALLEST
    maximum: int | None = None
    why: str = ""

    def accepts(self, size: int) -> bool:
        return self.minimum <= size <= (self.maximum or size)

    @property
    def usual(self) -> int | None:
        """The size a fixed-size architecture is built for."""
        return self.maximum

    def needs(self) -> str:
        if self.maximum is None:
            return f"images of at least {self.minimum} px"
        return (
            f"{self.maximum} px images only"
            if self.minimum == self.maximum
            else f"images of {self.minimum}-{self.maximum} px"
        )

    def fix(self, option: str) -> str:
        return f"{option} {self.maximum}" if self.maximum is not None else f"{option} {self.minimum} or more"


_SHRINKS = "smaller images leave its pooling layers nothing to pool"
_FIXED = "its position embeddings are built for that size"
# (pattern, rule), first match wins. Families that take any size from SMALLEST are listed too, so
# "known" is explicit: anything else falls back to torchvision's documented minimum.
_RULES: tuple[tuple[str, SizeRule], ...] = (
    (r"alexnet", SizeRule(63, why=_SHRINKS)),
    (r"convnext_", SizeRule(32, why=_SHRINKS)),
    (r"densenet", SizeRule(29, why=_SHRINKS)),
    (r"inception_v3", SizeRule(75, why=_SHRINKS)),
    (r"squeezenet1_0", SizeRule(21, why=_SHRINKS)),
    (r"squeezenet1_1", SizeRule(17, why=_SHRINKS)),
    (r"vgg", SizeRule(32, why=_SHRINKS)),
    (r"vit_", SizeRule(224, 224, _FIXED)),
    (r"maxvit_", SizeRule(221, 224, "its attention windows are built for 224 px")),
    (r"(efficientnet|googlenet|mnasnet|mobilenet|regnet|resnet|resnext|shufflenet|swin|wide_resnet)", SizeRule()),
)
# With ImageNet weights torchvision builds these for their weights' size (vit_h_14: the SWAG
# end-to-end weights, 518 px), not the 224 px of a model built from scratch.
_IMAGENET_SIZE = {"vit_h_14": 518}


def known_rule(arch: str, weights: str = "none") -> SizeRule | None:
    """The table's rule for `arch` (with `weights`: imagenet | none | PATH), or None if it has none."""
    for pattern, rule in _RULES:
        if re.match(pattern, arch):
            if weights == "imagenet" and arch in _IMAGENET_SIZE:
                size = _IMAGENET_SIZE[arch]
                return SizeRule(size, size, rule.why)
            return rule
    return None


def size_rule(arch: str, weights: str = "none") -> SizeRule:
    """The image sizes `arch` takes; for an architecture the table does not know, the minimum
    torchvision documents for its weights (importing torchvision, a second, only then)."""
    rule = known_rule(arch, weights)
    return rule if rule is not None else _documented_rule(arch)


def _documented_rule(arch: str) -> SizeRule:
    import torchvision.models as tvm

    try:
        low = int(tvm.get_model_weights(arch).DEFAULT.meta["min_size"][0])
    except (ValueError, KeyError, AttributeError, TypeError, IndexError):
        return SizeRule()  # not a torchvision model: --arch's own check says so later
    return SizeRule(max(SMALLEST, low), why="torchvision's documented minimum for it")


def check_image_size(arch: str, size: int, weights: str = "none", option: str = "--image-size") -> None:
    """ImageSizeError, one line with the size(s) `arch` takes, unless it takes `size`."""
    rule = size_rule(arch, weights)
    if rule.accepts(size):
        return
    because = f" ({rule.why})" if rule.why else ""
    raise ImageSizeError(f"{option} {size}: {arch} takes {rule.needs()}{because}; use {rule.fix(option)}")
