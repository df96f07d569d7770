"""Hardware decisions as small pure functions: given a device and its capability, what to do.

They run on CPU in the tests; on a GPU the trainer calls them with the real capability.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from ec2train.errors import UserError


class HardwareError(UserError):
    """A requested mode the device cannot do."""


@dataclass(frozen=True)
class AmpPolicy:
    enabled: bool
    dtype: Optional[torch.dtype]
    use_scaler: bool  # GradScaler: only for fp16, whose small exponent range underflows gradients

    @property
    def name(self) -> str:
        return {torch.float16: "fp16", torch.bfloat16: "bf16"}.get(self.dtype, "off") if self.enabled else "off"


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
                raise HardwareError(f"--amp bf16 needs an Ampere or newer GPU (this one is sm_{capability[0]}{capability[1]}); use --amp fp16 or auto" if capability else "--amp bf16 needs a GPU that supports bf16")
            return bf16
    else:
        if amp == "auto":
            return off
        if amp == "bf16":
            return bf16
        if amp == "fp16":
            raise HardwareError("--amp fp16 is for GPUs; on the CPU use --amp bf16 or off")
    raise HardwareError(f"--amp {amp}: must be auto, fp16, bf16 or off")


def use_channels_last(requested: bool, device_type: str) -> bool:
    """NHWC feeds tensor-core convolutions on GPUs; on the CPU it brings nothing here."""
    return requested and device_type == "cuda"


def use_pin_memory(device_type: str) -> bool:
    return device_type == "cuda"


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
