"""Paths of the public ACOUSLIC-AI release (Zenodo 12697994, v1.1), which the replica shares, and how one of
its cases is laid out as grand-challenge mounts /input."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from algorithm.contract import INPUT_FOLDER, INPUTS_JSON, OUTPUT_FRAME, OUTPUT_MASK, inputs_json
from algorithm.inputs import RELEASE_IMAGE_FOLDER

IMAGES_DIR = RELEASE_IMAGE_FOLDER
MASKS_DIR = Path("masks") / "stacked_fetal_abdomen"
CIRCUMFERENCES_CSV = Path("circumferences") / "fetal_abdominal_circumferences_per_sweep.csv"
CIRCUMFERENCES_HEADER = ["uuid", "subject_id"] + [f"sweep_{k}_ac_mm" for k in range(1, 7)]

# What the algorithm writes per case (the grand-challenge output sockets).
OUTPUT_MASK_DIR = OUTPUT_MASK.parent
OUTPUT_FRAME_JSON = OUTPUT_FRAME

STAGING = ("copy", "link", "symlink", "move")


def image_path(root: Path, uuid: str) -> Path:
    return Path(root) / IMAGES_DIR / f"{uuid}.mha"


def mask_path(root: Path, uuid: str) -> Path:
    return Path(root) / MASKS_DIR / f"{uuid}.mha"


def list_case_ids(root: Path) -> list[str]:
    """uuids of the cases in a release-layout folder, sorted."""
    return sorted(p.name[: -len(".mha")] for p in (Path(root) / IMAGES_DIR).glob("*.mha"))


def stage_case(image: Path, input_dir: Path, how: str = "copy") -> Path:
    """Lay one case's image out in `input_dir` as grand-challenge mounts /input (the socket's folder and an
    inputs.json naming it); returns the staged image.

    how: copy; link (a hard link: no copy of a 350 MB stack, falling back to a copy across file systems);
    move; symlink (to the resolved source: no copy, across file systems too).
    """
    if how not in STAGING:
        raise ValueError(f"how must be one of {', '.join(STAGING)}, got {how!r}")
    image, input_dir = Path(image), Path(input_dir)
    folder = input_dir / INPUT_FOLDER
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / image.name
    if how == "move":
        shutil.move(str(image), target)
    elif how == "symlink":
        os.symlink(image.resolve(), target)
    elif how == "link":
        try:
            os.link(image, target)
        except OSError:
            shutil.copyfile(image, target)
    else:
        shutil.copyfile(image, target)
    (input_dir / INPUTS_JSON).write_text(json.dumps(inputs_json(target.name), indent=2) + "\n")
    return target
