"""The ultrasound field of view (FOV): the sector of a frame that the probe can image.

The challenge evaluation masks every segmentation with a fixed FOV before scoring and fits the AC ellipse
only to contour points inside it, extrapolating across the FOV edge. We derive the same region from the
data itself: a pixel belongs to the FOV when it is non-zero in at least one frame of the stack. The
raw union is then cleaned (largest connected component, holes filled) so that speckle that happens to be
black on every frame, or a stray bright pixel outside the sector, does not change the region.

Convention for a stack that is entirely zero: there is no evidence of a sector, so the FOV is the whole
frame (all True). Restricting a mask with it then changes nothing, which is the safe default for callers
that use the FOV only to *remove* pixels.
"""
from __future__ import annotations

import numpy as np
from scipy import ndimage

# Frames per block when scanning a stack: bounds the temporary to chunk x H x W bools (~13 MB at 32 x 562 x 744).
_CHUNK_FRAMES = 32


def clean_fov(raw: np.ndarray) -> np.ndarray:
    """Largest 8-connected component of a raw (H, W) FOV estimate, with its holes filled.

    All True when `raw` has no True pixel (see the module docstring).
    """
    raw = np.asarray(raw, dtype=bool)
    if raw.ndim != 2:
        raise ValueError(f"expected a 2-D mask, got shape {raw.shape}")
    if not raw.any():
        return np.ones_like(raw, dtype=bool)
    labels, n = ndimage.label(raw, structure=np.ones((3, 3), dtype=bool))
    if n > 1:
        sizes = np.bincount(labels.ravel())
        sizes[0] = 0
        raw = labels == int(np.argmax(sizes))
    return ndimage.binary_fill_holes(raw)


def fov_from_frames_max(max_projection: np.ndarray, threshold: float = 0) -> np.ndarray:
    """FOV from a (H, W) per-pixel maximum over frames: pixels above `threshold`, cleaned."""
    max_projection = np.asarray(max_projection)
    if max_projection.ndim != 2:
        raise ValueError(f"expected a 2-D max projection, got shape {max_projection.shape}")
    return clean_fov(max_projection > threshold)


def fov_from_stack(stack: np.ndarray, threshold: float = 0) -> np.ndarray:
    """FOV (bool (H, W)) of a (Z, H, W) stack: pixels above `threshold` on any frame, cleaned.

    Scans the stack in blocks of frames and never makes a float (or full-size boolean) copy of it, so
    it works on a memory-mapped or SimpleITK-view array of a full 840-frame case.
    """
    if stack.ndim != 3:
        raise ValueError(f"expected a (Z, H, W) stack, got shape {stack.shape}")
    seen = np.zeros(stack.shape[1:], dtype=bool)
    for start in range(0, stack.shape[0], _CHUNK_FRAMES):
        seen |= (stack[start:start + _CHUNK_FRAMES] > threshold).any(axis=0)
    return clean_fov(seen)
