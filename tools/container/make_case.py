"""Lay out one generated replica case the way grand-challenge mounts it at /input.

    python tools/container/make_case.py --source DIR --case-dir test/cases/normal

`--source` is a folder written by `python -m training replica --cases 1` (public release layout). The case
folder gets the image staged by `training.data.layout.stage_case` (moved into the input socket's folder, with an
inputs.json like the one grand-challenge writes for a job) under `<case-dir>/input/`, and the replica's
annotation, when it wrote one, under `<case-dir>/reference/` (not mounted).
"""
from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository, when run as a script

from training.data.layout import IMAGES_DIR, MASKS_DIR, stage_case  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", type=Path, required=True, help="replica output folder (release layout)")
    parser.add_argument("--case-dir", type=Path, required=True, help="case folder to (re)create")
    args = parser.parse_args(argv)

    images = sorted((args.source / IMAGES_DIR).glob("*.mha"))
    if len(images) != 1:
        print(f"make_case: expected one .mha in {args.source / IMAGES_DIR}, found {len(images)}",
              file=sys.stderr)
        return 1
    image = images[0]
    if args.case_dir.exists():
        shutil.rmtree(args.case_dir)
    stage_case(image, args.case_dir / "input", how="move")
    truth = args.source / MASKS_DIR / image.name
    if truth.is_file():  # the reference annotation, kept next to (not inside) what is mounted at /input
        (args.case_dir / "reference").mkdir()
        shutil.move(str(truth), args.case_dir / "reference" / image.name)
    print(f"make_case: {args.case_dir / 'input'} <- {image.name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
