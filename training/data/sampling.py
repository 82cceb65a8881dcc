"""Which frames each epoch shows: shuffled, with optional negative subsampling, sharded over ranks.

Every sampler draws the same epoch on every rank (seeded by the run seed and the epoch) and hands each
rank its share, so DDP ranks never need to exchange indices, and a resumed run repeats the draws of the
uninterrupted one.
"""
from __future__ import annotations

import math

import numpy as np
from torch.utils.data import Sampler

from algorithm.config import FRAME_NONE
from training.data.mining import Hardness, draw_negatives


class EpochSampler(Sampler[int]):
    """One epoch's frame indices, the same on every rank (seeded by seed and epoch), then sharded.

    uniform: every frame once, shuffled; with `negatives_per_positive` r: every positive frame plus a fresh
    random draw of r x (positives) negative frames each epoch (over the epochs the network still sees all
    negatives, at a fraction of the cost per epoch). balanced: frames drawn with replacement with
    probability 1 / (count of their class), so each class fills a third of the epoch.
    """

    def __init__(self, labels: np.ndarray, seed: int, strategy: str = "uniform",
                 negatives_per_positive: float | None = None, rank: int = 0, world: int = 1):
        self.labels = np.asarray(labels)
        self.seed, self.strategy, self.ratio = seed, strategy, negatives_per_positive
        self.rank, self.world = rank, world
        self.epoch = 0
        self.hardness: Hardness | None = None  # hard-negative mining (training.data.mining), set by the trainer
        self._length = len(self.epoch_indices())

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def epoch_size(self) -> int:
        positives = int(np.sum(self.labels != FRAME_NONE))
        negatives = len(self.labels) - positives
        if self.ratio is not None and positives:
            negatives = min(negatives, int(round(self.ratio * positives)))
        return positives + negatives

    def epoch_indices(self) -> np.ndarray:
        rng = np.random.default_rng([self.seed, self.epoch, 7919])
        n = len(self.labels)
        if self.strategy == "balanced":
            counts = np.bincount(self.labels, minlength=3).astype(np.float64)
            weights = 1.0 / counts[self.labels]
            indices = rng.choice(n, size=self.epoch_size(), replace=True, p=weights / weights.sum())
        else:
            positives = np.flatnonzero(self.labels != FRAME_NONE)
            negatives = np.flatnonzero(self.labels == FRAME_NONE)
            if self.ratio is not None and len(positives):
                negatives = draw_negatives(rng, negatives, round(self.ratio * len(positives)), self.hardness)
            indices = rng.permutation(np.concatenate([positives, negatives]))
        padded = math.ceil(len(indices) / self.world) * self.world
        if padded > len(indices):  # as DistributedSampler: repeat the head so every rank gets as many
            indices = np.concatenate([indices, indices[: padded - len(indices)]])
        return indices[self.rank::self.world]

    def __iter__(self):
        return iter(self.epoch_indices().tolist())

    def __len__(self) -> int:
        return self._length


class MixedBatches(Sampler[list]):
    """Batches of (frame, decode) pairs: `batch_size` frames for the whole network (every positive plus
    `negatives_per_positive` negatives per positive) and, spread evenly over the same batches, head-only
    negatives (`head_negatives_per_positive` per positive, disjoint from the others) for which the decoder
    is skipped. The decoder at 224 px is most of a step's cost, the frame head needs many negatives to
    learn what is *not* an abdomen plane: this buys those negatives cheaply. Same seeding and sharding
    rules as EpochSampler (whole batches are sharded)."""

    def __init__(self, labels: np.ndarray, seed: int, batch_size: int, negatives_per_positive: float | None,
                 head_negatives_per_positive: float, rank: int = 0, world: int = 1):
        self.labels = np.asarray(labels)
        self.seed, self.batch_size = seed, batch_size
        self.ratio, self.head_ratio = negatives_per_positive, head_negatives_per_positive
        self.rank, self.world = rank, world
        self.epoch = 0
        self.hardness: Hardness | None = None  # as EpochSampler
        self._length = len(self.batches())

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def plan(self) -> tuple[np.ndarray, np.ndarray]:
        """(frames for the whole network, head-only frames) of this epoch, each shuffled."""
        rng = np.random.default_rng([self.seed, self.epoch, 7919])
        positives = np.flatnonzero(self.labels != FRAME_NONE)
        negatives = np.flatnonzero(self.labels == FRAME_NONE)
        if self.ratio is not None and len(positives):
            decoded_negatives = draw_negatives(rng, negatives, round(self.ratio * len(positives)), self.hardness)
        else:
            decoded_negatives = negatives
        rest = np.setdiff1d(negatives, decoded_negatives)
        head = draw_negatives(rng, rest, round(self.head_ratio * max(len(positives), 1)), self.hardness)
        return rng.permutation(np.concatenate([positives, decoded_negatives])), rng.permutation(head)

    def batches(self) -> list[list[tuple[int, bool]]]:
        decoded, head = self.plan()
        count = max(1, math.ceil(len(decoded) / self.batch_size))
        head_chunks = np.array_split(head, count)
        batches = [[(int(i), True) for i in decoded[b * self.batch_size:(b + 1) * self.batch_size]]
                   + [(int(i), False) for i in head_chunks[b]] for b in range(count)]
        padded = math.ceil(len(batches) / self.world) * self.world
        batches += batches[: padded - len(batches)]
        return batches[self.rank::self.world]

    def frames(self) -> int:
        decoded, head = self.plan()
        return len(decoded) + len(head)

    def __iter__(self):
        return iter(self.batches())

    def __len__(self) -> int:
        return self._length


def validation_subset(labels: np.ndarray, max_frames: int | None, seed: int = 0) -> np.ndarray | None:
    """A fixed validation subset: every positive frame (up to the budget), then random negatives."""
    if max_frames is None or max_frames >= len(labels):
        return None
    rng = np.random.default_rng([seed, 104729])
    positives = np.flatnonzero(labels != FRAME_NONE)
    negatives = rng.permutation(np.flatnonzero(labels == FRAME_NONE))
    positives = rng.permutation(positives)[:max_frames]
    chosen = np.concatenate([positives, negatives[: max_frames - len(positives)]])
    return np.sort(chosen)

