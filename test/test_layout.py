"""Staging a release-layout case into the /input layout: one function for the demo, runners, tests and tools."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import SimpleITK as sitk

from algorithm.contract import INPUT_FOLDER, INPUT_SLUG, INPUTS_JSON, find_input_image, read_stack
from algorithm.errors import InputError
from training.data.layout import STAGING, stage_case


@pytest.fixture
def image(tmp_path):
    path = tmp_path / "release" / "case.mha"
    path.parent.mkdir()
    sitk.WriteImage(sitk.GetImageFromArray(np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)), str(path))
    return path


@pytest.mark.parametrize("how", STAGING)
def test_every_way_of_staging_gives_a_case_the_algorithm_finds(tmp_path, image, how):
    original = image.read_bytes()
    staged = stage_case(image, tmp_path / "input", how=how)
    assert staged == tmp_path / "input" / INPUT_FOLDER / "case.mha"
    assert staged.read_bytes() == original
    sockets = json.loads((tmp_path / "input" / INPUTS_JSON).read_text())
    named = [(s["interface"]["slug"], s["interface"]["relative_path"]) for s in sockets]
    assert named == [(INPUT_SLUG, str(INPUT_FOLDER))]
    assert sockets[0]["image"]["name"] == "case.mha"
    assert image.exists() == (how != "move")
    assert staged.is_symlink() == (how == "symlink")
    if how == "link":
        assert os.stat(staged).st_ino == os.stat(image).st_ino
    assert read_stack(find_input_image(tmp_path / "input")).array.shape == (2, 3, 4)


def test_an_unknown_way_is_refused(tmp_path, image):
    with pytest.raises(ValueError, match="how must be one of"):
        stage_case(image, tmp_path / "input", how="teleport")
