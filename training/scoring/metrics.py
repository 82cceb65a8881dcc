"""Per-case ACOUSLIC-AI metrics, re-implemented from the challenge's public description and scorer.

score = 0.5 (1 - NAE_AC) + 0.25 WFSS + 0.25 DSC_soft, per case, averaged over cases.

* WFSS (weighted frame selection score), the official rule: 0 when the case has no annotated frame or
  the prediction is -1; 1 when the chosen frame holds an optimal plane (label 1), or a suboptimal plane
  (label 2) in a case with no optimal plane anywhere; 0.6 for a suboptimal plane when an optimal one
  exists; 0 otherwise.
* DSC_soft: Dice of the prediction (inside the FOV) against the ground truth of the chosen frame when
  that frame is annotated; otherwise against the nearest annotated frame of the same sweep at most
  `max_distance` (15) frames away, times (1 - distance / max_distance).
* NAE_AC = |AC_ref - AC_pred| / max(AC_ref, AC_pred), AC_pred from `algorithm.biometry` (ellipse on the
  FOV-restricted mask), AC_ref the reference of the sweep that contains the chosen frame. 1 (the worst)
  when the frame is -1, no ellipse can be fitted, or that sweep has no reference AC (official behaviour).
* HD (not in the score): Hausdorff distance in mm between the prediction and the same target frame as
  DSC_soft, multiplied by the frame distance when that is >= 1; the official penalty of image width x
  max_distance (744 x 15 px in the challenge, here converted to mm) when the prediction is empty or
  there is no target frame.

Sweeps are consecutive blocks of n_frames // 6 frames (140 in the challenge; the replica generator may use
fewer); nothing here assumes 840 frames.

Where we differ from the official code
--------------------------------------
1. Frame -1 / empty predictions: for -1 the official scorer compares an empty mask with the *last* frame
   of the stack (Python index -1); for an empty mask on an unannotated frame it does not look for the
   nearest annotated frame. Both end in SimpleITK's Dice of two empty masks, which is inf (SimpleITK
   2.5), so one such case makes the mean score inf. We define DSC_soft = 0 for -1 (or an empty mask)
   whenever the case has an annotated frame, and DSC_soft = 1 when the case has none and the prediction
   is -1 or empty (a correct rejection). WFSS (0) and NAE (1) follow the official code in both
   situations, so a correct rejection still scores only 0.25.
2. Nearest annotated frame: the official search returns the previous annotated frame whenever one exists
   within 15 frames, even if a later one is closer; we take the truly nearest (ties -> earlier frame),
   as the challenge's description states.
3. The FOV masks the ground truth of the target frame too (officially only the chosen frame's ground
   truth is masked; the nearest frame's is not). Annotations lie inside the FOV, so this rarely matters.
4. HD is in mm (officially in pixels, since the scorer drops the spacing), scaled by |distance| (officially
   by the signed difference, which can be negative); its penalty is width x max_distance x spacing mm.
5. A frame number outside [0, n_frames) is scored as -1 (officially it raises or indexes from the end).
6. The AC ellipse: see `algorithm.biometry` (largest blob's outer contour, a 4 px FOV-edge band; the
   official fit re-traces an erased line drawing and keeps one piece of it).

`training.scoring.official` reproduces the official code itself, these differences included (`--official`).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import SimpleITK as sitk

from algorithm.biometry import circumference_mm
from algorithm.config import PIXEL_SPACING_MM, SWEEPS_PER_CASE

# Ground-truth mask values of the public release.
GT_OPTIMAL, GT_SUBOPTIMAL = 1, 2
# Frames between the chosen and an annotated frame beyond which DSC_soft is 0 (the official tolerance).
MAX_FRAME_DISTANCE = 15
WFSS_SUBOPTIMAL = 0.6
_CHUNK_FRAMES = 32


@dataclass(frozen=True)
class FrameAnnotations:
    """Which frames of a ground-truth stack hold an optimal / a suboptimal plane (bool (Z,) each).

    Computed once per case so that the metrics need not rescan a 350 MB label stack.
    """

    optimal: np.ndarray
    suboptimal: np.ndarray

    @classmethod
    def from_stack(cls, gt_stack: np.ndarray) -> "FrameAnnotations":
        if gt_stack.ndim != 3:
            raise ValueError(f"expected a (Z, H, W) label stack, got shape {gt_stack.shape}")
        optimal = np.zeros(gt_stack.shape[0], dtype=bool)
        suboptimal = np.zeros(gt_stack.shape[0], dtype=bool)
        for start in range(0, gt_stack.shape[0], _CHUNK_FRAMES):
            block = np.asarray(gt_stack[start:start + _CHUNK_FRAMES]).reshape(-1, gt_stack.shape[1] * gt_stack.shape[2])
            optimal[start:start + len(block)] = (block == GT_OPTIMAL).any(axis=1)
            suboptimal[start:start + len(block)] = (block == GT_SUBOPTIMAL).any(axis=1)
        return cls(optimal, suboptimal)

    @property
    def annotated(self) -> np.ndarray:
        return self.optimal | self.suboptimal

    @property
    def n_frames(self) -> int:
        return len(self.optimal)


def _annotations(gt: np.ndarray | FrameAnnotations) -> FrameAnnotations:
    return gt if isinstance(gt, FrameAnnotations) else FrameAnnotations.from_stack(gt)


def valid_frame(frame: int, n_frames: int) -> int:
    """`frame` if it indexes the stack, else -1 (no frame)."""
    frame = int(frame)
    return frame if 0 <= frame < n_frames else -1


def sweep_length_of(n_frames: int, sweeps: int = SWEEPS_PER_CASE) -> int:
    return max(1, n_frames // sweeps)


def sweep_bounds(frame: int, n_frames: int, sweep_length: int) -> tuple[int, int]:
    """[start, stop) of the sweep holding `frame` (sweeps are consecutive blocks of `sweep_length`)."""
    start = (frame // sweep_length) * sweep_length
    return start, min(start + sweep_length, n_frames)


def wfss(chosen_frame: int, gt_mask_stack_labels: np.ndarray | FrameAnnotations) -> float:
    """Weighted frame selection score of one case (official rule, see the module docstring)."""
    ann = _annotations(gt_mask_stack_labels)
    if not ann.annotated.any():
        return 0.0
    frame = valid_frame(chosen_frame, ann.n_frames)
    if frame < 0:
        return 0.0
    if ann.optimal[frame]:
        return 1.0
    if ann.suboptimal[frame]:
        return WFSS_SUBOPTIMAL if ann.optimal.any() else 1.0
    return 0.0


def nearest_annotated_frame(chosen_frame: int, annotations: FrameAnnotations, sweep_length: int,
                            max_distance: int = MAX_FRAME_DISTANCE) -> int | None:
    """The annotated frame of the chosen frame's sweep closest to it (ties: the earlier), None if none
    lies within `max_distance` frames. The chosen frame itself when it is annotated."""
    frame = valid_frame(chosen_frame, annotations.n_frames)
    if frame < 0:
        return None
    start, stop = sweep_bounds(frame, annotations.n_frames, sweep_length)
    lo, hi = max(start, frame - max_distance), min(stop, frame + max_distance + 1)
    candidates = lo + np.flatnonzero(annotations.annotated[lo:hi])
    if len(candidates) == 0:
        return None
    return int(candidates[np.argmin(np.abs(candidates - frame))])  # argmin keeps the first (earlier) tie


def dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice of two binary masks; 1.0 when both are empty."""
    a, b = np.asarray(a, dtype=bool), np.asarray(b, dtype=bool)
    total = int(a.sum()) + int(b.sum())
    return 1.0 if total == 0 else 2.0 * int(np.logical_and(a, b).sum()) / total


def _restrict(mask: np.ndarray, fov: np.ndarray | None) -> np.ndarray:
    mask = np.asarray(mask) != 0
    return mask if fov is None else mask & np.asarray(fov, dtype=bool)


def _target(chosen_frame: int, gt_stack: np.ndarray, sweep_length: int | None, max_distance: int,
            annotations: FrameAnnotations | None) -> tuple[FrameAnnotations, int | None, int]:
    ann = annotations if annotations is not None else FrameAnnotations.from_stack(gt_stack)
    length = sweep_length or sweep_length_of(ann.n_frames)
    target = nearest_annotated_frame(chosen_frame, ann, length, max_distance)
    return ann, target, 0 if target is None else abs(target - int(chosen_frame))


def soft_dice(pred_mask_2d: np.ndarray | None, chosen_frame: int, gt_stack: np.ndarray,
              sweep_length: int | None = None, max_distance: int = MAX_FRAME_DISTANCE,
              fov: np.ndarray | None = None, annotations: FrameAnnotations | None = None) -> float:
    """DSC_soft of one case (module docstring). `sweep_length` None = n_frames // 6; `pred_mask_2d` None
    or empty = no segmentation; `annotations` may be passed to skip rescanning `gt_stack`."""
    ann, target, distance = _target(chosen_frame, gt_stack, sweep_length, max_distance, annotations)
    pred_empty = pred_mask_2d is None or valid_frame(chosen_frame, ann.n_frames) < 0 \
        or not _restrict(pred_mask_2d, fov).any()
    if not ann.annotated.any():
        return 1.0 if pred_empty else 0.0  # a correct rejection (we differ here, see the docstring)
    if target is None or pred_empty:
        return 0.0
    overlap = dice(_restrict(pred_mask_2d, fov), _restrict(gt_stack[target], fov))
    return overlap * (1.0 - distance / max_distance)


def hausdorff_penalty_mm(width_px: int, max_distance: int = MAX_FRAME_DISTANCE,
                         spacing_mm: float = PIXEL_SPACING_MM) -> float:
    """The official HD for an empty prediction or no target frame: image width x frame tolerance."""
    return float(width_px * max_distance * spacing_mm)


def _hausdorff_2d_mm(a: np.ndarray, b: np.ndarray, spacing_mm: float) -> float:
    images = []
    for m in (a, b):
        image = sitk.GetImageFromArray(m.astype(np.uint8))
        image.SetSpacing((spacing_mm, spacing_mm))
        images.append(image)
    hd = sitk.HausdorffDistanceImageFilter()
    hd.Execute(*images)
    return float(hd.GetHausdorffDistance())


def hausdorff_mm(pred_mask_2d: np.ndarray | None, chosen_frame: int, gt_stack: np.ndarray,
                 spacing_mm: float = PIXEL_SPACING_MM, sweep_length: int | None = None,
                 max_distance: int = MAX_FRAME_DISTANCE, fov: np.ndarray | None = None,
                 annotations: FrameAnnotations | None = None) -> float:
    """Hausdorff distance (mm) against the DSC_soft target frame, times the frame distance when >= 1;
    the official penalty (`hausdorff_penalty_mm`) when the prediction is empty or there is no target."""
    ann, target, distance = _target(chosen_frame, gt_stack, sweep_length, max_distance, annotations)
    penalty = hausdorff_penalty_mm(gt_stack.shape[-1], max_distance, spacing_mm)
    if pred_mask_2d is None or valid_frame(chosen_frame, ann.n_frames) < 0 or target is None:
        return penalty
    pred, gt = _restrict(pred_mask_2d, fov), _restrict(gt_stack[target], fov)
    if not pred.any() or not gt.any():
        return penalty
    return _hausdorff_2d_mm(pred, gt, spacing_mm) * max(1, distance)


def _usable(value: float | None) -> bool:
    return value is not None and math.isfinite(value) and value > 0


def nae_ac(ac_pred_mm: float | None, ac_ref_mm: float | None) -> float:
    """|AC_ref - AC_pred| / max(AC_ref, AC_pred); 1.0 when either is missing (None, NaN or <= 0)."""
    if not (_usable(ac_pred_mm) and _usable(ac_ref_mm)):
        return 1.0
    return abs(ac_ref_mm - ac_pred_mm) / max(ac_ref_mm, ac_pred_mm)


def reference_ac(chosen_frame: int, ac_ref_per_sweep: Sequence[float | None], n_frames: int,
                 sweep_length: int | None = None) -> float | None:
    """Reference AC (mm) of the sweep that holds `chosen_frame`; None for -1 or a sweep without one."""
    frame = valid_frame(chosen_frame, n_frames)
    if frame < 0:
        return None
    sweep = frame // (sweep_length or sweep_length_of(n_frames))
    if sweep >= len(ac_ref_per_sweep):
        return None
    value = ac_ref_per_sweep[sweep]
    return float(value) if _usable(value) else None


@dataclass(frozen=True)
class CaseScore:
    """The metrics of one case; `hd` in mm; `ac_*_mm` None where there is no measurement."""

    frame: int
    wfss: float
    dsc_soft: float
    nae_ac: float
    hd: float
    ac_pred_mm: float | None
    ac_ref_mm: float | None

    @property
    def score(self) -> float:
        return 0.5 * (1.0 - self.nae_ac) + 0.25 * self.wfss + 0.25 * self.dsc_soft

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "score": self.score}


def case_score(chosen_frame: int, pred_mask_2d: np.ndarray | None, gt_stack: np.ndarray,
               ac_ref_per_sweep: Sequence[float | None], fov: np.ndarray | None = None,
               spacing_mm: float = PIXEL_SPACING_MM, sweeps: int = SWEEPS_PER_CASE,
               max_distance: int = MAX_FRAME_DISTANCE) -> CaseScore:
    """All metrics of one case.

    `pred_mask_2d` is the predicted mask of the chosen frame ((H, W), non-zero = abdomen; None = none);
    `gt_stack` the (Z, H, W) label stack (1 optimal, 2 suboptimal); `ac_ref_per_sweep` the reference AC of
    each sweep in mm (None where absent); `fov` the (H, W) field of view (None = whole frame).
    """
    ann = FrameAnnotations.from_stack(gt_stack)
    n_frames = ann.n_frames
    length = sweep_length_of(n_frames, sweeps)
    frame = valid_frame(chosen_frame, n_frames)
    pred = None if frame < 0 or pred_mask_2d is None else _restrict(pred_mask_2d, fov)
    ac_pred = circumference_mm(pred, fov, spacing_mm) if pred is not None else 0.0
    ac_ref = reference_ac(frame, ac_ref_per_sweep, n_frames, length)
    common = dict(sweep_length=length, max_distance=max_distance, fov=fov, annotations=ann)
    return CaseScore(
        frame=frame,
        wfss=wfss(frame, ann),
        dsc_soft=soft_dice(pred, frame, gt_stack, **common),
        nae_ac=nae_ac(ac_pred, ac_ref),
        hd=hausdorff_mm(pred, frame, gt_stack, spacing_mm=spacing_mm, **common),
        ac_pred_mm=ac_pred if ac_pred > 0 else None,
        ac_ref_mm=ac_ref,
    )


# --- frame-level quality metrics (the paper's frame classification view) ------------------------------

def positive_frames(masks: np.ndarray, min_fraction: float) -> np.ndarray:
    """bool (N,): frames whose binary mask covers >= `min_fraction` of the frame.

    Pass masks at the network's input resolution (224 x 224) to get the paper's rule, with
    `InferenceConfig.min_mask_fraction` (1 %, i.e. >= 501.76 px). A single (H, W) mask gives a 0-d array.
    """
    masks = np.asarray(masks) != 0
    area = masks.reshape(*masks.shape[:-2], -1).sum(axis=-1)
    return area >= min_fraction * masks.shape[-2] * masks.shape[-1]


def frame_level_metrics(pred_positive: np.ndarray, gt_positive: np.ndarray) -> dict[str, float]:
    """Confusion counts and accuracy / precision / recall / F1 / specificity of per-frame decisions.

    A ratio whose denominator is 0 is 0.0 (scikit-learn's `zero_division=0`).
    """
    pred = np.asarray(pred_positive, dtype=bool).ravel()
    gt = np.asarray(gt_positive, dtype=bool).ravel()
    if pred.shape != gt.shape:
        raise ValueError(f"{pred.shape} predictions for {gt.shape} ground-truth frames")
    tp, fp = int(np.sum(pred & gt)), int(np.sum(pred & ~gt))
    fn, tn = int(np.sum(~pred & gt)), int(np.sum(~pred & ~gt))

    def ratio(num: int | float, den: int | float) -> float:
        return float(num) / den if den else 0.0

    precision, recall = ratio(tp, tp + fp), ratio(tp, tp + fn)
    return {
        "accuracy": ratio(tp + tn, tp + tn + fp + fn),
        "precision": precision,
        "recall": recall,
        "f1": ratio(2 * precision * recall, precision + recall),
        "specificity": ratio(tn, tn + fp),
        "tp": tp, "fp": fp, "tn": tn, "fn": fn,
    }
