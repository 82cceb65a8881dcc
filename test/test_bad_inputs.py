"""The catalogue of bad inputs: invalid inputs fail with one clear line and a documented exit code, leaving the
output folder empty; odd but valid inputs give outputs that honour the contract."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from algorithm.__main__ import main
from algorithm.contract import INPUT_FOLDER, INPUT_SLUG, OUTPUT_FRAME, OUTPUT_MASK
from conftest import case_from_array
from test_cli import assert_contract

REPO = Path(__file__).resolve().parents[1]
EXIT_INPUT, EXIT_WEIGHTS, EXIT_OUTPUT = 2, 3, 4


def run(case: Path, output: Path, weights: Path, *extra: str) -> int:
    return main(["--input", str(case), "--output", str(output), "--weights", str(weights), "--device", "cpu",
                 "--quiet", *extra])


def files_under(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.is_file()] if folder.exists() else []


def speckle(shape, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 120, shape, dtype=np.uint8)


def expect_failure(capsys, code: int, case: Path, output: Path, weights: Path, *needles: str) -> None:
    assert run(case, output, weights) == code
    err = capsys.readouterr().err.strip().splitlines()
    message = err[-1]
    assert message.startswith("error: ") and "Traceback" not in "\n".join(err)
    for needle in needles:
        assert needle in message, message
    assert files_under(output) == []


# ------------------------------------------------------------------------------------------- invalid

def test_missing_input_folder(tmp_path, random_weights, capsys):
    expect_failure(capsys, EXIT_INPUT, tmp_path / "absent", tmp_path / "out", random_weights, "absent")


def test_empty_input_folder(tmp_path, random_weights, capsys):
    (tmp_path / "in").mkdir()
    expect_failure(capsys, EXIT_INPUT, tmp_path / "in", tmp_path / "out", random_weights, INPUT_SLUG)


def test_image_folder_without_image(tmp_path, random_weights, capsys):
    (tmp_path / "in" / INPUT_FOLDER).mkdir(parents=True)
    (tmp_path / "in" / INPUT_FOLDER / "notes.txt").write_text("hello")
    expect_failure(capsys, EXIT_INPUT, tmp_path / "in", tmp_path / "out", random_weights, "no image")


def test_two_images_without_inputs_json(tmp_path, random_weights, capsys):
    case = case_from_array(tmp_path / "in", speckle((6, 16, 16)), "a.mha")
    case_from_array(tmp_path / "in", speckle((6, 16, 16)), "b.mha")
    expect_failure(capsys, EXIT_INPUT, case, tmp_path / "out", random_weights, "a.mha", "b.mha")


def test_file_that_is_not_an_image(tmp_path, random_weights, capsys):
    folder = tmp_path / "in" / INPUT_FOLDER
    folder.mkdir(parents=True)
    (folder / "case.mha").write_text("this is not an image\n")
    expect_failure(capsys, EXIT_INPUT, tmp_path / "in", tmp_path / "out", random_weights, "case.mha")


def test_truncated_mha(tmp_path, random_weights, capsys):
    case = case_from_array(tmp_path / "in", speckle((12, 40, 50)))
    path = case / INPUT_FOLDER / "case.mha"
    path.write_bytes(path.read_bytes()[:-200])
    expect_failure(capsys, EXIT_INPUT, case, tmp_path / "out", random_weights, "case.mha")


def test_four_dimensional_image(tmp_path, random_weights, capsys):
    folder = tmp_path / "in" / INPUT_FOLDER
    folder.mkdir(parents=True)
    sitk.WriteImage(sitk.Image([10, 8, 6, 2], sitk.sitkUInt8), str(folder / "case.mha"))
    expect_failure(capsys, EXIT_INPUT, tmp_path / "in", tmp_path / "out", random_weights, "4-D")


def test_two_dimensional_image(tmp_path, random_weights, capsys):
    folder = tmp_path / "in" / INPUT_FOLDER
    folder.mkdir(parents=True)
    sitk.WriteImage(sitk.Image([10, 8], sitk.sitkUInt8), str(folder / "case.mha"))
    expect_failure(capsys, EXIT_INPUT, tmp_path / "in", tmp_path / "out", random_weights, "2-D")


def test_zero_frames(tmp_path, random_weights, capsys):
    folder = tmp_path / "in" / INPUT_FOLDER
    folder.mkdir(parents=True)
    (folder / "case.mha").write_text("ObjectType = Image\nNDims = 3\nDimSize = 744 562 0\n"
                                     "ElementType = MET_UCHAR\nElementDataFile = LOCAL\n")
    expect_failure(capsys, EXIT_INPUT, tmp_path / "in", tmp_path / "out", random_weights, "case.mha")


def test_missing_weights_names_the_path(tmp_path, capsys):
    case = case_from_array(tmp_path / "in", speckle((6, 16, 16)))
    expect_failure(capsys, EXIT_WEIGHTS, case, tmp_path / "out", tmp_path / "nowhere.safetensors",
                   "nowhere.safetensors")


def test_corrupt_weights(tmp_path, random_weights, capsys):
    case = case_from_array(tmp_path / "in", speckle((6, 16, 16)))
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(random_weights.read_bytes()[:5000])
    expect_failure(capsys, EXIT_WEIGHTS, case, tmp_path / "out", bad, "bad.safetensors")


def test_output_folder_cannot_be_written(tmp_path, random_weights, capsys):
    case = case_from_array(tmp_path / "in", speckle((6, 16, 16)))
    blocker = tmp_path / "out"
    blocker.write_text("a file where the output folder should be")
    assert run(case, blocker, random_weights) == EXIT_OUTPUT
    assert "not writable" in capsys.readouterr().err
    assert blocker.read_text().startswith("a file")


def test_subprocess_prints_one_line_and_exit_code(tmp_path, random_weights):
    completed = subprocess.run([sys.executable, "-m", "algorithm", "--input", str(tmp_path / "none"),
                                "--output", str(tmp_path / "out"), "--weights", str(random_weights)],
                               cwd=REPO, capture_output=True, text=True, timeout=300)
    assert completed.returncode == EXIT_INPUT
    assert completed.stderr.strip().splitlines() == [f"error: input folder {tmp_path / 'none'} does not exist"]


# --------------------------------------------------------------------------------------- odd but valid

def image_of(case: Path) -> Path:
    return next((case / INPUT_FOLDER).iterdir())


def test_all_black_stack_gives_minus_one(tmp_path, random_weights):
    case = case_from_array(tmp_path / "in", np.zeros((12, 56, 74), dtype=np.uint8))
    assert run(case, tmp_path / "out", random_weights) == 0
    assert assert_contract(image_of(case), tmp_path / "out") == -1


@pytest.mark.parametrize("dtype", [np.int16, np.uint16, np.float32, np.float64])
def test_other_pixel_types(tmp_path, random_weights, dtype):
    array = speckle((12, 56, 74)).astype(dtype) * (40 if dtype != np.int16 else -3)
    if np.issubdtype(dtype, np.floating):
        array[0, 0, :3] = (np.nan, np.inf, -np.inf)
    case = case_from_array(tmp_path / "in", array)
    assert run(case, tmp_path / "out", random_weights) == 0
    assert_contract(image_of(case), tmp_path / "out")


def test_rgb_pixels(tmp_path, random_weights):
    rgb = np.repeat(speckle((12, 56, 74))[..., None], 3, axis=-1)
    case = case_from_array(tmp_path / "in", rgb, vector=True)
    assert run(case, tmp_path / "out", random_weights) == 0
    assert_contract(image_of(case), tmp_path / "out")


@pytest.mark.parametrize("frames", [1, 5, 13, 845])
def test_frame_counts_not_divisible_by_six(tmp_path, random_weights, frames):
    case = case_from_array(tmp_path / "in", speckle((frames, 30, 40)))
    assert run(case, tmp_path / "out", random_weights) == 0
    assert_contract(image_of(case), tmp_path / "out")


@pytest.mark.parametrize("shape", [(12, 600, 800), (12, 480, 300), (12, 9, 7)])
def test_other_frame_sizes(tmp_path, random_weights, shape):
    case = case_from_array(tmp_path / "in", speckle(shape))
    assert run(case, tmp_path / "out", random_weights) == 0
    assert_contract(image_of(case), tmp_path / "out")


@pytest.mark.parametrize("suffix", [".tif", ".tiff"])
def test_tiff_input(tmp_path, random_weights, suffix):
    case = case_from_array(tmp_path / "in", speckle((12, 56, 74)), name=f"case{suffix}")
    assert run(case, tmp_path / "out", random_weights) == 0
    assert_contract(image_of(case), tmp_path / "out")


def test_extra_unrelated_files(tmp_path, random_weights, small_case):
    case, _, _ = small_case
    extra = tmp_path / "in"
    import shutil
    shutil.copytree(case, extra)
    (extra / "README.txt").write_text("unrelated")
    (extra / "images" / "other-socket").mkdir()
    (extra / "images" / "other-socket" / "x.mha").write_bytes(b"junk")
    (extra / "inputs.json").write_text(json.dumps([
        {"interface": {"slug": INPUT_SLUG, "relative_path": str(INPUT_FOLDER)}},
        {"interface": {"slug": "other-socket", "relative_path": "images/other-socket"}}]))
    assert run(extra, tmp_path / "out", random_weights) == 0
    assert_contract(image_of(extra), tmp_path / "out")


# ---------------------------------------------------------------------------------- property-based

DTYPES = st.sampled_from([np.uint8, np.int16, np.uint16, np.int32, np.float32, np.float64])


@st.composite
def stacks(draw):
    dtype = draw(DTYPES)
    shape = (draw(st.integers(1, 14)), draw(st.integers(2, 48)), draw(st.integers(2, 48)))
    if np.issubdtype(dtype, np.floating):
        elements = st.floats(allow_nan=True, allow_infinity=True, width=32 if dtype == np.float32 else 64)
    else:
        info = np.iinfo(dtype)
        elements = st.integers(int(info.min), int(info.max))
    return draw(hnp.arrays(dtype, shape, elements=elements))


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                 HealthCheck.too_slow])
@given(array=stacks())
def test_never_an_unexpected_exception(tmp_path_factory, random_weights, array):
    root = tmp_path_factory.mktemp("prop")
    case = case_from_array(root / "in", array)
    code = run(case, root / "out", random_weights)
    assert code == 0
    assert_contract(image_of(case), root / "out")
