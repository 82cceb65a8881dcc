"""Online augmentation of (grey frame, label mask) pairs at network size, with albumentations.

The paper's recipe: brightness/contrast jitter, CLAHE, and an affine warp (translation up to +-20 % of the
side, rotation up to +-20 degrees), image and mask warped together.

The paper applied these *offline*, writing two augmented copies of each training frame (x2 data). We draw
them *online*, a fresh draw per sample per epoch. That is the same distribution of transformed frames
(the same transforms and ranges), but over E epochs the network sees up to E different versions of each
frame instead of the same 2, i.e. more variety for the same number of optimiser steps, with no extra disk
(the real training split would triple to ~36 GB offline) and no change to the epoch's composition. One
difference to be aware of: an offline x2 set makes an "epoch" three times longer (original + 2 copies), so
to match the paper's number of optimiser steps train 3x the epochs here (or compare at equal steps).

The affine warp is applied to the mask with nearest-neighbour interpolation and zero fill, so label values
(0, 1 optimal, 2 suboptimal) are never blended; the intensity transforms touch the image only. Seeding
(`set_seed`) makes a draw reproducible, which the training loop uses to make resumed runs repeat the
uninterrupted run's augmentation.
"""
from __future__ import annotations

from dataclasses import dataclass

import albumentations as A
import cv2
import numpy as np


@dataclass(frozen=True)
class AugmentConfig:
    """Ranges of the paper's augmentations and the probability each is applied to a sample."""

    brightness: float = 0.2  # factor drawn from [1 - b, 1 + b]
    contrast: float = 0.2
    jitter_p: float = 0.5
    clahe_clip: float = 2.0
    clahe_p: float = 0.25
    translate: float = 0.2  # fraction of the side, each axis
    rotate_deg: float = 20.0
    affine_p: float = 0.5


class FrameAugment:
    """Callable (grey uint8 (S, S), mask uint8 (S, S)) -> the same, transformed together. A temporal
    triplet (3, S, S) (frames t-1, t, t+1) gets one draw for all three frames, each transformed as a grey
    frame (CLAHE on an RGB image would mix the frames)."""

    def __init__(self, config: AugmentConfig = AugmentConfig(), seed: int | None = None):
        self.config = config
        c = config
        self.compose = A.Compose([
            A.ColorJitter(brightness=(1 - c.brightness, 1 + c.brightness),
                          contrast=(1 - c.contrast, 1 + c.contrast), saturation=(1.0, 1.0), hue=(0.0, 0.0),
                          p=c.jitter_p),
            A.CLAHE(clip_limit=(1.0, c.clahe_clip), tile_grid_size=(8, 8), p=c.clahe_p),
            A.Affine(translate_percent={"x": (-c.translate, c.translate), "y": (-c.translate, c.translate)},
                     rotate=(-c.rotate_deg, c.rotate_deg), interpolation=cv2.INTER_LINEAR,
                     mask_interpolation=cv2.INTER_NEAREST, border_mode=cv2.BORDER_CONSTANT, fill=0, fill_mask=0,
                     p=c.affine_p),
        ], seed=seed, additional_targets={"previous": "image", "following": "image"})

    def set_seed(self, seed: int) -> None:
        self.compose.set_random_seed(int(seed) % (2**32))

    def __call__(self, grey: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if grey.ndim == 2:
            out = self.compose(image=np.ascontiguousarray(grey), mask=np.ascontiguousarray(mask))
            return out["image"], out["mask"]
        out = self.compose(image=np.ascontiguousarray(grey[1]), previous=np.ascontiguousarray(grey[0]),
                           following=np.ascontiguousarray(grey[2]), mask=np.ascontiguousarray(mask))
        return np.stack([out["previous"], out["image"], out["following"]]), out["mask"]


def build_augment(enabled: bool = True, seed: int | None = None,
                  config: AugmentConfig = AugmentConfig()) -> FrameAugment | None:
    return FrameAugment(config, seed) if enabled else None
