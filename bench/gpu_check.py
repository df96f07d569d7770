"""GPU check: the GPU paths that cannot run on the build machines, in under 3 minutes on one GPU.

    python bench/gpu_check.py            # on a g4dn/g5 (or any CUDA) box, from a checkout

Checks, each one line PASS/FAIL, then the img/s table:
  1. fp16 + GradScaler training steps reduce the loss (the T4 path); bf16 too where the GPU has it
  2. channels_last inputs and cudnn.benchmark are on, as fit sets them up on CUDA
  3. `fit --cache-features` trains a head from cached features on the GPU
  4. `fit --nproc-per-node auto` starts torchrun with one NCCL process per GPU
  5. img/s of resnet50 at 224 px, frozen backbone and full fine-tune, AMP on and off (ec2train bench's step)
Exit status 0 when every check passes, 1 when one fails, 2 without a CUDA device.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def require_cuda() -> None:
    import torch

    if not torch.cuda.is_available():
        print("no CUDA device: bench/gpu_check.py needs an NVIDIA GPU (torch.cuda.is_available() is False here)")
        raise SystemExit(2)


def loss_falls(policy_name: str, amp: str, device: str) -> tuple[bool, str]:
    """20 steps on one fixed batch with fit's step: the loss must fall (a broken scaler gives inf/NaN)."""
    import torch
    import torchvision

    from ec2train import hw
    from ec2train.loop import StepContext, train_one_epoch

    torch.manual_seed(0)
    policy = hw.amp_policy(amp, "cuda", hw.device_capability(device))
    net = torchvision.models.resnet18(num_classes=4).to(device, memory_format=torch.channels_last)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda _s: 1.0)
    scaler = torch.amp.GradScaler("cuda") if policy.use_scaler else None
    ctx = StepContext(device, policy, True, scaler)
    x, y = torch.randn(16, 3, 64, 64), torch.randint(0, 4, (16,))
    first, _ = train_one_epoch(net, [(x, y)] * 2, opt, sched, ctx)
    last, _ = train_one_epoch(net, [(x, y)] * 18, opt, sched, ctx)
    before, after = first.loss / first.count, last.loss / last.count
    ok = policy.name == policy_name and after < before and after == after
    return ok, f"{policy.name} (scaler {'on' if scaler else 'off'}): loss {before:.3f} -> {after:.3f}"


def backends_on(device: str) -> tuple[bool, str]:
    import torch

    from ec2train import hw
    from ec2train.loop import StepContext

    hw.configure_backends("cuda", hw.device_capability(device))
    cl = hw.use_channels_last(True, "cuda")
    images, _ = StepContext(device, hw.amp_policy("auto", "cuda", hw.device_capability(device)), cl).to_device(
        torch.randn(2, 3, 32, 32), torch.zeros(2, dtype=torch.long)
    )
    nhwc = images.is_contiguous(memory_format=torch.channels_last)
    ok = cl and nhwc and torch.backends.cudnn.benchmark
    return ok, f"channels_last input {nhwc}, cudnn.benchmark {torch.backends.cudnn.benchmark}"


def run_fit(args: list[str], work: Path) -> tuple[bool, str, dict]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, "-m", "ec2train", "fit", *args], env=env, capture_output=True, text=True, timeout=150
    )
    metrics_file = Path(args[args.index("--output") + 1]) / "metrics.json"
    metrics = json.loads(metrics_file.read_text()) if metrics_file.is_file() else {}
    tail = (proc.stdout + proc.stderr).strip().splitlines()[-1:] or [""]
    return proc.returncode == 0, tail[0][:160], metrics


def fit_checks(work: Path) -> list[tuple[str, bool, str]]:
    import torch

    from ec2train.data import make_demo_dataset

    data = make_demo_dataset(work / "demo", classes=4, per_class=32, size=64)
    base = [
        "--data",
        str(data),
        "--arch",
        "resnet18",
        "--weights",
        "none",
        "--image-size",
        "64",
        "--epochs",
        "2",
        "--device",
        "cuda",
        "--logdir",
        str(work / "runs"),
        "--resume",
        "never",
    ]
    out = []
    ok, line, m = run_fit(base + ["--freeze-backbone", "--cache-features", "--output", str(work / "cache")], work)
    out.append(
        (
            "fit --cache-features on the GPU",
            ok and (work / "cache" / "model.pth").is_file(),
            f"valid acc {m.get('valid_acc1', '?')}; {line}",
        )
    )
    gpus = torch.cuda.device_count()
    ok, line, m = run_fit(base + ["--nproc-per-node", "auto", "--output", str(work / "ddp")], work)
    world = m.get("world_size", "?")
    out.append(
        (
            f"fit --nproc-per-node auto: torchrun, NCCL, {gpus} process(es)",
            ok and world == gpus,
            f"world size {world}; {line}",
        )
    )
    return out


def throughput(work: Path) -> list[str]:
    from ec2train.data import make_demo_dataset
    from ec2train.perf import bench

    data = make_demo_dataset(work / "demo224", classes=4, per_class=16, size=256)
    rows = ["| resnet50 224 px, batch 64 | amp | step img/s | end to end img/s |", "|---|---|---:|---:|"]
    for frozen in (True, False):
        for amp in ("auto", "off"):
            r = bench(
                data, arch="resnet50", batch_size=64, device="cuda", image_size=224, steps=10, amp=amp, frozen=frozen
            )
            rows.append(
                f"| {'frozen backbone' if frozen else 'full fine-tune'} | {r.amp} | {r.step_ips:.0f} | {r.end_to_end_ips:.0f} |"
            )
    return rows


def main() -> None:
    require_cuda()
    import torch

    from ec2train import hw

    t0 = time.perf_counter()
    device = "cuda:0"
    cap = hw.device_capability(device)
    print(
        f"{torch.cuda.get_device_name(0)} (sm_{cap[0]}{cap[1]}), {torch.cuda.device_count()} GPU(s), torch {torch.__version__}"
    )
    checks = [("fp16 + GradScaler steps reduce the loss", *loss_falls("fp16", "fp16", device))]
    if hw.supports_bf16(cap):
        checks.append(("bf16 steps reduce the loss", *loss_falls("bf16", "bf16", device)))
    checks.append(("channels_last and cudnn.benchmark on", *backends_on(device)))
    with tempfile.TemporaryDirectory(prefix="ec2train-gpu-check-") as tmp:
        checks += fit_checks(Path(tmp))
        for name, ok, detail in checks:
            print(f"{'PASS' if ok else 'FAIL'}  {name}: {detail}", flush=True)
        for row in throughput(Path(tmp)):
            print(row, flush=True)
    print(f"done in {time.perf_counter() - t0:.0f} s")
    raise SystemExit(0 if all(ok for _, ok, _ in checks) else 1)


if __name__ == "__main__":
    main()
