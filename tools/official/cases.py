"""Full-size cases (840 frames of 562 x 744) on which our `--official` mode is checked against the official
scorer: hand-built ones for each of its rules and quirks, and random ones.

`write_cases(cases, ground_truth, predictions)` writes them in the public release layout and the
per-case output layout `training.scoring.evaluate` reads. A case's uuid is its name.
"""
from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
import SimpleITK as sitk

from algorithm.biometry import circumference_mm
from algorithm.config import PIXEL_SPACING_MM, STACK_SPACING_MM
from training.data import layout

FRAMES, H, W = 840, 562, 744
SWEEP = FRAMES // 6
OPTIMAL, SUBOPTIMAL = 1, 2


def ellipse(center: tuple[float, float], ac_mm: float, aspect: float = 0.85, angle: float = 20.0) -> np.ndarray:
    """A filled ellipse of the given Ramanujan AC on a (H, W) frame, uint8 {0, 1}."""
    unit = math.pi * (3 * (1 + aspect) - math.sqrt((3 + aspect) * (1 + 3 * aspect)))
    a = ac_mm / PIXEL_SPACING_MM / unit
    mask = np.zeros((H, W), np.uint8)
    cv2.ellipse(mask, (center, (2 * a, 2 * a * aspect), angle), 1, -1)
    return mask


@dataclass
class Case:
    """Ground truth (frame -> (mask, label)), per-sweep reference ACs and what the algorithm wrote.

    `frame` None writes no prediction folder (a missing case); `mask_file` "stack" writes the (Z, H, W)
    output with `prediction` on `frame`, "2d" a single (H, W) file, "none" no mask file at all.
    """

    name: str
    labels: dict[int, tuple[np.ndarray, int]]
    frame: int | None
    prediction: np.ndarray | None = None
    references: list[float | None] = field(default_factory=lambda: [None] * 6)
    mask_file: str = "stack"


def _run(mask: np.ndarray, frames: range, label: int) -> dict[int, tuple[np.ndarray, int]]:
    return {f: (mask, label) for f in frames}


def hand_built(fov: np.ndarray) -> list[Case]:
    """One case per rule of the official scorer (and per way it differs from ours)."""
    whole = ellipse((372, 300), 200.0)
    cut = ellipse((372, 480), 300.0) & fov  # cut by the bottom of the FOV
    cut_lost = ellipse((640, 330), 300.0) & fov  # the official fit keeps a 1-px fragment: no AC
    inside_ac = circumference_mm(whole, fov)
    cut_ac, lost_ac = 300.0, 300.0
    sweep3 = lambda ac: [None, None, ac, None, None, None]  # noqa: E731 -- frames 280-419
    short = cv2.erode(fov.astype(np.uint8), np.ones((7, 7), np.uint8)) & cut  # stops 3 px short of the edge
    holed = cut.copy()
    cv2.circle(holed, (372, 440), 25, 0, -1)
    two_blobs = cut.copy()
    cv2.circle(two_blobs, (250, 120), 15, 1, -1)
    outside = np.zeros((H, W), np.uint8)
    cv2.circle(outside, (20, 20), 15, 1, -1)  # the top-left corner lies outside the FOV

    optimal = _run(whole, range(300, 307), OPTIMAL)
    return [
        Case("whole-optimal", optimal, 303, whole, sweep3(inside_ac)),
        Case("cut-ellipse", _run(cut, range(300, 307), OPTIMAL), 303, cut, sweep3(cut_ac)),
        Case("cut-official-no-fit", _run(cut_lost, range(300, 307), OPTIMAL), 303, cut_lost, sweep3(lost_ac)),
        Case("stops-short-of-edge", _run(cut, range(300, 307), OPTIMAL), 303, short, sweep3(cut_ac)),
        Case("hole-in-mask", _run(cut, range(300, 307), OPTIMAL), 303, holed, sweep3(cut_ac)),
        Case("two-blobs", _run(cut, range(300, 307), OPTIMAL), 303, two_blobs, sweep3(cut_ac)),
        Case("later-frame-nearer",
             {**_run(whole, range(290, 293), SUBOPTIMAL), **_run(whole, range(300, 306), OPTIMAL)},
             297, whole, sweep3(inside_ac)),
        Case("after-the-run", optimal, 311, whole, sweep3(inside_ac)),
        Case("suboptimal-with-optimal",
             {**_run(whole, range(300, 303), OPTIMAL), **_run(whole, range(303, 307), SUBOPTIMAL)},
             305, whole, sweep3(inside_ac)),
        Case("suboptimal-only", _run(whole, range(300, 307), SUBOPTIMAL), 304, whole, sweep3(inside_ac)),
        Case("no-annotation-near", optimal, 360, whole, sweep3(inside_ac)),
        Case("other-sweep-only", _run(whole, range(270, 280), OPTIMAL), 282, whole,
             [None, inside_ac, None, None, None, None]),
        Case("no-reference-for-sweep", optimal, 303, whole),
        Case("minus-one", optimal, -1, None, sweep3(inside_ac)),
        Case("minus-one-last-frame-annotated", {**optimal, **_run(whole, range(835, 840), OPTIMAL)}, -1, None,
             [None, None, inside_ac, None, None, inside_ac]),
        Case("minus-one-no-annotation", {}, -1),
        Case("empty-mask-on-annotated-frame", optimal, 303, np.zeros((H, W), np.uint8), sweep3(inside_ac)),
        Case("empty-mask-on-other-frame", optimal, 100, np.zeros((H, W), np.uint8), sweep3(inside_ac)),
        Case("mask-outside-fov-only", optimal, 303, outside, sweep3(inside_ac)),
        Case("no-annotation-but-a-mask", {}, 303, whole),
        Case("negative-frame-no-annotation", {}, -3),
        Case("negative-frame", optimal, -3, None, sweep3(inside_ac)),
        Case("frame-past-the-end", optimal, 900, None, sweep3(inside_ac)),
        Case("no-mask-file", optimal, 303, whole, sweep3(inside_ac), mask_file="none"),
        Case("mask-file-2d", optimal, 303, whole, sweep3(inside_ac), mask_file="2d"),
    ]


def random_cases(fov: np.ndarray, n: int, seed: int) -> list[Case]:
    """Random abdomens (some cut by the FOV), runs of optimal / suboptimal frames, and predictions near
    them: the drawn mask, eroded, dilated, shifted, stopping short of the FOV edge, empty, or -1."""
    rng = np.random.default_rng(seed)
    cases = []
    fov_u8 = fov.astype(np.uint8)
    for i in range(n):
        ac = rng.uniform(141, 351)
        center = (rng.uniform(150, 600), rng.uniform(150, 560))
        truth = ellipse(center, ac, rng.uniform(0.6, 0.95), rng.uniform(0, 180)) & fov
        sweep = int(rng.integers(6))
        start = sweep * SWEEP + int(rng.integers(20, 100))
        length = int(rng.integers(2, 12))
        labels = _run(truth, range(start, start + length), int(rng.choice([OPTIMAL, SUBOPTIMAL])))
        if rng.random() < 0.4:  # a second run a few frames later, the other label
            gap = int(rng.integers(1, 10))
            labels.update(_run(truth, range(start + length + gap, start + length + gap + 4),
                               OPTIMAL if labels[start][1] == SUBOPTIMAL else SUBOPTIMAL))
        references = [None] * 6
        references[sweep] = None if rng.random() < 0.1 else float(ac)
        kind = rng.choice(["drawn", "eroded", "dilated", "shifted", "short", "empty", "minus-one"])
        frame = start + int(rng.integers(-18, length + 18))
        prediction = {"drawn": truth, "empty": np.zeros_like(truth), "minus-one": None,
                      "eroded": cv2.erode(truth, np.ones((5, 5), np.uint8)),
                      "dilated": cv2.dilate(truth, np.ones((5, 5), np.uint8)),
                      "shifted": np.roll(truth, tuple(rng.integers(-6, 7, size=2)), axis=(0, 1)),
                      "short": truth & cv2.erode(fov_u8, np.ones((7, 7), np.uint8))}[kind]
        if kind == "minus-one":
            frame = -1
        frame = min(max(frame, -1), FRAMES - 1)
        cases.append(Case(f"random-{seed}-{i:03d}-{kind}", labels, frame, prediction, references))
    return cases


def _write(array: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(STACK_SPACING_MM[:array.ndim])
    sitk.WriteImage(image, str(path), True)


def write_cases(cases: list[Case], ground_truth: Path, predictions: Path) -> None:
    """Release-layout ground truth (masks and the per-sweep AC CSV; no images) and prediction folders."""
    rows = []
    for case in cases:
        labels = np.zeros((FRAMES, H, W), np.uint8)
        for f, (mask, label) in case.labels.items():
            labels[f][mask > 0] = label
        _write(labels, layout.mask_path(ground_truth, case.name))
        rows.append([case.name, case.name] + ["" if r is None else repr(float(r)) for r in case.references])
        if case.frame is None:
            continue
        folder = predictions / case.name
        (folder / layout.OUTPUT_FRAME_JSON).parent.mkdir(parents=True, exist_ok=True)
        (folder / layout.OUTPUT_FRAME_JSON).write_text(json.dumps(case.frame))
        if case.mask_file == "none":
            continue
        if case.mask_file == "2d":
            _write(case.prediction.astype(np.uint8), folder / layout.OUTPUT_MASK_DIR / "output.mha")
            continue
        output = np.zeros((FRAMES, H, W), np.uint8)
        if case.prediction is not None and 0 <= case.frame < FRAMES:
            output[case.frame] = case.prediction
        _write(output, folder / layout.OUTPUT_MASK_DIR / "output.mha")
    path = ground_truth / layout.CIRCUMFERENCES_CSV
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(layout.CIRCUMFERENCES_HEADER)
        writer.writerows(rows)
