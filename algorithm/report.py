"""A picture of the decision: the chosen frame with its mask and fitted ellipse, above a strip of the
per-frame scores of the whole stack (sweep borders, optimal/suboptimal probabilities, chosen frame).

People check a frame choice by looking, not by reading numbers; this is what the CLI writes beside its
outputs and what the benchmark report reuses for worst cases.
"""
from __future__ import annotations

import numpy as np
import cv2

from .biometry import Ellipse
from .config import FRAME_OPTIMAL, FRAME_SUBOPTIMAL
from .select import sweep_bounds

GREEN, RED, ORANGE, CYAN, GREY, WHITE = (80, 220, 80), (60, 60, 255), (0, 165, 255), (255, 220, 0), \
    (110, 110, 110), (255, 255, 255)


def draw_frame(frame: np.ndarray, mask: np.ndarray | None, ellipse: Ellipse | None,
               caption: str = "") -> np.ndarray:
    """(H, W) grey frame -> BGR image with the mask contour (green) and the fitted ellipse (red)."""
    picture = cv2.cvtColor(frame, cv2.COLOR_GRAY2BGR)
    if mask is not None and mask.any():
        contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
        cv2.drawContours(picture, contours, -1, GREEN, 2)
    if ellipse is not None:
        box = (tuple(map(float, ellipse.center_xy)), tuple(map(float, ellipse.axes)), float(ellipse.angle_deg))
        cv2.ellipse(picture, box, RED, 2, cv2.LINE_AA)
    if caption:
        cv2.putText(picture, caption, (10, 24), cv2.FONT_HERSHEY_SIMPLEX, 0.6, WHITE, 1, cv2.LINE_AA)
    return picture


def draw_score_strip(probabilities: np.ndarray, mask_fractions: np.ndarray, chosen: int, sweeps: int,
                     width: int, height: int = 130) -> np.ndarray:
    """Per-frame P(optimal) (green), P(suboptimal) (orange) and mask size (cyan) along the stack."""
    strip = np.full((height, width, 3), 24, dtype=np.uint8)
    n = len(mask_fractions)
    if n == 0:
        return strip
    top, bottom = 14, height - 6

    def x_of(frame: float) -> int:
        return int(round((frame + 0.5) * (width - 1) / n))

    def polyline(values: np.ndarray, colour: tuple[int, int, int]) -> None:
        scored = ~np.isnan(values)
        points = [(x_of(i), int(bottom - np.clip(v, 0, 1) * (bottom - top)))
                  for i, v in enumerate(values) if scored[i]]
        if len(points) > 1:
            cv2.polylines(strip, [np.array(points, dtype=np.int32)], False, colour, 1, cv2.LINE_AA)

    for start, _ in sweep_bounds(n, sweeps)[1:]:
        cv2.line(strip, (x_of(start - 0.5), top), (x_of(start - 0.5), bottom), GREY, 1)
    area = np.asarray(mask_fractions, dtype=np.float64)
    finite_area = area[~np.isnan(area)]
    peak = max(float(finite_area.max()), 1e-6) if finite_area.size else 1.0
    polyline(area / peak, CYAN)
    polyline(probabilities[:, FRAME_SUBOPTIMAL], ORANGE)
    polyline(probabilities[:, FRAME_OPTIMAL], GREEN)
    if chosen >= 0:
        cv2.line(strip, (x_of(chosen), top), (x_of(chosen), bottom), RED, 2)
    cv2.putText(strip, "P(optimal)", (6, 11), cv2.FONT_HERSHEY_SIMPLEX, 0.38, GREEN, 1, cv2.LINE_AA)
    cv2.putText(strip, "P(suboptimal)", (90, 11), cv2.FONT_HERSHEY_SIMPLEX, 0.38, ORANGE, 1, cv2.LINE_AA)
    cv2.putText(strip, "mask size", (200, 11), cv2.FONT_HERSHEY_SIMPLEX, 0.38, CYAN, 1, cv2.LINE_AA)
    cv2.putText(strip, "chosen", (280, 11), cv2.FONT_HERSHEY_SIMPLEX, 0.38, RED, 1, cv2.LINE_AA)
    return strip


def case_picture(stack: np.ndarray, frame: int, mask: np.ndarray | None, ellipse: Ellipse | None,
                 probabilities: np.ndarray, mask_fractions: np.ndarray, sweeps: int, caption: str) -> np.ndarray:
    """The chosen frame (or the stack's middle frame when none was chosen) above the score strip."""
    shown = frame if frame >= 0 else len(stack) // 2
    top = draw_frame(stack[shown], mask if frame >= 0 else None, ellipse, caption)
    strip = draw_score_strip(probabilities, mask_fractions, frame, sweeps, width=top.shape[1])
    return np.vstack([top, strip])


def write_png(path, picture: np.ndarray) -> None:
    if not cv2.imwrite(str(path), picture):
        raise OSError(f"OpenCV could not write {path}")
