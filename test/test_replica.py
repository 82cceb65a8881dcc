"""The replica generator: release layout, conventions, statistics of the real set, realism, determinism.

Rendered cases are small (a few frames per sweep) and shared by the tests through one module fixture;
statistics are measured on plans (what a case contains, no pixels), which cost milliseconds at the real
140 frames per sweep. Tests against the challenge's real FOV mask skip when the reference folder is absent.
"""
from __future__ import annotations

import csv
import json
import time
import uuid
from pathlib import Path

import cv2
import numpy as np
import pytest
import SimpleITK as sitk

from algorithm.biometry import circumference_mm
from algorithm.config import PIXEL_SPACING_MM, SWEEPS_PER_CASE, InferenceConfig
from conftest import REFERENCE, needs_reference_fov, reference_fov
from training.data import replica
from training.data.layout import CIRCUMFERENCES_CSV, CIRCUMFERENCES_HEADER, image_path, list_case_ids, mask_path
from training.data.replica import (LABEL_OPTIMAL, LABEL_SUBOPTIMAL, ReplicaConfig, case_rng, generate_case,
                              landmarks, plan_case, reference_measurements, sector_fov, subject_ids,
                              write_dataset)

REAL_FRAME = REFERENCE / "real_frames" / "frame_abdomen.png"
REAL_STATS = REFERENCE / "train_annotation_stats.csv"

K = 8  # frames per sweep of the rendered test cases
SEED = 11
CASES = 3


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> tuple[Path, list[str]]:
    root = tmp_path_factory.mktemp("replica")
    return root, write_dataset(root, CASES, frames_per_sweep=K, seed=SEED, progress=False)


@pytest.fixture(scope="module")
def plans() -> list[replica.CasePlan]:
    """300 plans at the real 140 frames per sweep, the size of the public training set."""
    cfg = ReplicaConfig()
    return [plan_case(case_rng(0, i), cfg) for i in range(300)]


def read(path: Path) -> tuple[np.ndarray, sitk.Image]:
    image = sitk.ReadImage(str(path))
    return sitk.GetArrayFromImage(image), image


def read_csv(root: Path) -> list[dict[str, str]]:
    with open(root / CIRCUMFERENCES_CSV, newline="") as handle:
        return list(csv.DictReader(handle))


def frame_labels(mask: np.ndarray) -> np.ndarray:
    """Per-frame label of a mask stack (each annotated frame carries exactly one label)."""
    return mask.reshape(len(mask), -1).max(axis=1)


def runs_of(labels: np.ndarray) -> list[tuple[int, int, int]]:
    """(start, stop, label) of the maximal runs of equal non-zero labels."""
    runs, start = [], None
    for f in range(len(labels) + 1):
        value = labels[f] if f < len(labels) else 0
        if start is not None and value != labels[start]:
            runs.append((start, f, int(labels[start])))
            start = None
        if start is None and value:
            start = f
    return runs


# ------------------------------------------------------------------------------------------ geometry

@needs_reference_fov
def test_sector_matches_the_challenge_fov_mask():
    reference = reference_fov()
    ours = sector_fov(*reference.shape)
    assert ours.dtype == bool and ours.shape == reference.shape
    assert (ours & reference).sum() / (ours | reference).sum() >= 0.99


@needs_reference_fov
def test_union_of_nonzero_pixels_is_the_challenge_fov(dataset):
    root, uuids = dataset
    reference = reference_fov()
    for case in uuids:
        image, _ = read(image_path(root, case))
        seen = (image > 0).any(axis=0)
        assert (seen & reference).sum() / (seen | reference).sum() >= 0.97


# ------------------------------------------------------------------------------------------ layout

def test_release_layout_and_csv(dataset):
    root, uuids = dataset
    assert sorted(uuids) == list_case_ids(root) and len(uuids) == CASES
    for case in uuids:
        assert uuid.UUID(case).version == 4
        assert mask_path(root, case).is_file()
    with open(root / CIRCUMFERENCES_CSV, newline="") as handle:
        assert next(csv.reader(handle)) == CIRCUMFERENCES_HEADER
    rows = read_csv(root)
    assert [r["uuid"] for r in rows] == uuids
    marker = json.loads((root / replica.REPLICA_MARKER).read_text())
    assert marker["seed"] == SEED and marker["config"]["frames_per_sweep"] == K
    assert all(len(r["subject_id"]) == 3 and r["subject_id"].isdigit() for r in rows)


def test_stacks_have_the_release_geometry(dataset):
    root, uuids = dataset
    for case in uuids:
        for path in (image_path(root, case), mask_path(root, case)):
            array, image = read(path)
            assert array.dtype == np.uint8
            assert array.shape == (SWEEPS_PER_CASE * K, 562, 744)
            assert image.GetSpacing() == pytest.approx((PIXEL_SPACING_MM, PIXEL_SPACING_MM, 0.28))
            header = path.read_bytes()[:1024].decode("latin-1")
            assert "CompressedData = True" in header
        mask, _ = read(mask_path(root, case))
        assert set(np.unique(mask)) <= {0, LABEL_OPTIMAL, LABEL_SUBOPTIMAL}


def test_masks_stay_inside_the_sector_with_one_label_per_frame(dataset):
    root, uuids = dataset
    outside = ~sector_fov()
    annotated = 0
    for case in uuids:
        mask, _ = read(mask_path(root, case))
        assert not mask[:, outside].any()
        for frame in mask:
            assert len(np.unique(frame[frame > 0])) <= 1
        annotated += int((frame_labels(mask) > 0).sum())
    assert annotated > 0  # the fixture's seed must exercise annotations


def test_reference_ac_is_measured_on_an_annotated_frame_of_its_sweep(dataset):
    root, uuids = dataset
    fov = sector_fov()
    for row, case in zip(read_csv(root), uuids):
        mask, _ = read(mask_path(root, case))
        labels = frame_labels(mask)
        for s in range(SWEEPS_PER_CASE):
            cell = row[f"sweep_{s + 1}_ac_mm"]
            sweep = labels[s * K:(s + 1) * K]
            assert (cell != "") == bool(sweep.any())
            if cell:
                # The best frame: optimal if the sweep has one.
                wanted = LABEL_OPTIMAL if (sweep == LABEL_OPTIMAL).any() else LABEL_SUBOPTIMAL
                acs = [circumference_mm(mask[s * K + f], fov) for f in np.flatnonzero(sweep == wanted)]
                assert min(abs(float(cell) - ac) for ac in acs) < 1e-6


# ------------------------------------------------------------------------------------------ statistics

def test_annotation_statistics_match_the_real_training_set(plans):
    labels = np.stack([p.labels() for p in plans])
    assert 0.020 <= (labels > 0).mean() <= 0.033  # real: 2.6 %
    has_optimal = (labels == LABEL_OPTIMAL).any(axis=1)
    assert 0.52 <= has_optimal.mean() <= 0.72  # real: 62 %
    assert 0.85 <= (labels == LABEL_SUBOPTIMAL).any(axis=1).mean() <= 0.96  # real: 91 %
    sweeps = np.array([len(p.annotated_sweeps) for p in plans])
    assert sweeps.max() <= 4 and (sweeps == 0).mean() <= 0.03
    assert 0.33 <= (sweeps == 1).mean() <= 0.51 and (sweeps >= 3).mean() >= 0.12  # real: 42 %, 22 %
    optimal_frames = (labels == LABEL_OPTIMAL).sum(axis=1)
    suboptimal_frames = (labels == LABEL_SUBOPTIMAL).sum(axis=1)
    assert 6 <= np.median(optimal_frames[optimal_frames > 0]) <= 13  # real: 9
    assert 9 <= np.median(suboptimal_frames[suboptimal_frames > 0]) <= 19  # real: 14
    lengths = {lab: [len(r) for p in plans for r in p.runs if r.label == lab] for lab in (1, 2)}
    assert 5 <= np.median(lengths[LABEL_OPTIMAL]) <= 11 and max(lengths[LABEL_OPTIMAL]) <= 26
    assert 4 <= np.median(lengths[LABEL_SUBOPTIMAL]) <= 10 and max(lengths[LABEL_SUBOPTIMAL]) <= 32


def test_runs_form_one_contiguous_block_inside_one_sweep(plans):
    k = ReplicaConfig().frames_per_sweep
    for plan in plans:
        for run in plan.runs:
            assert len(run) >= 1 and run.start // k == (run.stop - 1) // k
        for sweep in plan.annotated_sweeps:
            block = [r for r in plan.runs if r.start // k == sweep]
            assert all(a.stop == b.start and a.label != b.label for a, b in zip(block, block[1:]))
        assert [(r.start, r.stop, r.label) for r in plan.runs] == runs_of(plan.labels())


def test_small_sweeps_keep_a_sane_annotated_fraction():
    cfg = ReplicaConfig(frames_per_sweep=20)
    labels = np.stack([plan_case(case_rng(1, i), cfg).labels() for i in range(300)])
    assert 0.015 <= (labels > 0).mean() <= 0.045


def test_abdomen_is_drawn_only_on_annotated_frames_and_their_neighbours(plans):
    for plan in plans:
        labels = plan.labels()
        for frame, view in plan.abdomen.items():
            if labels[frame]:
                assert view.label == labels[frame] and view.visibility == 1.0
            else:  # a faint frame right before or after an annotated block
                assert view.visibility < 0.5
                neighbours = [f for f in (frame - 1, frame + 1) if 0 <= f < len(labels)]
                assert any(labels[f] for f in neighbours)
        assert all(f in plan.abdomen for f in np.flatnonzero(labels))
        assert not set(plan.gain) & set(plan.abdomen)  # never lifted off while the abdomen shows


def test_reference_ac_range_and_median(plans):
    cfg = ReplicaConfig()
    acs = []
    for plan in plans[:80]:
        ac, frames = reference_measurements(plan, cfg)
        for s in range(SWEEPS_PER_CASE):
            assert (ac[s] is None) == (s not in plan.annotated_sweeps)
            if frames[s] is not None:
                assert plan.labels()[frames[s]] in (LABEL_OPTIMAL, LABEL_SUBOPTIMAL)
        acs += [a for a in ac if a is not None]
    assert 135.0 <= min(acs) and max(acs) <= 365.0  # real: 141-351 mm
    assert 210.0 <= np.median(acs) <= 255.0  # real: 229 mm


def test_subject_ids_pair_some_consecutive_cases(plans):
    ids = subject_ids([p.pair_with_previous for p in plans])
    counts = np.unique(ids, return_counts=True)[1]
    assert counts.max() <= 2 and 5 <= (counts == 2).sum() <= 40  # real: 19 of 281 subjects
    numbers = [int(s) for s in ids]
    assert numbers[0] == 0 and all(b - a in (0, 1) for a, b in zip(numbers, numbers[1:]))


# ------------------------------------------------------------------------------------------ realism

def test_frames_are_dark_like_the_real_ones(dataset):
    root, uuids = dataset
    fov = sector_fov()
    liftoff = InferenceConfig().liftoff_max_mean
    for case in uuids:
        image, _ = read(image_path(root, case))
        mask, _ = read(mask_path(root, case))
        means = image[:, fov].mean(axis=1)
        live = means > liftoff
        assert 10.0 <= means[live].mean() <= 45.0
        assert (image[live][:, fov] > 200).mean() < 0.02
        annotated = frame_labels(mask) > 0
        assert (means[annotated] > liftoff).all()  # an annotated frame is never a lift-off frame


@pytest.mark.skipif(not REAL_FRAME.is_file(), reason=f"{REAL_FRAME} not available")
def test_annotated_frames_have_the_grey_levels_of_a_real_abdomen_frame(dataset):
    """Mean, spread and bright tail inside the sector, against the real frame of the reference folder."""
    fov = sector_fov()
    real = cv2.imread(str(REAL_FRAME), cv2.IMREAD_GRAYSCALE)[fov].astype(float)
    root, uuids = dataset
    compared = 0
    for case in uuids:
        image, _ = read(image_path(root, case))
        mask, _ = read(mask_path(root, case))
        for frame in np.flatnonzero(frame_labels(mask)):
            ours = image[frame][fov].astype(float)
            compared += 1
            assert 0.6 <= ours.mean() / real.mean() <= 1.4, frame
            assert 0.6 <= ours.std() / real.std() <= 1.4, frame
            assert 0.75 <= np.percentile(ours, 99) / np.percentile(real, 99) <= 1.3, frame
    assert compared > 0


@pytest.mark.skipif(not REAL_STATS.is_file(), reason=f"{REAL_STATS} not available")
def test_abdomen_sizes_match_the_real_masks(plans):
    """Median share of the frame covered by an annotated abdomen, per case and label, against the real
    training set's `opt_voxel_ratio` / `subopt_voxel_ratio` (about 0.12 of the frame for both)."""
    with open(REAL_STATS, newline="") as handle:
        rows = list(csv.DictReader(handle))
    fov, shape = sector_fov(), (562, 744)
    for label, column in ((LABEL_OPTIMAL, "opt_voxel_ratio"), (LABEL_SUBOPTIMAL, "subopt_voxel_ratio")):
        real = np.median([float(r[column]) for r in rows if r[column] and float(r[column]) > 0])
        ours = []
        for plan in plans[:60]:
            frames = np.flatnonzero(plan.labels() == label)
            if len(frames):
                ours.append(np.mean([(plan.abdomen[f].ellipse.draw_mask(shape) & fov).mean() for f in frames]))
        assert 0.8 <= np.median(ours) / real <= 1.25, (label, np.median(ours), real)


def test_liftoff_frames_are_near_black():
    case = generate_case(4, frames_per_sweep=10)
    black = [f for f, g in case.plan.gain.items() if g == 0.0]
    assert black, "seed 4 must produce lift-off frames"
    means = case.image[black][:, sector_fov()].mean(axis=1)
    assert (means < InferenceConfig().liftoff_max_mean).all()


def test_optimal_frames_show_their_landmarks_and_suboptimal_frames_do_not():
    cfg = ReplicaConfig(frames_per_sweep=12)
    seed = next(s for s in range(100) if any(r.label == LABEL_OPTIMAL for r in plan_case(s, cfg).runs)
                and any(r.label == LABEL_SUBOPTIMAL for r in plan_case(s, cfg).runs))
    case = generate_case(seed, config=cfg)
    labels, shape, fov = case.plan.labels(), (cfg.height, cfg.width), sector_fov()
    checked = 0
    for frame in np.flatnonzero(labels):
        view = case.plan.abdomen[frame]
        marks = landmarks(view)
        stomach = marks.stomach.draw_mask(shape, scale=0.7) & fov
        interior = view.ellipse.draw_mask(shape, scale=0.6) & ~marks.stomach.draw_mask(shape, scale=1.4) & fov
        if stomach.sum() < 100 or interior.sum() < 1000:
            continue  # landmark cut off by the edge of the sector
        checked += 1
        ratio = case.image[frame][stomach].mean() / case.image[frame][interior].mean()
        if labels[frame] == LABEL_OPTIMAL:
            assert ratio < 0.5  # the stomach bubble is dark
        else:
            assert ratio > 0.6  # no bubble where an optimal frame would have it
    assert checked > 0


def test_optimal_abdomen_is_rounder_than_suboptimal(plans):
    def aspect(label: int) -> list[float]:
        return [v.ellipse.semi_axes[1] / v.ellipse.semi_axes[0]
                for p in plans for v in p.abdomen.values() if v.label == label]
    assert min(aspect(LABEL_OPTIMAL)) > max(aspect(LABEL_SUBOPTIMAL))


# ------------------------------------------------------------------------------------------ behaviour

def test_cases_are_deterministic_and_independent_of_the_dataset_size(dataset, tmp_path):
    root, uuids = dataset
    again = write_dataset(tmp_path, 1, frames_per_sweep=K, seed=SEED, progress=False)
    assert again == uuids[:1]
    for path in (image_path, mask_path):
        assert path(tmp_path, again[0]).read_bytes() == path(root, uuids[0]).read_bytes()
    other = write_dataset(tmp_path / "other", 1, frames_per_sweep=K, seed=SEED + 1, progress=False)
    assert other != again


def test_generate_case_is_reproducible_from_a_seed():
    a, b = generate_case(21, frames_per_sweep=5), generate_case(21, frames_per_sweep=5)
    assert a.uuid == b.uuid and a.ac_per_sweep == b.ac_per_sweep
    assert np.array_equal(a.image, b.image) and np.array_equal(a.mask, b.mask)


def test_no_abdomen_case_through_the_command_line(tmp_path):
    assert replica.main(["--out", str(tmp_path), "--cases", "1", "--frames-per-sweep", "4",
                         "--seed", "3", "--no-abdomen"]) == 0
    (case,) = list_case_ids(tmp_path)
    mask, _ = read(mask_path(tmp_path, case))
    image, _ = read(image_path(tmp_path, case))
    assert not mask.any() and image.shape == (SWEEPS_PER_CASE * 4, 562, 744)
    (row,) = read_csv(tmp_path)
    assert row["uuid"] == case and all(row[f"sweep_{s}_ac_mm"] == "" for s in range(1, 7))


@pytest.mark.slow
def test_a_full_size_case_has_the_release_geometry_and_annotations():
    """The default 840-frame case, not only the small ones above. Its generation time is printed, not
    asserted (the 15 s budget is a benchmark: `python -m training replica` reports seconds per case)."""
    started = time.perf_counter()
    case = generate_case(case_rng(0, 0))
    print(f"full 840-frame case generated in {time.perf_counter() - started:.1f} s")
    k = replica.REAL_FRAMES_PER_SWEEP
    assert case.image.shape == case.mask.shape == (SWEEPS_PER_CASE * k, 562, 744)
    assert case.image.dtype == case.mask.dtype == np.uint8
    labels = frame_labels(case.mask)
    assert np.array_equal(labels, case.plan.labels())
    assert 0 < (labels > 0).mean() < 0.10
    assert [(s, ac is not None) for s, ac in enumerate(case.ac_per_sweep)] == [
        (s, bool(labels[s * k:(s + 1) * k].any())) for s in range(SWEEPS_PER_CASE)]


@pytest.mark.parametrize("args, message", [
    (["--cases", "0"], "--cases: must be at least 1, got 0"),
    (["--cases", "two"], "--cases: expected an integer, got 'two'"),
    (["--cases", "1", "--frames-per-sweep", "3"], "--frames-per-sweep: must be at least 4, got 3"),
])
def test_command_line_rejects_impossible_sizes(tmp_path, capsys, args, message):
    with pytest.raises(SystemExit) as exit_info:
        replica.main(["--out", str(tmp_path / "out"), *args])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
