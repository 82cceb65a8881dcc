"""Hard-negative mining: draw part of every epoch's negative frames where the frame head is most wrong.

Why: the frames that fool a model are rare among the negatives. On the replica a fetal head (a bright
skull ring) is about 3 % of the frames without abdomen; drawn uniformly, each is seen a handful of times
in a whole training run, and a model trained that way can call one an abdomen with near certainty. Real
blind sweeps have the same kind of look-alikes (head, bladder, stomach-like fluid pockets).

How: at the start of an epoch the trainer scores a random pool of negative frames with the current
encoder and frame head (no decoder, no augmentation) and hands the samplers a `Hardness`. Each negative
draw of that epoch then takes `fraction` of its frames from the pool, without replacement, with
probability proportional to P(abdomen) = 1 - P(none), and the rest uniformly from the others. The epoch
keeps its size, so steps per epoch, the schedule and resuming are unchanged.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from algorithm.config import FRAME_NONE

# Sampling weight of a pool frame the head already rejects with certainty (P(abdomen) = 0): kept above
# zero so that a pool with few hard frames still fills its share.
MIN_WEIGHT = 1e-3


@dataclass(frozen=True)
class Hardness:
    """Negative frames scored at the start of an epoch (dataset indices and their P(abdomen)), and the
    share of each negative draw to take from them."""

    frames: np.ndarray  # (K,) int64
    p_abdomen: np.ndarray  # (K,) float64 in [0, 1]
    fraction: float = 0.0

    def weights(self) -> np.ndarray:
        return np.clip(self.p_abdomen, MIN_WEIGHT, None)

    def summary(self) -> dict[str, float]:
        """What the log says about the pool: how many negatives the head currently calls abdomen."""
        p = self.p_abdomen
        return {"pool": int(len(p)), "mean_p_abdomen": float(p.mean()) if len(p) else 0.0,
                "called_abdomen": int((p >= 0.5).sum())}


def mining_pool(labels: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """`size` random negative frames (all of them when there are fewer), sorted."""
    negatives = np.flatnonzero(np.asarray(labels) == FRAME_NONE)
    if size >= len(negatives):
        return negatives
    return np.sort(rng.choice(negatives, size=size, replace=False))


def draw_negatives(rng: np.random.Generator, negatives: np.ndarray, size: int,
                   hardness: Hardness | None = None) -> np.ndarray:
    """`size` distinct frames of `negatives` (all of them when there are fewer): round(hardness.fraction x
    size) of them drawn from the scored pool in proportion to P(abdomen), the rest uniformly from what is
    left. Uniform when `hardness` is None."""
    negatives = np.asarray(negatives)
    size = min(int(size), len(negatives))
    if hardness is None or hardness.fraction <= 0 or size == 0:
        return rng.choice(negatives, size=size, replace=False)
    in_pool = np.isin(hardness.frames, negatives)
    pool, weights = hardness.frames[in_pool], hardness.weights()[in_pool]
    hard_count = min(int(round(hardness.fraction * size)), len(pool))
    hard = rng.choice(pool, size=hard_count, replace=False, p=weights / weights.sum()) if hard_count else \
        np.zeros(0, dtype=negatives.dtype)
    rest = np.setdiff1d(negatives, hard)
    easy = rng.choice(rest, size=size - hard_count, replace=False)
    return np.concatenate([hard, easy])


@torch.no_grad()
def score_negatives(model: torch.nn.Module, loader, device: torch.device, autocast) -> np.ndarray:
    """P(abdomen) of every frame `loader` yields, from the encoder and frame head only.

    `loader` yields (image, mask, label) batches (training.scoring.evaluate_frames.frame_loader, unaugmented);
    `autocast` is a context-manager factory for the training precision. The model is left in eval mode.
    """
    model.eval()
    scores = []
    for images, *_ in loader:
        with autocast():
            _, embedding = model.encoder(images.to(device))
            logits = model.frame_head(embedding)
        scores.append(1.0 - torch.softmax(logits.float(), dim=1)[:, FRAME_NONE].cpu())
    return torch.cat(scores).double().numpy() if scores else np.zeros(0)
