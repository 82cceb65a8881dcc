"""One case, top to bottom: field of view -> frame search (network) -> select -> post-process -> biometry.

`predict(stack, network)` returns everything a caller may want to write or show. Reading and writing files
is `run.py`'s and `contract.py`'s job; running the network is `network.py`'s, choosing which frames it runs
on is `search.py`'s.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from . import biometry
from .config import CHECKPOINT_INFERENCE_CHOICES, FRAME_NONE, FRAME_OPTIMAL, PIXEL_SPACING_MM, InferenceConfig
from .fov import fov_from_stack
from .network import Network
from .postprocess import abdomen_probability, clean_mask
from .progress import SearchProgress
from .runtime import StageTimer
from .search import FrameScores, FrameSearch
from .select import NO_FRAME, Selection, select_frame

__all__ = ["CaseResult", "decide", "predict"]


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
    levers: dict = field(default_factory=dict)  # the leaderboard levers in force (tta as the search ran it)

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
            "levers": self.levers,
            "timings_s": {k: round(v, 3) for k, v in self.timings.items()},
        }


def predict(stack: np.ndarray, network: Network, search: FrameSearch | None = None,
            progress: SearchProgress | None = None) -> CaseResult:
    """Choose the AC frame of a (frames, height, width) uint8 stack and segment it.

    `search` defaults to `FrameSearch.for_network(network)`, the configuration's own."""
    search = search or FrameSearch.for_network(network)
    inference = network.config.inference
    timer = StageTimer(network.device)
    _, height, width = stack.shape
    with timer("field_of_view"):
        fov = fov_from_stack(stack)
        frames = search.frames_to_encode(stack)
    with timer("network"):
        found = search(stack, network, frames, progress, timer)
    scores = found.scores
    decision = decide(scores, fov, (height, width), inference, timer)
    return CaseResult(**decision, scores=scores, fov=fov, timings=dict(timer.seconds),
                      frames_encoded=found.frames_encoded, frames_decoded=int(scores.decoded.sum()),
                      search=found.details,  # the flip as the search ran it: "auto" resolved, or none at all
                      levers={**levers_of(inference), "tta": found.details.get("tta", "none")})


def levers_of(inference: InferenceConfig) -> dict[str, str]:
    """The leaderboard levers of a configuration (the settings a checkpoint may carry), for result.json."""
    return {name: getattr(inference, name) for name in CHECKPOINT_INFERENCE_CHOICES}


def decide(scores: FrameScores, fov: np.ndarray, frame_shape: tuple[int, int], inference: InferenceConfig,
           timer: StageTimer | None = None) -> dict:
    """From the network's scores to the answer: select -> post-process -> biometry (no network call, so the
    selection rule and the AC fit can be compared on the same scores). Returns CaseResult's fields frame,
    mask, ellipse, ac_mm and selection."""
    timer = timer or StageTimer(torch.device("cpu"))
    with timer("select"):
        selection = select_frame(scores.probabilities, scores.mask_fractions, inference)
    mask, ellipse, ac_mm = None, None, None
    with timer("postprocess"):
        if selection.frame != NO_FRAME:
            probability = abdomen_probability(scores.abdomen_maps[selection.frame], *frame_shape)
            mask = clean_mask(probability, fov, inference.mask_threshold)
            if inference.ac_fit == "subpixel":
                ellipse = biometry.fit_ellipse_subpixel(probability, mask, fov, inference.mask_threshold)
            elif inference.ac_fit == "contour":
                ellipse = biometry.fit_ellipse(mask, fov)
            else:
                raise ValueError(f"unknown AC fit {inference.ac_fit!r}")
            ac_mm = None if ellipse is None else float(ellipse.circumference_mm(PIXEL_SPACING_MM))
            if inference.mask_output == "ellipse" and ellipse is not None:
                mask = ellipse.draw(mask.shape) & fov.astype(np.uint8)
    return {"frame": selection.frame, "mask": mask, "ellipse": ellipse, "ac_mm": ac_mm, "selection": selection}
