"""The picture of the decision (algorithm.report): a title with frame, plane type and AC; a score strip with
the sweeps named and a frame axis."""
from __future__ import annotations

import numpy as np
import pytest

from algorithm.report import STRIP_BACKGROUND, case_picture, draw_score_strip, frame_ticks, title
from algorithm.select import sweep_bounds


@pytest.mark.parametrize("frame, plane, ac, expected", [
    (217, "optimal", 301.24, "frame 217  ·  optimal plane  ·  AC 301.2 mm"),
    (37, "suboptimal", None, "frame 37  ·  suboptimal plane  ·  AC n/a"),
    (-1, "none", None, "no frame chosen (-1): no abdomen plane found"),
])
def test_the_title_says_frame_plane_and_ac(frame, plane, ac, expected):
    assert title(frame, plane, ac) == expected


@pytest.mark.parametrize("frames, ticks", [(840, list(range(0, 801, 100))), (72, list(range(0, 71, 10))),
                                           (300, list(range(0, 251, 50))), (1, [0]), (5, [0, 1, 2, 3, 4])])
def test_frame_ticks_are_round_numbers_inside_the_stack(frames, ticks):
    assert frame_ticks(frames) == ticks


def strip_for(frames: int, chosen: int = 300, width: int = 744) -> tuple[np.ndarray, list[tuple[int, int]]]:
    rng = np.random.default_rng(0)
    probabilities = rng.dirichlet((3, 1, 1), frames)
    return draw_score_strip(probabilities, rng.random(frames), chosen, 6, width=width), sweep_bounds(frames, 6)


def test_each_sweep_is_named_above_its_own_span():
    strip, bounds = strip_for(840)
    width = strip.shape[1]
    names_row = strip[20:36]  # between the legend and the plot
    for start, stop in bounds:
        left, right = int(start * width / 840) + 8, int(stop * width / 840) - 8
        written = np.flatnonzero((names_row[:, left:right] != STRIP_BACKGROUND).any(axis=(0, 2)))
        assert written.size, (start, stop)
        centre = left + (written.min() + written.max()) / 2
        assert abs(centre - (left + right) / 2) < 10  # centred on its sweep
    assert not (names_row[:, :4] != STRIP_BACKGROUND).any()


def test_the_frame_axis_has_labelled_ticks_below_the_plot():
    strip, _ = strip_for(840)
    height, width = strip.shape[:2]
    axis_labels = strip[height - 18:]
    for tick in frame_ticks(840)[:-1]:  # the last one gives way to the axis name at the right end
        x = int(round((tick + 0.5) * (width - 1) / 840))
        near = axis_labels[:, max(0, x - 6):x + 6]
        assert (near != STRIP_BACKGROUND).any(), tick


def test_the_picture_is_the_frame_above_the_strip():
    stack = np.random.default_rng(1).integers(0, 200, (72, 120, 160), dtype=np.uint8)
    probabilities = np.full((72, 3), 1 / 3)
    picture = case_picture(stack, 10, None, None, probabilities, np.zeros(72), 6, title(10, "optimal", 250.0))
    assert picture.shape == (120 + 170, 160, 3) and picture.dtype == np.uint8
    assert np.array_equal(picture[60:120], np.repeat(stack[10][60:, :, None], 3, axis=-1))  # below the title
    assert (picture[:30] != np.repeat(stack[10][:30, :, None], 3, axis=-1)).any()  # the title is written
