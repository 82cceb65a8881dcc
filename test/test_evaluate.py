"""The evaluation CLI end to end on a tiny release-layout dataset (6 sweeps x 10 frames x 80 x 100 px)."""
import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import SimpleITK as sitk

from algorithm.biometry import circumference_mm
from training.data import layout
from training.scoring.evaluate import evaluate, main, read_mask_frame

REPO = Path(__file__).resolve().parents[1]
FRAMES, H, W = 60, 80, 100  # sweep length 60 // 6 = 10


def fov() -> np.ndarray:
    """A sector-like FOV: a trapezoid, so the corners of the frame are outside."""
    mask = np.zeros((H, W), np.uint8)
    cv2.fillPoly(mask, [np.array([[35, 2], [65, 2], [97, 77], [3, 77]], np.int32)], 1)
    return mask.astype(bool)


def ellipse(a=24.0, b=16.0) -> np.ndarray:
    mask = np.zeros((H, W), np.uint8)
    cv2.ellipse(mask, ((50, 45), (2 * a, 2 * b), 15), 1, -1)
    return mask


def write(array: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image = sitk.GetImageFromArray(array)
    image.SetSpacing((0.28,) * array.ndim)
    sitk.WriteImage(image, str(path), True)


def write_prediction(root: Path, uuid: str, frame: int, mask_2d: np.ndarray | None) -> None:
    case = root / uuid
    (case / layout.OUTPUT_FRAME_JSON).parent.mkdir(parents=True, exist_ok=True)
    (case / layout.OUTPUT_FRAME_JSON).write_text(json.dumps(frame))
    output = np.zeros((FRAMES, H, W), np.uint8)
    if mask_2d is not None and frame >= 0:
        output[frame] = mask_2d
    write(output, case / layout.OUTPUT_MASK_DIR / "output.mha")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """Ground truth of five cases and predictions for four; returns (gt_root, pred_root)."""
    root = tmp_path_factory.mktemp("eval")
    gt_root, pred_root = root / "gt", root / "pred"
    rng = np.random.default_rng(0)
    region = fov()
    gt_mask, ref_ac = ellipse(), circumference_mm(ellipse())

    labels = np.zeros((FRAMES, H, W), np.uint8)
    labels[12:15] = gt_mask * 1  # sweep 2 (10-19): optimal 12-14, suboptimal 15-16
    labels[15:17] = gt_mask * 2
    labels[42:45] = gt_mask * 1  # sweep 5 (40-49): optimal 42-44
    references = [None, ref_ac, None, None, ref_ac, None]

    outside_blob = gt_mask.copy()
    outside_blob[1:6, 1:6] = 1  # top-left corner: outside the FOV
    cases = {
        "perfect": (labels, 13, outside_blob),  # the blob must be ignored through the derived FOV
        "suboptimal": (labels, 15, gt_mask),
        "near": (labels, 47, gt_mask),  # 3 frames after the run 42-44
        "missing": (labels, None, None),
        "rejected": (np.zeros_like(labels), -1, None),  # no annotation and -1
    }
    rows = []
    for i, (uuid, (case_labels, frame, pred)) in enumerate(cases.items()):
        speckle = rng.integers(1, 60, size=(FRAMES, H, W), dtype=np.uint8) * region
        write(speckle.astype(np.uint8), layout.image_path(gt_root, uuid))
        write(case_labels, layout.mask_path(gt_root, uuid))
        refs = references if case_labels.any() else [None] * 6
        rows.append([uuid, f"{i:03d}"] + ["" if r is None else repr(r) for r in refs])
        if frame is not None:
            write_prediction(pred_root, uuid, frame, pred)
    csv_path = gt_root / layout.CIRCUMFERENCES_CSV
    csv_path.parent.mkdir(parents=True, exist_ok=True)
    with csv_path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(layout.CIRCUMFERENCES_HEADER)
        writer.writerows(rows)
    return gt_root, pred_root


def test_cli_scores_hand_checked_cases(dataset, tmp_path):
    gt_root, pred_root = dataset
    out = tmp_path / "report.json"
    run = subprocess.run(
        [sys.executable, "-m", "training", "evaluate", "--predictions", str(pred_root),
         "--ground-truth", str(gt_root), "--json", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )
    assert run.returncode == 0, run.stderr
    assert "perfect" in run.stdout and "mean of 5" in run.stdout
    report = json.loads(out.read_text())
    cases = report["cases"]
    assert set(cases) == {"perfect", "suboptimal", "near", "missing", "rejected"}
    assert report["missing"] == ["missing"]

    p = cases["perfect"]
    assert (p["frame"], p["wfss"], p["dsc_soft"]) == (13, 1.0, 1.0)
    assert p["nae_ac"] == pytest.approx(0.0, abs=1e-9) and p["score"] == pytest.approx(1.0)
    assert p["ac_pred_mm"] == pytest.approx(p["ac_ref_mm"])

    s = cases["suboptimal"]
    assert (s["wfss"], s["dsc_soft"]) == (0.6, 1.0)
    assert s["score"] == pytest.approx(0.5 + 0.25 * 0.6 + 0.25, abs=1e-9)

    n = cases["near"]
    assert n["wfss"] == 0.0 and n["dsc_soft"] == pytest.approx(1 - 3 / 15)
    assert n["nae_ac"] == pytest.approx(0.0, abs=1e-9)

    m = cases["missing"]
    assert (m["frame"], m["wfss"], m["dsc_soft"], m["nae_ac"], m["score"]) == (-1, 0.0, 0.0, 1.0, 0.0)
    assert m["ac_pred_mm"] is None

    r = cases["rejected"]
    assert (r["frame"], r["wfss"], r["dsc_soft"], r["nae_ac"]) == (-1, 0.0, 1.0, 1.0)
    assert r["score"] == pytest.approx(0.25)

    agg = report["aggregate"]
    assert agg["n_cases"] == 5
    for key in ("wfss", "dsc_soft", "nae_ac", "hd", "score"):
        assert agg[key] == pytest.approx(np.mean([c[key] for c in cases.values()]))


def test_fov_mask_option_is_applied(dataset, tmp_path):
    gt_root, pred_root = dataset
    whole = tmp_path / "whole_fov.mha"
    write(np.ones((H, W), np.uint8), whole)
    out = tmp_path / "whole.json"
    assert main(["--predictions", str(pred_root), "--ground-truth", str(gt_root),
                 "--json", str(out), "--fov-mask", str(whole)]) == 0
    perfect = json.loads(out.read_text())["cases"]["perfect"]
    # without the sector FOV the corner blob counts: 25 extra pixels lower the Dice
    area = int(ellipse().sum())
    assert perfect["dsc_soft"] == pytest.approx(2 * area / (2 * area + 25))
    # the same FOV given as an array gives the derived-FOV result
    assert evaluate(pred_root, gt_root, fov_mask=fov())["cases"]["perfect"]["dsc_soft"] == 1.0


def test_read_mask_frame_reads_one_frame_or_a_2d_file(tmp_path):
    stack = np.zeros((FRAMES, H, W), np.uint8)
    stack[7, 10:20, 30:50] = 1
    write(stack, tmp_path / "stack.mha")
    assert read_mask_frame(tmp_path / "stack.mha", 7).sum() == 200
    assert read_mask_frame(tmp_path / "stack.mha", 8).sum() == 0
    write(stack[7], tmp_path / "single.mha")
    single = read_mask_frame(tmp_path / "single.mha", 7)
    assert single.dtype == np.uint8 and set(np.unique(single)) == {0, 1} and single.sum() == 200
    with pytest.raises(ValueError, match="outside its 60 frames"):
        read_mask_frame(tmp_path / "stack.mha", FRAMES)


def test_a_mask_that_is_not_binary_is_refused_as_the_challenge_refuses_it(tmp_path):
    stack = np.zeros((FRAMES, H, W), np.uint8)
    stack[7, 10:20, 30:50] = 255
    write(stack, tmp_path / "stack.mha")
    with pytest.raises(ValueError, match=r"stack.mha: mask values must be 0 or 1, frame 7 holds 0, 255"):
        read_mask_frame(tmp_path / "stack.mha", 7)
    assert read_mask_frame(tmp_path / "stack.mha", 8).sum() == 0  # only the scored frame is checked


def test_bad_folders_and_masks_are_one_line_errors(dataset, tmp_path, capsys):
    gt_root, pred_root = dataset
    assert main(["--predictions", str(tmp_path / "absent"), "--ground-truth", str(gt_root)]) == 2
    assert capsys.readouterr().err.strip() == f"error: predictions folder {tmp_path / 'absent'} does not exist"

    (tmp_path / "empty").mkdir()
    assert main(["--predictions", str(pred_root), "--ground-truth", str(tmp_path / "empty")]) == 2
    assert "no ground-truth mask stacks (*.mha) under" in capsys.readouterr().err

    bad = tmp_path / "pred"
    shutil.copytree(pred_root, bad)
    output = bad / "perfect" / layout.OUTPUT_MASK_DIR / "output.mha"
    stack = sitk.GetArrayFromImage(sitk.ReadImage(str(output)))
    write(stack * 255, output)
    json_out = tmp_path / "report.json"
    assert main(["--predictions", str(bad), "--ground-truth", str(gt_root), "--json", str(json_out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "mask values must be 0 or 1, frame 13 holds 0, 255" in err
    assert not json_out.exists()
