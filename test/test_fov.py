"""Field of view derived from a stack: synthetic sectors, cleaning rules, and the challenge's own FOV mask."""

import cv2
import numpy as np
import pytest

from algorithm.fov import clean_fov, fov_from_frames_max, fov_from_stack
from conftest import needs_reference_fov, reference_fov



def sector(shape=(120, 160), radius=130, start=50, stop=130) -> np.ndarray:
    """A probe-like sector (apex above the top edge) as a bool mask."""
    mask = np.zeros(shape, np.uint8)
    cv2.ellipse(mask, (shape[1] // 2, -15), (radius, radius), 0, start, stop, 1, -1)
    return mask.astype(bool)


def speckle_stack(fov: np.ndarray, frames: int, seed: int = 0) -> np.ndarray:
    """Rayleigh speckle (uint8, dark like real frames, some zeros inside the FOV) times the FOV."""
    rng = np.random.default_rng(seed)
    speckle = np.clip(rng.rayleigh(20.0, size=(frames, *fov.shape)), 0, 255).astype(np.uint8)
    return speckle * fov.astype(np.uint8)


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / (a | b).sum())


def test_sector_recovered_exactly_over_many_chunks():
    fov = sector()
    stack = speckle_stack(fov, frames=70)  # more than two 32-frame chunks
    assert (stack[0][fov] == 0).any(), "speckle should leave holes on single frames"
    got = fov_from_stack(stack)
    assert got.dtype == bool and got.shape == fov.shape
    assert np.array_equal(got, fov)


def test_outlier_pixels_removed_and_holes_filled():
    fov = sector()
    stack = speckle_stack(fov, frames=4)
    stack[:, fov.shape[0] // 2, fov.shape[1] // 2] = 0  # a pixel black on every frame, inside the sector
    stack[2, 2, 3] = 200  # a stray bright pixel outside the sector (corner)
    assert not fov[2, 3]
    got = fov_from_stack(stack)
    assert np.array_equal(got, fov)


def test_all_zero_stack_gives_whole_frame():
    got = fov_from_stack(np.zeros((5, 20, 30), np.uint8))
    assert got.shape == (20, 30) and got.all()


def test_max_projection_matches_stack_and_threshold():
    fov = sector()
    stack = speckle_stack(fov, frames=6)
    assert np.array_equal(fov_from_frames_max(stack.max(axis=0)), fov_from_stack(stack))
    # a dim haze (value 1) outside the sector is kept at threshold 0 and dropped at threshold 1
    stack[:, ~fov] = 1
    assert fov_from_stack(stack).all()
    assert np.array_equal(fov_from_stack(stack, threshold=1), fov)


def test_shape_checks():
    with pytest.raises(ValueError):
        fov_from_stack(np.zeros((20, 30), np.uint8))
    with pytest.raises(ValueError):
        clean_fov(np.zeros((2, 20, 30), bool))


@needs_reference_fov
def test_challenge_fov_recovered_from_speckle():
    reference = reference_fov()
    stack = speckle_stack(reference, frames=6, seed=1)
    got = fov_from_stack(stack)
    assert iou(got, reference) >= 0.99
