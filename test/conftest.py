"""Shared fixtures: a randomly initialised small checkpoint and generated replica cases.

Tests use a small FetalCLIPSEG with random weights saved in our checkpoint format: every contract property
must hold whatever the network predicts.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from algorithm.config import ModelConfig
from algorithm.contract import INPUT_FOLDER

# Real challenge artefacts (FOV mask, training-set statistics, one real frame), never part of the project:
# `../shared/reference/` beside the repository, or wherever ACOUSLIC_REFERENCE points. Tests that read them
# skip when they are absent, so a fresh clone passes without them.
REFERENCE = Path(os.environ.get("ACOUSLIC_REFERENCE", Path(__file__).resolve().parents[2] / "shared" / "reference"))
REFERENCE_FOV = REFERENCE / "fov_mask.mha"
needs_reference_fov = pytest.mark.skipif(not REFERENCE_FOV.is_file(), reason=f"{REFERENCE_FOV} not available")


def reference_fov() -> np.ndarray:
    """The challenge's FOV mask as a (562, 744) bool array, read as `training.scoring.evaluate --fov-mask` reads it."""
    from training.scoring.evaluate import read_fov_mask

    return read_fov_mask(REFERENCE_FOV)


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny tensors: with several intra-op threads they mostly wait on each other, so use one."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def random_weights(tmp_path_factory) -> Path:
    from algorithm.model.checkpoint import save_checkpoint
    from algorithm.model.fetalclipseg import build_model

    torch.manual_seed(0)
    config = ModelConfig.small()
    model = build_model(config)
    path = tmp_path_factory.mktemp("weights") / "random_small.safetensors"
    save_checkpoint(path, model, config, provenance="random initialisation for tests, not for clinical use")
    return path


def case_from_array(root: Path, array: np.ndarray, name: str = "case.mha", spacing=(0.28, 0.28, 1.0),
                    vector: bool = False) -> Path:
    """A grand-challenge style case folder holding `array` as its one image; returns the folder."""
    folder = root / INPUT_FOLDER
    folder.mkdir(parents=True, exist_ok=True)
    image = sitk.GetImageFromArray(array, isVector=vector)
    image.SetSpacing(spacing)
    sitk.WriteImage(image, str(folder / name), useCompression=True)
    return root


def release_case_to_input(release: Path, uuid: str, root: Path) -> Path:
    """Copy one case of a release-layout folder into a grand-challenge /input layout."""
    from training.data.layout import image_path, stage_case

    stage_case(image_path(release, uuid), root, how="copy")
    return root


@pytest.fixture(scope="session")
def full_case(tmp_path_factory) -> tuple[Path, Path, str]:
    """One full-size (840-frame) replica case: (input folder, release folder, uuid)."""
    from training.data.replica import write_dataset

    base = tmp_path_factory.mktemp("full_case")
    uuid = write_dataset(base / "release", cases=1, frames_per_sweep=140, seed=11)[0]
    return release_case_to_input(base / "release", uuid, base / "input"), base / "release", uuid


@pytest.fixture(scope="session")
def small_case(tmp_path_factory) -> tuple[Path, Path, str]:
    """One small replica case (6 sweeps x 12 frames): (input folder, release folder, uuid)."""
    from training.data.replica import write_dataset

    base = tmp_path_factory.mktemp("small_case")
    uuid = write_dataset(base / "release", cases=1, frames_per_sweep=12, seed=5)[0]
    return release_case_to_input(base / "release", uuid, base / "input"), base / "release", uuid
