"""Losses of FetalCLIPSEG training and the statistics to report them over a whole split.

Mask: soft Dice (the paper's loss), optionally plus pixel cross-entropy. The Dice is computed over the
whole batch (all frames' pixels pooled per class), not per frame: most frames hold no abdomen, and a
per-frame Dice of an empty target is 0 for any false-positive pixel and undefined (1 by smoothing) for a
perfect empty prediction, which makes the loss jump between its extremes on negative frames. Pooled over
the batch, negatives contribute their false positives to the denominator, as they should. Background and
abdomen are both scored (MONAI's DiceLoss default, include_background=True), which keeps the gradient
alive on batches with no abdomen at all.

`dice-fg` is the published FetalCLIPSEG loss instead (segmentation_models_pytorch's DiceLoss, multilabel
mode, on the one abdomen channel): foreground only, pooled over the batch, no smoothing, and zero for a
batch without any abdomen pixel. With our two-class softmax the abdomen probability is the sigmoid of the
logit difference, so it is the same loss on the same family of outputs.

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
A one-output head (FetalCLIPCLS) is trained with plain binary cross-entropy, abdomen plane or not, as
published.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from algorithm.config import FRAME_NONE

MASK_LOSSES = ("dice", "dice-fg")
# segmentation_models_pytorch's DiceLoss clamps its denominator at this eps (smooth 0)
DICE_EPS = 1e-7


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

    def foreground_loss(self) -> torch.Tensor:
        """The published loss: 1 - Dice of the abdomen class, 0 when the target has no abdomen."""
        dice = 2 * self.intersection[1] / (self.prediction[1] + self.target[1]).clamp_min(DICE_EPS)
        return (1.0 - dice) * (self.target[1] > 0)

    def value(self, kind: str) -> torch.Tensor:
        return self.foreground_loss() if kind == "dice-fg" else self.loss()


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


def frame_loss(frame_logits: torch.Tensor, label: torch.Tensor, class_weights: torch.Tensor | None = None,
               reduction: str = "mean") -> torch.Tensor:
    """Class-weighted cross-entropy for a 3-class head; binary cross-entropy (annotated or not) for a 1-output
    head."""
    logits = frame_logits.float()
    if logits.shape[1] == 1:
        target = (label != FRAME_NONE).float()
        return F.binary_cross_entropy_with_logits(logits[:, 0], target, reduction=reduction)
    return F.cross_entropy(logits, label, weight=class_weights if reduction == "mean" else None, reduction=reduction)


class SegLoss(torch.nn.Module):
    """Dice (+ CE) on the mask plus the frame head's loss; returns the total and its parts.

    `mask_loss`: "dice" (ours) or "dice-fg" (published). The frame loss follows the head: weighted
    cross-entropy for three classes, binary cross-entropy for one output.
    """

    def __init__(self, frame_class_weights: torch.Tensor | None, weights: LossWeights = LossWeights(),
                 use_mask: bool = True, mask_loss: str = "dice"):
        super().__init__()
        if mask_loss not in MASK_LOSSES:
            raise ValueError(f"mask_loss must be one of {MASK_LOSSES}, got {mask_loss!r}")
        self.weights = weights
        self.use_mask = use_mask
        self.mask_loss = mask_loss
        self.register_buffer("frame_class_weights",
                             frame_class_weights if frame_class_weights is not None else torch.ones(3))

    def forward(self, mask_logits: torch.Tensor | None, frame_logits: torch.Tensor, mask: torch.Tensor,
                label: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        frame = frame_loss(frame_logits, label, self.frame_class_weights)
        total = self.weights.frame * frame
        parts = {"frame_ce": float(frame.detach())}
        if self.use_mask and mask_logits is not None:
            dice = dice_sums(mask_logits, mask).value(self.mask_loss)
            total = total + self.weights.mask_dice * dice
            parts["dice"] = float(dice.detach())
            if self.weights.mask_ce:
                mask_ce = F.cross_entropy(mask_logits.float(), mask)
                total = total + self.weights.mask_ce * mask_ce
                parts["mask_ce"] = float(mask_ce.detach())
        parts["loss"] = float(total.detach())
        return total, parts
