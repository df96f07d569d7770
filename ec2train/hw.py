"""Device policy as small pure functions: given a device and its capability, what to do
(AMP, channels_last, compile, pin memory, optimizer kernels, backend flags). The CPU thread
plan lives in threads.py.

They run on CPU in the tests; on a GPU the trainer calls them with the real capability.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ec2train.errors import UserError


class HardwareError(UserError):
    """A requested mode the device cannot do."""


@dataclass(frozen=True)
class AmpPolicy:
    enabled: bool
    dtype: torch.dtype | None
    use_scaler: bool  # GradScaler: only for fp16, whose small exponent range underflows gradients

    @property
    def name(self) -> str:
        if not self.enabled or self.dtype is None:
            return "off"
        return {torch.float16: "fp16", torch.bfloat16: "bf16"}.get(self.dtype, "off")


def supports_bf16(capability: tuple[int, int] | None) -> bool:
    """bf16 tensor cores arrived with Ampere (sm_80): A10G (g5) yes, T4 (g4dn, sm_75) no."""
    return capability is not None and capability >= (8, 0)


def amp_policy(amp: str, device_type: str, capability: tuple[int, int] | None = None) -> AmpPolicy:
    """auto: bf16 on Ampere+, fp16 + GradScaler on older GPUs, off on CPU."""
    off = AmpPolicy(False, None, False)
    fp16 = AmpPolicy(True, torch.float16, True)
    bf16 = AmpPolicy(True, torch.bfloat16, False)
    if amp == "off":
        return off
    if device_type == "cuda":
        if amp == "auto":
            return bf16 if supports_bf16(capability) else fp16
        if amp == "fp16":
            return fp16
        if amp == "bf16":
            if not supports_bf16(capability):
                raise HardwareError(
                    f"--amp bf16 needs an Ampere or newer GPU (this one is sm_{capability[0]}{capability[1]}); use --amp fp16 or auto"
                    if capability
                    else "--amp bf16 needs a GPU that supports bf16"
                )
            return bf16
    else:
        if amp == "auto":
            return off
        if amp == "bf16":
            return bf16
        if amp == "fp16":
            raise HardwareError("--amp fp16 is for GPUs; on the CPU use --amp bf16 or off")
    raise HardwareError(f"--amp {amp}: must be auto, fp16, bf16 or off")


def use_channels_last(requested: bool, device_type: str, frozen: bool = False) -> bool:
    """NHWC feeds tensor-core convolutions on GPUs. On the CPU it helps where the backbone only
    runs forward (frozen); a full fine-tune's step was no faster with it, and slower at larger
    images (docs/performance.md). Pure."""
    return requested and (device_type == "cuda" or (device_type == "cpu" and frozen))


def inference_channels_last(device_type: str) -> bool:
    """NHWC for inference (predict, serve, the SageMaker handler), on the GPU and on the CPU too:
    oneDNN's NHWC convolutions beat torch's NCHW path, for a lone small image and for batches
    at 224 px alike (docs/performance.md). Pure."""
    return device_type in ("cuda", "cpu")


COMPILE_MODES = ("auto", "on", "off")


def compile_forward(mode: str, device_type: str) -> bool:
    """Whether a server compiles its forward pass (torch.compile, inductor, frozen weights, one
    static graph per batch size). auto: on the CPU, where the compiled pass is faster than
    eager at every batch size measured (docs/performance.md); off on GPUs until it has been
    measured there. Pure."""
    if mode not in COMPILE_MODES:
        raise UserError(f"--compile {mode}: must be auto, on or off")
    return mode == "on" or (mode == "auto" and device_type == "cpu")


def batch_buckets(max_batch: int) -> tuple[int, ...]:
    """The batch sizes a compiled forward pass is built for: the powers of two below max_batch,
    then max_batch. A pass of n images runs at the smallest bucket that holds n, padded: a static
    shape keeps the compiled kernels (a dynamic batch dimension measured no faster than eager),
    and at most ceil(log2(max_batch)) + 1 graphs are compiled. Pure."""
    if max_batch < 1:
        raise ValueError(f"max_batch must be at least 1, not {max_batch}")
    sizes = [1 << i for i in range(max_batch.bit_length()) if 1 << i < max_batch]
    return (*sizes, max_batch)


def bucket_for(n: int, buckets: tuple[int, ...]) -> int:
    """The smallest bucket that holds n images. Pure."""
    for size in buckets:
        if size >= n:
            return size
    raise ValueError(f"a batch of {n} is larger than the largest compiled batch size {buckets[-1]}")


# `--loader auto` picks the GPU loader only once bench/gpu_check.py has passed with it on a GPU
# (as `--compile auto` leaves GPUs eager until measured): set this with that run in
# docs/performance.md. Until then the GPU loader is opt-in (`--loader gpu`).
GPU_LOADER_VERIFIED = False
# Few CPUs per GPU: g4dn.xlarge and g5.xlarge have 4, the .2xlarge sizes 8. Above this the
# CPU loader's workers are left to do the decoding.
GPU_LOADER_MAX_CPUS = 8
GPU_LOADER_MIN_JPEG_SHARE = 0.5  # the GPU loader decodes JPEGs only: the rest go to the workers


@dataclass(frozen=True)
class LoaderChoice:
    kind: str  # "cpu": workers decode and transform; "gpu": workers read files, the device decodes
    why: str  # one line for fit's header


# config.LOADERS is the same tuple: the SageMaker package ships this module without config.py.
LOADER_MODES = ("auto", "cpu", "gpu")


def choose_loader(
    requested: str,
    device_type: str,
    jpeg_share: float,
    cpus_per_process: int,
    decode_problem: str | None = None,
    verified: bool | None = None,
) -> LoaderChoice:
    """Which loader decodes the images. cpu and gpu are as asked (gpu on a CPU device runs the
    GPU loader's code on the CPU); auto picks the GPU loader when it pays (a CUDA device, JPEG
    data, few CPUs per process) and it has been verified on a GPU. decode_problem: why the
    device cannot decode JPEGs (data.gpu.device_decode_problem), if it cannot; verified: None
    reads GPU_LOADER_VERIFIED. Pure."""
    verified = GPU_LOADER_VERIFIED if verified is None else verified
    if requested not in LOADER_MODES:
        raise HardwareError(f"--loader {requested}: must be one of {', '.join(LOADER_MODES)}")
    if requested == "cpu":
        return LoaderChoice("cpu", "cpu loader (--loader cpu): workers decode and transform")
    if requested == "gpu":
        if decode_problem:
            raise HardwareError(
                f"--loader gpu: torchvision cannot decode JPEGs on this device ({decode_problem}); use --loader cpu"
            )
        if device_type != "cuda":
            return LoaderChoice(
                "gpu",
                "gpu loader (--loader gpu) on the CPU: this process decodes and transforms each batch, "
                "its workers read files (slower than --loader cpu here; it runs the GPU path without a GPU)",
            )
        mixed = f"; {1 - jpeg_share:.0%} of the files are not JPEGs: workers decode those" if jpeg_share < 1 else ""
        return LoaderChoice("gpu", f"gpu loader (--loader gpu): workers read files, the GPU decodes{mixed}")
    if device_type != "cuda":
        return LoaderChoice("cpu", "cpu loader: no GPU")
    if not verified:
        return LoaderChoice(
            "cpu", "cpu loader: auto keeps it until bench/gpu_check.py has passed on a GPU; --loader gpu opts in"
        )
    if jpeg_share < GPU_LOADER_MIN_JPEG_SHARE:
        return LoaderChoice("cpu", f"cpu loader: {jpeg_share:.0%} of the files are JPEGs")
    if cpus_per_process > GPU_LOADER_MAX_CPUS:
        return LoaderChoice("cpu", f"cpu loader: {cpus_per_process} CPUs for this process keep the GPU fed")
    if decode_problem:
        return LoaderChoice("cpu", f"cpu loader: torchvision cannot decode JPEGs on the GPU ({decode_problem})")
    return LoaderChoice("gpu", f"gpu loader: {cpus_per_process} CPUs for this GPU, JPEG data; the GPU decodes")


def use_pin_memory(device_type: str) -> bool:
    return device_type == "cuda"


def optimizer_kernel(device_type: str, torch_version: tuple[int, int]) -> str:
    """How SGD and AdamW update the weights: "fused" (one kernel per parameter group) on CUDA,
    and on the CPU from torch 2.4, which added fused CPU kernels; else "foreach" (multi-tensor),
    never a Python loop over every parameter: fused is several times faster than foreach on
    the CPU, and foreach than the loop (docs/performance.md). Pure."""
    if device_type == "cuda" or (device_type == "cpu" and torch_version >= (2, 4)):
        return "fused"
    return "foreach"


def torch_version() -> tuple[int, int]:
    major, minor = torch.__version__.split(".")[:2]
    return int(major), int("".join(c for c in minor if c.isdigit()) or 0)


def background_work_helps(device_type: str) -> bool:
    """Whether fit writes its checkpoints in a background thread. Yes
    when an accelerator trains: the CPU mostly waits for it. No on the CPU: the thread plan
    gives torch every core the loader leaves, and a busy extra thread stalls its OpenMP team:
    writing last.pt in between costs less than the stall beside training (docs/performance.md)."""
    return device_type != "cpu"


def cudnn_benchmark(device_type: str, fixed_input_size: bool = True) -> bool:
    """Let cuDNN pick the fastest kernels: worth it when input shapes do not change."""
    return device_type == "cuda" and fixed_input_size


def matmul_precision(device_type: str, capability: tuple[int, int] | None) -> str:
    """'high' lets fp32 matmuls use TF32 tensor cores (Ampere+: A10G, A100, H100) for layers
    that run outside autocast or with --amp off; convolutions already use TF32 by default."""
    return "high" if device_type == "cuda" and supports_bf16(capability) else "highest"


def configure_backends(device_type: str, capability: tuple[int, int] | None) -> None:
    """Apply the process-wide backend flags these decisions call for (once, at the start of fit)."""
    torch.backends.cudnn.benchmark = cudnn_benchmark(device_type)
    torch.set_float32_matmul_precision(matmul_precision(device_type, capability))


def device_capability(device: str) -> tuple[int, int] | None:
    if device.startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.get_device_capability(torch.device(device))
    return None


def cuda_device_count() -> int:
    """GPUs this process can see (0 without CUDA)."""
    return torch.cuda.device_count() if torch.cuda.is_available() else 0
