"""Lay out one generated replica case the way grand-challenge mounts it at /input.

    python test/container/make_case.py --source DIR --case-dir test/cases/normal

`--source` is a folder written by `python -m training replica --cases 1` (public release layout:
`DIR/images/stacked_fetal_ultrasound/<uuid>.mha`). The case folder gets

    <case-dir>/input/images/stacked-fetal-ultrasound/<uuid>.mha
    <case-dir>/input/inputs.json
    <case-dir>/reference/<uuid>.mha      (the replica's annotation, when it wrote one; not mounted)

where inputs.json is a list of socket values like the one grand-challenge writes for a job (the
algorithm's input socket `stacked-fetal-ultrasound`, an Image socket with relative_path
`images/stacked-fetal-ultrasound`).
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import uuid
from pathlib import Path

SOURCE_IMAGES = Path("images") / "stacked_fetal_ultrasound"  # public release layout (training/layout.py)
SOURCE_MASKS = Path("masks") / "stacked_fetal_abdomen"
INPUT_SLUG = "stacked-fetal-ultrasound"
INPUT_RELATIVE_PATH = "images/stacked-fetal-ultrasound"


def inputs_json(image_name: str) -> list[dict]:
    """grand-challenge's /input/inputs.json for a job with one image input."""
    pk = 1000001
    return [
        {
            "pk": pk,
            "url": f"https://grand-challenge.org/components/component-interface-values/{pk}/",
            "file": None,
            "image": {"pk": str(uuid.uuid5(uuid.NAMESPACE_URL, image_name)), "name": image_name},
            "value": None,
            "interface": {
                "pk": 588,
                "title": "Stacked Fetal Ultrasound",
                "description": "Stacked blind-sweep fetal abdominal ultrasound frames",
                "slug": INPUT_SLUG,
                "kind": "Image",
                "super_kind": "Image",
                "relative_path": INPUT_RELATIVE_PATH,
                "default_value": None,
                "example_value": None,
            },
        }
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", type=Path, required=True, help="replica output folder (release layout)")
    parser.add_argument("--case-dir", type=Path, required=True, help="case folder to (re)create")
    args = parser.parse_args(argv)

    images = sorted((args.source / SOURCE_IMAGES).glob("*.mha"))
    if len(images) != 1:
        print(f"make_case: expected one .mha in {args.source / SOURCE_IMAGES}, found {len(images)}",
              file=sys.stderr)
        return 1
    image = images[0]
    if args.case_dir.exists():
        shutil.rmtree(args.case_dir)
    folder = args.case_dir / "input" / INPUT_RELATIVE_PATH
    folder.mkdir(parents=True)
    shutil.move(str(image), folder / image.name)
    truth = args.source / SOURCE_MASKS / image.name
    if truth.is_file():  # the reference annotation, kept next to (not inside) what is mounted at /input
        (args.case_dir / "reference").mkdir()
        shutil.move(str(truth), args.case_dir / "reference" / image.name)
    (args.case_dir / "input" / "inputs.json").write_text(json.dumps(inputs_json(image.name), indent=2) + "\n")
    print(f"make_case: {args.case_dir / 'input'} <- {image.name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
