"""What `--input` may name: a grand-challenge case folder, one image file, or a dataset in the release layout.

Grand-challenge mounts one case as `/input/images/stacked-fetal-ultrasound/<image>` (hyphens), often with an
`inputs.json`; that layout is read exactly as the platform defines it (contract.find_input_image). People
hold the public release instead (Zenodo 12697994, and our replica): every case of a dataset in one folder,
`images/stacked_fetal_ultrasound/<uuid>.mha` (underscores). Those two, and a single image file, are all a
participant needs to run the algorithm on what they have, without staging anything.
"""
from __future__ import annotations

from pathlib import Path

from .contract import (ACCEPTED_FORMATS, INPUT_FOLDER, INPUTS_JSON, find_input_image, image_suffix, is_image,
                       not_regular)
from .errors import InputError

# The public release's image folder (masks/ and circumferences/ beside it hold the reference).
RELEASE_IMAGE_FOLDER = Path("images") / "stacked_fetal_ultrasound"


def is_dataset(path: Path) -> bool:
    """A release-layout folder: it has the release's image folder and is not a grand-challenge case folder."""
    path = Path(path)
    return ((path / RELEASE_IMAGE_FOLDER).is_dir() and not (path / INPUT_FOLDER).exists()
            and not (path / INPUTS_JSON).exists())


def case_name(image: Path) -> str:
    """A case's name: its image's file name without the image suffix (`<uuid>` for `<uuid>.nii.gz`)."""
    name, suffix = Path(image).name, image_suffix(Path(image))
    return name[: len(name) - len(suffix)] if suffix else Path(image).stem


def image_file(path: Path) -> Path:
    """`path` itself when it is an image file we read; InputError naming what it is otherwise."""
    path = Path(path)
    if not path.exists():
        if path.is_symlink():
            raise InputError(f"{path}: {not_regular(path)}")
        raise InputError(f"input image {path} does not exist")
    if not image_suffix(path):
        raise InputError(f"{path}: not an image file this algorithm reads ({ACCEPTED_FORMATS})")
    if not path.is_file():
        raise InputError(f"{path}: {not_regular(path)}")
    return path


def case_image(path: Path) -> Path:
    """The image of one case: `path` when it names an image file, else the one image of the case folder."""
    path = Path(path)
    if path.is_dir() or not (path.exists() or image_suffix(path)):
        return find_input_image(path)  # a folder, or nothing at all: the grand-challenge case's messages
    return image_file(path)


def dataset_images(folder: Path) -> list[Path]:
    """Every case image of a release-layout folder, sorted; InputError when there is none or two share a name.

    Entries that are named like images but are not regular files stay in the list: reading them fails as
    that case's error, not the whole run's.
    """
    images_dir = Path(folder) / RELEASE_IMAGE_FOLDER
    try:
        images = sorted(p for p in images_dir.iterdir() if not p.name.startswith(".") and image_suffix(p))
    except OSError as error:
        raise InputError(f"{images_dir}: cannot be listed ({error.strerror or error})") from None
    if not any(is_image(p) for p in images):
        raise InputError(f"no image ({ACCEPTED_FORMATS}) in {images_dir}")
    seen: dict[str, Path] = {}
    for image in images:
        name = case_name(image)
        if name in seen:
            raise InputError(f"{images_dir}: two images for case {name} ({seen[name].name}, {image.name})")
        seen[name] = image
    return images
