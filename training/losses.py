"""Losses of FetalCLIPSEG training and the statistics to report them over a whole split.

Mask: soft Dice (the paper's loss), optionally plus pixel cross-entropy. The Dice is computed over the
whole batch (all frames' pixels pooled per class), not per frame: most frames hold no abdomen, and a
per-frame Dice of an empty target is 0 for any false-positive pixel and undefined (1 by smoothing) for a
perfect empty prediction, which makes the loss jump between its extremes on negative frames. Pooled over
the batch, negatives contribute their false positives to the denominator, as they should. Background and
abdomen are both scored (MONAI's DiceLoss default, include_background=True), which keeps the gradient
alive on batches with no abdomen at all.

Frame head: cross-entropy over none / suboptimal / optimal with class weights from the *training split's*
counts, w_c = (N / (K n_c)) ** power, rescaled so the average weight per training frame is 1 (the loss
keeps its scale whatever the power). The imbalance is heavy (real set: ~90 % "none" frames in the sweeps
that have an AC, ~2.6 % annotated overall). power = 1 is the fully balanced weighting; it makes the rare
optimal class worth ~20x a background frame, and the near-identical neighbours of an annotated run (which
are labelled "none") are then called optimal too, i.e. many false positives, which cost the frame
selection more than a missed frame does (a sweep has several optimal frames, any one is enough). power =
0.5 (our default) is the usual compromise (square-root inverse frequency): the minority classes still count
several times more than the background, with fewer false positives. power = 0 is plain cross-entropy. The
alternative, sampling frames class-balanced (`--sampler balanced`), changes what the network sees rather
than how much each frame counts; use one or the other, not both (the sampler sets power 0 by default).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F


def class_weights(counts: np.ndarray | list[int], power: float = 0.5) -> torch.Tensor:
    """Inverse-frequency weights ** power, normalised to a mean of 1 per training frame; absent classes 1."""
    counts = np.asarray(counts, dtype=np.float64)
    present = counts > 0
    weights = np.ones_like(counts)
    if power != 0 and present.any():
        total, k = counts[present].sum(), present.sum()
        weights[present] = (total / (k * counts[present])) ** power
        weights[present] /= (weights[present] * counts[present]).sum() / total
    return torch.tensor(weights, dtype=torch.float32)


@dataclass
class DiceSums:
    """Per-class sums of a soft Dice: intersection, prediction and target mass ((C,) tensors)."""

    intersection: torch.Tensor
    prediction: torch.Tensor
    target: torch.Tensor

    def loss(self, smooth: float = 1.0) -> torch.Tensor:
        dice = (2 * self.intersection + smooth) / (self.prediction + self.target + smooth)
        return 1.0 - dice.mean()


def dice_sums(logits: torch.Tensor, target: torch.Tensor) -> DiceSums:
    """(B, C, H, W) logits and (B, H, W) class indices -> pooled soft-Dice sums per class (float32)."""
    probs = torch.softmax(logits.float(), dim=1)
    one_hot = F.one_hot(target, probs.shape[1]).permute(0, 3, 1, 2).to(probs.dtype)
    dims = (0, 2, 3)
    return DiceSums((probs * one_hot).sum(dims), probs.sum(dims), one_hot.sum(dims))


@dataclass(frozen=True)
class LossWeights:
    mask_dice: float = 1.0
    mask_ce: float = 0.0  # paper: Dice only
    frame: float = 1.0


class SegLoss(torch.nn.Module):
    """Dice (+ CE) on the mask plus weighted CE on the frame head; returns the total and its parts."""

    def __init__(self, frame_class_weights: torch.Tensor | None, weights: LossWeights = LossWeights(),
                 use_mask: bool = True):
        super().__init__()
        self.weights = weights
        self.use_mask = use_mask
        self.register_buffer("frame_class_weights",
                             frame_class_weights if frame_class_weights is not None else torch.ones(3))

    def forward(self, mask_logits: torch.Tensor | None, frame_logits: torch.Tensor, mask: torch.Tensor,
                label: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        frame_ce = F.cross_entropy(frame_logits.float(), label, weight=self.frame_class_weights)
        total = self.weights.frame * frame_ce
        parts = {"frame_ce": float(frame_ce.detach())}
        if self.use_mask and mask_logits is not None:
            dice = dice_sums(mask_logits, mask).loss()
            total = total + self.weights.mask_dice * dice
            parts["dice"] = float(dice.detach())
            if self.weights.mask_ce:
                mask_ce = F.cross_entropy(mask_logits.float(), mask)
                total = total + self.weights.mask_ce * mask_ce
                parts["mask_ce"] = float(mask_ce.detach())
        parts["loss"] = float(total.detach())
        return total, parts
