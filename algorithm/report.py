"""A picture of the decision: the chosen frame with its mask and fitted ellipse, above a strip of the
per-frame scores of the whole stack (sweeps labelled, a frame axis, optimal/suboptimal probabilities, mask
size, the chosen frame).

People check a frame choice by looking, not by reading numbers; this is what the CLI writes beside its
outputs and what the benchmark report reuses for worst cases. Lines are drawn with OpenCV; text with
Pillow's built-in TrueType font, since OpenCV's Hershey fonts set "P(optimal)" as "P( optimal )".
"""
from __future__ import annotations

from functools import lru_cache

import cv2
import numpy as np
from PIL import Image, ImageDraw, ImageFont

from .biometry import Ellipse
from .config import FRAME_OPTIMAL, FRAME_SUBOPTIMAL
from .select import sweep_bounds

GREEN, RED, ORANGE, CYAN, GREY, WHITE = (80, 220, 80), (60, 60, 255), (0, 165, 255), (255, 220, 0), \
    (110, 110, 110), (255, 255, 255)  # BGR, as OpenCV draws
LIGHT_GREY = (170, 170, 170)
STRIP_BACKGROUND = 24
TITLE_SIZE, LABEL_SIZE = 17, 12  # font sizes, px


@lru_cache(maxsize=None)
def _font(size: int) -> ImageFont.ImageFont:
    return ImageFont.load_default(size=size)


def text_width(text: str, size: int = LABEL_SIZE) -> int:
    return int(np.ceil(_font(size).getlength(text)))


def draw_texts(picture: np.ndarray, texts: list[tuple[str, tuple[int, int], tuple[int, int, int], int]],
               shadow: bool = False) -> np.ndarray:
    """`picture` (BGR) with each (text, (x, y) of its top left, BGR colour, size) written on it; `shadow`
    puts a dark outline under the letters so they read on any ultrasound background."""
    image = Image.fromarray(np.ascontiguousarray(picture[..., ::-1]))
    draw = ImageDraw.Draw(image)
    for text, xy, colour, size in texts:
        draw.text(xy, text, fill=tuple(reversed(colour)), font=_font(size),
                  stroke_width=2 if shadow else 0, stroke_fill=(0, 0, 0))
    return np.asarray(image)[..., ::-1].copy()


def title(frame: int, plane: str, ac_mm: float | None) -> str:
    """What the picture's title says: the chosen frame, its plane type and the AC."""
    if frame < 0:
        return "no frame chosen (-1): no abdomen plane found"
    ac = f"AC {ac_mm:.1f} mm" if ac_mm else "AC n/a"
    return f"frame {frame}  ·  {plane} plane  ·  {ac}"


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
        picture = draw_texts(picture, [(caption, (10, 8), WHITE, TITLE_SIZE)], shadow=True)
    return picture


def frame_ticks(n_frames: int, target: int = 10) -> list[int]:
    """Round frame numbers (1, 2 or 5 times a power of ten apart) for an axis of `n_frames` frames."""
    if n_frames <= 1:
        return [0]
    raw = (n_frames - 1) / target
    magnitude = 10 ** int(np.floor(np.log10(raw))) if raw >= 1 else 1
    step = next(m * magnitude for m in (1, 2, 5, 10) if m * magnitude >= raw)
    return list(range(0, n_frames, int(step)))


def draw_score_strip(probabilities: np.ndarray, mask_fractions: np.ndarray, chosen: int, sweeps: int,
                     width: int, height: int = 170) -> np.ndarray:
    """Per-frame P(optimal) (green), P(suboptimal) (orange) and relative mask size (cyan) along the stack, the
    sweeps labelled above and separated by grey lines, the frame numbers below, the chosen frame in red."""
    strip = np.full((height, width, 3), STRIP_BACKGROUND, dtype=np.uint8)
    n = len(mask_fractions)
    if n == 0:
        return strip
    top, bottom = 40, height - 24  # the plot; legend and sweep names above, the frame axis below

    def x_of(frame: float) -> int:
        return int(round((frame + 0.5) * (width - 1) / n))

    def polyline(values: np.ndarray, colour: tuple[int, int, int]) -> None:
        scored = ~np.isnan(values)
        points = [(x_of(i), int(bottom - np.clip(v, 0, 1) * (bottom - top)))
                  for i, v in enumerate(values) if scored[i]]
        if len(points) > 1:
            cv2.polylines(strip, [np.array(points, dtype=np.int32)], False, colour, 1, cv2.LINE_AA)

    texts = []
    bounds = sweep_bounds(n, sweeps)
    for number, (start, stop) in enumerate(bounds, 1):
        if start > 0:
            cv2.line(strip, (x_of(start - 0.5), top), (x_of(start - 0.5), bottom), GREY, 1)
        name = f"Sweep {number}"
        if text_width(name) < x_of(stop - 0.5) - x_of(start - 0.5) - 4:
            centre = (x_of(start - 0.5) + x_of(stop - 0.5)) // 2
            texts.append((name, (centre - text_width(name) // 2, 22), LIGHT_GREY, LABEL_SIZE))
    area = np.asarray(mask_fractions, dtype=np.float64)
    finite_area = area[~np.isnan(area)]
    peak = max(float(finite_area.max()), 1e-6) if finite_area.size else 1.0
    polyline(area / peak, CYAN)
    polyline(probabilities[:, FRAME_SUBOPTIMAL], ORANGE)
    polyline(probabilities[:, FRAME_OPTIMAL], GREEN)
    if chosen >= 0:
        cv2.line(strip, (x_of(chosen), top), (x_of(chosen), bottom), RED, 2)

    # The frame axis: a tick per round frame number, labels that do not collide, "frame" at the right end.
    cv2.line(strip, (0, bottom), (width - 1, bottom), GREY, 1)
    axis_name = "frame"
    right_end = width - 4 - text_width(axis_name)
    texts.append((axis_name, (right_end, bottom + 6), LIGHT_GREY, LABEL_SIZE))
    free_from = 0
    for tick in frame_ticks(n):
        x = x_of(tick)
        cv2.line(strip, (x, bottom), (x, bottom + 4), LIGHT_GREY, 1)
        label = str(tick)
        left = max(0, x - text_width(label) // 2)
        if left >= free_from and left + text_width(label) < right_end - 6:
            texts.append((label, (left, bottom + 6), LIGHT_GREY, LABEL_SIZE))
            free_from = left + text_width(label) + 6

    x = 6
    for label, colour in (("P(optimal)", GREEN), ("P(suboptimal)", ORANGE), ("mask size (relative)", CYAN),
                          ("chosen frame", RED)):
        cv2.line(strip, (x, 11), (x + 14, 11), colour, 2)
        texts.append((label, (x + 19, 3), colour, LABEL_SIZE))
        x += 19 + text_width(label) + 16
    return draw_texts(strip, texts)


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
