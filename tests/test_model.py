"""Heads across architectures, freezing, weights files, state_dict prefixes, config resolution."""

from __future__ import annotations

import pytest
import torch

from ec2train.config import ConfigError, TrainConfig, load_toml, resolve, to_toml
from ec2train.model import ModelError, build_model, clean_state_dict, find_head, freeze_backbone


@pytest.mark.parametrize(
    "arch,head",
    [
        ("resnet18", "fc"),
        ("mobilenet_v3_small", "classifier.3"),
        ("efficientnet_b0", "classifier.1"),
        ("squeezenet1_0", "classifier.1"),
        ("vit_b_16", "heads.head"),
        ("densenet121", "classifier"),
        ("convnext_tiny", "classifier.2"),
    ],
)
def test_head_is_replaced_whatever_it_is_called(arch, head):
    model = build_model(arch, 7, "none")
    name, module = find_head(model)
    assert name == head
    assert getattr(module, "out_features", getattr(module, "out_channels", None)) == 7
    if arch in ("resnet18", "mobilenet_v3_small", "squeezenet1_0"):
        model.eval()
        with torch.inference_mode():
            assert model(torch.randn(2, 3, 64, 64)).shape == (2, 7)


def test_freeze_backbone_leaves_only_the_head_trainable():
    model = build_model("resnet18", 5, "none")
    head = freeze_backbone(model)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert head == "fc" and trainable == {"fc.weight", "fc.bias"}


def test_weights_from_a_local_file_keep_the_backbone(tmp_path):
    src = build_model("resnet18", 10, "none")
    torch.save({"module." + k: v for k, v in src.state_dict().items()}, tmp_path / "w.pth")
    model = build_model("resnet18", 3, str(tmp_path / "w.pth"))
    assert torch.equal(model.conv1.weight, src.conv1.weight)
    assert model.fc.out_features == 3
    with pytest.raises(ModelError, match="does not fit"):
        build_model("mobilenet_v3_small", 3, str(tmp_path / "w.pth"))


@pytest.mark.fast
def test_clean_state_dict_strips_ddp_and_compile_prefixes():
    t = torch.zeros(1)
    assert list(clean_state_dict({"module._orig_mod.fc.weight": t, "_orig_mod.module.x": t, "y": t})) == [
        "fc.weight",
        "x",
        "y",
    ]


@pytest.mark.fast
def test_config_layers_defaults_file_and_cli(tmp_path):
    f = tmp_path / "c.toml"
    f.write_text('[fit]\nepochs = 9\nlr = 1\nbatch-size = 8\narch = "resnet18"\n')
    with pytest.raises(ConfigError, match="--lr"):
        resolve(f)
    f.write_text('[fit]\nepochs = 9\nlr = 0.01\nbatch-size = 8\narch = "resnet18"\nfreeze_backbone = false\n')
    cfg = resolve(f, epochs=2, lr=None)
    assert (cfg.epochs, cfg.lr, cfg.batch_size, cfg.arch, cfg.frozen) == (2, 0.01, 8, "resnet18", False)
    assert resolve(None, weights="none").frozen is False and TrainConfig().frozen is True
    round_trip = tmp_path / "r.toml"
    round_trip.write_text(to_toml(cfg))
    assert resolve(round_trip) == cfg
    assert load_toml(round_trip)["epochs"] == 2
    with pytest.raises(ConfigError, match="must be one of"):
        resolve(None, optimizer="adam")
    with pytest.raises(ConfigError, match="s3://"):
        resolve(None, s3_uri="bucket/prefix")
