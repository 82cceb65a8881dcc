"""Where the checkpoint comes from: an explicit path, grand-challenge's model folder, or the bundled demo file.

A location that was given (`--weights`) or that exists (`/opt/ml/model`, where grand-challenge unpacks the
model tarball) must yield exactly one checkpoint; anything else is a WeightsError naming what was found there,
never a quiet fall-back. The bundled replica demo weights are used only when no model folder exists at all:
they live beside the code on a developer's machine and are not part of the submission image.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

from .errors import WeightsError

log = logging.getLogger("algorithm")

MODEL_MOUNT = Path("/opt/ml/model")
BUNDLED = Path(__file__).resolve().parent / "weights"
SUFFIX = ".safetensors"
MAX_ENTRIES = 10_000  # a model folder is a handful of files; stop listing a tree far larger than that


def _is_checkpoint(path: Path) -> bool:
    return path.name.lower().endswith(SUFFIX) and not path.name.startswith(".")


def _listing(folder: Path) -> list[Path]:
    """Every file under `folder` (symbolic links to folders not followed), at most MAX_ENTRIES entries."""
    files: list[Path] = []

    def fail(error: OSError) -> None:
        raise WeightsError(f"cannot read the weights folder {folder}: {error.strerror or error}")

    seen = 0
    for root, dirs, names in os.walk(folder, onerror=fail):
        seen += len(dirs) + len(names)
        if seen > MAX_ENTRIES:
            raise WeightsError(f"weights folder {folder} holds more than {MAX_ENTRIES} entries; expected one "
                               f"{SUFFIX} checkpoint")
        dirs.sort()
        files.extend(Path(root) / name for name in sorted(names))
    return files


def _describe(folder: Path, files: list[Path]) -> str:
    if not files:
        return "it is empty"
    names = [str(p.relative_to(folder)) for p in files[:8]]
    return "found: " + ", ".join(names) + (f" and {len(files) - 8} more" if len(files) > 8 else "")


def checkpoint_in(folder: Path) -> Path:
    """The one checkpoint under `folder`; WeightsError naming what is there when there is not exactly one."""
    if not folder.is_dir():
        raise WeightsError(f"{folder} is not a folder")
    files = _listing(folder)
    found = [p for p in files if _is_checkpoint(p) and p.is_file()]
    if not found:
        others = [p for p in files if not p.name.startswith(".")] or files
        raise WeightsError(f"{folder} holds no {SUFFIX} checkpoint ({_describe(folder, others)}); our "
                           f"checkpoints are single {SUFFIX} files (see README, Weights)")
    if len(found) > 1:
        raise WeightsError(f"{folder} holds {len(found)} {SUFFIX} files ({_describe(folder, found)}); "
                           "expected one: pass --weights to choose")
    return found[0]


def resolve_weights(explicit: Path | None = None, model_dir: Path | None = None, bundled: Path | None = None) -> Path:
    """The checkpoint to load: `explicit` (a file, or a folder with one checkpoint), else the one in
    `model_dir` (default MODEL_MOUNT) when that folder exists, else the bundled demo checkpoint (default in
    BUNDLED), with a warning."""
    model_dir = MODEL_MOUNT if model_dir is None else Path(model_dir)
    bundled = BUNDLED if bundled is None else Path(bundled)
    if explicit is not None:
        explicit = Path(explicit)
        if explicit.is_dir():
            return checkpoint_in(explicit)
        if not explicit.is_file():
            what = "is not a regular file" if os.path.exists(explicit) else "does not exist"
            raise WeightsError(f"weights file {explicit} {what}")
        return explicit
    if os.path.lexists(model_dir):  # present, even if unreadable or a broken link: it was meant to be used
        return checkpoint_in(model_dir)
    if bundled.is_dir() and any(_is_checkpoint(p) for p in bundled.iterdir()):
        path = checkpoint_in(bundled)
        log.warning("no --weights and no %s: using the bundled demo weights %s", model_dir, path.name)
        return path
    raise WeightsError(f"no weights: {model_dir} does not exist and there are no bundled demo weights; pass "
                       f"--weights PATH, or upload a model tarball holding one {SUFFIX} checkpoint")
