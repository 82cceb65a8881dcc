"""Frames -> network input, shared by inference and training.

The paper's recipe: pad each frame to a centred square with zeros, resize to 224 (bicubic), replicate the
grey channel to RGB, normalise with CLIP's mean and std. Everything runs in torch so the same code is a
batched GPU kernel at inference and a per-sample transform in training.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .config import CLIP_MEAN, CLIP_STD
from .select import sweep_bounds


@dataclass(frozen=True)
class SquarePad:
    """Where a (height, width) frame sits inside its zero-padded square of side `side`."""

    height: int
    width: int

    @property
    def side(self) -> int:
        return max(self.height, self.width)

    @property
    def top(self) -> int:
        return (self.side - self.height) // 2

    @property
    def left(self) -> int:
        return (self.side - self.width) // 2

    def crop(self, square: np.ndarray | torch.Tensor) -> np.ndarray | torch.Tensor:
        """Undo the padding on the last two axes of a (..., side, side) array."""
        return square[..., self.top:self.top + self.height, self.left:self.left + self.width]


def pad_to_square(frames: torch.Tensor) -> torch.Tensor:
    """(..., H, W) -> (..., S, S) with the frame centred and zeros around it."""
    geometry = SquarePad(frames.shape[-2], frames.shape[-1])
    bottom = geometry.side - geometry.height - geometry.top
    right = geometry.side - geometry.width - geometry.left
    return F.pad(frames, (geometry.left, right, geometry.top, bottom))


def resize_frames(frames: torch.Tensor, size: int) -> torch.Tensor:
    """Bicubic, antialiased resize of (N, C, H, W) grey levels in [0, 255], clamped back to that range.

    Antialiasing makes the 744 -> 224 reduction behave like PIL's bicubic resize (what CLIP pipelines use)
    instead of sampling every third pixel of the speckle.
    """
    resized = F.interpolate(frames, size=(size, size), mode="bicubic", antialias=True, align_corners=False)
    return resized.clamp_(0.0, 255.0)


def normalise(grey: torch.Tensor) -> torch.Tensor:
    """(N, 1, S, S) grey levels (or (N, 3, S, S), a grey frame per channel) in [0, 255] -> (N, 3, S, S)
    CLIP-normalised RGB."""
    mean = torch.tensor(CLIP_MEAN, dtype=grey.dtype, device=grey.device).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD, dtype=grey.dtype, device=grey.device).view(1, 3, 1, 1)
    return (grey.expand(-1, 3, -1, -1) / 255.0 - mean) / std


def input_rows(frames: np.ndarray, n_frames: int, sweeps: int, input_frames: str = "single") -> np.ndarray:
    """The stack rows that make the network input of each of `frames` (frame numbers of an `n_frames` stack
    of `sweeps` sweeps): the frames themselves (N,) for "single"; (N, 3) rows t-1, t, t+1 for "temporal",
    a neighbour outside t's sweep replaced by t (the sweeps are separate acquisitions)."""
    frames = np.asarray(frames, dtype=np.int64)
    if input_frames == "single":
        return frames
    if input_frames != "temporal":
        raise ValueError(f"input_frames must be single or temporal, got {input_frames!r}")
    bounds = sweep_bounds(n_frames, sweeps)
    first = np.concatenate([np.full(stop - start, start) for start, stop in bounds])
    last = np.concatenate([np.full(stop - start, stop - 1) for start, stop in bounds])
    before = np.where(frames - 1 >= first[frames], frames - 1, frames)
    after = np.where(frames + 1 <= last[frames], frames + 1, frames)
    return np.stack([before, frames, after], axis=1)


def preprocess_frames(frames: np.ndarray | torch.Tensor, image_size: int = 224,
                      device: torch.device | str | None = None) -> torch.Tensor:
    """(N, H, W) uint8 frames, or (N, 3, H, W) frame triplets (`input_rows`' "temporal") -> (N, 3,
    image_size, image_size) float32 network input on `device`: a frame's grey fills all three channels, a
    triplet's frames one channel each.

    The uint8 frames travel to the device first (4x less to copy than float) and are converted there.
    """
    tensor = torch.as_tensor(frames)
    if tensor.ndim == 3:
        tensor = tensor.unsqueeze(1)
    elif tensor.ndim != 4 or tensor.shape[1] != 3:
        raise ValueError(f"expected (N, H, W) frames or (N, 3, H, W) triplets, got shape {tuple(tensor.shape)}")
    tensor = tensor.to(device=device, non_blocking=True).float()
    return normalise(resize_frames(pad_to_square(tensor), image_size))


def upsample_to_frame(maps: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(N, C, s, s) maps at network resolution -> (N, C, height, width) on the original frame grid.

    Inverse of `preprocess_frames`' geometry: bilinear to the padded square, then the padding is cut away.
    """
    geometry = SquarePad(height, width)
    square = F.interpolate(maps, size=(geometry.side, geometry.side), mode="bilinear", align_corners=False)
    return geometry.crop(square)
