"""Where the network runs and in which number format: device choice, the one precision policy of inference
and training (and its plan for inference: what is cast once, what runs under autocast), the description of
the runtime for logs, stage timings, and the batch size that fits the GPU's memory.

`torch.cuda.is_bf16_supported()` answers True on a T4 (compute capability 7.5) because it counts emulated
bf16; there bf16 has no tensor cores and is several times slower than fp16. So the policy reads the compute
capability itself: bf16 only where it is native (8.0 and later), fp16 below that, fp32 only on request.

`--device auto` falls back to the CPU when torch cannot use the GPU; when an NVIDIA GPU is visible all the
same (a driver older than the CUDA build needs, a CPU-only torch), the fallback carries the reason, so that a
submission that would take minutes per case on the CPU says why in its log and its result.json.
"""
from __future__ import annotations

import glob
import os
import platform
import re
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ContextManager, Iterator, Optional

import torch

from .config import DEVICES, PRECISIONS

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# First compute capability with native bf16 tensor cores (Ampere).
NATIVE_BF16_CAPABILITY = (8, 0)
# Oldest NVIDIA Linux driver branch each CUDA major release runs on (NVIDIA's minor-version compatibility:
# any 12.x build on >= 525, any 13.x build on >= 580).
MIN_DRIVER_FOR_CUDA = {11: 450, 12: 525, 13: 580}
NVIDIA_DRIVER_VERSION_FILE = Path("/proc/driver/nvidia/version")


class DeviceError(RuntimeError):
    """A device or precision this machine cannot provide (e.g. `--device cuda` without a usable GPU)."""


# ------------------------------------------------------------------------------------------ precision

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


def cast_matmul_weights(module: torch.nn.Module, dtype: torch.dtype) -> int:
    """Cast the weights that feed matrix products (linear, convolution, attention projections, a ViT's
    `proj`) to `dtype`, in place, once; norm and embedding parameters stay fp32. Under autocast the products
    then find their weights already in the half type instead of converting fp32 weights on every call.
    Returns the number of parameters cast."""
    cast = 0
    for owner in module.modules():
        matmul = isinstance(owner, (torch.nn.Linear, torch.nn.MultiheadAttention, torch.nn.modules.conv._ConvNd))
        for name, parameter in owner.named_parameters(recurse=False):
            if parameter.dtype != torch.float32:
                continue
            if matmul or (name == "proj" and parameter.ndim == 2):
                parameter.data = parameter.data.to(dtype)
                cast += parameter.numel()
    return cast


@dataclass(frozen=True)
class PrecisionPlan:
    """How inference runs in one precision on one device: what is cast once at load, what runs under autocast.

    * CUDA fp16 / bf16: the encoder's matrix weights are cast to the half type once (under inference mode
      autocast's cast cache never holds, so fp32 weights would be converted again for every batch); norm
      and embedding parameters stay fp32. Encoder, frame head and decoder run under autocast, which computes
      norms and softmax in fp32; the residual stream is in the half type, as under plain autocast, and the
      decoder receives its features in it (its first convolutions would cast them anyway).
    * CPU bf16 (CPUs with AMX / AVX512-BF16 units): the whole encoder is cast to bf16 once and runs without
      autocast (CPU autocast re-casts every weight on every call and sends 3-D linears through a batched-
      matmul path that copies the weight: slower than fp32 there). Frame head and decoder stay fp32.
    * fp32: nothing is cast and nothing runs under autocast.
    """

    precision: str  # fp32 | fp16 | bf16, as `choose_precision` resolved it
    device_type: str  # cuda | cpu
    encoder_dtype: torch.dtype  # the whole encoder, and its input, in this type
    matmul_dtype: torch.dtype | None  # the encoder's matrix weights cast to this type (None: not cast)
    feature_dtype: torch.dtype  # the decoder's features are handed over in this type

    @classmethod
    def of(cls, precision: str, device: torch.device | str) -> "PrecisionPlan":
        device = torch.device(device)
        dtype = DTYPES[precision]
        if device.type == "cuda":
            half = dtype if precision != "fp32" else None
            return cls(precision, "cuda", torch.float32, half, half or torch.float32)
        return cls(precision, device.type, dtype, None, torch.float32)

    def prepare(self, encoder: torch.nn.Module) -> None:
        """The casts done once, at load, in place."""
        if self.encoder_dtype != torch.float32:
            encoder.to(self.encoder_dtype)
        if self.matmul_dtype is not None:
            cast_matmul_weights(encoder, self.matmul_dtype)

    def autocast(self) -> ContextManager:
        """The context the network runs in: autocast on CUDA (disabled for fp32), nothing on the CPU."""
        if self.device_type != "cuda":
            return nullcontext()
        return autocast(self.device_type, self.precision)


# ------------------------------------------------------------------------------------------ device

@dataclass(frozen=True)
class DeviceChoice:
    device: torch.device
    fallback: str | None = None  # why `auto` runs on the CPU although an NVIDIA GPU is visible


def nvidia_gpu_visible() -> bool:
    """Whether this process sees an NVIDIA GPU at all (device nodes, as the NVIDIA container runtime
    mounts them), whether or not torch can use it."""
    return bool(glob.glob("/dev/nvidia[0-9]*"))


def nvidia_driver_version() -> str | None:
    """The loaded NVIDIA kernel driver's version (e.g. '535.183.01'), or None without one."""
    try:
        text = NVIDIA_DRIVER_VERSION_FILE.read_text()
    except OSError:
        return None
    found = re.search(r"Kernel Module(?: for [\w-]+)?\s+(\d+\.\d+(?:\.\d+)?)", text)
    return found.group(1) if found else None


def _cuda_major(cuda: str | None) -> int | None:
    try:
        return int(str(cuda).split(".")[0])
    except ValueError:
        return None


def cuda_unusable_reason() -> str:
    """Why torch cannot use CUDA here, as precisely as the machine lets us tell."""
    build = f"torch {torch.__version__}"
    cuda = torch.version.cuda
    if cuda is None:
        return f"{build} is a CPU-only build"
    driver = nvidia_driver_version()
    needed = MIN_DRIVER_FOR_CUDA.get(_cuda_major(cuda) or -1)
    if driver is not None and needed is not None and int(driver.split(".")[0]) < needed:
        return (f"the NVIDIA driver {driver} is older than this CUDA {cuda} build of {build} needs "
                f"(driver >= {needed})")
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None and visible.strip() in ("", "-1"):
        return f"CUDA_VISIBLE_DEVICES={visible!r} hides every GPU"
    return (f"{build} (CUDA {cuda}) could not initialise CUDA"
            + (f" with NVIDIA driver {driver}" if driver else " (no NVIDIA driver found)"))


def select_device(requested: str) -> DeviceChoice:
    """`auto | cpu | cuda | cuda:N` -> the device to run on.

    `auto` takes CUDA when torch can use it, else the CPU, with the reason attached when an NVIDIA GPU is
    visible (see the module docstring). An explicit `cuda` without a usable GPU raises DeviceError.
    """
    if requested == "cpu":
        return DeviceChoice(torch.device("cpu"))
    if requested != "auto" and not re.fullmatch(r"cuda(:\d+)?", requested):
        raise DeviceError(f"unknown device {requested!r}: use {', '.join(DEVICES)} or cuda:N")
    if torch.cuda.is_available():
        device = torch.device("cuda" if requested == "auto" else requested)
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise DeviceError(f"--device {requested}: only {torch.cuda.device_count()} CUDA device(s) visible")
        return DeviceChoice(device)
    if requested == "auto":
        if not nvidia_gpu_visible():
            return DeviceChoice(torch.device("cpu"))
        return DeviceChoice(torch.device("cpu"), fallback=(
            f"an NVIDIA GPU is visible but torch cannot use it: {cuda_unusable_reason()}; running on the CPU "
            "instead (minutes per case, coarse frame search)"))
    reason = cuda_unusable_reason() if nvidia_gpu_visible() else "no NVIDIA GPU is visible"
    raise DeviceError(f"--device {requested} asked for, but no usable CUDA GPU: {reason}")


def resolve_device(name: str) -> torch.device:
    """`select_device(name).device`, for callers that do their own logging (training)."""
    return select_device(name).device


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


def describe_runtime(device: torch.device, precision: str, fallback: str | None = None) -> dict[str, Any]:
    """What ran the network, for the log and result.json: device name, compute capability, torch, CUDA,
    cuDNN and driver versions, the precision used, and the reason of a CPU fallback."""
    info: dict[str, Any] = {"device": str(device), "precision": precision, "torch": torch.__version__,
                            "cuda": torch.version.cuda, "driver": nvidia_driver_version()}
    if device.type == "cuda":
        properties = torch.cuda.get_device_properties(device)
        info.update(device_name=properties.name, compute_capability=f"{properties.major}.{properties.minor}",
                    memory_gib=round(properties.total_memory / 2**30, 1),
                    cudnn=torch.backends.cudnn.version())
    else:
        info.update(device_name=f"{cpu_name()} ({os.cpu_count()} CPUs visible)", compute_capability=None,
                    threads=torch.get_num_threads())
    if fallback:
        info["device_warning"] = fallback
    return info


def runtime_line(info: dict[str, Any]) -> str:
    """One log line from `describe_runtime`."""
    where = info["device_name"] + (f", compute capability {info['compute_capability']}"
                                   if info.get("compute_capability") else "")
    versions = f"torch {info['torch']}" + (f", CUDA {info['cuda']}" if info.get("cuda") else "") + \
        (f", driver {info['driver']}" if info.get("driver") else "")
    return f"{info['device']} ({where}); {versions}; precision {info['precision']}"


# ------------------------------------------------------------------------------------------ timings

class StageTimer:
    """Time per named stage.

    `timer(name)` measures wall time and synchronises CUDA at its end, so GPU work is charged to the
    right stage; it also keeps the process CPU time (`cpu_seconds`), which is steadier than wall time on
    a shared machine. `timer.device_span(name)` is for stages inside the batch loop: on CUDA it records
    events instead of synchronising (the GPU keeps its queue full) and the elapsed GPU time is read once,
    when `seconds` is accessed; on the CPU it is a plain wall-time span.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self._seconds: dict[str, float] = {}
        self.cpu_seconds: dict[str, float] = {}
        self._events: dict[str, list[tuple[torch.cuda.Event, torch.cuda.Event]]] = {}

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        start, cpu_start = time.perf_counter(), time.process_time()
        yield
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self._seconds[name] = self._seconds.get(name, 0.0) + time.perf_counter() - start
        self.cpu_seconds[name] = self.cpu_seconds.get(name, 0.0) + time.process_time() - cpu_start

    @contextmanager
    def device_span(self, name: str) -> Iterator[None]:
        if self.device.type != "cuda":
            with self(name):
                yield
            return
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        yield
        end.record()
        self._events.setdefault(name, []).append((begin, end))

    @property
    def seconds(self) -> dict[str, float]:
        if self._events:
            torch.cuda.synchronize(self.device)
            for name, pairs in self._events.items():
                elapsed = sum(b.elapsed_time(e) for b, e in pairs) / 1000.0
                self._seconds[name] = self._seconds.get(name, 0.0) + elapsed
            self._events.clear()
        return self._seconds


# ------------------------------------------------------------------------------------------ memory

def cuda_memory_available(device: torch.device) -> int:
    """Bytes this process can still allocate on `device`: the device's free memory plus what the caching
    allocator holds unused, within the per-process cap (`torch.cuda.set_per_process_memory_fraction`)."""
    free, total = torch.cuda.mem_get_info(device)
    reserved, allocated = torch.cuda.memory_reserved(device), torch.cuda.memory_allocated(device)
    available = free + (reserved - allocated)
    fraction = getattr(torch.cuda, "get_per_process_memory_fraction", lambda _device: 1.0)(device)
    return int(max(0, min(available, fraction * total - allocated)))


def batch_size_for_memory(available_bytes: int, bytes_per_frame: float, reserve_bytes: int = 0,
                          limit: int = 64, multiple: int = 8) -> int:
    """The largest batch whose activations (`bytes_per_frame` each) fit in `available_bytes` less
    `reserve_bytes`, at most `limit`, rounded down to a multiple of `multiple` (tensor-core friendly shapes)
    when it is at least that large; never below 1."""
    if bytes_per_frame <= 0:
        raise ValueError(f"bytes_per_frame must be positive, got {bytes_per_frame}")
    fits = int((available_bytes - reserve_bytes) // bytes_per_frame)
    fits = min(fits, limit)
    if fits >= multiple:
        fits -= fits % multiple
    return max(1, fits)


def cuda_batch_plan(available_bytes: int, bytes_per_frame: float, stored_bytes_per_frame: float,
                    case_frames: int, given: int | None = None, limit: int = 64) -> tuple[int, int]:
    """(batch size, frames that may wait for their decode decision) on a GPU with `available_bytes`.

    The batch (unless `given`) is the largest whose activations fit beside the decoder inputs that the
    frames of a `case_frames`-frame case hold while they wait (`stored_bytes_per_frame` each; 0 without a
    lazy decoder); as many frames may wait as half the memory left beside the batch holds, at least a batch.
    """
    reserve = int(stored_bytes_per_frame * case_frames)
    batch = given or batch_size_for_memory(available_bytes, bytes_per_frame, reserve, limit=max(1, limit))
    left = available_bytes - batch * bytes_per_frame
    waiting = int(left * 0.5 // stored_bytes_per_frame) if stored_bytes_per_frame > 0 else batch
    return batch, max(batch, waiting)
