"""Which cases a benchmark runs, where their outputs go, and when a case counts as done.

Inputs: a folder in the public release layout (`images/stacked_fetal_ultrasound/<uuid>.mha`, see
`training.data.layout`) or a flat folder of images; the case id is the file name without its suffix.

Outputs: `OUT/predictions/<uuid>/` laid out like the algorithm's /output (what `training.scoring.evaluate`
reads). A case is written into `OUT/.staging/<uuid>/` first and moved into place with one rename when
it is complete, so a crash or Ctrl-C never leaves a half-written case under `predictions/`; anything in
`predictions/` that is nevertheless incomplete (e.g. written by hand or by an older tool) is redone.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from algorithm.contract import IMAGE_SUFFIXES
from algorithm.inputs import case_name
from training.data import layout

PREDICTIONS = "predictions"
STAGING = ".staging"


@dataclass(frozen=True)
class Case:
    uuid: str
    image: Path


def discover_cases(folder: Path, limit: int | None = None) -> list[Case]:
    """The cases of a release-layout folder or of a flat folder of images, sorted by id."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"cases folder {folder} does not exist")
    release = folder / layout.IMAGES_DIR
    source = release if release.is_dir() else folder
    images = sorted(p for p in source.iterdir()
                    if p.is_file() and not p.name.startswith(".") and p.name.lower().endswith(IMAGE_SUFFIXES))
    if not images:
        where = f"{release} or {folder}" if source is folder else str(release)
        raise FileNotFoundError(f"no case images ({', '.join(IMAGE_SUFFIXES)}) in {where}")
    cases = [Case(case_name(p), p) for p in images]
    seen: dict[str, Path] = {}
    for case in cases:
        if case.uuid in seen:
            raise ValueError(f"two images for case {case.uuid}: {seen[case.uuid].name} and {case.image.name}")
        seen[case.uuid] = case.image
    return cases[:limit] if limit is not None else cases


def frame_number(case_dir: Path) -> int | None:
    """The frame number a case folder holds, or None when its JSON is missing or not an integer."""
    try:
        value = json.loads((Path(case_dir) / layout.OUTPUT_FRAME_JSON).read_text())
    except (OSError, ValueError):
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        return None
    return value


def mask_files(case_dir: Path) -> list[Path]:
    folder = Path(case_dir) / layout.OUTPUT_MASK_DIR
    return sorted(p for p in folder.glob("*.mha") if not p.name.startswith(".")) if folder.is_dir() else []


def is_complete(case_dir: Path) -> bool:
    """Both output sockets are there: an integer frame JSON and exactly one non-empty mask .mha."""
    masks = mask_files(case_dir)
    return frame_number(case_dir) is not None and len(masks) == 1 and masks[0].stat().st_size > 0


class OutputTree:
    """OUT/: predictions/<uuid>/, .staging/, and the run's JSON files."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.predictions = self.root / PREDICTIONS
        self.staging_root = self.root / STAGING

    def case_dir(self, uuid: str) -> Path:
        return self.predictions / uuid

    def done(self, uuid: str) -> bool:
        return is_complete(self.case_dir(uuid))

    def staging(self, uuid: str) -> Path:
        """A fresh, empty staging folder for one attempt at a case."""
        path = self.staging_root / uuid
        if path.exists():
            shutil.rmtree(path)
        path.mkdir(parents=True)
        return path

    def commit(self, uuid: str, staged: Path) -> Path:
        """Move a complete staging folder into predictions/<uuid> (replacing an incomplete one)."""
        if not is_complete(staged):
            present = sorted(str(p.relative_to(staged)) for p in staged.rglob("*") if p.is_file())
            raise RuntimeError(f"outputs incomplete (need {layout.OUTPUT_FRAME_JSON} with an integer and one "
                               f".mha in {layout.OUTPUT_MASK_DIR}/); got {present or 'nothing'}")
        target = self.case_dir(uuid)
        self.predictions.mkdir(parents=True, exist_ok=True)
        if target.exists():
            shutil.rmtree(target)
        os.replace(staged, target)
        return target

    def discard(self, uuid: str) -> None:
        shutil.rmtree(self.staging_root / uuid, ignore_errors=True)

    def clean_staging(self) -> None:
        shutil.rmtree(self.staging_root, ignore_errors=True)


def write_json_atomic(path: Path, value: object) -> None:
    """Write JSON through a temporary file and a rename: readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(handle, "w") as out:
            json.dump(value, out, indent=2)
            out.write("\n")
        os.chmod(temporary, 0o644)  # mkstemp makes it 0600
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def read_json(path: Path, default: object) -> object:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return default


def ground_truth_subset(ground_truth: Path, uuids: list[str], dest: Path) -> tuple[Path, list[str]]:
    """A release-layout view of `ground_truth` restricted to `uuids` (symlinks; the CSV filtered).

    `training.scoring.evaluate` scores every ground-truth case it finds; a benchmark of some cases (`--limit`, a
    subset folder) must be scored on those only. Returns (folder, uuids without a ground-truth mask).
    """
    ground_truth = Path(ground_truth).resolve()
    if dest.exists():
        shutil.rmtree(dest)
    missing = []
    for uuid in uuids:
        mask = layout.mask_path(ground_truth, uuid)
        if not mask.is_file():
            missing.append(uuid)
            continue
        for source, target in ((mask, layout.mask_path(dest, uuid)),
                               (layout.image_path(ground_truth, uuid), layout.image_path(dest, uuid))):
            if source.is_file():
                target.parent.mkdir(parents=True, exist_ok=True)
                try:
                    target.symlink_to(source)
                except OSError:
                    shutil.copy2(source, target)
    csv_in = ground_truth / layout.CIRCUMFERENCES_CSV
    if csv_in.is_file():
        wanted = set(uuids)
        lines = csv_in.read_text().splitlines(keepends=True)
        kept = lines[:1] + [line for line in lines[1:] if line.split(",", 1)[0].strip() in wanted]
        csv_out = dest / layout.CIRCUMFERENCES_CSV
        csv_out.parent.mkdir(parents=True, exist_ok=True)
        csv_out.write_text("".join(kept))
    (dest / layout.MASKS_DIR).mkdir(parents=True, exist_ok=True)
    return dest, missing
