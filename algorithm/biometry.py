"""Abdominal circumference (AC) from a segmentation mask: the one ellipse fit of the project.

The algorithm's outputs, frame selection, the replica generator and the evaluation all measure AC here, so
a mask is measured the same way everywhere. The definitions follow the ACOUSLIC-AI evaluation:

* the mask is restricted to the ultrasound field of view (FOV) first;
* contour points near the FOV edge (and the image edge) are dropped, because there the outline is the
  border of the image, not the abdominal wall; the ellipse is fitted to the remaining, genuine part of
  the outline, so a half-visible abdomen is extrapolated across the edge;
* the fit is OpenCV's least-squares `cv2.fitEllipse` on contour pixel centres;
* the perimeter is Ramanujan's approximation pi * (3(a + b) - sqrt((3a + b)(a + 3b))) of the semi-axes,
  converted to mm with the 0.28 mm pixel spacing.

Why `cv2.fitEllipse` and not `fitEllipseAMS` / `fitEllipseDirect`: on drawn ellipses with 30-60 % of the
outline cut off by a FOV edge the three agree to within 0.1 %, and on wobbly outlines none is consistently
better; `fitEllipse` is what the challenge's scorer uses.

Why a 4 px edge band (`EDGE_TOLERANCE_PX`): a predicted mask can stop a few pixels short of the FOV edge
(the network's map is upsampled from 224 px, 3.3 frame pixels per network pixel). Its cut side then runs
parallel to the edge, a little inside it, and a fit that keeps it is flattened: 16 % short with a 2 px
band for a mask 2-3 px short of the edge, where a 4 px band measures it as well as the drawn mask. 4 px is
also how far the official scorer's erasure reaches (its FOV outline dilated three times by 3 x 3), so for a
one-blob mask we fit the points it fits. A wider band would cover masks stopping further short but loses
genuine wall next to the edge, which costs accuracy on noisy outlines. `python -m training ellipse-study`
measures this; the README gives the figures.

Where we deliberately differ from the official code: it traces every contour of the masked image (holes
and separate blobs included), erases its near-edge pixels, re-traces the remaining line drawing and keeps
the piece with the largest `cv2.contourArea`. An outline opened by the FOV edge leaves open arcs whose
traced area is ~0, so that choice is close to arbitrary and sometimes keeps a fragment or nothing, even for
a drawn mask (`training.scoring.official` reproduces it). We fit the outer contour of the largest connected
component, all of it except the edge band.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import contourpy
import cv2
import numpy as np
from contourpy import LineType

from algorithm.config import PIXEL_SPACING_MM

# Contour points within this chessboard distance (px) of a pixel outside the FOV / image are dropped.
EDGE_TOLERANCE_PX = 4


def ramanujan_perimeter(a: float, b: float) -> float:
    """Perimeter of an ellipse with semi-axes `a`, `b`, by Ramanujan's approximation.

    The closed form the challenge's scorer uses, pi * (3(a + b) - sqrt((3a + b)(a + 3b))) (Ramanujan's first
    formula; relative error below 1e-5 for the axis ratios of fetal abdomens).
    """
    if a < 0 or b < 0:
        raise ValueError(f"semi-axes must be non-negative, got {a}, {b}")
    return math.pi * (3.0 * (a + b) - math.sqrt((3.0 * a + b) * (a + 3.0 * b)))


@dataclass(frozen=True)
class Ellipse:
    """A fitted ellipse in pixel coordinates (x to the right, y down).

    `axes` are FULL axis lengths in px, major first; `angle_deg` is the direction of the major axis in
    degrees in [0, 180), measured like OpenCV's RotatedRect angle (from +x towards +y, i.e. clockwise on
    screen). `to_cv()` gives the tuple `cv2.ellipse` draws.
    """

    center_xy: tuple[float, float]
    axes: tuple[float, float]
    angle_deg: float

    @classmethod
    def from_cv(cls, box: tuple) -> "Ellipse":
        """From OpenCV's ((cx, cy), (width, height), angle), reordered so the major axis comes first."""
        (cx, cy), (w, h), angle = box
        if w < h:
            w, h, angle = h, w, angle + 90.0
        return cls((float(cx), float(cy)), (float(w), float(h)), float(angle) % 180.0)

    def to_cv(self) -> tuple[tuple[float, float], tuple[float, float], float]:
        return self.center_xy, self.axes, self.angle_deg

    @property
    def semi_axes(self) -> tuple[float, float]:
        return self.axes[0] / 2.0, self.axes[1] / 2.0

    @property
    def perimeter_px(self) -> float:
        return ramanujan_perimeter(*self.semi_axes)

    def circumference_mm(self, spacing_mm: float = PIXEL_SPACING_MM) -> float:
        return self.perimeter_px * spacing_mm

    def to_dict(self) -> dict[str, object]:
        """JSON-ready fields (lists, floats) plus the perimeter in px."""
        return {"center_xy": list(self.center_xy), "axes": list(self.axes), "angle_deg": self.angle_deg,
                "perimeter_px": self.perimeter_px}

    def draw(self, shape: tuple[int, int], filled: bool = True, thickness: int = 1) -> np.ndarray:
        """uint8 {0, 1} (H, W) raster of the ellipse (filled, or its outline of `thickness` px)."""
        canvas = np.zeros(shape, dtype=np.uint8)
        cv2.ellipse(canvas, self.to_cv(), 1, -1 if filled else thickness)
        return canvas


def _largest_outer_contour(mask: np.ndarray) -> np.ndarray | None:
    """(N, 2) x, y points of the outer contour of the largest blob of a (padded) uint8 mask."""
    contours, _ = cv2.findContours(mask, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    if not contours:
        return None
    # Area first; the point count breaks ties between degenerate (zero-area) lines and single pixels.
    largest = max(contours, key=lambda c: (cv2.contourArea(c), len(c)))
    return largest.reshape(-1, 2)


def fit_ellipse(mask: np.ndarray, fov: np.ndarray | None = None,
                edge_tolerance_px: int = EDGE_TOLERANCE_PX) -> Ellipse | None:
    """Ellipse fitted to the outline of the largest blob of `mask` inside `fov`, FOV-edge points excluded.

    `mask` is a 2-D (H, W) array, non-zero = abdomen; `fov` a same-shape boolean array (None = the whole
    image, so only the image edge truncates). Returns None when the mask is empty inside the FOV, fewer
    than 5 contour points remain off the edge, or the fit degenerates.
    """
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"expected a 2-D mask, got shape {mask.shape}")
    inside = np.ones(mask.shape, dtype=bool) if fov is None else np.asarray(fov, dtype=bool)
    if inside.shape != mask.shape:
        raise ValueError(f"FOV shape {inside.shape} does not match mask shape {mask.shape}")
    blob = (mask != 0) & inside
    if not blob.any():
        return None

    # A 1-px zero frame around everything makes the image edge an FOV edge like any other and keeps
    # findContours off the image border.
    blob = np.pad(blob, 1).astype(np.uint8)
    points = _largest_outer_contour(blob)
    if points is None:
        return None
    near_edge = _edge_band(inside, edge_tolerance_px)
    return _fit(points[~near_edge[points[:, 1], points[:, 0]]] - 1)


def fit_ellipse_subpixel(probability: np.ndarray, mask: np.ndarray, fov: np.ndarray | None = None,
                         level: float = 0.5, edge_tolerance_px: int = EDGE_TOLERANCE_PX) -> Ellipse | None:
    """Ellipse fitted to the `level` iso-line of an (H, W) abdomen probability around `mask`'s blob.

    The pixel outline `fit_ellipse` uses runs through the centres of the mask's border pixels, about half a
    pixel inside the line where the probability crosses the threshold, so it measures a slightly smaller
    ellipse; the iso-line (marching squares, contourpy) is where the mask's edge really is. Only the
    probability within two pixels of `mask` counts (other blobs are not the abdomen), the outer line is
    kept, and points in the FOV edge band are dropped exactly as for the pixel outline. None where
    `fit_ellipse` would give None.
    """
    probability, mask = np.asarray(probability, dtype=np.float64), np.asarray(mask) != 0
    if probability.shape != mask.shape or mask.ndim != 2:
        raise ValueError(f"probability {probability.shape} and mask {mask.shape} must be the same 2-D shape")
    inside = np.ones(mask.shape, dtype=bool) if fov is None else np.asarray(fov, dtype=bool)
    if inside.shape != mask.shape:
        raise ValueError(f"FOV shape {inside.shape} does not match mask shape {mask.shape}")
    if not (mask & inside).any():
        return None
    near_mask = cv2.dilate((mask & inside).astype(np.uint8), np.ones((5, 5), np.uint8)) > 0
    field = np.pad(np.where(near_mask & inside, probability, 0.0), 1)  # closed lines, off the image border
    lines = [line for line in contourpy.contour_generator(z=field, line_type=LineType.Separate).lines(level)
             if len(line) >= 3]
    if not lines:
        return None
    outer = max(lines, key=lambda line: abs(_shoelace_area(line)))  # (N, 2) x, y in padded coordinates
    near_edge = _edge_band(inside, edge_tolerance_px)
    cells = np.clip(np.rint(outer).astype(np.int64), 0, np.array(near_edge.shape[::-1]) - 1)
    return _fit(outer[~near_edge[cells[:, 1], cells[:, 0]]] - 1)


def _edge_band(inside: np.ndarray, edge_tolerance_px: int) -> np.ndarray:
    """Padded (H + 2, W + 2) boolean: within `edge_tolerance_px` of the FOV's (or the image's) edge."""
    outside = np.pad(~inside, 1, constant_values=True).astype(np.uint8)
    size = 2 * edge_tolerance_px + 1
    return cv2.dilate(outside, np.ones((size, size), np.uint8)) > 0


def _shoelace_area(line: np.ndarray) -> float:
    x, y = line[:, 0], line[:, 1]
    return 0.5 * float(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1)))


def _fit(points: np.ndarray) -> Ellipse | None:
    """cv2.fitEllipse on (N, 2) x, y points; None below 5 points or for a degenerate fit."""
    if len(points) < 5:
        return None
    box = cv2.fitEllipse(np.ascontiguousarray(points, dtype=np.float32))
    (cx, cy), (w, h), angle = box
    if not all(math.isfinite(v) for v in (cx, cy, w, h, angle)) or min(w, h) <= 0:
        return None
    return Ellipse.from_cv(box)


def circumference_mm(mask: np.ndarray, fov: np.ndarray | None = None,
                     spacing_mm: float = PIXEL_SPACING_MM) -> float:
    """AC in mm of `mask` (see `fit_ellipse`); 0.0 when no ellipse can be fitted.

    0.0 rather than None keeps the value a float everywhere (CSV, JSON, tensors); any NAE against a
    positive reference is then 1, the official penalty for a missing measurement.
    """
    ellipse = fit_ellipse(mask, fov)
    return 0.0 if ellipse is None else ellipse.circumference_mm(spacing_mm)
