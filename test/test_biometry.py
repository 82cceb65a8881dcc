"""Ellipse fit and AC: whole ellipses, ellipses cut by a FOV edge or the image edge, degenerate masks."""
import math

import cv2
import numpy as np
import pytest
from scipy.special import ellipe

from algorithm.biometry import Ellipse, circumference_mm, fit_ellipse, ramanujan_perimeter
from conftest import REFERENCE, REFERENCE_FOV, needs_reference_fov, reference_fov

REAL_MASK = REFERENCE / "real_frames" / "mask_abdomen_other_frame.png"
H, W = 562, 744
A, B, ANGLE = 150.0, 110.0, 30.0  # semi-axes (px) and orientation of the test abdomen


def exact_perimeter(a: float, b: float) -> float:
    """4 a E(e^2), the complete elliptic integral of the second kind (scipy's parameter m = e^2)."""
    return 4.0 * a * ellipe(1.0 - (b / a) ** 2)


def drawn_ellipse(center, shape=(H, W), a=A, b=B, angle=ANGLE) -> np.ndarray:
    mask = np.zeros(shape, np.uint8)
    cv2.ellipse(mask, (center, (2 * a, 2 * b), angle), 1, -1)
    return mask


def outside_fraction(center, fov: np.ndarray) -> float:
    """Share of the whole ellipse's area (drawn on a canvas larger than the image) outside `fov`."""
    pad = 400
    canvas = drawn_ellipse((center[0] + pad, center[1] + pad), shape=(H + 2 * pad, W + 2 * pad)).astype(bool)
    inside = canvas[pad:pad + H, pad:pad + W] & fov
    return 1.0 - inside.sum() / canvas.sum()


def rel_error(ellipse: Ellipse | None) -> float:
    assert ellipse is not None
    return abs(ellipse.perimeter_px / ramanujan_perimeter(A, B) - 1.0)


def test_ramanujan_matches_circle_and_elliptic_integral():
    assert ramanujan_perimeter(10.0, 10.0) == pytest.approx(2 * math.pi * 10.0, rel=1e-12)
    assert ramanujan_perimeter(A, B) == pytest.approx(exact_perimeter(A, B), rel=1e-6)
    assert ramanujan_perimeter(B, A) == pytest.approx(ramanujan_perimeter(A, B), rel=1e-12)
    assert ramanujan_perimeter(5.0, 0.0) == pytest.approx(exact_perimeter(5.0, 0.0), rel=5e-3)  # flat: 4a


def test_whole_ellipse_fit():
    ellipse = fit_ellipse(drawn_ellipse((372, 280)))
    assert rel_error(ellipse) < 0.01
    assert ellipse.center_xy == pytest.approx((372, 280), abs=0.5)
    assert ellipse.axes[0] >= ellipse.axes[1]
    assert ellipse.angle_deg == pytest.approx(ANGLE, abs=1.0)
    assert ellipse.circumference_mm(0.28) == pytest.approx(ellipse.perimeter_px * 0.28)


def test_ellipse_cut_by_rectangular_fov():
    fov = np.zeros((H, W), bool)
    fov[60:500, 80:660] = True
    center = (625, 280)
    assert 0.3 <= outside_fraction(center, fov) <= 0.4
    mask = drawn_ellipse(center)
    assert rel_error(fit_ellipse(mask, fov)) < 0.01
    # the straight FOV edge is not abdominal wall: fitting it as such (no FOV given) is badly wrong
    assert rel_error(fit_ellipse(mask & fov)) > 0.03


def test_ellipse_cut_by_sector_fov():
    fov = np.zeros((H, W), np.uint8)
    cv2.ellipse(fov, (372, -60), (520, 520), 0, 50, 130, 1, -1)
    fov = fov.astype(bool)
    center = (372, 432)
    assert 0.3 <= outside_fraction(center, fov) <= 0.4
    assert rel_error(fit_ellipse(drawn_ellipse(center), fov)) < 0.01
    assert circumference_mm(drawn_ellipse(center), fov, 0.28) == pytest.approx(
        ramanujan_perimeter(A, B) * 0.28, rel=0.01)


def test_a_mask_stopping_short_of_the_fov_edge_is_extrapolated():
    """A predicted mask can end a few pixels inside the FOV: its cut side, parallel to the edge, is not
    abdominal wall. Up to 3 px short it lies in the 4 px edge band and is dropped."""
    fov = np.zeros((H, W), np.uint8)
    cv2.ellipse(fov, (372, -60), (520, 520), 0, 50, 130, 1, -1)
    center = (372, 432)
    for short in (0, 1, 2, 3):
        inner = cv2.erode(fov, np.ones((2 * short + 1, 2 * short + 1), np.uint8)) if short else fov
        assert rel_error(fit_ellipse(drawn_ellipse(center) & inner, fov.astype(bool))) < 0.01, short
    far = cv2.erode(fov, np.ones((11, 11), np.uint8))  # 5 px short: its cut side is fitted as wall
    assert rel_error(fit_ellipse(drawn_ellipse(center) & far, fov.astype(bool))) > 0.05


def test_ellipse_cut_by_image_edge():
    center = (372, 535)  # bottom ~35 % below the image
    assert 0.3 <= outside_fraction(center, np.ones((H, W), bool)) <= 0.4
    assert rel_error(fit_ellipse(drawn_ellipse(center))) < 0.01


@needs_reference_fov
def test_ellipse_cut_by_challenge_fov():
    fov = reference_fov()
    for center in [(372, 530), (640, 330)]:
        assert 0.25 <= outside_fraction(center, fov) <= 0.45, center
        assert rel_error(fit_ellipse(drawn_ellipse(center), fov)) < 0.01, center


@pytest.mark.skipif(not REAL_MASK.is_file(), reason=f"{REAL_MASK} not available")
def test_a_real_annotation_measures_an_ac_of_the_real_range():
    """The real training set's reference ACs span 141-351 mm. Taking cv2.fitEllipse's full axes for
    semi-axes (as an early version of the official scorer did) doubles the AC: about 470 mm here."""
    mask = cv2.imread(str(REAL_MASK), cv2.IMREAD_GRAYSCALE) > 0
    fov = reference_fov() if REFERENCE_FOV.is_file() else None
    ac = circumference_mm(mask, fov, 0.28)
    assert 141.0 <= ac <= 351.0
    ellipse = fit_ellipse(mask, fov)
    assert ac == pytest.approx(exact_perimeter(*(d / 2 for d in ellipse.axes)) * 0.28, rel=1e-3)


def test_largest_blob_is_measured():
    mask = drawn_ellipse((300, 280))
    cv2.circle(mask, (680, 60), 20, 1, -1)  # a separate small blob
    assert rel_error(fit_ellipse(mask)) < 0.01


def test_no_ellipse_cases():
    empty = np.zeros((H, W), np.uint8)
    assert fit_ellipse(empty) is None
    assert circumference_mm(empty) == 0.0
    fov = np.zeros((H, W), bool)
    fov[:, :300] = True
    outside_only = drawn_ellipse((550, 280), a=60, b=40)
    assert fit_ellipse(outside_only, fov) is None  # nothing inside the FOV
    tiny = np.zeros((H, W), np.uint8)
    tiny[100, 100:102] = 1
    assert fit_ellipse(tiny) is None  # fewer than 5 contour points
    with pytest.raises(ValueError):
        fit_ellipse(np.zeros((2, H, W)))
    with pytest.raises(ValueError):
        fit_ellipse(empty, np.ones((H, W + 1), bool))


def test_ellipse_normalisation_and_draw():
    ellipse = Ellipse.from_cv(((50.0, 40.0), (20.0, 60.0), 10.0))
    assert ellipse.axes == (60.0, 20.0) and ellipse.angle_deg == pytest.approx(100.0)
    raster = ellipse.draw((100, 120))
    assert raster[40, 50] == 1 and raster[40, 80] == 0 and raster[40 + 25, 50 - 4] == 1  # long axis ~vertical
    record = ellipse.to_dict()
    assert record["axes"] == [60.0, 20.0] and record["perimeter_px"] == pytest.approx(ramanujan_perimeter(30, 10))
    refit = fit_ellipse(raster)
    assert refit.axes == pytest.approx(ellipse.axes, abs=1.5)
    assert refit.angle_deg == pytest.approx(ellipse.angle_deg, abs=2.0)
