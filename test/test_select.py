"""Frame selection on synthetic score sequences: sweep borders, ties, smoothing, -1."""
import numpy as np
import pytest

from algorithm.config import FRAME_NONE, FRAME_OPTIMAL, FRAME_SUBOPTIMAL, InferenceConfig
from algorithm.select import NO_FRAME, nan_moving_average, select_frame, sweep_bounds

CONFIG = InferenceConfig(sweeps=6, smoothing_window=3, min_mask_fraction=0.01, min_quality_probability=0.5)


def probabilities(n: int) -> np.ndarray:
    out = np.zeros((n, 3))
    out[:, FRAME_NONE] = 1.0
    return out


def set_frames(probs: np.ndarray, frames, p_opt: float, p_sub: float) -> None:
    for f in frames:
        probs[f] = (1.0 - p_opt - p_sub, p_sub, p_opt)


def test_sweep_bounds_even_and_uneven():
    assert sweep_bounds(840, 6)[1] == (140, 280)
    assert sweep_bounds(60, 6) == [(i * 10, (i + 1) * 10) for i in range(6)]
    uneven = sweep_bounds(845, 6)
    assert [b - a for a, b in uneven] == [141] * 5 + [140]
    assert uneven[-1][1] == 845
    assert sweep_bounds(3, 6) == [(0, 1), (1, 2), (2, 3)]
    assert sweep_bounds(0, 6) == []


def test_optimal_run_beats_stronger_suboptimal_run():
    probs, area = probabilities(60), np.zeros(60)
    set_frames(probs, range(12, 17), p_opt=0.7, p_sub=0.2)
    set_frames(probs, range(40, 48), p_opt=0.0, p_sub=0.99)
    area[12:17] = area[40:48] = 0.1
    selection = select_frame(probs, area, CONFIG)
    assert 12 <= selection.frame < 17
    assert selection.candidates[1].tier == FRAME_OPTIMAL
    assert selection.candidates[4].tier == FRAME_SUBOPTIMAL


def test_no_qualifying_frame_gives_minus_one():
    probs, area = probabilities(60), np.zeros(60)
    set_frames(probs, range(20, 25), p_opt=0.9, p_sub=0.05)
    area[20:25] = 0.005  # masks below the 1 % rule
    selection = select_frame(probs, area, CONFIG)
    assert selection.frame == NO_FRAME
    assert all(c.tier == FRAME_NONE for c in selection.candidates)


def test_big_mask_without_quality_does_not_qualify():
    probs, area = probabilities(60), np.full(60, 0.2)
    assert select_frame(probs, area, CONFIG).frame == NO_FRAME


def test_smoothing_never_crosses_a_sweep_border():
    # A strong optimal frame at the last frame of sweep 1 must not lift the first frame of sweep 2.
    probs, area = probabilities(60), np.full(60, 0.05)
    set_frames(probs, [9], p_opt=1.0, p_sub=0.0)
    set_frames(probs, [10], p_opt=0.4, p_sub=0.0)
    selection = select_frame(probs, area, CONFIG)
    smoothed = selection.smoothed_probabilities
    # frame 10 averages itself and frame 11 only (window 3, border cut): (0.4 + 0) / 2
    assert smoothed[10, FRAME_OPTIMAL] == pytest.approx(0.2)
    # frame 9 averages frames 8 and 9 only
    assert smoothed[9, FRAME_OPTIMAL] == pytest.approx(0.5)


def test_isolated_spike_loses_to_a_consistent_run():
    probs, area = probabilities(60), np.full(60, 0.05)
    set_frames(probs, [5], p_opt=1.0, p_sub=0.0)  # one-frame spike: smoothed to 1/3
    set_frames(probs, range(30, 35), p_opt=0.8, p_sub=0.1)
    assert 30 <= select_frame(probs, area, CONFIG).frame < 35


def test_ties_go_to_the_larger_mask_then_the_earlier_frame():
    probs, area = probabilities(60), np.full(60, 0.05)
    set_frames(probs, range(0, 60), p_opt=0.9, p_sub=0.05)
    assert select_frame(probs, area, CONFIG).frame == 0
    area[33] = 0.3
    assert select_frame(probs, area, CONFIG).frame == 33


def test_unscored_frames_are_ignored_not_zero():
    probs, area = probabilities(60), np.full(60, np.nan)
    probs[:] = np.nan
    probs[[20, 22]] = (0.1, 0.1, 0.8)  # frame 21 was skipped by a coarse search
    area[[20, 22]] = 0.1
    selection = select_frame(probs, area, CONFIG)
    assert selection.frame in (20, 22)
    assert selection.smoothed_probabilities[20, FRAME_OPTIMAL] == pytest.approx(0.8)
    assert np.isnan(selection.smoothed_probabilities[5]).all()


def test_nan_moving_average_matches_plain_average_without_nans():
    values = np.arange(10, dtype=float)
    smoothed = nan_moving_average(values, 3)
    assert smoothed[4] == pytest.approx(4.0)
    assert smoothed[0] == pytest.approx(0.5)
    assert smoothed[9] == pytest.approx(8.5)


def test_shape_mismatch_is_rejected():
    with pytest.raises(ValueError):
        select_frame(np.zeros((10, 2)), np.zeros(10), CONFIG)


def test_within_a_tier_a_larger_cross_section_outweighs_head_noise():
    # A nearly flat head (as the small demo weights have): the larger mask wins over +0.04 of P(abdomen).
    probs, area = probabilities(60), np.zeros(60)
    set_frames(probs, range(10, 15), p_opt=0.2, p_sub=0.42)
    set_frames(probs, range(40, 45), p_opt=0.2, p_sub=0.46)
    area[10:15], area[40:45] = 0.09, 0.05
    assert 10 <= select_frame(probs, area, CONFIG).frame < 15


def test_within_a_tier_a_confident_head_outweighs_a_somewhat_larger_mask():
    probs, area = probabilities(60), np.zeros(60)
    set_frames(probs, range(10, 15), p_opt=0.95, p_sub=0.0)
    set_frames(probs, range(40, 45), p_opt=0.51, p_sub=0.0)
    area[10:15], area[40:45] = 0.05, 0.08
    selection = select_frame(probs, area, CONFIG)
    assert 10 <= selection.frame < 15 and selection.candidates[1].tier == FRAME_OPTIMAL
