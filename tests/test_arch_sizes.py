"""Image sizes an architecture cannot take: one line before anything is written, for every
architecture `ec2train archs` lists, with each rule checked against a real forward pass."""

from __future__ import annotations

import contextlib
import re
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torchvision.models as tvm
from torch import nn

from ec2train.arch_sizes import SMALLEST, ImageSizeError, check_image_size, known_rule, size_rule
from ec2train.config import resolve
from ec2train.model import build_model, classification_archs
from tests.support.cli import assert_one_line_error, run_cli

ARCHS = classification_archs()
# Models this big, and the fixed-size transformers (224 px and up), run their forward pass on the
# meta device (shapes only): on the CPU they would cost seconds each.
META_PARAMS = 100_000_000


@contextlib.contextmanager
def _no_weight_init() -> Iterator[None]:
    """Build models without initialising their weights (the forward pass here needs shapes only):
    torch.nn.init's functions do nothing meanwhile, and untouched weights cost no memory."""
    init = torch.nn.init
    saved = {n: getattr(init, n) for n in dir(init) if n.endswith("_") and not n.startswith("_")}
    for name in saved:
        setattr(init, name, lambda tensor, *a, **k: tensor)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # googlenet/inception's note on their init
            yield
    finally:
        for name, fn in saved.items():
            setattr(init, name, fn)


def _probe_model(arch: str) -> nn.Module:
    with _no_weight_init():
        model = build_model(arch, 4, "none")  # exactly what fit builds
    if sum(p.numel() for p in model.parameters()) > META_PARAMS or size_rule(arch).maximum is not None:
        return model.to("meta").train()
    for t in [*model.parameters(), *model.buffers()]:
        t.data.zero_()  # no NaN or denormal garbage to slow the pass down
    return model.train()  # as fit trains it (a frozen backbone runs in eval mode: same shapes)


def _runs(model: nn.Module, size: int) -> bool:
    device = next(model.parameters()).device
    try:
        with torch.no_grad():
            out = model(torch.zeros(2, 3, size, size, device=device))  # 2: BatchNorm trains on a batch
    except (RuntimeError, ValueError, AssertionError, IndexError):
        return False
    assert isinstance(out, torch.Tensor) and out.shape == (2, 4), f"fit cannot train on {type(out).__name__}"
    return True


def test_every_listed_architecture_has_a_rule():
    assert [a for a in ARCHS if known_rule(a) is None] == []


def _family(arch: str) -> str:
    return re.match(r"[a-z]+", arch).group()


# Grouped by family (resnet, vit, ...) so each test stays a few seconds.
FAMILIES = sorted({_family(a) for a in ARCHS})


@pytest.mark.parametrize("family", FAMILIES)
def test_each_rule_matches_a_real_forward_pass(family, one_torch_thread):
    """At the edges of what each rule accepts (its smallest and, for a fixed size, its largest
    size) the model runs, and one pixel beyond each edge it fails, built and trained as fit does."""
    wrong = []
    for arch in (a for a in ARCHS if _family(a) == family):
        rule = size_rule(arch)
        model = _probe_model(arch)
        edges = [rule.minimum] if rule.maximum is None else sorted({rule.minimum, rule.maximum})
        for size in edges:
            if not _runs(model, size):
                wrong.append(f"{arch} fails at {size} px, which its rule accepts")
        beyond = [rule.minimum - 1] + ([rule.maximum + 1] if rule.maximum is not None else [])
        for size in (s for s in beyond if s >= SMALLEST):
            if _runs(model, size):
                wrong.append(f"{arch} runs at {size} px, which its rule refuses")
        del model
    assert wrong == []


@pytest.mark.parametrize("arch", [a for a in ARCHS if size_rule(a).maximum is not None])
def test_fixed_sizes_with_imagenet_weights_are_the_weights_sizes(arch):
    """torchvision builds a pretrained transformer for its weights' size (min_size in their metadata)."""
    documented = tvm.get_model_weights(arch).DEFAULT.meta["min_size"][0]
    assert size_rule(arch, "imagenet").maximum == documented


def test_an_unknown_architecture_gets_torchvisions_documented_minimum(monkeypatch):
    import ec2train.arch_sizes as arch_sizes

    monkeypatch.setattr(arch_sizes, "_RULES", ())
    assert size_rule("inception_v3").minimum == 75
    assert size_rule("resnet18").minimum == SMALLEST  # documented 1: TrainConfig's floor stands
    assert size_rule("not_a_model").accepts(SMALLEST)


def test_the_message_names_the_size_the_architecture_takes():
    with pytest.raises(ImageSizeError) as fixed:
        check_image_size("vit_b_16", 64)
    assert str(fixed.value).startswith("--image-size 64: vit_b_16 takes 224 px images only")
    assert str(fixed.value).endswith("use --image-size 224")
    with pytest.raises(ImageSizeError) as small:
        check_image_size("inception_v3", 64)
    assert "at least 75 px" in str(small.value) and str(small.value).endswith("use --image-size 75 or more")
    assert "518" in str(pytest.raises(ImageSizeError, check_image_size, "vit_h_14", 224, "imagenet").value)
    check_image_size("vit_h_14", 224, "none")
    check_image_size("swin_t", 64)


def test_config_validation_refuses_the_size_before_a_run_starts():
    with pytest.raises(ImageSizeError, match="vit_b_16 takes 224 px images only"):
        resolve(arch="vit_b_16", image_size=64, weights="none")
    assert resolve(arch="vit_b_16", image_size=224, weights="none").image_size == 224


def _nothing_written(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.name != "demo")


@pytest.mark.parametrize(
    "args,needles",
    [
        (
            ("fit", "--arch", "vit_b_16", "--image-size", "64"),
            ("vit_b_16 takes 224 px images only", "--image-size 224"),
        ),
        (("fit", "--arch", "inception_v3", "--image-size", "64"), ("inception_v3", "--image-size 75 or more")),
        (("tune", "--arch", "vit_b_16", "--image-size", "64", "--trials", "1"), ("vit_b_16", "--image-size 224")),
        (("bench", "--arch", "inception_v3", "--image-size", "64"), ("inception_v3", "--image-size 75 or more")),
    ],
    ids=["fit-vit", "fit-inception", "tune", "bench"],
)
def test_cli_says_it_in_one_line_and_writes_nothing(demo_data: Path, tmp_path: Path, args, needles):
    weights = () if args[0] == "bench" else ("--weights", "none")  # bench times random weights
    res = run_cli(*args, "--data", demo_data, *weights, cwd=tmp_path)
    assert_one_line_error(res.returncode, res.stderr, *needles)
    assert len(res.stderr.strip().splitlines()) == 1, res.stderr
    assert _nothing_written(tmp_path) == []  # no config.toml, TrainedModels/, runs/ or tune/


def test_googlenet_trains_without_aux_heads_and_older_files_with_them_still_load(tmp_path: Path):
    """fit's loss takes one tensor: GoogLeNet and Inception v3 are built without their auxiliary
    classifiers (which made a training forward pass return a tuple). Model files and --weights
    files that still hold those tensors load as before."""
    from ec2train.export import model_payload, save_model_file
    from ec2train.model import model_from_file, replace_head

    model = build_model("googlenet", 3, "none").train()
    assert isinstance(model(torch.zeros(2, 3, 32, 32)), torch.Tensor)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        old = tvm.get_model("googlenet", weights=None, aux_logits=True, init_weights=False)
    replace_head(old, 3)
    assert any(k.startswith("aux1.") for k in old.state_dict())
    payload = model_payload(
        old.state_dict(), arch="googlenet", class_names=["a", "b", "c"], image_size=32, mean=(0.5,) * 3, std=(0.5,) * 3
    )
    loaded, _ = model_from_file(save_model_file(tmp_path / "model.pth", payload))
    x = torch.rand(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x), old.eval()(x))
    torch.save(old.state_dict(), tmp_path / "backbone.pth")
    assert torch.equal(
        build_model("googlenet", 5, str(tmp_path / "backbone.pth")).conv1.conv.weight, old.conv1.conv.weight
    )
