"""What the speed benchmark measures beside seconds: peak memory, FLOPs per frame, activation size, GPU peaks."""
from __future__ import annotations

import os
import platform
import resource
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch

from algorithm.config import ModelConfig

# Dense tensor-core peaks (TFLOP/s) of the GPUs we may run on: fp16 on T4 (bf16 unsupported), bf16 otherwise.
GPU_PEAK_TFLOPS = {"T4": 65.0, "A10G": 70.0, "L4": 121.0, "A100": 312.0, "H100": 756.0, "H200": 790.0}


class PeakRSS:
    """Peak resident memory of this process while the block runs (sampled every 10 ms), in MiB."""

    def __init__(self):
        self.peak = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @staticmethod
    def current() -> float:
        try:
            with open("/proc/self/statm") as handle:
                return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
        except (OSError, ValueError):
            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0

    def _run(self) -> None:
        while not self._stop.wait(0.01):
            self.peak = max(self.peak, self.current())

    def __enter__(self) -> "PeakRSS":
        self.peak = self.current()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.peak = max(self.peak, self.current())


@contextmanager
def cuda_peak(device: torch.device) -> Iterator[dict]:
    out: dict[str, float | None] = {"max_allocated_mb": None}
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    yield out
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        out["max_allocated_mb"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)


def count_flops(model: torch.nn.Module, config: ModelConfig, device: torch.device) -> dict[str, float]:
    """GFLOP of one frame through the encoder (+ frame head) and through the decoder (multiply-add = 2)."""
    x = torch.zeros(1, 3, config.image_size, config.image_size, device=device)
    dtype = next(model.encoder.parameters()).dtype
    # FlopCounterMode has no formula for the fused `_native_multi_head_attention` kernel that
    # nn.MultiheadAttention takes in inference: without this switch the in-projection and attention
    # (about a third of ViT-L's FLOPs) go uncounted.
    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        return _count_flops(model, x, dtype)
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)


def _count_flops(model: torch.nn.Module, x: torch.Tensor, dtype: torch.dtype) -> dict[str, float]:
    from torch.utils.flop_counter import FlopCounterMode

    with torch.inference_mode():
        with FlopCounterMode(display=False) as counter:
            features, embedding = model.encoder(x.to(dtype))
            model.frame_head(embedding.float())
        encoder = counter.get_total_flops()
        with FlopCounterMode(display=False) as counter:
            model.decoder(x, [f.float() for f in features])
        decoder = counter.get_total_flops()
    return {"encoder_gflop": encoder / 1e9, "decoder_gflop": decoder / 1e9, "total_gflop": (encoder + decoder) / 1e9}


def activation_bytes_per_frame(model: torch.nn.Module, config: ModelConfig, batch: int = 4) -> float:
    """Peak bytes of tensors alive during one fp32 forward pass of a CPU model, per frame, from the
    profiler's allocation events. Under CUDA fp16 autocast most activations take half of that, the
    residual stream and normalisation outputs stay fp32: the fp32 figure is an upper bound."""
    from torch.profiler import ProfilerActivity, profile

    x = torch.zeros(batch, 3, config.image_size, config.image_size)
    with torch.no_grad():
        model(x)  # warm-up: one-off caches are not activations
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            model(x)
    # Allocations are charged to the op that made them (its self memory, net of what it freed itself);
    # frees outside any op are "[memory]" events. Replaying both in time order gives the live total.
    deltas = [(e.time_range.start, e.cpu_memory_usage if e.name == "[memory]" else e.self_cpu_memory_usage)
              for e in prof.events()]
    live = peak = 0
    for _, delta in sorted(deltas, key=lambda d: d[0]):
        live += delta
        peak = max(peak, live)
    return peak / batch


def memory_estimate(model: torch.nn.Module, config: ModelConfig, batch_size: int, per_frame: float) -> dict:
    """GPU memory at `batch_size` under fp16: the encoder's matrix weights in fp16 (cast once at load, as
    `runtime.PrecisionPlan` does; this casts `model`'s), the other weights fp32, + activations (fp32 upper
    bound), plus 30 % for the caching allocator's fragmentation and cuBLAS/cuDNN workspaces. The CUDA
    context itself (about 0.3-0.5 GB on a T4) is not counted."""
    from algorithm.runtime import cast_matmul_weights

    params = sum(p.numel() for p in model.parameters())
    half = cast_matmul_weights(model.encoder, torch.float16) if hasattr(model, "encoder") else 0
    weights = (params - half) * 4 + half * 2
    activations = per_frame * batch_size
    total = (weights + activations) * 1.3
    return {"parameters_m": round(params / 1e6, 1), "weights_gb": round(weights / 1e9, 2),
            "activations_per_frame_mb": round(per_frame / 1e6, 1), "batch_size": batch_size,
            "activations_gb": round(activations / 1e9, 2), "estimate_gb": round(total / 1e9, 2),
            "rule": "(fp16 encoder matrix weights + other weights fp32 + batch x fp32 activation peak per "
                    "frame) x 1.3"}


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()} ({os.cpu_count()} CPUs visible)"
    except OSError:
        pass
    return platform.processor() or "cpu"


def gpu_peak_tflops(name: str) -> float | None:
    for key, value in GPU_PEAK_TFLOPS.items():
        if key in name:
            return value
    return None
