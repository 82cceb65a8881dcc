"""tools/check_outputs.py, the one output checker of the container test and the pytest suites."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from algorithm.contract import OUTPUT_FRAME, OUTPUT_MASK, read_stack, write_outputs
from conftest import case_from_array
from tools.check_outputs import check_outputs

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def case(tmp_path):
    root = case_from_array(tmp_path / "in", np.zeros((5, 12, 16), np.uint8))
    return next(root.rglob("*.mha"))


def written(case: Path, out: Path, frame: int, on_frame: bool = True) -> Path:
    mask = np.zeros((12, 16), np.uint8)
    mask[3:7, 4:9] = on_frame
    write_outputs(out, read_stack(case), frame, mask if frame >= 0 else None)
    return out


def test_outputs_of_the_contract_writer_pass(case, tmp_path):
    report = check_outputs(case, written(case, tmp_path / "out", 2), expect="found")
    assert report.failures == [] and report.frame == 2


def test_a_chosen_frame_with_an_empty_mask_keeps_the_contract_but_is_no_finding(case, tmp_path):
    out = written(case, tmp_path / "out", 2, on_frame=False)
    assert check_outputs(case, out).failures == []
    assert check_outputs(case, out, expect="found").failures == ["frame 2 chosen but its mask is empty"]


@pytest.mark.parametrize("damage, needle", [
    ("second frame", "mask voxels lie on frames [1, 2]"),
    ("leftover", "temporary files left"),
    ("float frame", "expected a JSON integer"),
    ("wrong type", "expected 8-bit unsigned integer"),
])
def test_each_broken_property_is_named(case, tmp_path, damage, needle):
    out = written(case, tmp_path / "out", 2)
    if damage == "second frame":
        image = sitk.ReadImage(str(out / OUTPUT_MASK))
        array = sitk.GetArrayFromImage(image)
        array[1] = array[2]
        fixed = sitk.GetImageFromArray(array)
        fixed.CopyInformation(image)
        sitk.WriteImage(fixed, str(out / OUTPUT_MASK))
    elif damage == "leftover":
        (out / f".{OUTPUT_FRAME.stem}.0a1b2c3d.partial.json").write_text("2")
    elif damage == "float frame":
        (out / OUTPUT_FRAME).write_text("2.0")
    else:
        image = sitk.ReadImage(str(out / OUTPUT_MASK))
        sitk.WriteImage(sitk.Cast(image, sitk.sitkInt16), str(out / OUTPUT_MASK))
    failures = check_outputs(case, out).failures
    assert any(needle in failure for failure in failures), failures


def test_the_script_exits_1_and_lists_the_failure(case, tmp_path):
    out = written(case, tmp_path / "out", -1)
    done = subprocess.run([sys.executable, "tools/check_outputs.py", "--input", str(case.parents[2]),
                           "--output", str(out), "--expect", "found"], cwd=REPO, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 1
    assert "expected a chosen frame (>= 0), got -1" in done.stderr
