"""The challenge's own scorer, reproduced: `python -m training evaluate --official`.

What the leaderboard runs is `DIAGNijmegen/ACOUSLIC-AI-evaluation-method` (main, ebf14b3, July 2024). This
module re-derives its per-case results from its behaviour, quirks included, so that a local score predicts
the leaderboard's to 1e-9 (checked against that code by `test/test_official.py` when a checkout is at
hand). The project's own metrics (`training.scoring.metrics`) follow the challenge's definitions instead; the
README lists where the two differ. What the official scorer does, per case:

* **Frame.** Sweeps are fixed blocks of 140 frames (here n_frames // 6, the same for the 840-frame stacks
  it is written for). For -1 (or any frame outside the sweeps) the predicted mask is all zeros and there is
  no reference AC; the ground truth it compares with is still `gt[frame]`, for -1 the stack's *last*
  frame. A frame past the end of the stack, or a negative frame other than -1 in a case with annotations,
  makes it raise (`OfficialScorerFailure` here): on grand-challenge that fails the whole evaluation.
* **Overlap.** The prediction and the binarised ground truth of the chosen frame, both masked with the FOV,
  through SimpleITK's `LabelOverlapMeasuresImageFilter` (ground truth first). Two empty masks give a Dice
  of inf (and DBL_MAX for several other measures).
* **DSC_soft and Hausdorff (pixels: the images carry no spacing).** Both masks non-empty: Dice and HD of
  the chosen frame. Empty prediction: the chosen frame's Dice (0, or inf when its ground truth is empty
  too) and HD = 744 x 15. Empty ground truth on the chosen frame: the *previous* annotated frame of the
  sweep within 15 frames when there is one, else the next; its unmasked ground truth gives
  Dice x (1 - |d| / 15) and HD x d with the signed d = nearest - chosen; none within 15: HD = 744 x 15
  and DSC_soft = the chosen frame's Dice (0).
* **WFSS**: as `training.scoring.metrics.wfss`.
* **NAE_AC** = |ref - pred| / max(ref, pred, 1e-6), or 1 when either AC is missing, with the ellipse fit
  below.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import cv2
import numpy as np
import SimpleITK as sitk

from algorithm.biometry import Ellipse
from algorithm.config import PIXEL_SPACING_MM, SWEEPS_PER_CASE
from training.scoring.metrics import MAX_FRAME_DISTANCE, FrameAnnotations, sweep_length_of, wfss

# The official scorer's constants.
HD_PENALTY_PX = 744 * MAX_FRAME_DISTANCE  # "maximum sweep width x frame tolerance", whatever the width
NAE_FLOOR = 1e-6
FIT_PAD_PX = 200  # zero frame around mask and FOV before tracing contours
FOV_BAND_DILATIONS = 3  # 3 x 3 dilations of the FOV outline that erase the mask outline near the FOV edge
OVERLAP_MEASURES = ("FalseNegativeError", "FalsePositiveError", "MeanOverlap", "UnionOverlap",
                    "VolumeSimilarity", "JaccardCoefficient", "DiceCoefficient")


class OfficialScorerFailure(ValueError):
    """An input on which the official scorer raises (and grand-challenge's evaluation fails)."""


# ------------------------------------------------------------------------------------------ ellipse fit

def _outline(binary_255: np.ndarray, mode: int) -> np.ndarray:
    """A 1-px line drawing of every contour of a uint8 {0, 255} image (OpenCV's tracing and drawing)."""
    contours, _ = cv2.findContours(binary_255, mode, cv2.CHAIN_APPROX_SIMPLE)
    drawing = np.zeros_like(binary_255)
    cv2.drawContours(drawing, contours, -1, 255, 1)
    return drawing


def official_fit_points(mask: np.ndarray, fov: np.ndarray) -> np.ndarray | None:
    """The contour points the official scorer fits its ellipse to, in padded coordinates (+FIT_PAD_PX).

    Every contour of the FOV-masked prediction (outer ones, holes, every blob) is drawn as a 1-px line;
    the line pixels within 3 dilations of the FOV outline are erased; the remaining drawing is traced
    again and the piece with the largest `cv2.contourArea` is kept. An open arc's traced contour runs
    along the line and back, so its area is ~0: among the pieces of an outline opened by the FOV edge the
    choice is close to arbitrary (the first of equal areas wins), and a closed ring (a hole, a separate
    blob away from the edge) always beats them. None when nothing is left or the piece has <= 5 points.
    """
    inside = np.asarray(fov) != 0
    masked = np.pad(((np.asarray(mask) != 0) & inside).astype(np.uint8) * 255, FIT_PAD_PX)
    fov_255 = np.pad(inside.astype(np.uint8) * 255, FIT_PAD_PX)
    band = cv2.dilate(_outline(fov_255, cv2.RETR_TREE), np.ones((3, 3), np.uint8), iterations=FOV_BAND_DILATIONS)
    drawing = _outline(masked, cv2.RETR_TREE)
    drawing[band != 0] = 0
    pieces, _ = cv2.findContours(drawing, cv2.RETR_LIST, cv2.CHAIN_APPROX_NONE)
    if not pieces:
        return None
    piece = max(pieces, key=cv2.contourArea)
    return piece if len(piece) > 5 else None


def official_fit_ellipse(mask: np.ndarray, fov: np.ndarray) -> Ellipse | None:
    """The official scorer's ellipse for a (H, W) mask and FOV, in image coordinates (None: no fit)."""
    points = official_fit_points(mask, fov)
    if points is None:
        return None
    (cx, cy), axes, angle = cv2.fitEllipse(points)
    if any(math.isnan(v) for v in axes):
        return None
    return Ellipse.from_cv(((cx - FIT_PAD_PX, cy - FIT_PAD_PX), axes, angle))


def official_circumference_mm(mask: np.ndarray, fov: np.ndarray,
                              spacing_mm: float = PIXEL_SPACING_MM) -> float | None:
    """AC (mm) as the official scorer measures it: Ramanujan's perimeter of the half axes; None: no fit."""
    ellipse = official_fit_ellipse(mask, fov)
    return None if ellipse is None else ellipse.perimeter_px * spacing_mm


# ------------------------------------------------------------------------------------------ one case

def _image(mask: np.ndarray) -> sitk.Image:
    return sitk.GetImageFromArray(np.asarray(mask, dtype=np.uint8))


def overlap_measures(reference: np.ndarray, prediction: np.ndarray) -> dict[str, float]:
    """SimpleITK's label overlap measures of two binary (H, W) masks, reference first."""
    measures = sitk.LabelOverlapMeasuresImageFilter()
    measures.SetNumberOfThreads(1)
    measures.Execute(_image(reference), _image(prediction))
    return {name: float(getattr(measures, f"Get{name}")()) for name in OVERLAP_MEASURES}


def hausdorff_px(reference: np.ndarray, prediction: np.ndarray) -> float:
    """SimpleITK's Hausdorff distance of two non-empty binary (H, W) masks, in pixels."""
    distance = sitk.HausdorffDistanceImageFilter()
    distance.SetNumberOfThreads(1)
    distance.Execute(_image(reference), _image(prediction))
    return float(distance.GetHausdorffDistance())


def previous_first_annotated_frame(annotated: np.ndarray, frame: int, sweep: tuple[int, int],
                                   max_distance: int = MAX_FRAME_DISTANCE) -> int | None:
    """The official search: the closest annotated frame before `frame` in its sweep within `max_distance`,
    else the closest after it, else None (the chosen frame itself is not looked at)."""
    start, stop = sweep
    before = np.flatnonzero(annotated[max(start, frame - max_distance):frame])
    if len(before):
        return max(start, frame - max_distance) + int(before[-1])
    after = np.flatnonzero(annotated[frame + 1:min(stop, frame + max_distance + 1)])
    return frame + 1 + int(after[0]) if len(after) else None


@dataclass(frozen=True)
class OfficialCaseScore:
    """One case as the official scorer scores it; `metrics` holds its per-case dict, under its names."""

    frame: int
    ac_pred_mm: float | None
    ac_ref_mm: float | None
    metrics: dict[str, float]

    @property
    def score(self) -> float:
        m = self.metrics
        return 0.5 * (1.0 - m["nae_circumference"]) + 0.25 * m["wfss"] + 0.25 * m["DiceCoefficientSoft"]

    def to_dict(self) -> dict[str, Any]:
        """Our report's keys (HD in pixels, as the official scorer computes it) plus its own dict."""
        m = self.metrics
        return {"frame": self.frame, "wfss": m["wfss"], "dsc_soft": m["DiceCoefficientSoft"],
                "nae_ac": m["nae_circumference"], "hd": m["HausdorffDistance"], "ac_pred_mm": self.ac_pred_mm,
                "ac_ref_mm": self.ac_ref_mm, "score": self.score, "official": dict(m)}


def official_case_score(chosen_frame: int, pred_stack: np.ndarray | None, gt_stack: np.ndarray,
                        ac_ref_per_sweep: Sequence[float | None], fov: np.ndarray,
                        spacing_mm: float = PIXEL_SPACING_MM, sweeps: int = SWEEPS_PER_CASE,
                        annotations: FrameAnnotations | None = None) -> OfficialCaseScore:
    """Score one case as the official scorer does (module docstring).

    `pred_stack` is the algorithm's (Z, H, W) binary output (None: no output at all, a missing case);
    `gt_stack` the (Z, H, W) label stack; `ac_ref_per_sweep` the reference AC of each sweep (None where
    absent); `fov` the (H, W) FOV the official scorer applies (its `fov_mask.mha` on grand-challenge).
    Raises `OfficialScorerFailure` where the official scorer raises.
    """
    ann = annotations if annotations is not None else FrameAnnotations.from_stack(gt_stack)
    n_frames, frame = ann.n_frames, int(chosen_frame)
    if not -n_frames <= frame < n_frames:
        raise OfficialScorerFailure(f"frame {frame} is outside the {n_frames}-frame stack (the official "
                                    "scorer raises IndexError)")
    if frame < -1 and ann.annotated.any():
        raise OfficialScorerFailure(f"frame {frame} (the official scorer's WFSS raises 'Frame number is out "
                                    "of range' for negative frames other than -1)")
    if pred_stack is not None and (pred_stack.ndim != 3 or pred_stack.shape[1:] != gt_stack.shape[1:]):
        raise OfficialScorerFailure(f"the mask file holds a {pred_stack.shape} array; the official scorer "
                                    f"needs the (Z, H, W) output stack of {gt_stack.shape[1:]} frames")
    length = sweep_length_of(n_frames, sweeps)
    in_sweep = 0 <= frame < sweeps * length
    if in_sweep and pred_stack is not None and frame >= len(pred_stack):
        raise OfficialScorerFailure(f"frame {frame} is outside the {len(pred_stack)}-frame output stack")
    inside = np.asarray(fov) != 0
    prediction = np.zeros(gt_stack.shape[1:], dtype=bool)
    if in_sweep and pred_stack is not None:
        prediction = np.asarray(pred_stack[frame]) != 0
    sweep = frame // length if in_sweep else None

    ac_pred = official_circumference_mm(prediction, inside, spacing_mm)
    ac_ref = ac_ref_per_sweep[sweep] if sweep is not None and sweep < len(ac_ref_per_sweep) else None
    ac_ref = None if ac_ref is None else float(ac_ref)
    if ac_pred is None or ac_ref is None:
        nae = 1.0
    else:
        nae = abs(ac_ref - ac_pred) / max(ac_ref, ac_pred, NAE_FLOOR)

    gt = (np.asarray(gt_stack[frame]) > 0) & inside
    pred = prediction & inside
    metrics: dict[str, Any] = overlap_measures(gt, pred)
    dice = metrics["DiceCoefficient"]
    metrics.update(DiceCoefficientNearestFrame=dice, NearestAnnotatedFrame=frame, DiceCoefficientSoft=dice)
    if gt.any() and pred.any():
        hd = hausdorff_px(gt, pred)
    elif not pred.any():
        hd = float(HD_PENALTY_PX)
    else:
        start = frame - frame % length
        nearest = previous_first_annotated_frame(ann.annotated, frame, (start, start + length))
        if nearest is None:
            hd = float(HD_PENALTY_PX)
        else:
            target = np.asarray(gt_stack[nearest]) > 0  # not masked with the FOV (official behaviour)
            hd = hausdorff_px(target, pred) * (nearest - frame)
            dice_nearest = overlap_measures(target, pred)["DiceCoefficient"]
            metrics.update(DiceCoefficientNearestFrame=dice_nearest, NearestAnnotatedFrame=nearest,
                           DiceCoefficientSoft=dice_nearest * (1 - abs(nearest - frame) / MAX_FRAME_DISTANCE))
    metrics.update(HausdorffDistance=hd, wfss=_official_wfss(frame, ann), nae_circumference=nae)
    return OfficialCaseScore(frame, ac_pred, ac_ref, metrics)


def _official_wfss(frame: int, ann: FrameAnnotations) -> float:
    """The official WFSS: 0 without annotations or for -1 (other frames are valid here, see the checks)."""
    if not ann.annotated.any() or frame == -1:
        return 0.0
    return wfss(frame, ann)
