"""`python -m algorithm.benchmark`: case-level speed of our pipeline against the paper-style reference.

On one generated replica case (training.phantom, a dev dependency imported lazily) it times every stage
(read, field of view, preprocess, encode, decode, select, post-process, write) of

* our pipeline (`algorithm.inference.Predictor` with its defaults: LoRA merged, inference mode, bf16 on
  AMX CPUs / fp16-bf16 autocast on CUDA, lazy decoder, coarse-to-fine search on the CPU), and
* a reference path that runs the same weights the way the published FetalCLIPSEG code does: every frame,
  fp32, peft's unmerged LoRA, intermediate tokens captured with `register_forward_hook` on the transformer
  blocks of a plain `visual(x)` call, and per-frame numpy post-processing of every mask on the host,

on the same hardware in the same process, and reports frames per second, peak memory, FLOPs per frame and,
on a GPU, the distance to the compute floor of the encoder. Timed runs follow one untimed warm-up batch per
pipeline (library initialisation: oneDNN primitives, cuDNN autotuning, CUDA context).

`--frames N` (for the full model on a CPU): the reference runs on a replica case of about N frames (same
seed, shorter sweeps) and its per-frame cost is extrapolated to the whole case (`extrapolated: true`); our
pipeline runs on the whole case and, for the same-frame check, on the short case too.

Numbers on a shared machine are noisy; CPU seconds (`process_time`) are reported next to wall seconds.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import resource
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from .config import Config, InferenceConfig, ModelConfig
from .inference import FrameScores, Predictor, StageTimer
from .runtime import resolve_device
from .postprocess import abdomen_probability, clean_mask
from .preprocess import preprocess_frames
from .select import NO_FRAME, select_frame

BUNDLED_WEIGHTS = Path(__file__).resolve().parent / "weights"
# Dense tensor-core peaks (TFLOP/s) of the GPUs we may run on: fp16 on T4 (bf16 unsupported), bf16 otherwise.
GPU_PEAK_TFLOPS = {"T4": 65.0, "A10G": 70.0, "L4": 121.0, "A100": 312.0, "H100": 756.0, "H200": 790.0}
STAGES = ("read", "field_of_view", "preprocess", "encode", "decode", "scores", "select", "postprocess", "write",
          "other")


# ------------------------------------------------------------------------------------------ reference path

class ReferencePipeline:
    """FetalCLIPSEG run like the published code: every frame, fp32, hooks, per-frame host post-processing.

    The model is used as loaded (LoRA adapters unmerged). Intermediate token maps come from forward hooks
    on the transformer blocks of `visual(x)`; the network's outputs are the same as `FetalCLIPSeg.forward`.
    """

    def __init__(self, model: torch.nn.Module, config: Config, device: torch.device):
        self.model = model.to(device).eval()
        self.config = config
        self.device = device
        visual = self.model.encoder.visual
        self.visual = visual
        self.blocks = [visual.transformer.resblocks[i - 1] for i in config.model.skip_layers]
        self.batch_first = getattr(visual.transformer, "batch_first", True)
        self.captured: dict[int, torch.Tensor] = {}
        self.handles = [block.register_forward_hook(self._hook(i)) for i, block in enumerate(self.blocks)]

    def _hook(self, position: int):
        def capture(_module, _inputs, output):
            self.captured[position] = output if self.batch_first else output.transpose(0, 1)
        return capture

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()

    def forward(self, x: torch.Tensor, timer: StageTimer) -> tuple[torch.Tensor, torch.Tensor]:
        with timer("encode"):
            self.captured.clear()
            embedding = self.visual(x)
            grid = self.config.model.grid_size
            features = [self.captured[i][:, 1:].transpose(1, 2).reshape(x.shape[0], -1, grid, grid)
                        for i in range(len(self.blocks))]
            frame_logits = self.model.frame_head(embedding)
        with timer("decode"):
            mask_logits = self.model.decoder(x, features)
        return mask_logits, frame_logits

    @torch.no_grad()
    def predict(self, stack: np.ndarray, timer: StageTimer) -> dict:
        n_frames, height, width = stack.shape
        inference = self.config.inference
        size = self.config.model.image_size
        probabilities = np.zeros((n_frames, 3))
        fractions = np.zeros(n_frames)
        maps: list[np.ndarray] = []
        with timer("field_of_view"):
            from .fov import fov_from_stack
            fov = fov_from_stack(stack)
        batch = max(1, inference.batch_size)
        for start in range(0, n_frames, batch):
            with timer("preprocess"):
                x = preprocess_frames(torch.from_numpy(stack[start:start + batch]), size).to(self.device)
            mask_logits, frame_logits = self.forward(x, timer)
            with timer("scores"):  # the published code's per-frame loop over host arrays
                probs = torch.softmax(frame_logits, dim=1).cpu().numpy()
                masks = torch.softmax(mask_logits, dim=1).cpu().numpy()
                for row in range(len(probs)):
                    abdomen = 1.0 - masks[row, 0]
                    binary = (abdomen >= inference.mask_threshold).astype(np.uint8)
                    probabilities[start + row] = probs[row]
                    fractions[start + row] = binary.sum() / float(binary.size)
                    maps.append(abdomen.astype(np.float32))
        with timer("select"):
            selection = select_frame(probabilities, fractions, inference)
        with timer("postprocess"):
            mask = None
            if selection.frame != NO_FRAME:
                probability = abdomen_probability(torch.from_numpy(maps[selection.frame]), height, width)
                mask = clean_mask(probability, fov, inference.mask_threshold)
        return {"frame": selection.frame, "mask": mask, "frames_encoded": n_frames, "frames_decoded": n_frames,
                "probabilities": probabilities, "fractions": fractions}


# ------------------------------------------------------------------------------------------ measurements

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
    `Predictor` does; this casts `model`'s), the other weights fp32, + activations (fp32 upper bound), plus
    30 % for the caching allocator's fragmentation and cuBLAS/cuDNN workspaces. The CUDA context itself
    (about 0.3-0.5 GB on a T4) is not counted."""
    from .inference import cast_matmul_weights

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


# ------------------------------------------------------------------------------------------ set-up

@dataclass
class Weights:
    config: ModelConfig
    state: dict[str, torch.Tensor] | None  # None: load from `path`
    path: Path | None
    note: str
    meaningful: bool  # trained weights (outputs mean something)

    def model(self) -> torch.nn.Module:
        """A fresh model with these weights (LoRA unmerged), on the CPU."""
        if self.path is not None:
            from .model.checkpoint import load_checkpoint
            return load_checkpoint(self.path, device="cpu")[0]
        from .model.fetalclipseg import build_model
        model = build_model(self.config)
        model.load_state_dict(self.state)
        return model


def choose_weights(config_name: str, weights: Path | None) -> Weights:
    """--weights; else the bundled demo weights (small config only); else random initialisation."""
    from .model.checkpoint import read_checkpoint_info

    if weights is None and config_name == "small":
        found = sorted(BUNDLED_WEIGHTS.glob("*.safetensors"))
        weights = found[0] if found else None
    if weights is not None:
        info = read_checkpoint_info(weights)
        return Weights(info.config, None, Path(weights), f"{weights}: {info.provenance}", meaningful=True)
    from .model.fetalclipseg import build_model

    config = ModelConfig.small() if config_name == "small" else ModelConfig()
    torch.manual_seed(0)
    state = copy.deepcopy(build_model(config).state_dict())
    what = "FetalCLIP-shaped ViT-L/14" if config_name == "full" else "small"
    return Weights(config, state, None, f"random initialisation of the {what} model (seed 0): timings are "
                   "real, but the frame choice is noise, so same_frame_as_reference only checks that the "
                   "optimisations keep the network's ranking", meaningful=False)


def make_case(seed: int, frames_per_sweep: int) -> np.ndarray:
    from training.phantom import generate_case  # dev dependency, only the benchmark needs it

    return generate_case(seed, frames_per_sweep=frames_per_sweep).image


def time_read_write(stack: np.ndarray, frame: int, mask: np.ndarray | None) -> tuple[dict, dict, np.ndarray]:
    """Write the case as the challenge ships it, read it back with `contract.read_stack`, write the outputs
    with `contract.write_outputs`: (wall s, CPU s, the stack as read)."""
    import SimpleITK as sitk

    from .contract import read_stack, write_outputs

    with tempfile.TemporaryDirectory(prefix="benchmark-") as tmp:
        path = Path(tmp) / "case.mha"
        image = sitk.GetImageFromArray(stack)
        image.SetSpacing((0.28, 0.28, 0.28))
        sitk.WriteImage(image, str(path), useCompression=True, compressionLevel=1)
        wall, cpu = {}, {}
        t, c = time.perf_counter(), time.process_time()
        read = read_stack(path)
        wall["read"], cpu["read"] = time.perf_counter() - t, time.process_time() - c
        t, c = time.perf_counter(), time.process_time()
        write_outputs(Path(tmp) / "output", read, frame, mask)
        wall["write"], cpu["write"] = time.perf_counter() - t, time.process_time() - c
    return wall, cpu, read.array


# ------------------------------------------------------------------------------------------ runs

@dataclass
class Run:
    frame: int
    seconds: dict[str, float]
    cpu_seconds: dict[str, float]
    frames_encoded: int
    frames_decoded: int
    peak_rss_mb: float
    cuda_max_allocated_mb: float | None
    mask: np.ndarray | None = None
    extra: dict = field(default_factory=dict)

    @property
    def network_seconds(self) -> float:
        return sum(self.seconds.get(k, 0.0) for k in ("preprocess", "encode", "decode", "scores", "other"))


def run_ours(predictor: Predictor, stack: np.ndarray) -> Run:
    with PeakRSS() as rss, cuda_peak(predictor.device) as gpu:
        start, cpu_start = time.perf_counter(), time.process_time()
        result = predictor.predict(stack)
        total, cpu_total = time.perf_counter() - start, time.process_time() - cpu_start
    seconds = dict(result.timings)
    network = seconds.pop("network", 0.0)
    inner = sum(seconds.get(k, 0.0) for k in ("preprocess", "encode", "decode"))
    seconds["other"] = max(0.0, total - sum(seconds.values()))  # loader waits, transfers, search bookkeeping
    cpu = {"pipeline": cpu_total}
    return Run(result.frame, seconds, cpu, result.frames_encoded, result.frames_decoded, rss.peak,
               gpu["max_allocated_mb"], result.mask,
               {"search": result.search, "network_wall_s": network, "network_inner_s": inner})


def run_reference(reference: ReferencePipeline, stack: np.ndarray) -> Run:
    timer = StageTimer(reference.device)
    with PeakRSS() as rss, cuda_peak(reference.device) as gpu:
        start, cpu_start = time.perf_counter(), time.process_time()
        out = reference.predict(stack, timer)
        total, cpu_total = time.perf_counter() - start, time.process_time() - cpu_start
    seconds = dict(timer.seconds)
    seconds["other"] = max(0.0, total - sum(seconds.values()))
    return Run(out["frame"], seconds, {"pipeline": cpu_total}, out["frames_encoded"], out["frames_decoded"],
               rss.peak, gpu["max_allocated_mb"], out["mask"])


def warm_up(predictor: Predictor, reference: ReferencePipeline, stack: np.ndarray, frames: int = 2) -> None:
    """One small untimed batch through each pipeline: one-off library initialisation is not case time
    (on CUDA use a full batch, so that cuDNN autotuning happens here)."""
    if predictor.device.type == "cuda":
        frames = predictor.batch_size
    frames = np.arange(min(len(stack), max(1, frames)))
    predictor.score_frames(stack, frames, FrameScores.empty(len(stack)))
    with torch.no_grad():
        x = preprocess_frames(torch.from_numpy(stack[frames]), predictor.config.model.image_size).to(reference.device)
        reference.forward(x, StageTimer(reference.device))


# ------------------------------------------------------------------------------------------ report

def stage_table(ours: Run, reference: Run, reference_scale: float, shared: dict[str, float]) -> list[dict]:
    """Per-stage seconds of both pipelines. `shared` stages (read, write) run the same code for both and are
    measured once; the reference's own stages are multiplied by `reference_scale` (1 unless extrapolated)."""
    rows = []
    for stage in STAGES:
        mine = ours.seconds.get(stage, 0.0) + shared.get(stage, 0.0)
        theirs = reference.seconds.get(stage, 0.0) * reference_scale + shared.get(stage, 0.0)
        if mine == 0.0 and theirs == 0.0:
            continue
        rows.append({"stage": stage, "seconds": round(mine, 3), "reference_seconds": round(theirs, 3),
                     "speedup": round(theirs / mine, 2) if mine > 0 else None})
    return rows


def print_report(report: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(stderr=False)
    table = Table(title=f"FetalCLIPSEG case benchmark: {report['config']} model on {report['device_name']}")
    table.add_column("stage")
    table.add_column("ours (s)", justify="right")
    table.add_column("reference (s)", justify="right")
    table.add_column("speed-up", justify="right")
    for row in report["stages"]:
        table.add_row(row["stage"], f"{row['seconds']:.2f}", f"{row['reference_seconds']:.2f}",
                      "" if row["speedup"] is None else f"{row['speedup']:.1f}x")
    table.add_row("[bold]case", f"[bold]{report['seconds']:.2f}", f"[bold]{report['reference_seconds']:.2f}",
                  f"[bold]{report['speedup_vs_reference']:.1f}x")
    console.print(table)
    extrapolated = " (reference extrapolated from a shorter case)" if report["extrapolated"] else ""
    console.print(f"frames: {report['frames']}, encoded by us: {report['frames_encoded']}, decoded: "
                  f"{report['frames_decoded']}; {report['frames_per_second']:.1f} frames/s vs "
                  f"{report['reference_frames_per_second']:.1f}{extrapolated}")
    console.print(f"chosen frame: ours {report['frame']}, reference {report['reference_frame']} "
                  f"(same: {report['same_frame_as_reference']}; {report['same_frame_scope']})")
    flops = report.get("flops") or {}
    if flops:
        line = (f"FLOPs per frame: encoder {flops['encoder_gflop']:.1f} G, decoder {flops['decoder_gflop']:.1f} G; "
                f"encoder at {flops['encoder_achieved_tflops']:.3f} TFLOP/s")
        if flops.get("encoder_floor_s") is not None:
            line += (f"; compute floor {flops['encoder_floor_s']:.2f} s at {flops['peak_tflops']} TFLOP/s, "
                     f"encoder {flops['encoder_vs_floor']:.1f}x the floor")
        console.print(line)
    memory = report["memory"]
    console.print(f"peak host RSS: ours {memory['host_peak_rss_mb']:.0f} MiB, reference "
                  f"{memory['reference_host_peak_rss_mb']:.0f} MiB" +
                  (f"; CUDA max allocated: ours {memory['cuda_max_allocated_mb']} MiB, reference "
                   f"{memory['reference_cuda_max_allocated_mb']} MiB" if memory.get("cuda_max_allocated_mb") else ""))
    if memory.get("estimate_t4"):
        est = memory["estimate_t4"]
        console.print(f"T4 estimate at batch {est['batch_size']}: {est['estimate_gb']} GB "
                      f"(weights {est['weights_gb']} GB, activations {est['activations_gb']} GB)")
    for note in report["notes"]:
        console.print(f"[dim]note: {note}")


# ------------------------------------------------------------------------------------------ search check

class LabelOracle(torch.nn.Module):
    """A stand-in network for checking the frame search without trained weights (dev tool).

    It recognises each frame of one replica case by a signature of its network input (4 x 4 block means)
    and answers what a good network would: frame-head logits from the ground-truth labels blurred along
    time (a network is unsure at the ends of a run) plus Gaussian logit noise, and the ground-truth mask
    as the mask logits. It has FetalCLIPSeg's three parts, so `Predictor` runs it like the real model.
    """

    def __init__(self, stack: np.ndarray, labels: np.ndarray, image_size: int, noise: float, seed: int):
        super().__init__()
        from scipy import ndimage

        self.image_size = image_size
        signatures = []
        for start in range(0, len(stack), 64):
            signatures.append(self.signature(preprocess_frames(stack[start:start + 64], image_size)))
        self.signatures = torch.cat(signatures)
        annotated = labels.reshape(len(labels), -1)
        optimal = (annotated == 1).any(axis=1).astype(np.float64)
        suboptimal = (annotated == 2).any(axis=1).astype(np.float64)
        rng = np.random.default_rng(seed)
        q_opt = ndimage.gaussian_filter1d(optimal, 1.0)
        q_sub = ndimage.gaussian_filter1d(suboptimal, 1.0)
        logits = np.stack([np.zeros(len(labels)), 6.0 * q_sub - 2.5, 6.0 * q_opt - 2.5], axis=1)
        self.frame_logits = torch.tensor(logits + rng.normal(0.0, noise, logits.shape), dtype=torch.float32)
        self.masks: dict[int, torch.Tensor] = {}
        for frame in np.flatnonzero(optimal + suboptimal):
            square = preprocess_frames((labels[frame:frame + 1] > 0).astype(np.uint8) * 255, image_size)
            self.masks[int(frame)] = square[0, 0] > square[0, 0].mean()
        outer = self

        class Encoder(torch.nn.Module):
            def forward(self, x):
                index = outer.lookup(x).float().view(-1, 1, 1, 1)
                return [index] * 4, index.view(-1, 1)

        class Head(torch.nn.Module):
            def forward(self, embedding):
                return outer.frame_logits[embedding.view(-1).long()]

        class Decoder(torch.nn.Module):
            def forward(self, x, features):
                frames = features[0].view(-1).long().tolist()
                logits = torch.full((len(frames), 2, outer.image_size, outer.image_size), -8.0)
                logits[:, 0] = 8.0
                for row, frame in enumerate(frames):
                    if frame in outer.masks:
                        logits[row, 1] = torch.where(outer.masks[frame], 8.0, -8.0)
                return logits

        self.encoder, self.frame_head, self.decoder = Encoder(), Head(), Decoder()

    @staticmethod
    def signature(x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.adaptive_avg_pool2d(x[:, :1].float(), 4).flatten(1).double()

    def lookup(self, x: torch.Tensor) -> torch.Tensor:
        distances = torch.cdist(self.signature(x), self.signatures)
        return distances.argmin(dim=1)


def compare_search(args: argparse.Namespace) -> dict:
    """Coarse-to-fine against the dense scan on `args.compare_search` replica cases (seeds from `args.seed`):
    chosen frames, challenge scores (training.metrics.case_score) and frames encoded."""
    from training.metrics import case_score
    from training.phantom import generate_case

    device = resolve_device(args.device)
    oracle = args.weights is None and not sorted(BUNDLED_WEIGHTS.glob("*.safetensors"))
    weights = None if oracle else choose_weights("small", args.weights)
    stride = args.coarse_stride if args.coarse_stride and args.coarse_stride > 1 else \
        InferenceConfig().cpu_coarse_stride
    rows = []
    for i in range(args.compare_search):
        seed = args.seed + i
        case = generate_case(seed, frames_per_sweep=args.frames_per_sweep)
        results = {}
        for name, coarse in (("dense", 1), ("coarse", stride)):
            model_config = ModelConfig.small() if oracle else weights.config
            config = Config(model=model_config).replace(device=device.type, coarse_stride=coarse,
                                                        **({"precision": "fp32"} if oracle else {}),
                                                        **overrides_from(args, skip=("coarse_stride",)))
            model = (LabelOracle(case.image, case.mask, model_config.image_size, args.oracle_noise, seed)
                     if oracle else weights.model())
            predictor = Predictor(model, config, device)
            start = time.perf_counter()
            result = predictor.predict(case.image)
            seconds = time.perf_counter() - start
            score = case_score(result.frame, result.mask, case.mask, case.ac_per_sweep, fov=result.fov)
            results[name] = {"frame": result.frame, "score": round(score.score, 4), "wfss": score.wfss,
                             "frames_encoded": result.frames_encoded, "seconds": round(seconds, 2)}
        dense, coarse_result = results["dense"], results["coarse"]
        rows.append({"seed": seed, "uuid": case.uuid, "dense": dense, "coarse": coarse_result,
                     "same_frame": dense["frame"] == coarse_result["frame"],
                     "score_delta": round(coarse_result["score"] - dense["score"], 4)})
        print(f"case {seed}: dense frame {dense['frame']} score {dense['score']:.3f} ({dense['frames_encoded']} "
              f"frames), coarse frame {coarse_result['frame']} score {coarse_result['score']:.3f} "
              f"({coarse_result['frames_encoded']} frames)", flush=True)
    encoded_dense = sum(r["dense"]["frames_encoded"] for r in rows)
    encoded_coarse = sum(r["coarse"]["frames_encoded"] for r in rows)
    return {
        "network": (f"label oracle (ground truth blurred over 1 frame, logit noise s.d. {args.oracle_noise}): "
                    "no trained weights were available" if oracle else weights.note),
        "coarse_stride": stride, "cases": len(rows), "frames_per_sweep": args.frames_per_sweep,
        "same_frame": sum(r["same_frame"] for r in rows),
        "mean_score_dense": round(float(np.mean([r["dense"]["score"] for r in rows])), 4),
        "mean_score_coarse": round(float(np.mean([r["coarse"]["score"] for r in rows])), 4),
        "worst_score_delta": min(r["score_delta"] for r in rows),
        "frames_encoded_dense": encoded_dense, "frames_encoded_coarse": encoded_coarse,
        "encoder_work_ratio": round(encoded_dense / max(encoded_coarse, 1), 2),
        "rows": rows,
    }


# ------------------------------------------------------------------------------------------ main

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m algorithm.benchmark", description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, default=None, help="write the report here")
    parser.add_argument("--config", choices=["small", "full"], default="small")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--weights", type=Path, default=None,
                        help="checkpoint; default: the bundled demo weights (small), else random weights")
    parser.add_argument("--frames", type=int, default=None,
                        help="run the reference on a ~N-frame case and extrapolate (full model on a CPU)")
    parser.add_argument("--frames-per-sweep", type=int, default=140, help="replica case size (6 sweeps)")
    parser.add_argument("--seed", type=int, default=5000, help="replica case seed (not a training seed)")
    parser.add_argument("--coarse-stride", type=int, default=None, help="override (0 auto, 1 dense)")
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--precision", choices=["auto", "fp32", "fp16", "bf16"], default=None,
                        help="network number format (default auto: runtime.choose_precision)")
    parser.add_argument("--cpu-precision", dest="precision", choices=["auto", "fp32", "bf16"],
                        help="older name of --precision")
    parser.add_argument("--lazy-decoder", choices=["auto", "on", "off"], default=None)
    parser.add_argument("--compile", action="store_true", help="torch.compile encoder and decoder")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--no-flops", action="store_true", help="skip FLOP counting and the memory estimate")
    parser.add_argument("--compare-search", type=int, default=0, metavar="CASES",
                        help="instead of timing: coarse-to-fine vs dense scan on CASES replica cases (frames, "
                             "challenge scores); the small model's weights, or a label oracle without weights")
    parser.add_argument("--oracle-noise", type=float, default=0.5, help="logit noise of the label oracle")
    parser.add_argument("--quick", action="store_true",
                        help="small config, 6 x 4 frames, batch 8: a CI smoke run of well under a minute")
    return parser.parse_args(argv)


def overrides_from(args: argparse.Namespace, skip: tuple[str, ...] = ()) -> dict[str, Any]:
    chosen = {"coarse_stride": args.coarse_stride, "batch_size": args.batch_size, "precision": args.precision,
              "lazy_decoder": args.lazy_decoder, "threads": args.threads, "compile": True if args.compile else None}
    return {k: v for k, v in chosen.items() if v is not None and k not in skip}


def run_benchmark(args: argparse.Namespace) -> dict:
    if args.quick:
        args.config = "small"
        args.frames_per_sweep = min(args.frames_per_sweep, 4)
        args.batch_size = args.batch_size or 8
        args.frames = None
    device = resolve_device(args.device)
    notes: list[str] = []
    weights = choose_weights(args.config, args.weights)
    if args.config == "full" and weights.config.width != ModelConfig().width:
        raise SystemExit(f"--config full but {weights.path} holds the {weights.config.name} model")
    overrides = {"device": device.type, **overrides_from(args)}
    config = Config(model=weights.config).replace(**overrides)

    full_stack = make_case(args.seed, args.frames_per_sweep)
    n_frames = len(full_stack)
    subset = args.frames is not None and args.frames < n_frames
    short_stack = make_case(args.seed, max(4, math.ceil(args.frames / 6))) if subset else full_stack

    predictor = Predictor(weights.model(), config, device)
    # The reference runs fp32 at our batch size (on CUDA the one auto-sized from free memory).
    reference = ReferencePipeline(weights.model(), config.replace(device=device.type,
                                                                  batch_size=predictor.batch_size), device)
    warm_up(predictor, reference, full_stack)

    ours = run_ours(predictor, full_stack)
    ours_short = run_ours(predictor, short_stack) if subset else ours
    ref = run_reference(reference, short_stack)
    io_wall, io_cpu, _ = time_read_write(full_stack, ours.frame, ours.mask)

    scale = n_frames / len(short_stack)  # reference per-frame stages, extrapolated to the whole case
    rows = stage_table(ours, ref, scale, io_wall)
    seconds = sum(r["seconds"] for r in rows)
    reference_seconds = sum(r["reference_seconds"] for r in rows)
    same = ours_short.frame == ref.frame
    if subset:
        notes.append(f"reference timed on a {len(short_stack)}-frame replica case (seed {args.seed}) and its "
                     f"per-frame stages scaled by {scale:.2f} to the {n_frames}-frame case; ours measured on the "
                     "whole case")
    if not weights.meaningful:
        notes.append(weights.note)

    report: dict[str, Any] = {
        "device": device.type,
        "device_name": device_name(device),
        "config": args.config,
        "model": weights.config.name,
        "weights": str(weights.path) if weights.path else "random",
        "weights_note": weights.note,
        "torch": torch.__version__,
        "case": {"generator": "training.phantom", "seed": args.seed, "frames_per_sweep": args.frames_per_sweep},
        "frames": n_frames,
        "frames_encoded": ours.frames_encoded,
        "frames_decoded": ours.frames_decoded,
        "reference_frames_encoded": n_frames,
        "seconds": round(seconds, 3),
        "reference_seconds": round(reference_seconds, 3),
        "speedup_vs_reference": round(reference_seconds / seconds, 3) if seconds > 0 else None,
        "cpu_seconds": round(ours.cpu_seconds["pipeline"] + sum(io_cpu.values()), 3),
        "reference_cpu_seconds": round(ref.cpu_seconds["pipeline"] * scale + sum(io_cpu.values()), 3),
        "frames_per_second": round(n_frames / seconds, 3),
        "reference_frames_per_second": round(n_frames / reference_seconds, 3),
        "frame": ours.frame,
        "reference_frame": ref.frame,
        "same_frame_as_reference": bool(same),
        "same_frame_scope": (f"{len(short_stack)}-frame replica case" if subset else "the benchmarked case"),
        "extrapolated": bool(subset),
        "stages": rows,
        "settings": predictor.describe(),
        "search": ours.extra["search"],
        "memory": {"host_peak_rss_mb": round(ours.peak_rss_mb, 1),
                   "reference_host_peak_rss_mb": round(ref.peak_rss_mb, 1),
                   "cuda_max_allocated_mb": ours.cuda_max_allocated_mb,
                   "reference_cuda_max_allocated_mb": ref.cuda_max_allocated_mb},
        "warm_up": "one untimed batch per pipeline before the timed runs",
        "notes": notes,
    }
    if not args.no_flops:
        report["flops"] = flops_report(predictor, weights, report, device)
        if device.type == "cpu" and not args.quick:  # the T4 estimate is about the full model
            model = weights.model()  # fp32, LoRA merged as in inference (peft's unmerged attention
            if hasattr(model, "merge_lora"):  # adapter allocates weight-sized temporaries on every call)
                model.merge_lora()
            per_frame = activation_bytes_per_frame(model.eval(), weights.config, batch=4)
            report["memory"]["estimate_t4"] = memory_estimate(model, weights.config, 32, per_frame)
    return report


def flops_report(predictor: Predictor, weights: Weights, report: dict, device: torch.device) -> dict:
    flops = count_flops(predictor.model, weights.config, device)
    encode_s = next((r["seconds"] for r in report["stages"] if r["stage"] == "encode"), 0.0)
    out = {k: round(v, 2) for k, v in flops.items()}
    out["case_tflop_dense"] = round(flops["total_gflop"] * report["frames"] / 1e3, 2)
    out["case_tflop_ours"] = round((flops["encoder_gflop"] * report["frames_encoded"] +
                                    flops["decoder_gflop"] * report["frames_decoded"]) / 1e3, 2)
    out["encoder_achieved_tflops"] = round(flops["encoder_gflop"] * report["frames_encoded"] / 1e3 /
                                           max(encode_s, 1e-9), 4)
    peak = gpu_peak_tflops(report["device_name"]) if device.type == "cuda" else None
    out["peak_tflops"] = peak
    out["encoder_floor_s"] = None if peak is None else round(
        flops["encoder_gflop"] * report["frames_encoded"] / 1e3 / peak, 3)
    out["encoder_vs_floor"] = None if peak is None else round(encode_s / out["encoder_floor_s"], 2)
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.compare_search:
        report = compare_search(args)
        print(f"same frame in {report['same_frame']}/{report['cases']} cases; mean challenge score dense "
              f"{report['mean_score_dense']:.4f}, coarse {report['mean_score_coarse']:.4f}; encoder work "
              f"{report['frames_encoded_dense']} -> {report['frames_encoded_coarse']} frames "
              f"({report['encoder_work_ratio']:.2f}x less); network: {report['network']}")
    else:
        report = run_benchmark(args)
        print_report(report)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
