"""Challenge metrics on hand-made label stacks whose expected values are worked out by hand."""
import cv2
import numpy as np
import pytest

from algorithm.biometry import circumference_mm
from algorithm.config import InferenceConfig
from training.scoring.metrics import (
    FrameAnnotations,
    case_score,
    dice,
    frame_level_metrics,
    hausdorff_mm,
    hausdorff_penalty_mm,
    nae_ac,
    nearest_annotated_frame,
    positive_frames,
    reference_ac,
    soft_dice,
    wfss,
)

SWEEP = 20  # frames per sweep: 6 sweeps -> 120 frames
H, W = 64, 80


def ellipse_mask(a=22, b=15, center=(40, 32)) -> np.ndarray:
    mask = np.zeros((H, W), np.uint8)
    cv2.ellipse(mask, (center, (2 * a, 2 * b), 20), 1, -1)
    return mask


def stack(optimal=(), suboptimal=()) -> np.ndarray:
    """(120, H, W) labels: the same ellipse, label 1 on `optimal` frames and 2 on `suboptimal` ones."""
    labels = np.zeros((6 * SWEEP, H, W), np.uint8)
    for frames, label in ((optimal, 1), (suboptimal, 2)):
        for f in frames:
            labels[f] = ellipse_mask() * label
    return labels


# sweep 1 (frames 0-19): optimal 8-10, suboptimal 11-12; sweep 2 (20-39): optimal 21
GT = stack(optimal=(8, 9, 10, 21), suboptimal=(11, 12))
SUBOPT_ONLY = stack(suboptimal=(50, 51))
NOTHING = stack()


def test_wfss_official_rule():
    assert wfss(9, GT) == 1.0
    assert wfss(11, GT) == 0.6  # suboptimal while an optimal plane exists
    assert wfss(50, SUBOPT_ONLY) == 1.0  # suboptimal is the best the case offers
    assert wfss(15, GT) == 0.0
    assert wfss(-1, GT) == 0.0
    assert wfss(10 ** 6, GT) == 0.0  # out of range = no frame
    assert wfss(5, NOTHING) == 0.0 and wfss(-1, NOTHING) == 0.0
    assert wfss(11, FrameAnnotations.from_stack(GT)) == 0.6


def test_frame_annotations_scan_in_chunks():
    labels = np.zeros((70, 8, 8), np.uint8)
    labels[33, 2, 2], labels[65, 3, 3], labels[69, 0, 0] = 1, 2, 1
    ann = FrameAnnotations.from_stack(labels)
    assert list(np.flatnonzero(ann.optimal)) == [33, 69]
    assert list(np.flatnonzero(ann.suboptimal)) == [65]
    assert ann.n_frames == 70


def test_nearest_frame_is_truly_nearest_and_stays_in_sweep():
    ann = FrameAnnotations.from_stack(stack(optimal=(8, 9, 10, 16)))
    assert nearest_annotated_frame(9, ann, SWEEP) == 9
    assert nearest_annotated_frame(14, ann, SWEEP) == 16  # 2 ahead beats 4 behind (officially: 10)
    assert nearest_annotated_frame(13, ann, SWEEP) == 10  # tie (3 / 3) -> the earlier frame
    ann = FrameAnnotations.from_stack(GT)
    assert nearest_annotated_frame(19, ann, SWEEP) == 12  # frame 21 is 2 away but in the next sweep
    assert nearest_annotated_frame(35, ann, SWEEP) == 21  # 14 away, same sweep
    assert nearest_annotated_frame(37, ann, SWEEP) is None  # 16 away
    assert nearest_annotated_frame(-1, ann, SWEEP) is None


def test_dice_by_hand():
    a = np.zeros((20, 20), bool)
    b = np.zeros((20, 20), bool)
    a[0:10, 0:10] = True
    b[0:10, 5:15] = True  # 50 of 100 pixels shared
    assert dice(a, b) == pytest.approx(0.5)
    assert dice(a, a) == 1.0 and dice(a, np.zeros_like(a)) == 0.0
    assert dice(np.zeros_like(a), np.zeros_like(a)) == 1.0


def test_soft_dice():
    gt_mask = ellipse_mask()
    assert soft_dice(gt_mask, 9, GT) == 1.0
    assert soft_dice(gt_mask, 15, GT) == pytest.approx(1 - 3 / 15)  # nearest annotated: 12
    assert soft_dice(gt_mask, 15, GT) == pytest.approx(0.8)
    assert soft_dice(gt_mask, 35, GT) == pytest.approx(1 - 14 / 15)
    assert soft_dice(gt_mask, 36, GT) == 0.0  # 15 away: weight 0
    assert soft_dice(gt_mask, 37, GT) == 0.0  # beyond the tolerance
    assert soft_dice(gt_mask, -1, GT) == 0.0
    assert soft_dice(np.zeros((H, W)), 9, GT) == 0.0
    assert soft_dice(None, 9, GT) == 0.0
    # the sweep length is derived from the stack (20 here), not the challenge's 140
    assert soft_dice(gt_mask, 19, GT) == pytest.approx(1 - 7 / 15)
    assert soft_dice(gt_mask, 19, GT, sweep_length=60) == pytest.approx(1 - 2 / 15)
    # a correct rejection in a case without any annotation
    assert soft_dice(None, -1, NOTHING) == 1.0
    assert soft_dice(gt_mask, 5, NOTHING) == 0.0


def test_soft_dice_masks_outside_fov():
    fov = np.ones((H, W), bool)
    fov[:, 70:] = False
    pred = ellipse_mask().copy()
    pred[5:10, 72:78] = 1  # a blob outside the FOV
    assert soft_dice(pred, 9, GT) < 1.0
    assert soft_dice(pred, 9, GT, fov=fov) == 1.0


def test_hausdorff_mm():
    gt_mask = ellipse_mask()
    shifted = np.roll(gt_mask, 4, axis=1)  # every boundary 4 px to the right
    assert hausdorff_mm(gt_mask, 9, GT) == 0.0
    assert hausdorff_mm(shifted, 9, GT, spacing_mm=0.28) == pytest.approx(4 * 0.28)
    assert hausdorff_mm(shifted, 15, GT, spacing_mm=0.28) == pytest.approx(4 * 0.28 * 3)  # 3 frames away
    penalty = hausdorff_penalty_mm(W, 15, 0.28)
    assert penalty == pytest.approx(W * 15 * 0.28)
    assert hausdorff_mm(np.zeros((H, W)), 9, GT, spacing_mm=0.28) == penalty
    assert hausdorff_mm(None, -1, GT, spacing_mm=0.28) == penalty
    assert hausdorff_mm(gt_mask, 37, GT, spacing_mm=0.28) == penalty  # no target frame
    assert hausdorff_mm(None, -1, NOTHING, spacing_mm=0.28) == penalty


def test_nae_and_reference_ac():
    assert nae_ac(200.0, 250.0) == pytest.approx(0.2)
    assert nae_ac(250.0, 200.0) == pytest.approx(0.2)
    assert nae_ac(180.0, 180.0) == 0.0
    assert nae_ac(0.0, 250.0) == 1.0
    assert nae_ac(None, 250.0) == 1.0
    assert nae_ac(200.0, None) == 1.0
    assert nae_ac(200.0, float("nan")) == 1.0
    per_sweep = [None, 210.0, None, 190.0, None, None]
    assert reference_ac(25, per_sweep, 120) == 210.0  # frame 25 is in sweep 2 (20-39)
    assert reference_ac(65, per_sweep, 120) == 190.0
    assert reference_ac(5, per_sweep, 120) is None
    assert reference_ac(-1, per_sweep, 120) is None
    # 840 frames: sweeps of 140 frames
    assert reference_ac(150, per_sweep, 840) == 210.0
    assert reference_ac(450, per_sweep, 840) == 190.0
    assert reference_ac(300, per_sweep, 840) is None


def test_case_score_perfect_suboptimal_near_and_none():
    gt_mask = ellipse_mask()
    ac = circumference_mm(gt_mask)
    per_sweep = [ac, ac, None, None, None, None]

    perfect = case_score(9, gt_mask, GT, per_sweep)
    assert (perfect.wfss, perfect.dsc_soft) == (1.0, 1.0)
    assert perfect.nae_ac == pytest.approx(0.0, abs=1e-9)
    assert perfect.score == pytest.approx(1.0)
    assert perfect.ac_pred_mm == pytest.approx(ac) and perfect.ac_ref_mm == ac and perfect.hd == 0.0

    sub = case_score(11, gt_mask, GT, per_sweep)
    assert sub.wfss == 0.6 and sub.dsc_soft == 1.0
    assert sub.score == pytest.approx(0.5 + 0.25 * 0.6 + 0.25)

    near = case_score(15, gt_mask, GT, per_sweep)
    assert near.wfss == 0.0 and near.dsc_soft == pytest.approx(0.8)
    assert near.score == pytest.approx(0.5 + 0.25 * 0.8)

    bigger = case_score(9, ellipse_mask(a=27.5, b=18.75), GT, per_sweep)  # axes x 1.25
    assert bigger.nae_ac == pytest.approx(1 - 1 / 1.25, abs=0.02)

    no_reference = case_score(21, gt_mask, GT, per_sweep[:1] + [None] * 5)  # sweep 2 has no AC
    assert no_reference.nae_ac == 1.0 and no_reference.wfss == 1.0

    none = case_score(-1, gt_mask, GT, per_sweep)
    assert (none.frame, none.wfss, none.nae_ac, none.dsc_soft, none.score) == (-1, 0.0, 1.0, 0.0, 0.0)
    assert none.ac_pred_mm is None
    assert case_score(10 ** 6, gt_mask, GT, per_sweep).frame == -1

    record = perfect.to_dict()
    assert set(record) == {"frame", "wfss", "dsc_soft", "nae_ac", "hd", "ac_pred_mm", "ac_ref_mm", "score"}


def test_positive_frames_one_percent_of_network_input():
    fraction = InferenceConfig().min_mask_fraction
    masks = np.zeros((3, 224, 224), np.uint8)
    masks[0].flat[:501] = 1  # 501 < 501.76
    masks[1].flat[:502] = 1
    masks[2].flat[:5000] = 1
    assert list(positive_frames(masks, fraction)) == [False, True, True]
    assert bool(positive_frames(masks[1], fraction))


def test_frame_level_metrics_by_hand():
    pred = np.array([1, 1, 1, 0, 0, 0, 0], bool)
    gt = np.array([1, 0, 0, 1, 0, 0, 0], bool)
    m = frame_level_metrics(pred, gt)
    assert (m["tp"], m["fp"], m["fn"], m["tn"]) == (1, 2, 1, 3)
    assert m["accuracy"] == pytest.approx(4 / 7)
    assert m["precision"] == pytest.approx(1 / 3)
    assert m["recall"] == pytest.approx(1 / 2)
    assert m["f1"] == pytest.approx(0.4)
    assert m["specificity"] == pytest.approx(3 / 5)

    none = frame_level_metrics(np.zeros(4, bool), np.zeros(4, bool))
    assert none["precision"] == none["recall"] == none["f1"] == 0.0
    assert none["accuracy"] == 1.0 and none["specificity"] == 1.0
    with pytest.raises(ValueError):
        frame_level_metrics(np.zeros(3, bool), np.zeros(4, bool))
