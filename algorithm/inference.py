"""One case, top to bottom: stack -> preprocess -> encode/decode -> select frame -> post-process -> result.

`Predictor` holds a loaded model and the configuration; `predict(stack)` returns everything a caller may
want to write or show. Reading and writing files is the CLI's and `contract`'s job, not this module's.
"""
from __future__ import annotations

import logging
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch

from . import biometry
from .config import FRAME_NONE, FRAME_OPTIMAL, Config
from .fov import fov_from_stack
from .postprocess import abdomen_probability, clean_mask
from .preprocess import preprocess_frames
from .select import NO_FRAME, Selection, select_frame

log = logging.getLogger(__name__)


def resolve_device(name: str) -> torch.device:
    """`auto` -> CUDA when available, else CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError("--device cuda asked for, but no CUDA device is available")
    return torch.device(name)


@dataclass
class FrameScores:
    """Per-frame network outputs of one case; NaN (or absent) for frames never run through the network."""

    probabilities: np.ndarray  # (N, 3) frame-head softmax
    mask_fractions: np.ndarray  # (N,) share of the network input the mask covers
    abdomen_maps: dict[int, torch.Tensor] = field(default_factory=dict)  # frame -> (s, s) float16 probability

    @classmethod
    def empty(cls, n_frames: int) -> "FrameScores":
        return cls(np.full((n_frames, 3), np.nan), np.full(n_frames, np.nan))

    @property
    def scored(self) -> np.ndarray:
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

    def summary(self) -> dict:
        """What people want to read about a case (the log and result.json)."""
        chosen = next((c for c in self.selection.candidates if c.frame == self.frame), None)
        return {
            "frame": self.frame,
            "plane": {FRAME_OPTIMAL: "optimal", FRAME_NONE: "none"}.get(chosen.tier, "suboptimal")
            if chosen else "none",
            "ac_mm": None if self.ac_mm is None else round(self.ac_mm, 2),
            "ellipse": None if self.ellipse is None else self.ellipse.to_dict()
            if hasattr(self.ellipse, "to_dict") else None,
            "sweep_candidates": [c.to_dict() for c in self.selection.candidates],
            "frames_encoded": self.frames_encoded,
            "frames_total": int(len(self.scores.mask_fractions)),
            "timings_s": {k: round(v, 3) for k, v in self.timings.items()},
        }


class StageTimer:
    """Wall time per named stage; synchronises CUDA so GPU work is charged to the right stage."""

    def __init__(self, device: torch.device):
        self.device = device
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        yield
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start


def liftoff_frames(stack: np.ndarray, max_mean: float, chunk: int = 64) -> np.ndarray:
    """Frames so dark (probe lifted off the belly) that they cannot show an abdomen."""
    means = np.concatenate([stack[i:i + chunk].mean(axis=(1, 2)) for i in range(0, len(stack), chunk)]) \
        if len(stack) else np.zeros(0)
    return means < max_mean


class Predictor:
    """A loaded FetalCLIPSEG and the settings to run it on whole cases."""

    def __init__(self, model: torch.nn.Module, config: Config, device: torch.device | None = None):
        self.config = config
        self.device = device or resolve_device(config.inference.device)
        self.model = model.to(self.device).eval()
        if self.device.type == "cuda":
            self.model = self.model.to(memory_format=torch.channels_last)

    def _autocast(self):
        if self.device.type != "cuda" or not self.config.inference.amp:
            return nullcontext()
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.autocast("cuda", dtype=dtype)

    @torch.inference_mode()
    def score_frames(self, stack: np.ndarray, indices: np.ndarray, scores: FrameScores,
                     progress: Callable[[int], None] | None = None) -> None:
        """Run the network on `indices` of the stack, filling `scores` in place."""
        size = self.config.model.image_size
        batch = max(1, self.config.inference.batch_size)
        for start in range(0, len(indices), batch):
            chunk = indices[start:start + batch]
            frames = torch.from_numpy(np.ascontiguousarray(stack[chunk]))
            if self.device.type == "cuda":
                frames = frames.pin_memory()
            inputs = preprocess_frames(frames, size, device=self.device)
            if self.device.type == "cuda":
                inputs = inputs.contiguous(memory_format=torch.channels_last)
            with self._autocast():
                output = self.model(inputs)
            probabilities = torch.softmax(output.frame_logits.float(), dim=1).cpu().numpy()
            abdomen = 1.0 - torch.softmax(output.mask_logits.float(), dim=1)[:, 0]
            fractions = (abdomen >= self.config.inference.mask_threshold).float().mean(dim=(1, 2)).cpu().numpy()
            abdomen = abdomen.half().cpu()
            for row, frame in enumerate(chunk.tolist()):
                scores.probabilities[frame] = probabilities[row]
                scores.mask_fractions[frame] = fractions[row]
                scores.abdomen_maps[frame] = abdomen[row]
            if progress is not None:
                progress(len(chunk))

    def frames_to_encode(self, stack: np.ndarray) -> np.ndarray:
        """Every frame except probe lift-off."""
        dark = liftoff_frames(stack, self.config.inference.liftoff_max_mean)
        return np.flatnonzero(~dark)

    def predict(self, stack: np.ndarray, progress: Callable[[int], None] | None = None) -> CaseResult:
        """Choose the AC frame of a (frames, height, width) uint8 stack and segment it."""
        timer = StageTimer(self.device)
        n_frames, height, width = stack.shape
        with timer("field_of_view"):
            fov = fov_from_stack(stack)
            indices = self.frames_to_encode(stack)
        scores = FrameScores.empty(n_frames)
        with timer("network"):
            self.score_frames(stack, indices, scores, progress)
        with timer("select"):
            selection = select_frame(scores.probabilities, scores.mask_fractions, self.config.inference)
        mask, ellipse, ac_mm = None, None, None
        with timer("postprocess"):
            if selection.frame != NO_FRAME:
                probability = abdomen_probability(scores.abdomen_maps[selection.frame], height, width)
                mask = clean_mask(probability, fov, self.config.inference.mask_threshold)
                ellipse = biometry.fit_ellipse(mask, fov)
                ac_mm = None if ellipse is None else float(ellipse.circumference_mm(biometry.PIXEL_SPACING_MM))
        return CaseResult(frame=selection.frame, mask=mask, ellipse=ellipse, ac_mm=ac_mm, selection=selection,
                          scores=scores, fov=fov, timings=timer.seconds, frames_encoded=len(indices))


def load_predictor(weights: Path, config_overrides: dict | None = None) -> tuple[Predictor, dict]:
    """Load our checkpoint and wrap it; returns the predictor and the checkpoint's description."""
    from .model.checkpoint import load_checkpoint

    device_name = (config_overrides or {}).get("device", "auto")
    device = resolve_device(device_name)
    model, info = load_checkpoint(weights, device="cpu")
    config = Config(model=info.config).replace(**(config_overrides or {}))
    return Predictor(model, config, device), {"weights": str(weights), "provenance": info.provenance,
                                              "version": info.version}
