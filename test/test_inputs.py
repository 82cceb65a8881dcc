"""What `--input` may name besides grand-challenge's case folder: one image file, or a dataset in the public
release layout (every case, one model load, an output folder per case, cases.csv)."""
from __future__ import annotations

import contextlib
import csv
import io
import json
import os
from pathlib import Path

import numpy as np
import pytest

from algorithm.__main__ import main
from algorithm.batch import CASES_CSV, COLUMNS
from algorithm.contract import INPUT_FOLDER, OUTPUT_FRAME, OUTPUT_MASK
from algorithm.inputs import RELEASE_IMAGE_FOLDER, case_name, is_dataset
from conftest import case_from_array
from test_cli import assert_contract
from training.data.layout import IMAGES_DIR, image_path, list_case_ids
from training.data.replica import main as replica_main

EXIT_INPUT = 2


def run(source: Path, output: Path, weights: Path, *extra: str) -> int:
    return main(["--input", str(source), "--output", str(output), "--weights", str(weights), "--device", "cpu",
                 "--quiet", *extra])


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    """Three replica cases as `python -m training replica --cases 3` writes them (4 frames per sweep)."""
    folder = tmp_path_factory.mktemp("dataset") / "replica"
    assert replica_main(["--out", str(folder), "--cases", "3", "--frames-per-sweep", "4", "--seed", "7"]) == 0
    return folder


@pytest.fixture(scope="module")
def dataset_run(dataset, tmp_path_factory, random_weights):
    """The dataset run once: (exit code, output folder, stdout lines, weights each model load was given)."""
    import algorithm.batch as batch

    output = tmp_path_factory.mktemp("dataset_out") / "out"
    loads, printed = [], io.StringIO()
    original = batch.load

    def counting_load(*args, **kwargs):
        loads.append(args[0])
        return original(*args, **kwargs)

    with pytest.MonkeyPatch.context() as patch, contextlib.redirect_stdout(printed):
        patch.setattr(batch, "load", counting_load)
        code = run(dataset, output, random_weights)
    return code, output, printed.getvalue().splitlines(), loads


# ------------------------------------------------------------------------------------------ image file

def test_an_image_file_runs_as_one_case(tmp_path, random_weights, small_case):
    _, release, uuid = small_case
    image = image_path(release, uuid)
    assert run(image, tmp_path / "out", random_weights) == 0
    assert_contract(image, tmp_path / "out")
    assert json.loads((tmp_path / "out" / "fetalclipseg" / "result.json").read_text())["input"] == str(image)


def test_an_image_file_gives_the_bytes_of_its_case_folder(tmp_path, random_weights, small_case):
    case, release, uuid = small_case
    assert run(image_path(release, uuid), tmp_path / "file", random_weights, "--no-extras") == 0
    assert run(case, tmp_path / "folder", random_weights, "--no-extras") == 0
    for relative in (OUTPUT_MASK, OUTPUT_FRAME):
        assert (tmp_path / "file" / relative).read_bytes() == (tmp_path / "folder" / relative).read_bytes()


@pytest.mark.parametrize("what, needle", [("missing.mha", "input image"), ("notes.txt", "not an image file"),
                                          ("link.mha", "not a regular file"), ("missing", "input folder")])
def test_an_input_that_is_no_image_is_refused(tmp_path, random_weights, capsys, what, needle):
    (tmp_path / "notes.txt").write_text("hello")
    os.symlink("/dev/zero", tmp_path / "link.mha")
    assert run(tmp_path / what, tmp_path / "out", random_weights) == EXIT_INPUT
    message = capsys.readouterr().err.strip().splitlines()[-1]
    assert message.startswith("error: ") and needle in message and what in message, message
    assert not [p for p in (tmp_path / "out").rglob("*") if p.is_file()]


# --------------------------------------------------------------------------------------------- dataset

def test_the_release_layout_is_a_dataset_and_the_challenge_layout_is_a_case(dataset, tmp_path):
    assert IMAGES_DIR == RELEASE_IMAGE_FOLDER and is_dataset(dataset)
    case = case_from_array(tmp_path / "case", np.zeros((6, 8, 10), np.uint8))
    assert not is_dataset(case)
    (case / RELEASE_IMAGE_FOLDER).mkdir(parents=True)  # both layouts: grand-challenge's wins
    assert not is_dataset(case)
    assert case_name(Path("a/b/0199.nii.gz")) == "0199" and case_name(Path("x.MHA")) == "x"


def test_a_dataset_runs_every_case_into_its_own_folder_with_one_model_load(dataset, dataset_run):
    code, output, lines, loads = dataset_run
    assert code == 0
    uuids = list_case_ids(dataset)
    assert len(uuids) == 3 and len(loads) == 1
    for uuid in uuids:
        assert_contract(image_path(dataset, uuid), output / uuid)
        assert (output / uuid / "fetalclipseg" / "chosen_frame.png").is_file()
    assert [line.split(":")[0] for line in lines[:3]] == uuids
    assert lines[-1].startswith("3 of 3 cases done")
    with open(output / CASES_CSV, newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert tuple(rows[0]) == COLUMNS and [row["case"] for row in rows] == uuids
    for row in rows:
        frame = json.loads((output / row["case"] / OUTPUT_FRAME).read_text())
        result = json.loads((output / row["case"] / "fetalclipseg" / "result.json").read_text())
        assert row["status"] == "ok" and row["error"] == "" and int(row["frame"]) == frame
        assert row["plane"] == result["plane"] and float(row["seconds"]) > 0
        assert row["ac_mm"] == ("" if result["ac_mm"] is None else f"{result['ac_mm']:.2f}")


def test_a_dataset_case_gives_the_bytes_of_the_same_case_run_alone(dataset, dataset_run, tmp_path,
                                                                    random_weights):
    _, output, _, _ = dataset_run
    uuid = list_case_ids(dataset)[1]
    assert run(image_path(dataset, uuid), tmp_path / "alone", random_weights) == 0
    for relative in (OUTPUT_MASK, OUTPUT_FRAME):
        assert (tmp_path / "alone" / relative).read_bytes() == (output / uuid / relative).read_bytes()


def test_a_failing_case_is_a_row_and_the_exit_code_not_the_end(dataset, tmp_path, random_weights, capsys):
    """One case is not an image: the two others still run, the table says which failed and why, and the run
    exits 2 at the end with one error line; the failed case's folder holds nothing (an earlier run's
    outputs there are removed)."""
    copy = tmp_path / "dataset"
    (copy / IMAGES_DIR).mkdir(parents=True)
    uuids = list_case_ids(dataset)
    for uuid in uuids:
        os.symlink(image_path(dataset, uuid), image_path(copy, uuid))
    broken = "0-broken"
    image_path(copy, broken).write_text("ObjectType = Image\nNDims = 3\nthis is not an image\n")
    (tmp_path / "out" / broken / "fetalclipseg").mkdir(parents=True)
    (tmp_path / "out" / broken / "fetalclipseg" / "result.json").write_text("{}")  # an earlier run's
    assert run(copy, tmp_path / "out", random_weights, "--no-extras") == EXIT_INPUT
    captured = capsys.readouterr()
    error = captured.err.strip().splitlines()[-1]
    assert error.startswith("error: 1 of 4 cases failed") and broken in error and "cases.csv" in error
    assert f"{broken}: failed (exit 2)" in captured.out
    with open(tmp_path / "out" / CASES_CSV, newline="") as fh:
        rows = {row["case"]: row for row in csv.DictReader(fh)}
    assert rows[broken]["status"] == "failed" and f"{broken}.mha" in rows[broken]["error"]
    assert rows[broken]["frame"] == rows[broken]["plane"] == ""
    assert not (tmp_path / "out" / broken).exists()
    for uuid in uuids:
        assert rows[uuid]["status"] == "ok"
        assert_contract(image_path(dataset, uuid), tmp_path / "out" / uuid)


def test_a_dataset_without_images_is_refused_before_the_model_loads(tmp_path, random_weights, capsys, monkeypatch):
    import algorithm.batch as batch

    (tmp_path / "dataset" / IMAGES_DIR).mkdir(parents=True)
    (tmp_path / "dataset" / IMAGES_DIR / "readme.txt").write_text("no images here")
    monkeypatch.setattr(batch, "load", lambda *a, **k: pytest.fail("the model was loaded"))
    assert run(tmp_path / "dataset", tmp_path / "out", random_weights) == EXIT_INPUT
    message = capsys.readouterr().err.strip().splitlines()[-1]
    assert message.startswith("error: no image") and str(IMAGES_DIR) in message
    assert not (tmp_path / "out" / CASES_CSV).exists()


def test_the_challenge_layout_keeps_its_rules_beside_a_release_folder(tmp_path, random_weights, capsys):
    """A folder with grand-challenge's socket folder is one case, even when it also holds the release's
    image folder: two images there are refused as on the platform."""
    case = case_from_array(tmp_path / "in", np.zeros((6, 16, 16), np.uint8), "a.mha")
    case_from_array(tmp_path / "in", np.zeros((6, 16, 16), np.uint8), "b.mha")
    (case / RELEASE_IMAGE_FOLDER).mkdir(parents=True)
    assert run(case, tmp_path / "out", random_weights) == EXIT_INPUT
    assert "expected one" in capsys.readouterr().err and (case / INPUT_FOLDER / "a.mha").is_file()
