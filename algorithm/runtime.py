"""Where the network runs and in which number format: the one precision policy of inference and training.

`torch.cuda.is_bf16_supported()` answers True on a T4 (compute capability 7.5) because it counts emulated
bf16; there bf16 has no tensor cores and is several times slower than fp16. So the policy reads the compute
capability itself: bf16 only where it is native (8.0 and later), fp16 below that, fp32 only on request.
"""
from __future__ import annotations

from typing import Optional

import torch

PRECISIONS = ("auto", "fp32", "fp16", "bf16")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# First compute capability with native bf16 tensor cores (Ampere).
NATIVE_BF16_CAPABILITY = (8, 0)


def cuda_capability(device: torch.device | None = None) -> tuple[int, int]:
    """(major, minor) compute capability of a CUDA device."""
    return tuple(torch.cuda.get_device_capability(device))  # type: ignore[return-value]


def cpu_has_fast_bf16() -> bool:
    """Whether this CPU multiplies bf16 matrices in hardware (AMX tiles or AVX512-BF16)."""
    try:
        return bool(torch.cpu._is_amx_tile_supported() or torch.cpu._is_avx512_bf16_supported())
    except AttributeError:  # older torch
        return False


def choose_precision(requested: str, device: torch.device | str, capability: Optional[tuple[int, int]] = None,
                     cpu_fast_bf16: Optional[bool] = None) -> str:
    """`auto | fp32 | fp16 | bf16` -> the precision to run in on `device` (never `auto`).

    auto: on CUDA bf16 where it is native (capability >= 8.0), fp16 below; on the CPU bf16 where the CPU has
    bf16 matrix units, fp32 elsewhere. An explicit choice is kept, except fp16 on the CPU (no fast kernels
    there), which is refused. `capability` and `cpu_fast_bf16` default to the machine's own; tests pass them.
    """
    if requested not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {requested!r}")
    device = torch.device(device)
    if device.type == "cuda":
        if requested != "auto":
            return requested
        capability = tuple(capability) if capability is not None else cuda_capability(device)
        return "bf16" if capability >= NATIVE_BF16_CAPABILITY else "fp16"
    if requested == "fp16":
        raise ValueError("fp16 needs a CUDA GPU; on the CPU use auto, fp32 or bf16")
    if requested != "auto":
        return requested
    fast = cpu_has_fast_bf16() if cpu_fast_bf16 is None else cpu_fast_bf16
    return "bf16" if fast else "fp32"


def needs_grad_scaling(precision: str) -> bool:
    """fp16 training needs loss scaling (its 5-bit exponent underflows small gradients); bf16 and fp32 do not."""
    return precision == "fp16"


def autocast(device: torch.device | str, precision: str):
    """The autocast context of `precision` on `device` (disabled for fp32)."""
    device = torch.device(device)
    return torch.autocast(device.type, dtype=DTYPES[precision], enabled=precision != "fp32")
