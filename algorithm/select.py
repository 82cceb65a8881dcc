"""Frame selection: from per-frame network outputs to the one frame on which the AC is measured.

Each frame gets two numbers from the single forward pass: the frame head's class probabilities
(none / suboptimal / optimal) and the fraction of the network input its mask covers. Selection is
sweep-aware: scores are smoothed along time inside each sweep only (a sweep border is a probe jump, not a
neighbour), frames whose mask is too small (the paper's 1 % rule) are never chosen, an optimal frame beats
any suboptimal one, and -1 is returned when no frame qualifies.

Inside a tier, frames are ranked by `evidence` = head probability x mask fraction, not by the probability
alone: the AC is measured where the abdomen's cross-section is large *and* the head is confident. Ranking
by probability first lets a few hundredths of head noise outvote a mask twice the size (measured on the
replica with the small demo weights, whose frame head is nearly flat: the largest masks sat on the
annotated frames, the most confident head outputs did not).

Two rules pick among the sweeps' best frames (`InferenceConfig.selection`): "frame" takes the best of them
(tier, then evidence); "sweep" first takes the sweep with the most frames that qualify (the evidence of a
whole sweep passing over the abdomen, as the ACOUSLIC-AI solution of sk-jp ranks sweeps), then its best
frame. With a coarse search the counts cover the frames the search decoded.

Frames that were not run through the network (lift-off frames, or frames skipped by a coarse search) carry
NaN and are ignored by the smoothing rather than counted as zeros.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .config import FRAME_NONE, FRAME_OPTIMAL, FRAME_SUBOPTIMAL, InferenceConfig

NO_FRAME = -1


@dataclass(frozen=True)
class Candidate:
    """The best frame of one sweep."""

    sweep: int  # 0-based
    frame: int
    tier: int  # FRAME_OPTIMAL, FRAME_SUBOPTIMAL or FRAME_NONE (did not qualify)
    score: float
    mask_fraction: float
    qualifying_frames: int = 0  # frames of the sweep that could be chosen (tier above FRAME_NONE)

    def to_dict(self) -> dict:
        return {"sweep": self.sweep + 1, "frame": self.frame, "tier": int(self.tier),
                "score": round(float(self.score), 4), "mask_fraction": round(float(self.mask_fraction), 4),
                "qualifying_frames": self.qualifying_frames}


@dataclass(frozen=True)
class Selection:
    frame: int  # NO_FRAME when nothing qualifies
    candidates: tuple[Candidate, ...]  # one per sweep
    smoothed_probabilities: np.ndarray  # (N, 3)


def sweep_bounds(n_frames: int, sweeps: int) -> list[tuple[int, int]]:
    """[start, stop) of each sweep. Frame counts not divisible by `sweeps` are split as evenly as
    possible, the first sweeps taking one frame more (np.array_split's rule)."""
    if n_frames <= 0:
        return []
    sweeps = max(1, min(sweeps, n_frames))
    edges = np.cumsum([0] + [len(part) for part in np.array_split(np.arange(n_frames), sweeps)])
    return [(int(a), int(b)) for a, b in zip(edges[:-1], edges[1:])]


def nan_moving_average(values: np.ndarray, window: int) -> np.ndarray:
    """Centred moving average along axis 0 that skips NaNs; frames with no valid neighbour stay NaN."""
    if window <= 1 or len(values) == 0:
        return values.astype(np.float64, copy=True)
    valid = ~np.isnan(values)
    filled = np.where(valid, values, 0.0).astype(np.float64)
    kernel = np.ones(window)
    half = window // 2

    def smooth(column: np.ndarray) -> np.ndarray:
        return np.convolve(np.pad(column, (half, window - 1 - half)), kernel, mode="valid")

    if values.ndim == 1:
        sums, counts = smooth(filled), smooth(valid.astype(np.float64))
    else:
        sums = np.stack([smooth(filled[:, j]) for j in range(values.shape[1])], axis=1)
        counts = np.stack([smooth(valid[:, j].astype(np.float64)) for j in range(values.shape[1])], axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(counts > 0, sums / np.maximum(counts, 1e-12), np.nan)


def _best_in_sweep(sweep: int, start: int, stop: int, probs: np.ndarray, fractions: np.ndarray,
                   config: InferenceConfig) -> Candidate:
    """Highest-ranked frame of one sweep: tier first, then evidence, then mask size, then earliest frame."""
    area = fractions[start:stop]
    tier, score = frame_tiers(probs[start:stop], area, config)
    area_key = np.nan_to_num(area, nan=-1.0)
    # lexsort sorts by the last key first; negative index makes ties go to the earliest frame.
    order = np.lexsort((-np.arange(stop - start), area_key, evidence(score, area_key), tier))
    best = int(order[-1])
    return Candidate(sweep=sweep, frame=start + best, tier=int(tier[best]), score=float(score[best]),
                     mask_fraction=float(max(area_key[best], 0.0)),
                     qualifying_frames=int((tier != FRAME_NONE).sum()))


def frame_tiers(smoothed: np.ndarray, mask_fractions: np.ndarray, config: InferenceConfig
                ) -> tuple[np.ndarray, np.ndarray]:
    """Tier (FRAME_OPTIMAL / FRAME_SUBOPTIMAL / FRAME_NONE) and score of each frame from its smoothed
    (N, 3) head probabilities and mask fraction: the score is P(optimal) in the optimal tier, else
    P(optimal) + P(suboptimal); NaN (not run) scores -1. Shared by `select_frame` and the coarse search."""
    p_opt = smoothed[:, FRAME_OPTIMAL]
    p_abdomen = smoothed[:, FRAME_OPTIMAL] + smoothed[:, FRAME_SUBOPTIMAL]
    big_enough = np.nan_to_num(mask_fractions, nan=0.0) >= config.min_mask_fraction
    threshold = config.min_quality_probability
    optimal = big_enough & (np.nan_to_num(p_opt, nan=0.0) >= threshold)
    suboptimal = big_enough & (np.nan_to_num(p_abdomen, nan=0.0) >= threshold)
    tier = np.where(optimal, FRAME_OPTIMAL, np.where(suboptimal, FRAME_SUBOPTIMAL, FRAME_NONE))
    score = np.nan_to_num(np.where(tier == FRAME_OPTIMAL, p_opt, p_abdomen), nan=-1.0)
    return tier, score


def evidence(score: np.ndarray | float, mask_fraction: np.ndarray | float) -> np.ndarray:
    """Ranking key inside a tier: head probability x mask fraction (0 where either is missing)."""
    return np.clip(score, 0.0, None) * np.clip(mask_fraction, 0.0, None)


def select_frame(frame_probabilities: np.ndarray, mask_fractions: np.ndarray,
                 config: InferenceConfig) -> Selection:
    """Choose the AC frame.

    frame_probabilities: (N, 3) softmax of the frame head, NaN rows for frames not run.
    mask_fractions: (N,) fraction of the network input covered by the predicted mask, NaN if not run.
    """
    probs = np.asarray(frame_probabilities, dtype=np.float64)
    fractions = np.asarray(mask_fractions, dtype=np.float64)
    if probs.ndim != 2 or probs.shape[1] != 3 or fractions.shape != (probs.shape[0],):
        raise ValueError(f"expected (N, 3) probabilities and (N,) fractions, got {probs.shape}, {fractions.shape}")
    smoothed = np.full_like(probs, np.nan)
    candidates = []
    for sweep, (start, stop) in enumerate(sweep_bounds(len(probs), config.sweeps)):
        smoothed[start:stop] = nan_moving_average(probs[start:stop], config.smoothing_window)
        candidates.append(_best_in_sweep(sweep, start, stop, smoothed, fractions, config))
    qualified = [c for c in candidates if c.tier != FRAME_NONE]
    if not qualified:
        return Selection(NO_FRAME, tuple(candidates), smoothed)
    def rank(c: Candidate) -> tuple:
        return c.tier, float(evidence(c.score, c.mask_fraction)), c.mask_fraction, -c.frame

    if config.selection == "sweep":
        best = max(qualified, key=lambda c: (c.qualifying_frames, *rank(c)))
    elif config.selection == "frame":
        best = max(qualified, key=rank)
    else:
        raise ValueError(f"unknown selection rule {config.selection!r}")
    return Selection(best.frame, tuple(candidates), smoothed)
