"""Paths of the public ACOUSLIC-AI release (Zenodo 12697994, v1.1); the replica uses the same."""
from __future__ import annotations

from pathlib import Path

IMAGES_DIR = Path("images") / "stacked_fetal_ultrasound"
MASKS_DIR = Path("masks") / "stacked_fetal_abdomen"
CIRCUMFERENCES_CSV = Path("circumferences") / "fetal_abdominal_circumferences_per_sweep.csv"
CIRCUMFERENCES_HEADER = ["uuid", "subject_id"] + [f"sweep_{k}_ac_mm" for k in range(1, 7)]

# What the algorithm writes per case (the grand-challenge output sockets).
OUTPUT_MASK_DIR = Path("images") / "fetal-abdomen-segmentation"
OUTPUT_FRAME_JSON = Path("fetal-abdomen-frame-number.json")


def image_path(root: Path, uuid: str) -> Path:
    return Path(root) / IMAGES_DIR / f"{uuid}.mha"


def mask_path(root: Path, uuid: str) -> Path:
    return Path(root) / MASKS_DIR / f"{uuid}.mha"


def list_case_ids(root: Path) -> list[str]:
    """uuids of the cases in a release-layout folder, sorted."""
    return sorted(p.name[: -len(".mha")] for p in (Path(root) / IMAGES_DIR).glob("*.mha"))
