"""GPU decisions are pure functions of (flag, device type, capability): tested here without a GPU.
The GradScaler path runs for real on the CPU (fp16 autocast + torch.amp.GradScaler("cpu"))."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ec2train import hw
from ec2train.data import default_workers
from ec2train.errors import UserError
from tests.support.cli import assert_one_line_error, cli_in_process
from tests.support.training import TINY_FIT

T4, A10G, V100, H100 = (7, 5), (8, 6), (7, 0), (9, 0)


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory) -> Path:
    from ec2train.data import make_demo_dataset

    return make_demo_dataset(tmp_path_factory.mktemp("hw") / "d", classes=3, per_class=8, size=32, eval_per_class=2)


@pytest.mark.fast
@pytest.mark.parametrize(
    "amp, device, cap, name, scaler",
    [
        ("auto", "cuda", T4, "fp16", True),  # g4dn: no bf16 tensor cores; fp16 needs loss scaling
        ("auto", "cuda", V100, "fp16", True),  # p3
        ("auto", "cuda", A10G, "bf16", False),  # g5: bf16 has fp32's range, no scaler
        ("auto", "cuda", H100, "bf16", False),  # p5
        ("fp16", "cuda", A10G, "fp16", True),  # asked for: allowed, with a scaler
        ("bf16", "cuda", A10G, "bf16", False),
        ("off", "cuda", T4, "off", False),
        ("auto", "cpu", None, "off", False),  # CPU autocast is slower than fp32 for these models
        ("bf16", "cpu", None, "bf16", False),  # but can be asked for
        ("off", "cpu", None, "off", False),
    ],
)
def test_amp_policy(amp, device, cap, name, scaler):
    policy = hw.amp_policy(amp, device, cap)
    assert policy.name == name
    assert policy.enabled == (name != "off")
    assert policy.dtype == {"fp16": torch.float16, "bf16": torch.bfloat16, "off": None}[name]
    assert policy.use_scaler is scaler


@pytest.mark.fast
@pytest.mark.parametrize(
    "amp, device, cap, needle",
    [
        ("bf16", "cuda", T4, "sm_75"),  # the T4 has no bf16: say so and offer fp16
        ("fp16", "cpu", None, "bf16"),
        ("int8", "cuda", A10G, "auto, fp16, bf16 or off"),
    ],
)
def test_amp_policy_refuses_what_the_device_cannot_do(amp, device, cap, needle):
    with pytest.raises(hw.HardwareError, match=needle):
        hw.amp_policy(amp, device, cap)


@pytest.mark.fast
def test_bf16_support_starts_at_ampere():
    assert [hw.supports_bf16(c) for c in (None, V100, T4, (8, 0), A10G, H100)] == [
        False,
        False,
        False,
        True,
        True,
        True,
    ]


@pytest.mark.fast
def test_memory_format_pinning_and_kernel_choice_only_on_cuda():
    assert hw.use_channels_last(True, "cuda") and not hw.use_channels_last(False, "cuda")
    assert not hw.use_channels_last(True, "cpu")  # a full fine-tune on the CPU: no faster, slower at 64 px
    assert hw.use_pin_memory("cuda") and not hw.use_pin_memory("cpu")
    assert hw.cudnn_benchmark("cuda") and not hw.cudnn_benchmark("cpu")
    assert not hw.cudnn_benchmark("cuda", fixed_input_size=False)
    assert hw.matmul_precision("cuda", A10G) == "high"  # TF32 tensor cores
    assert hw.matmul_precision("cuda", T4) == "highest"  # no TF32 before Ampere
    assert hw.matmul_precision("cpu", None) == "highest"


@pytest.mark.fast
def test_configure_backends_on_cpu_leaves_exact_fp32():
    old_bench, old_prec = torch.backends.cudnn.benchmark, torch.get_float32_matmul_precision()
    try:
        torch.backends.cudnn.benchmark = True
        torch.set_float32_matmul_precision("high")
        hw.configure_backends("cpu", None)
        assert torch.backends.cudnn.benchmark is False
        assert torch.get_float32_matmul_precision() == "highest"
    finally:
        torch.backends.cudnn.benchmark = old_bench
        torch.set_float32_matmul_precision(old_prec)


@pytest.mark.fast
@pytest.mark.parametrize(
    "cpus, procs, workers",
    [
        (4, 1, 3),  # g4dn.xlarge / g5.xlarge: 4 vCPUs, one GPU; one core for the training loop
        (8, 1, 7),  # g5.2xlarge
        (48, 4, 8),  # g5.12xlarge: 12 per process, capped at 8 (more only adds memory)
        (96, 8, 8),  # p4d / g5.48xlarge
        (16, 4, 3),  # g4dn.12xlarge
        (2, 1, 1),
        (1, 1, 0),  # one CPU: load in the main process
        (None, 1, 0),
        (4, 8, 0),  # more processes than CPUs
    ],
)
def test_default_workers_from_cpus_per_process(cpus, procs, workers):
    assert default_workers(cpus, procs) == workers


def test_cli_refuses_fp16_on_cpu(capsys, demo_data: Path, tmp_path: Path):
    code, _, err = cli_in_process(
        capsys,
        "fit",
        "--data",
        demo_data,
        "--output",
        tmp_path,
        "--weights",
        "none",
        "--device",
        "cpu",
        "--amp",
        "fp16",
    )
    assert_one_line_error(code, err, "--amp fp16", "bf16")


def test_scaler_state_is_checkpointed_and_restored(tiny_data: Path, tmp_path: Path, monkeypatch):
    """fp16 + GradScaler, as on a T4, run for real on the CPU: last.pt carries the scaler's state
    and a resumed run continues from it instead of starting a fresh scaler."""
    from ec2train.config import resolve
    from ec2train.loop import fit

    fp16 = hw.AmpPolicy(True, torch.float16, True)
    monkeypatch.setattr(hw, "amp_policy", lambda *args, **kwargs: fp16)
    settings = dict(
        TINY_FIT,
        data=str(tiny_data),
        output=str(tmp_path / "out"),
        logdir=str(tmp_path / "runs"),
        batch_size=8,
        freeze_backbone=True,
        augment=False,
    )
    stop: list[int] = []  # stopped in epoch 2, so the run is unfinished and can resume
    fit(resolve(**dict(settings, epochs=2)), on_epoch=lambda e, r: stop.append(e), should_stop=lambda: bool(stop))
    ckpt_path = tmp_path / "out" / "last.pt"
    ckpt = torch.load(ckpt_path, weights_only=True)
    fresh = torch.amp.GradScaler("cpu").state_dict()
    assert set(ckpt["scaler"]) == set(fresh)
    assert ckpt["scaler"]["scale"] <= fresh["scale"]

    # Values a fresh scaler never has: 3 is no power of two, and growth_interval is fixed at 2000.
    ckpt["scaler"].update(scale=3.0, growth_interval=7)
    torch.save(ckpt, ckpt_path)
    fit(resolve(**dict(settings, epochs=2, resume="auto")))
    resumed = torch.load(ckpt_path, weights_only=True)
    assert resumed["epoch"] == 2
    assert resumed["scaler"]["growth_interval"] == 7
    ratio = resumed["scaler"]["scale"] / 3.0  # grew or backed off by powers of two from 3
    assert ratio > 0 and abs(torch.log2(torch.tensor(ratio)).item() % 1) < 1e-9


@pytest.mark.fast
def test_background_writes_and_warm_ups_only_beside_an_accelerator():
    # On the CPU, a busy extra thread stalls torch's OpenMP team: fit keeps that work in line.
    assert hw.background_work_helps("cuda") and hw.background_work_helps("mps")
    assert not hw.background_work_helps("cpu")


@pytest.mark.fast
def test_the_optimizer_update_is_fused_where_torch_has_the_kernel():
    assert hw.optimizer_kernel("cuda", (2, 1)) == "fused"
    assert hw.optimizer_kernel("cpu", (2, 4)) == "fused" and hw.optimizer_kernel("cpu", (2, 3)) == "foreach"
    assert hw.optimizer_kernel("mps", (2, 14)) == "foreach"
    assert hw.torch_version() >= (2, 4)  # this project's torch: fit's optimizers on the CPU are fused
    from ec2train.optim import make_optimizer

    net = torch.nn.Linear(3, 2)
    for name in ("adamw", "sgd"):
        opt = make_optimizer(name, [{"params": list(net.parameters())}], 0.1, 0.9, "cpu")
        assert opt.defaults["fused"] is True, name
        net(torch.ones(1, 3)).sum().backward()
        opt.step()  # the fused CPU kernel runs


@pytest.mark.fast
@pytest.mark.parametrize(
    "mode, device, compiled",
    [
        ("auto", "cpu", True),  # measured: 1.3-1.7x the images/s of the eager pass on the CPU
        ("auto", "cuda", False),  # not yet measured on a GPU
        ("on", "cuda", True),
        ("on", "cpu", True),
        ("off", "cpu", False),
        ("off", "cuda", False),
    ],
)
def test_serve_compiles_its_forward_pass_on_the_cpu_by_default(mode, device, compiled):
    assert hw.compile_forward(mode, device) is compiled


@pytest.mark.fast
def test_the_cli_offers_the_compile_modes_hw_knows():
    from ec2train.cli._app import Compile

    assert tuple(m.value for m in Compile) == hw.COMPILE_MODES


@pytest.mark.fast
def test_a_bad_compile_mode_is_a_user_error():
    with pytest.raises(UserError, match="--compile fast: must be auto, on or off"):
        hw.compile_forward("fast", "cpu")


@pytest.mark.fast
@pytest.mark.parametrize(
    "max_batch, buckets",
    [
        (1, (1,)),
        (2, (1, 2)),
        (3, (1, 2, 3)),
        (4, (1, 2, 4)),
        (6, (1, 2, 4, 6)),
        (8, (1, 2, 4, 8)),
        (9, (1, 2, 4, 8, 9)),
    ],
)
def test_compiled_batch_sizes_are_the_powers_of_two_below_max_batch_and_max_batch(max_batch, buckets):
    assert hw.batch_buckets(max_batch) == buckets


@pytest.mark.fast
def test_a_batch_runs_at_the_smallest_compiled_size_that_holds_it():
    buckets = hw.batch_buckets(8)
    assert [hw.bucket_for(n, buckets) for n in range(1, 9)] == [1, 2, 4, 4, 8, 8, 8, 8]
    with pytest.raises(ValueError, match="larger than the largest compiled batch size 8"):
        hw.bucket_for(9, buckets)
    with pytest.raises(ValueError):
        hw.batch_buckets(0)
