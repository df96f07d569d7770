"""GPU check: the GPU paths that cannot run on the build machines, in about 4 minutes on one GPU.

    python bench/gpu_check.py               # on a g4dn/g5 (or any CUDA) box, from a checkout
    python bench/gpu_check.py --logs L      # also keep each fit's and bench's whole output in L/
    python bench/gpu_check.py --only loader # the GPU loader's checks (7-9) alone, about 2 minutes

Checks, each one line PASS/FAIL, then the img/s table:
  1. fp16 + GradScaler training steps reduce the loss (the T4 path); bf16 too where the GPU has it
  2. channels_last inputs and cudnn.benchmark are on, as fit sets them up on CUDA; uint8 batches
     normalized on the GPU equal the CPU's ToTensor + Normalize bit for bit
  3. `fit --cache-features` trains a head from cached features on the GPU
  4. NCCL sums a tensor on the GPU; `fit --nproc-per-node auto` starts torchrun with one process per GPU,
     joined by an NCCL process group when there are several
  5. img/s of resnet50 at 224 px, frozen backbone and full fine-tune, AMP on and off (ec2train bench's step)
  6. `ec2train serve --compile on`'s compiled forward pass on the GPU (auto leaves GPUs eager until
     this has run): its logits against the eager pass's, and img/s of both at batch 8
  7. the GPU loader (`fit --loader gpu`; `--loader auto` keeps the CPU loader until this passes):
     `fit --loader gpu` trains on the GPU; its eval and train transforms against the CPU loader's,
     its fallbacks and errors, and its decode beside work queued on the training stream
  8. end to end img/s of resnet50 at 224 px, frozen and full fine-tune, AMP auto, with the CPU
     loader and the GPU loader, restricted to 4 CPUs (as a g4dn/g5.xlarge) and unrestricted, on
     500x400 JPEGs (bench/_gpu_loader.py)
  9. the goal: on 4 CPUs the GPU loader >= 2x the CPU loader (frozen backbone) and within 15% of
     the step's rate (full fine-tune)
Exit status 0 when every check passes, 1 when one fails, 2 without a CUDA device.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from _gpu_loader import CHILD_FLAG, loader_bench_child, loader_checks  # noqa: E402


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


def pixels_exact(device: str) -> tuple[bool, str]:
    """Every uint8 value, in every channel, normalized on the GPU as fit does it, equals the
    CPU's ToTensor + Normalize bit for bit (what serving computes)."""
    import torch
    from torchvision import transforms as T

    from ec2train.preprocess import IMAGENET_MEAN, IMAGENET_STD, normalize_pixels, pixel_stats

    pixels = torch.arange(256, dtype=torch.uint8).repeat(3, 1).view(1, 3, 16, 16)
    expected = T.Normalize(IMAGENET_MEAN, IMAGENET_STD)(pixels[0].float().div(255))
    got = normalize_pixels(pixels.to(device), pixel_stats(IMAGENET_MEAN, IMAGENET_STD, device), True)[0].cpu()
    differ = int((got != expected).sum())
    return differ == 0, f"{differ} of {expected.numel()} values differ from the CPU's"


def compiled_forward(device: str) -> tuple[bool, str]:
    """serve's compiled pass (infer.BucketedForward, batch sizes 1 and 8, one padded batch of 5)
    against the eager pass on the GPU: the same logits within TF32's tolerance, and img/s of
    each at batch 8, resnet18 at 224 px."""
    from ec2train.errors import first_line

    try:
        return _compiled_against_eager(device)
    except Exception as exc:  # no triton, an inductor failure: a FAIL line, and the other checks still run
        return False, first_line(exc)[:300]


def _compiled_against_eager(device: str) -> tuple[bool, str]:
    import torch
    import torchvision

    from ec2train.infer import BucketedForward

    torch.manual_seed(0)
    net = torchvision.models.resnet18(num_classes=133).eval().to(device, memory_format=torch.channels_last)
    images = torch.randn(8, 3, 224, 224, device=device).contiguous(memory_format=torch.channels_last)
    forward = BucketedForward(net, (1, 8), torch.channels_last)
    start = time.perf_counter()
    with torch.inference_mode():
        forward.build(images[:1], lambda size, seconds: None)
        built = time.perf_counter() - start
        worst = max(float((forward(images[:n]) - net(images[:n])).abs().max()) for n in (1, 5, 8))
        rates = {}
        for name, fn in (("eager", net), ("compiled", forward)):
            for _ in range(3):
                fn(images)
            torch.cuda.synchronize()
            t = time.perf_counter()
            for _ in range(50):
                fn(images)
            torch.cuda.synchronize()
            rates[name] = 50 * 8 / (time.perf_counter() - t)
    ok = worst < 5e-2
    return ok, (
        f"max |logit difference| {worst:.2e}; batch 8: compiled {rates['compiled']:.0f} img/s, "
        f"eager {rates['eager']:.0f} img/s ({rates['compiled'] / rates['eager']:.2f}x); built in {built:.0f} s"
    )


LOGS: Path | None = None


def run_cli(name: str, args: list[str]) -> subprocess.CompletedProcess:
    """`python -m ec2train ARGS` from this checkout; its whole output goes to LOGS/NAME.log when --logs is given."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, "-m", "ec2train", *args], env=env, capture_output=True, text=True, timeout=150
    )
    if LOGS is not None:
        (LOGS / f"{name}.log").write_text(
            f"$ ec2train {' '.join(args)}\nexit {proc.returncode}\n{proc.stdout}{proc.stderr}"
        )
    return proc


def run_fit(name: str, args: list[str]) -> tuple[bool, str, dict]:
    proc = run_cli(name, ["fit", *args])
    (Path(args[args.index("--output") + 1]).parent / f"{name.removeprefix('fit-')}-output.txt").write_text(
        proc.stdout + proc.stderr
    )
    metrics_file = Path(args[args.index("--output") + 1]) / "metrics.json"
    metrics = json.loads(metrics_file.read_text()) if metrics_file.is_file() else {}
    return proc.returncode == 0, summary(proc.stdout + proc.stderr), metrics


def summary(output: str) -> str:
    """The line that says how a fit went: its error, else its last epoch line, else its last line."""
    lines = [ln.strip() for ln in output.splitlines() if ln.strip()]
    for wanted in ("error:", "epoch "):
        hits = [ln for ln in lines if ln.startswith(wanted)]
        if hits:
            return hits[-1][:200]
    return lines[-1][:200] if lines else ""


def nccl_all_reduce(device: str) -> tuple[bool, str]:
    """A one-process NCCL group sums a tensor on the GPU: the library loads and its kernels run here."""
    import torch
    import torch.distributed as dist

    from ec2train import ddp

    store = dist.HashStore()
    dist.init_process_group("nccl", store=store, rank=0, world_size=1, device_id=torch.device(device))
    try:
        t = torch.arange(4.0, device=device)
        dist.all_reduce(t)
        # fit's second group beside NCCL, for the stop question between steps (CPU tensors, gloo)
        control = dist.new_group(backend=ddp.control_backend(dist.get_backend()))
        flag = torch.tensor([1], dtype=torch.int32)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=control)
        ok = t.tolist() == [0.0, 1.0, 2.0, 3.0] and flag.item() == 1
        return ok, (
            f"NCCL {'.'.join(map(str, torch.cuda.nccl.version()))}, all_reduce {t.tolist()}; "
            f"gloo control group answered {flag.item()}"
        )
    finally:
        dist.destroy_process_group()


def demo_fit(work: Path) -> tuple[Path, list[str]]:
    """The demo data set and the fit options every fit check shares."""
    from ec2train.data import make_demo_dataset

    data = make_demo_dataset(work / "demo", classes=4, per_class=32, size=64)
    return data, [
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


def gpu_loader_fit(work: Path) -> tuple[str, bool, str]:
    _, base = demo_fit(work)
    out = base + ["--loader", "gpu", "--workers", "2", "--output", str(work / "gpu-loader")]
    ok, line, m = run_fit("fit-gpu-loader", out)
    log = (work / "gpu-loader-output.txt").read_text() if (work / "gpu-loader-output.txt").is_file() else ""
    header = "gpu loader (--loader gpu): workers read files, the GPU decodes"
    return (
        "fit --loader gpu: workers read files, the GPU decodes and augments",
        ok and header in log and m.get("test_images") == 32,
        f"valid acc {m.get('valid_acc1', '?')}; {line}",
    )


def fit_checks(work: Path) -> list[tuple[str, bool, str]]:
    import torch

    data, base = demo_fit(work)
    out = []
    ok, line, m = run_fit(
        "fit-cache-features", base + ["--freeze-backbone", "--cache-features", "--output", str(work / "cache")]
    )
    out.append(
        (
            "fit --cache-features on the GPU",
            ok and (work / "cache" / "model.pth").is_file(),
            f"valid acc {m.get('valid_acc1', '?')}; {line}",
        )
    )
    gpus = torch.cuda.device_count()
    ok, line, m = run_fit("fit-ddp", base + ["--nproc-per-node", "auto", "--output", str(work / "ddp")])
    world = m.get("world_size", "?")
    log = (work / "ddp-output.txt").read_text() if (work / "ddp-output.txt").is_file() else ""
    nccl = gpus == 1 or "nccl process group" in log  # one process trains without a group
    out.append(
        (
            f"fit --nproc-per-node auto: torchrun, {gpus} process(es), NCCL when several",
            ok and world == gpus and nccl,
            f"world size {world}; {line}",
        )
    )
    proc = run_cli("bench", ["bench", "--data", str(data), "--device", "cuda", "--image-size", "64", "--steps", "5"])
    plan = [ln.strip() for ln in (proc.stdout + proc.stderr).splitlines() if ln.startswith("threads:")][:1] or [
        "(no thread plan line)"
    ]
    out.append(("ec2train bench --device cuda", proc.returncode == 0, plan[0][:160]))
    return out


def throughput(work: Path) -> list[str]:
    from ec2train.data import make_demo_dataset
    from ec2train.perf import bench

    data = make_demo_dataset(work / "demo224", classes=4, per_class=160, size=256)
    rows = ["| resnet50 224 px, batch 64 | amp | step img/s | end to end img/s |", "|---|---|---:|---:|"]
    for frozen in (True, False):
        for amp in ("auto", "off"):
            r = bench(
                data, arch="resnet50", batch_size=64, device="cuda", image_size=224, steps=20, amp=amp, frozen=frozen,
                loaders=("cpu",),
            )  # fmt: skip
            rows.append(
                f"| {'frozen backbone' if frozen else 'full fine-tune'} | {r.amp} | {r.step_ips:.0f} | {r.end_to_end_ips:.0f} |"
            )
    return rows


def _fit_step(tr, batches) -> None:
    from ec2train.loop import train_one_epoch

    train_one_epoch(tr.net, batches, tr.optimizer, tr.scheduler, tr.ctx)


def _reading_every_step(tr, batches) -> None:
    """The same step and the same numbers (loss, top-1 and top-5 hits), read at once, every step
    (the classic loop's habit): the only difference from fit's step is when the numbers are read."""
    import torch.nn.functional as F

    from ec2train.loop import topk_hits

    total = correct = top5 = 0.0
    for images, labels in batches:
        images, labels = tr.ctx.to_device(images, labels)
        with tr.ctx.autocast():
            logits = tr.net(images)
            loss = F.cross_entropy(logits.float(), labels)
        tr.optimizer.zero_grad(set_to_none=True)
        if tr.ctx.scaler is not None:
            tr.ctx.scaler.scale(loss).backward()
            tr.ctx.scaler.step(tr.optimizer)
            tr.ctx.scaler.update()
        else:
            loss.backward()
            tr.optimizer.step()
        tr.scheduler.step()
        total += loss.item() * len(labels)
        c1, c5 = topk_hits(logits.detach(), labels).tolist()
        correct, top5 = correct + c1, top5 + c5


def step_bookkeeping(device: str, steps: int = 30) -> list[str]:
    """fit's step (numbers read one step late) against the same step reading its loss and hits at
    once, every step: same model, optimizer, AMP and batch; interleaved, best of 5."""
    import torch

    from ec2train import ddp
    from ec2train.config import TrainConfig
    from ec2train.loop import make_runtime, make_trainer, set_train_mode

    rows = ["| resnet50 224 px, batch 64, step only | fit's step img/s | reading every step img/s | ratio |"]
    rows.append("|---|---:|---:|---:|")
    for frozen in (True, False):
        rt = make_runtime(device, "auto", 0, env=ddp.DistEnv())
        cfg = TrainConfig(arch="resnet50", weights="none", freeze_backbone=frozen, channels_last=True)
        tr = make_trainer(rt, cfg, 100, lambda _s: 1.0)
        set_train_mode(tr.net, tr.head, frozen)
        x = torch.randn(64, 3, 224, 224, device=device)
        y = torch.randint(0, 100, (64,), device=device)
        batches = [(x, y)] * steps
        times: dict = {_fit_step: [], _reading_every_step: []}
        for fn in times:  # warm-up: cudnn.benchmark picks its kernels
            fn(tr, batches)
        for _ in range(5):
            for fn, ips in times.items():
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                fn(tr, batches)
                torch.cuda.synchronize()
                ips.append(steps * 64 / (time.perf_counter() - t0))
        ours, theirs = max(times[_fit_step]), max(times[_reading_every_step])
        what = "frozen backbone" if frozen else "full fine-tune"
        rows.append(f"| {what}, amp {rt.amp.name} | {ours:.0f} | {theirs:.0f} | {ours / theirs:.2f}x |")
    return rows


def main() -> None:
    global LOGS
    if len(sys.argv) == 4 and sys.argv[1] == CHILD_FLAG:  # one of check 8's measuring processes
        loader_bench_child(sys.argv[2], int(sys.argv[3]))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--logs", type=Path, help="keep each fit's and bench's whole output in this folder")
    parser.add_argument(
        "--only", choices=("all", "loader"), default="all", help="loader: the GPU loader's checks (7-9) alone"
    )
    args = parser.parse_args()
    LOGS = args.logs
    if LOGS is not None:
        LOGS.mkdir(parents=True, exist_ok=True)
    require_cuda()
    import torch

    from ec2train import hw

    t0 = time.perf_counter()
    device = "cuda:0"
    cap = hw.device_capability(device)
    print(
        f"{torch.cuda.get_device_name(0)} (sm_{cap[0]}{cap[1]}), {torch.cuda.device_count()} GPU(s), {os.cpu_count()} CPUs, "
        f"torch {torch.__version__}",
        flush=True,
    )
    checks = []
    if args.only == "all":
        checks.append(("fp16 + GradScaler steps reduce the loss", *loss_falls("fp16", "fp16", device)))
        if hw.supports_bf16(cap):
            checks.append(("bf16 steps reduce the loss", *loss_falls("bf16", "bf16", device)))
        checks.append(("channels_last and cudnn.benchmark on", *backends_on(device)))
        checks.append(("uint8 batches normalized on the GPU equal ToTensor + Normalize", *pixels_exact(device)))
        checks.append(("NCCL all_reduce on the GPU", *nccl_all_reduce(device)))
        checks.append(("serve --compile on: the compiled forward pass on the GPU", *compiled_forward(device)))
    with tempfile.TemporaryDirectory(prefix="ec2train-gpu-check-") as tmp:
        checks += fit_checks(Path(tmp)) if args.only == "all" else []
        checks.append(gpu_loader_fit(Path(tmp)))
        loader, loader_table = loader_checks(device, Path(tmp), LOGS)
        checks += loader
        for name, ok, detail in checks:
            print(f"{'PASS' if ok else 'FAIL'}  {name}: {detail}", flush=True)
        if args.only == "all":
            for row in step_bookkeeping(device):
                print(row, flush=True)
            for row in throughput(Path(tmp)):
                print(row, flush=True)
        for row in loader_table:
            print(row, flush=True)
    print(f"done in {time.perf_counter() - t0:.0f} s")
    raise SystemExit(0 if all(ok for _, ok, _ in checks) else 1)


if __name__ == "__main__":
    main()
