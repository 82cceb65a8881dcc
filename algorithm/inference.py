"""One case, top to bottom: stack -> preprocess -> encode/decode -> select frame -> post-process -> result.

`Predictor` holds a loaded model and the configuration; `predict(stack)` returns everything a caller may
want to write or show. Reading and writing files is the CLI's and `contract`'s job, not this module's.

Speed (`python -m training speed` measures every item against the paper-style reference):

* LoRA is merged into the encoder weights at load (`InferenceConfig.merge_lora`). peft's adapter on
  `nn.MultiheadAttention` re-merges and unmerges the attention weights on every call and its Linear
  adapters add two small matmuls each; merged, the encoder is plain open_clip, whose attention goes through
  PyTorch's fused `_native_multi_head_attention` / `scaled_dot_product_attention` kernels. Same outputs.
* Precision from `runtime.choose_precision`: on CUDA fp16 below compute capability 8.0 (a T4), bf16 above.
  The encoder's matrix weights (linear, convolution, attention projections) are cast to that type once at
  load, so autocast finds them already cast (under inference mode its cast cache never holds, and fp32
  weights would be converted again for every batch); norm and embedding parameters stay fp32, and autocast
  computes norms and softmax in fp32. The residual stream is in the half type, as under plain autocast
  (open_clip casts the embeddings to the patch embedding's type); `tools/gpu_check.py` measures the largest
  activation against fp16's range. On CPUs with AMX / AVX512-BF16 units the whole encoder runs in bf16
  without autocast.
* Frames are encoded in batches under `torch.inference_mode`. On CUDA: the batch size comes from the free
  GPU memory (measured with a probe batch at load), every batch has that one shape (the last is padded
  with repeats), and the model is warmed up at load, so cuDNN autotuning or `torch.compile` never meets a
  new shape inside a case; channels-last convolutions, pinned host memory, and results copied to the host
  once per call, never per batch.
* A background thread cuts and copies the next batch out of the stack while the current one computes.
* Lazy decoder (`lazy_decoder`, on by default): selection can only choose a frame whose smoothed
  P(abdomen) reaches `min_quality_probability`, and a smoothed value reaches it only if some frame of its
  smoothing window does. So the mask decoder runs only on frames with such a neighbour; the others keep a
  NaN mask fraction. The chosen frame is exactly the one a full decode gives. On the CPU the decision is
  taken after every batch (features of few frames held); on CUDA once, after every frame of the call is
  encoded (features held on the GPU, in the half type), so the GPU never waits for the host in between.
* Coarse-to-fine search (`coarse_stride` > 1, the CPU default for wide encoders): encode every k-th frame of each
  sweep, then encode the +-`refine_radius` neighbourhood of the best `refine_candidates` frames of every
  sweep, and repeat while the best frames move (a run of abdomen frames is followed to its best frame).
  Lift-off frames are never encoded.
"""
from __future__ import annotations

import logging
import time
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import torch

from . import biometry
from .config import FRAME_NONE, FRAME_OPTIMAL, FRAME_SUBOPTIMAL, Config, InferenceConfig
from .fov import fov_from_stack
from .postprocess import abdomen_probability, clean_mask
from .preprocess import preprocess_frames
from .runtime import (DTYPES, DeviceError, autocast, choose_precision, cuda_batch_plan, cuda_memory_available,
                      describe_runtime, resolve_device, select_device)
from .select import NO_FRAME, Selection, evidence, frame_tiers, nan_moving_average, select_frame, sweep_bounds

log = logging.getLogger(__name__)

# Refinement rounds of the coarse-to-fine search after the coarse pass (each follows the best frames of
# every sweep by up to `refine_radius` frames). Enough to walk along the longest annotated runs.
MAX_REFINE_ROUNDS = 4
# The coarse search refines only around frames whose smoothed P(abdomen) reaches this fraction of
# `min_quality_probability` (half of the selection threshold): sweeps without any sign of an abdomen cost
# only their coarse frames. A sweep whose best frame is below that cannot hold a frame that qualifies
# unless a whole run falls between two coarse frames with no echo in the frames around it.
REFINE_FLOOR = 0.5
# Slack on the decode rule, so that rounding in the moving average can never hide a qualifying frame.
_DECODE_SLACK = 1e-6
# Automatic CUDA batch size: frames of the probe batch that measures activation memory per frame, the case
# size whose decoder inputs must fit beside the batch (840 frames, the challenge's), and the share of the
# remaining memory left untouched (allocator fragmentation, cuBLAS / cuDNN workspaces).
_PROBE_FRAMES = 8
_TYPICAL_CASE_FRAMES = 840
_MEMORY_HEADROOM = 0.15

__all__ = ["CaseResult", "FrameScores", "Predictor", "StageTimer", "cast_matmul_weights", "load_predictor",
           "resolve_coarse_stride", "resolve_device"]


def resolve_coarse_stride(config: InferenceConfig, device: torch.device, encoder_width: int | None = None) -> int:
    """`coarse_stride` 0 (auto) -> 1 (dense) on CUDA; on the CPU `cpu_coarse_stride` for encoders at least
    `cpu_coarse_min_width` wide (ViT-L: seconds per frame), dense for narrower ones (the small
    configuration scans a whole case in about the time ViT-L needs for a stride-8 subsample, and a short
    run of abdomen frames can fall between two coarse frames)."""
    if config.coarse_stride > 0:
        return config.coarse_stride
    if device.type == "cuda" or (encoder_width is not None and encoder_width < config.cpu_coarse_min_width):
        return 1
    return max(1, config.cpu_coarse_stride)


@dataclass
class FrameScores:
    """Per-frame network outputs of one case; NaN for frames never run through the network.

    `probabilities` is set for every encoded frame, `mask_fractions` (and `abdomen_maps`) only for frames
    the decoder ran on: with the lazy decoder, frames that cannot be chosen are encoded but not decoded.
    """

    probabilities: np.ndarray  # (N, 3) frame-head softmax
    mask_fractions: np.ndarray  # (N,) share of the network input the mask covers
    abdomen_maps: dict[int, torch.Tensor] = field(default_factory=dict)  # frame -> (s, s) float16 probability

    @classmethod
    def empty(cls, n_frames: int) -> "FrameScores":
        return cls(np.full((n_frames, 3), np.nan), np.full(n_frames, np.nan))

    @property
    def scored(self) -> np.ndarray:
        """Frames run through the encoder (they have frame-head probabilities)."""
        return ~np.isnan(self.probabilities[:, 0])

    @property
    def decoded(self) -> np.ndarray:
        """Frames run through the mask decoder too."""
        return ~np.isnan(self.mask_fractions)


@dataclass
class CaseResult:
    frame: int
    mask: np.ndarray | None  # (H, W) uint8 on the chosen frame
    ellipse: biometry.Ellipse | None
    ac_mm: float | None
    selection: Selection
    scores: FrameScores
    fov: np.ndarray
    timings: dict[str, float]
    frames_encoded: int
    frames_decoded: int = 0
    search: dict = field(default_factory=dict)  # how the frames were searched (stride, rounds, ...)

    def summary(self) -> dict:
        """What people want to read about a case (the log and result.json)."""
        chosen = next((c for c in self.selection.candidates if c.frame == self.frame), None)
        return {
            "frame": self.frame,
            "plane": {FRAME_OPTIMAL: "optimal", FRAME_NONE: "none"}.get(chosen.tier, "suboptimal")
            if chosen else "none",
            "ac_mm": self.ac_mm,  # unrounded: readers format it, and rounding twice can move the last digit
            "ellipse": None if self.ellipse is None else self.ellipse.to_dict(),
            "sweep_candidates": [c.to_dict() for c in self.selection.candidates],
            "frames_encoded": self.frames_encoded,
            "frames_decoded": self.frames_decoded,
            "frames_total": int(len(self.scores.mask_fractions)),
            "search": self.search,
            "timings_s": {k: round(v, 3) for k, v in self.timings.items()},
        }


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


def liftoff_frames(stack: np.ndarray, max_mean: float, chunk: int = 64) -> np.ndarray:
    """Frames so dark (probe lifted off the belly) that they cannot show an abdomen."""
    means = np.concatenate([stack[i:i + chunk].mean(axis=(1, 2)) for i in range(0, len(stack), chunk)]) \
        if len(stack) else np.zeros(0)
    return means < max_mean


class _BatchLoader:
    """Cuts batches of frames out of the stack in a background thread, one batch ahead of the consumer.

    Fancy-indexing a (840, 562, 744) stack copies the frames; on CUDA the copy goes into pinned memory so
    that the host-to-device transfer is asynchronous. numpy and the copy release the GIL, so this overlaps
    with the network on the main thread.
    """

    def __init__(self, stack: np.ndarray, batches: Sequence[np.ndarray], pin: bool, prefetch: bool):
        self.stack, self.batches, self.pin = stack, list(batches), pin
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="batch-loader") if prefetch else None

    def _load(self, chunk: np.ndarray) -> torch.Tensor:
        frames = torch.from_numpy(np.ascontiguousarray(self.stack[chunk]))
        return frames.pin_memory() if self.pin else frames

    def __iter__(self) -> Iterator[tuple[np.ndarray, torch.Tensor]]:
        if self.pool is None:
            for chunk in self.batches:
                yield chunk, self._load(chunk)
            return
        try:
            ahead: Future | None = self.pool.submit(self._load, self.batches[0]) if self.batches else None
            for i, chunk in enumerate(self.batches):
                frames = ahead.result()
                ahead = self.pool.submit(self._load, self.batches[i + 1]) if i + 1 < len(self.batches) else None
                yield chunk, frames
        finally:
            self.pool.shutdown(wait=True, cancel_futures=True)


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


@dataclass
class _Pending:
    """An encoded frame whose decode decision waits for a later frame of the same call."""

    inputs: torch.Tensor  # (1, 3, s, s)
    features: list[torch.Tensor]  # four (1, width, g, g)


class Predictor:
    """A loaded FetalCLIPSEG and the settings to run it on whole cases.

    The model is prepared for inference in place: LoRA merged into the encoder (unless `merge_lora=False`),
    parameters frozen, moved to the device, matrix weights cast to the half type on CUDA; on CUDA the batch
    size is chosen from the free memory and every shape the case will use is run once (warm-up).
    `device_warning` is the reason of a CPU fallback (`runtime.select_device`), recorded in `runtime`.
    """

    def __init__(self, model: torch.nn.Module, config: Config, device: torch.device | None = None,
                 device_warning: str | None = None):
        self.config = config
        inference = config.inference
        if device is None:
            choice = select_device(inference.device)
            device, device_warning = choice.device, device_warning or choice.fallback
        self.device = device
        try:
            self.precision = choose_precision(inference.precision, self.device)
        except ValueError as error:
            raise DeviceError(str(error)) from None
        if inference.threads > 0:
            torch.set_num_threads(inference.threads)
        encoder = getattr(model, "encoder", None)
        if inference.merge_lora and getattr(encoder, "has_lora", False) and hasattr(model, "merge_lora"):
            model.merge_lora()
        self.model = model.to(self.device).eval()
        for parameter in self.model.parameters():
            parameter.requires_grad_(False)
        cuda = self.device.type == "cuda"
        if cuda:
            torch.backends.cudnn.benchmark = True
            self.model = self.model.to(memory_format=torch.channels_last)
        # The split forward (encoder + frame head for every frame, decoder on demand) needs the three parts.
        self.split = all(hasattr(self.model, part) for part in ("encoder", "decoder", "frame_head"))
        self.lazy_decoder = self.split and inference.lazy_decoder in ("auto", "on")
        self.coarse_stride = resolve_coarse_stride(inference, self.device, getattr(config.model, "width", None))
        # CPU bf16: the encoder's weights are cast once and it runs without autocast (CPU autocast re-casts
        # every weight on every call and sends 3-D linears through a batched-matmul path that copies the
        # weight: slower than fp32 there). The frame head and the decoder stay fp32.
        self._encoder_dtype = torch.bfloat16 if not cuda and self.precision == "bf16" else torch.float32
        if self.split and self._encoder_dtype != torch.float32:
            self.model.encoder.to(self._encoder_dtype)
        # CUDA fp16 / bf16: autocast, with the encoder's matrix weights cast once here.
        self._half = DTYPES[self.precision] if cuda and self.precision != "fp32" else None
        if self.split and self._half is not None:
            cast_matmul_weights(self.model.encoder, self._half)
        # One shape per network part on CUDA: batches padded to the batch size, measured on the plain modules
        # (a compiled one would compile the probe's shape too), then compiled and warmed up at that shape.
        self.pad_batches = cuda
        self._encoder, self._decoder = getattr(self.model, "encoder", None), getattr(self.model, "decoder", None)
        self.batch_size, self._pending_limit, self.memory = self._batch_plan()
        self._encoder, self._decoder = self._compiled_parts()
        if cuda:
            self.warm_up()
        self.runtime = {**describe_runtime(self.device, self.precision, device_warning),
                        "batch_size": self.batch_size}

    # ------------------------------------------------------------------------------------------ set-up

    def _compiled_parts(self):
        encoder = getattr(self.model, "encoder", None)
        decoder = getattr(self.model, "decoder", None)
        if not self.config.inference.compile or not self.split:
            return encoder, decoder
        return torch.compile(encoder, dynamic=False), torch.compile(decoder, dynamic=False)

    def _batch_plan(self) -> tuple[int, int, dict]:
        """(batch size, frames whose decode decision may wait before the host must decide, memory figures).

        Given batch sizes are kept. Auto on the CPU: `cpu_batch_size`, deciding after every batch. Auto on
        CUDA: a probe batch measures the activation memory per frame and the decoder inputs a waiting frame
        holds; the batch is the largest that fits beside the decoder inputs of a typical case, and as many
        frames may wait as half the memory left then holds (every frame of a case, on a T4 as on an H200).
        """
        inference = self.config.inference
        given = inference.batch_size if inference.batch_size > 0 else None
        if self.device.type != "cuda":
            batch = given or max(1, inference.cpu_batch_size)
            return batch, batch, {}
        probe = min(_PROBE_FRAMES, given or inference.max_batch_size)
        per_frame, stored = self._measure_frame_memory(probe)
        available = int(cuda_memory_available(self.device) * (1.0 - _MEMORY_HEADROOM))
        batch, waiting = cuda_batch_plan(available, per_frame, stored if self.lazy_decoder else 0.0,
                                         _TYPICAL_CASE_FRAMES, given, inference.max_batch_size)
        memory = {"probe_frames": probe, "activation_mb_per_frame": round(per_frame / 2**20, 1),
                  "stored_mb_per_frame": round(stored / 2**20, 2), "available_gb": round(available / 2**30, 2),
                  "frames_waiting_at_most": waiting}
        return batch, waiting, memory

    @torch.inference_mode()
    def _measure_frame_memory(self, frames: int) -> tuple[float, float]:
        """CUDA bytes per frame of one forward pass (peak above what was allocated before), and bytes a frame
        waiting for its decode decision holds (network input + decoder features)."""
        size = self.config.model.image_size
        torch.cuda.synchronize(self.device)
        before = torch.cuda.memory_allocated(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        inputs = torch.zeros(frames, 3, size, size, device=self.device).contiguous(memory_format=torch.channels_last)
        stored = 0.0
        if self.split:
            features, _ = self._encode(inputs)
            with self._autocast():
                self._decode_masks(inputs, features)
            stored = sum(f[0].numel() * f.element_size() for f in features) + inputs[0].numel() * inputs.element_size()
        else:
            with self._autocast():
                self.model(inputs)
        torch.cuda.synchronize(self.device)
        peak = torch.cuda.max_memory_allocated(self.device) - before
        return peak / frames, stored

    @torch.inference_mode()
    def warm_up(self) -> None:
        """Run every shape a case uses once (encoder and decoder at the batch size), so that cuDNN's autotuning
        and `torch.compile` happen at load rather than inside the first case."""
        size = self.config.model.image_size
        inputs = torch.zeros(self.batch_size, 3, size, size, device=self.device)
        inputs = inputs.contiguous(memory_format=torch.channels_last)
        if self.split:
            features, _ = self._encode(inputs)
            with self._autocast():
                self._decode_masks(inputs, features)
        else:
            with self._autocast():
                self.model(inputs)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _autocast(self):
        """fp16 / bf16 autocast on CUDA; nothing on the CPU (see `_encoder_dtype`)."""
        if self.device.type != "cuda":
            return nullcontext()
        return autocast(self.device, self.precision)

    def _encode(self, inputs: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Encoder + frame head: (decoder features, frame-head probabilities (B, 3) float32). On CUDA the
        features come in the half type (the decoder's first convolutions would cast them to it anyway)."""
        with self._autocast():
            features, embedding = self._encoder(inputs.to(self._encoder_dtype))
            if self._encoder_dtype != torch.float32:
                features, embedding = [f.float() for f in features], embedding.float()
            elif self._half is not None:
                features = [f.to(self._half) for f in features]
            logits = self.model.frame_head(embedding)
        return features, torch.softmax(logits.float(), dim=1)

    def describe(self) -> dict:
        """The speed-relevant settings actually in force (for logs and the benchmark)."""
        return {"device": str(self.device), "precision": self.precision, "coarse_stride": self.coarse_stride,
                "lazy_decoder": self.lazy_decoder, "lora_merged": not getattr(getattr(self.model, "encoder", None),
                                                                               "has_lora", False),
                "batch_size": self.batch_size, "padded_batches": self.pad_batches,
                "compile": self.config.inference.compile, "threads": torch.get_num_threads(),
                "runtime": self.runtime, **({"memory": self.memory} if self.memory else {})}

    # ------------------------------------------------------------------------------------------ network

    def _inputs(self, frames: torch.Tensor) -> torch.Tensor:
        inputs = preprocess_frames(frames, self.config.model.image_size, device=self.device)
        if self.device.type == "cuda":
            inputs = inputs.contiguous(memory_format=torch.channels_last)
        return inputs

    def _padded(self, chunk: np.ndarray) -> np.ndarray:
        """`chunk` filled up to the batch size with repeats of its last frame (CUDA: one shape per part)."""
        if not self.pad_batches or len(chunk) >= self.batch_size:
            return chunk
        return np.concatenate([chunk, np.full(self.batch_size - len(chunk), chunk[-1], dtype=chunk.dtype)])

    def _decode_masks(self, inputs: torch.Tensor, features: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Decoder + `_mask_outputs` in chunks of `cpu_decoder_chunk` frames on the CPU: the decoder's
        full-resolution activations (~30 MB per frame for the small model) are what bounds peak memory, not
        the batch's inputs. One chunk on CUDA."""
        chunk = len(inputs) if self.device.type == "cuda" else max(1, self.config.inference.cpu_decoder_chunk)
        parts = [self._mask_outputs(self._decoder(inputs[i:i + chunk], [f[i:i + chunk] for f in features]))
                 for i in range(0, len(inputs), chunk)]
        if len(parts) == 1:
            return parts[0]
        return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])

    def _mask_outputs(self, mask_logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, C, s, s) logits -> abdomen probability (B, s, s) float16 and mask fraction (B,), on device."""
        abdomen = 1.0 - torch.softmax(mask_logits.float(), dim=1)[:, 0]
        fractions = (abdomen >= self.config.inference.mask_threshold).float().mean(dim=(1, 2))
        return abdomen.half(), fractions

    @torch.inference_mode()
    def score_frames(self, stack: np.ndarray, indices: np.ndarray, scores: FrameScores,
                     progress: Callable[[int], None] | None = None, timer: StageTimer | None = None) -> None:
        """Run the network on `indices` of the stack, filling `scores` in place.

        Every frame gets its frame-head probabilities; the mask decoder runs on every frame, or with the lazy
        decoder on the frames that `needs_mask` picks (deciding a frame waits until the frames of its
        smoothing window that this call encodes are known). Device results reach the host when decisions
        need them (after every batch on the CPU, once per call on CUDA) and at the end.
        """
        indices = np.unique(np.asarray(indices, dtype=np.int64))
        if len(indices) == 0:
            return
        timer = timer or StageTimer(self.device)
        chunks = [indices[i:i + self.batch_size] for i in range(0, len(indices), self.batch_size)]
        loader = _BatchLoader(stack, [self._padded(c) for c in chunks], pin=self.device.type == "cuda",
                              prefetch=self.config.inference.prefetch and len(chunks) > 1)
        if not self.split:
            return self._score_whole_model(chunks, loader, scores, progress, timer)
        encoded: list[tuple[np.ndarray, torch.Tensor]] = []  # frame-head results not yet on the host
        decoded: list[tuple[np.ndarray, torch.Tensor, torch.Tensor]] = []  # decoder results, likewise
        pending: dict[int, _Pending] = {}
        for position, (chunk, (_, frames)) in enumerate(zip(chunks, loader)):
            n = len(chunk)
            with timer.device_span("preprocess"):
                inputs = self._inputs(frames)
            with timer.device_span("encode"):
                features, probabilities = self._encode(inputs)
            encoded.append((chunk, probabilities[:n]))
            if not self.lazy_decoder:
                with timer.device_span("decode"), self._autocast():
                    abdomen, fractions = self._decode_masks(inputs, features)
                decoded.append((chunk, abdomen[:n], fractions[:n]))
            else:
                for row, frame in enumerate(chunk.tolist()):
                    pending[frame] = _Pending(inputs[row:row + 1], [f[row:row + 1] for f in features])
                last = position == len(chunks) - 1
                if last or len(pending) >= self._pending_limit:
                    self._to_host(encoded, scores)
                    next_frame = None if last else int(chunks[position + 1][0])
                    ready = self._decide(scores, sorted(pending), next_frame)
                    chosen = [frame for frame, go in ready.items() if go]
                    items = [pending.pop(frame) for frame in chosen]
                    for frame in ready:
                        pending.pop(frame, None)  # decided against: features dropped
                    decoded += self._decode_pending(np.array(chosen, dtype=np.int64), items, timer)
            if progress is not None:
                progress(n)
        assert not pending, "the last batch has no later frame to wait for"
        self._to_host(encoded, scores)
        self._collect(decoded, scores)

    def _decode_pending(self, frames: np.ndarray, items: list[_Pending], timer: StageTimer) -> list:
        """Decode waiting frames: in batches of the batch size on CUDA (the last padded), at once on the CPU
        (`_decode_masks` bounds the CPU's memory itself). Results stay on the device."""
        size = self.batch_size if self.pad_batches else max(len(items), 1)
        out = []
        for start in range(0, len(items), size):
            part = items[start:start + size]
            part = part + [part[-1]] * (size - len(part)) if self.pad_batches else part
            inputs = torch.cat([item.inputs for item in part])
            features = [torch.cat(maps) for maps in zip(*(item.features for item in part))]
            with timer.device_span("decode"), self._autocast():
                abdomen, fractions = self._decode_masks(inputs, features)
            real = frames[start:start + size]
            out.append((real, abdomen[:len(real)], fractions[:len(real)]))
        return out

    def _score_whole_model(self, chunks: list[np.ndarray], loader: _BatchLoader, scores: FrameScores,
                           progress: Callable[[int], None] | None, timer: StageTimer) -> None:
        """Any model with FetalCLIPSeg's forward (e.g. a wrapped one): one forward per batch, all decoded."""
        encoded, decoded = [], []
        for chunk, (_, frames) in zip(chunks, loader):
            n = len(chunk)
            with timer.device_span("preprocess"):
                inputs = self._inputs(frames)
            with timer.device_span("encode"), self._autocast():
                output = self.model(inputs)
                probabilities = torch.softmax(output.frame_logits.float(), dim=1)
                abdomen, fractions = self._mask_outputs(output.mask_logits)
            encoded.append((chunk, probabilities[:n]))
            decoded.append((chunk, abdomen[:n], fractions[:n]))
            if progress is not None:
                progress(n)
        self._to_host(encoded, scores)
        self._collect(decoded, scores)

    @staticmethod
    def _to_host(encoded: list[tuple[np.ndarray, torch.Tensor]], scores: FrameScores) -> None:
        """Frame-head probabilities of the batches since the last call, copied to the host at once."""
        if not encoded:
            return
        chunks = np.concatenate([e[0] for e in encoded])
        scores.probabilities[chunks] = torch.cat([e[1] for e in encoded]).cpu().numpy()
        encoded.clear()

    @staticmethod
    def _collect(decoded: list[tuple[np.ndarray, torch.Tensor, torch.Tensor]], scores: FrameScores) -> None:
        """Decoder results copied to the host once per call: no synchronisation inside the batch loop."""
        if not decoded:
            return
        frames = np.concatenate([d[0] for d in decoded])
        abdomen = torch.cat([d[1] for d in decoded]).cpu()
        scores.mask_fractions[frames] = torch.cat([d[2] for d in decoded]).cpu().numpy()
        for row, frame in enumerate(frames.tolist()):
            scores.abdomen_maps[frame] = abdomen[row]

    # ------------------------------------------------------------------------------------------ lazy decoder

    def _window(self, frame: int, bounds: tuple[int, int]) -> tuple[int, int]:
        """[lo, hi] of the smoothing window of `frame` inside its sweep (select.nan_moving_average's)."""
        window = max(1, self.config.inference.smoothing_window)
        half = window // 2
        return max(bounds[0], frame - half), min(bounds[1] - 1, frame + (window - 1 - half))

    def _sweep_of(self, n_frames: int) -> Callable[[int], tuple[int, int]]:
        bounds = sweep_bounds(n_frames, self.config.inference.sweeps)
        starts = np.array([b[0] for b in bounds])
        return lambda frame: bounds[int(np.searchsorted(starts, frame, side="right")) - 1]

    def needs_mask(self, scores: FrameScores, frame: int, sweep: tuple[int, int]) -> bool:
        """Could `frame` be chosen? Only if some encoded frame of its smoothing window has
        P(optimal) + P(suboptimal) >= min_quality_probability (the smoothed value is a mean of those)."""
        lo, hi = self._window(frame, sweep)
        window = scores.probabilities[lo:hi + 1]
        p_abdomen = window[:, FRAME_OPTIMAL] + window[:, FRAME_SUBOPTIMAL]
        p_abdomen = p_abdomen[~np.isnan(p_abdomen)]
        return bool(p_abdomen.size) and float(p_abdomen.max()) >= \
            self.config.inference.min_quality_probability - _DECODE_SLACK

    def _decide(self, scores: FrameScores, frames: list[int], next_frame: int | None) -> dict[int, bool]:
        """Decode decisions for the frames whose window holds no frame still to come in this call."""
        sweep_of = self._sweep_of(len(scores.mask_fractions))
        decided = {}
        for frame in frames:
            sweep = sweep_of(frame)
            _, hi = self._window(frame, sweep)
            if next_frame is not None and next_frame <= hi:
                continue  # a later frame of this call lies in the window: decide with the next batch
            decided[frame] = self.needs_mask(scores, frame, sweep)
        return decided

    def complete_masks(self, stack: np.ndarray, scores: FrameScores, timer: StageTimer | None = None) -> int:
        """Decode frames that became choosable after their batch was decided (a neighbour encoded by a later
        call of the coarse search): they are encoded again with the decoder. Returns how many."""
        sweep_of = self._sweep_of(len(scores.mask_fractions))
        missing = [f for f in np.flatnonzero(scores.scored & ~scores.decoded).tolist()
                   if self.needs_mask(scores, f, sweep_of(f))]
        if missing:
            self._full_forward(stack, np.array(missing), scores, timer or StageTimer(self.device))
        return len(missing)

    @torch.inference_mode()
    def _full_forward(self, stack: np.ndarray, frames: np.ndarray, scores: FrameScores, timer: StageTimer) -> None:
        decoded = []
        for start in range(0, len(frames), self.batch_size):
            chunk = frames[start:start + self.batch_size]
            with timer.device_span("preprocess"):
                inputs = self._inputs(torch.from_numpy(np.ascontiguousarray(stack[self._padded(chunk)])))
            with timer.device_span("encode"):
                features, _ = self._encode(inputs)
            with timer.device_span("decode"), self._autocast():
                abdomen, fractions = self._decode_masks(inputs, features)
            decoded.append((chunk, abdomen[:len(chunk)], fractions[:len(chunk)]))
        self._collect(decoded, scores)

    # ------------------------------------------------------------------------------------------ search

    def frames_to_encode(self, stack: np.ndarray) -> np.ndarray:
        """Every frame except probe lift-off."""
        dark = liftoff_frames(stack, self.config.inference.liftoff_max_mean)
        return np.flatnonzero(~dark)

    def coarse_frames(self, candidates: np.ndarray, n_frames: int, stride: int) -> np.ndarray:
        """Every `stride`-th candidate (non-lift-off) frame of each sweep, starting half a stride in."""
        chosen = []
        for start, stop in sweep_bounds(n_frames, self.config.inference.sweeps):
            inside = candidates[(candidates >= start) & (candidates < stop)]
            chosen.append(inside[min(stride // 2, max(len(inside) - 1, 0))::stride])
        return np.concatenate(chosen) if chosen else np.zeros(0, dtype=np.int64)

    def refine_centres(self, scores: FrameScores) -> list[int]:
        """The best `refine_candidates` encoded frames of each sweep, ranked as `select` ranks frames
        (tier, evidence, mask size), at least `refine_radius` apart, among the frames whose smoothed
        P(abdomen) reaches REFINE_FLOOR x min_quality_probability."""
        inference = self.config.inference
        probs = scores.probabilities
        centres = []
        for start, stop in sweep_bounds(len(probs), inference.sweeps):
            encoded = np.flatnonzero(scores.scored[start:stop])
            if not len(encoded):
                continue
            smoothed = nan_moving_average(probs[start:stop], inference.smoothing_window)
            p_abdomen = smoothed[:, FRAME_OPTIMAL] + smoothed[:, FRAME_SUBOPTIMAL]
            area = np.nan_to_num(scores.mask_fractions[start:stop], nan=0.0)
            tier, score = frame_tiers(smoothed, area, inference)
            floor = REFINE_FLOOR * inference.min_quality_probability
            rank = evidence(score, area)
            keys = [(tier[i], rank[i], score[i], area[i], -i) for i in encoded if p_abdomen[i] >= floor]
            taken: list[int] = []
            for key in sorted(keys, reverse=True):
                frame = -int(key[-1])
                if all(abs(frame - t) > inference.refine_radius for t in taken):
                    taken.append(frame)
                if len(taken) >= max(1, inference.refine_candidates):
                    break
            centres += [start + t for t in taken]
        return centres

    def coarse_to_fine(self, stack: np.ndarray, candidates: np.ndarray, scores: FrameScores, stride: int,
                       progress: Callable[[int], None] | None = None, timer: StageTimer | None = None) -> dict:
        """Coarse pass, then refinement rounds around the best frames of every sweep until they settle."""
        n_frames = len(stack)
        coarse = self.coarse_frames(candidates, n_frames, stride)
        self.score_frames(stack, coarse, scores, progress, timer)
        allowed = np.zeros(n_frames, dtype=bool)
        allowed[candidates] = True
        radius = max(1, self.config.inference.refine_radius)
        rounds = []
        for _ in range(MAX_REFINE_ROUNDS):
            wanted = set()
            for centre in self.refine_centres(scores):
                lo, hi = max(0, centre - radius), min(n_frames - 1, centre + radius)
                wanted.update(f for f in range(lo, hi + 1) if allowed[f] and not scores.scored[f])
            if not wanted:
                break
            rounds.append(len(wanted))
            self.score_frames(stack, np.array(sorted(wanted)), scores, progress, timer)
        return {"coarse_frames": int(len(coarse)), "refine_rounds": rounds}

    # ------------------------------------------------------------------------------------------ one case

    def predict(self, stack: np.ndarray, progress: Callable[[int], None] | None = None) -> CaseResult:
        """Choose the AC frame of a (frames, height, width) uint8 stack and segment it."""
        timer = StageTimer(self.device)
        n_frames, height, width = stack.shape
        with timer("field_of_view"):
            fov = fov_from_stack(stack)
            candidates = self.frames_to_encode(stack)
        scores = FrameScores.empty(n_frames)
        stride = self.coarse_stride
        search: dict = {"coarse_stride": stride, "lift_off_frames": int(n_frames - len(candidates)),
                        "precision": self.precision, "batch_size": self.batch_size, "lazy_decoder": self.lazy_decoder}
        with timer("network"):
            if stride <= 1:
                self.score_frames(stack, candidates, scores, progress, timer)
            else:
                search.update(self.coarse_to_fine(stack, candidates, scores, stride, progress, timer))
            reencoded = self.complete_masks(stack, scores, timer) if self.lazy_decoder else 0
        search["frames_reencoded"] = reencoded
        with timer("select"):
            selection = select_frame(scores.probabilities, scores.mask_fractions, self.config.inference)
        mask, ellipse, ac_mm = None, None, None
        with timer("postprocess"):
            if selection.frame != NO_FRAME:
                probability = abdomen_probability(scores.abdomen_maps[selection.frame], height, width)
                mask = clean_mask(probability, fov, self.config.inference.mask_threshold)
                ellipse = biometry.fit_ellipse(mask, fov)
                ac_mm = None if ellipse is None else float(ellipse.circumference_mm(biometry.PIXEL_SPACING_MM))
        encoded = int(scores.scored.sum()) + reencoded
        return CaseResult(frame=selection.frame, mask=mask, ellipse=ellipse, ac_mm=ac_mm, selection=selection,
                          scores=scores, fov=fov, timings=dict(timer.seconds), frames_encoded=encoded,
                          frames_decoded=int(scores.decoded.sum()), search=search)


def load_predictor(weights: Path, config_overrides: dict | None = None) -> tuple[Predictor, dict]:
    """Load our checkpoint and wrap it; returns the predictor and the checkpoint's description.

    The device is chosen first, so that `--device cuda` without a usable GPU fails before the weights are
    read; a CPU fallback while an NVIDIA GPU is visible is logged as a WARNING with its reason.
    """
    from .model.checkpoint import CheckpointError, load_checkpoint, read_checkpoint_info

    choice = select_device((config_overrides or {}).get("device", "auto"))
    if choice.fallback:
        log.warning(choice.fallback)
    declared = read_checkpoint_info(weights).config
    if declared.decoder == "none" or declared.frame_classes != 3:
        raise CheckpointError(f"{weights} holds a frame classifier (decoder {declared.decoder!r}, "
                              f"{declared.frame_classes} frame class(es)); the algorithm needs a mask decoder and "
                              "three frame classes")
    model, info = load_checkpoint(weights, device="cpu")
    config = Config(model=info.config).replace(**(config_overrides or {}))
    predictor = Predictor(model, config, choice.device, device_warning=choice.fallback)
    return predictor, {"weights": str(weights), "provenance": info.provenance, "version": info.version}
