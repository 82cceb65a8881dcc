"""Network mask -> the clean binary abdomen on which the ellipse is fitted.

An ellipse fit is only as good as its contour: stray blobs pull it, holes (the stomach bubble is dark and
sometimes left out by the network) add inner contours. So the mask is thresholded on the original frame
grid, restricted to the field of view, reduced to its largest connected component and its holes are filled.
"""
from __future__ import annotations

import numpy as np
import torch
from scipy import ndimage

from .preprocess import upsample_to_frame


def abdomen_probability(network_map: torch.Tensor, height: int, width: int) -> np.ndarray:
    """(s, s) abdomen probability at network resolution -> (height, width) float32 on the frame grid."""
    return upsample_to_frame(network_map.float()[None, None], height, width)[0, 0].cpu().numpy()


def largest_component(mask: np.ndarray) -> np.ndarray:
    """Keep the largest 8-connected component of a boolean mask."""
    labels, count = ndimage.label(mask, structure=np.ones((3, 3), dtype=bool))
    if count <= 1:
        return mask.astype(bool)
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    return labels == int(np.argmax(sizes))


def clean_mask(probability: np.ndarray, fov: np.ndarray | None = None, threshold: float = 0.5) -> np.ndarray:
    """(H, W) probability -> (H, W) uint8 {0, 1}: threshold, FOV, largest component, holes filled."""
    mask = probability >= threshold
    if fov is not None:
        mask &= fov.astype(bool)
    if not mask.any():
        return np.zeros(probability.shape, dtype=np.uint8)
    mask = ndimage.binary_fill_holes(largest_component(mask))
    if fov is not None:
        mask &= fov.astype(bool)
    return mask.astype(np.uint8)
