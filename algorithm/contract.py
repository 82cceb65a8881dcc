"""The grand-challenge contract: find and read the input stack, write the outputs atomically.

We do not use evalutils: it is retired (0.6 is an empty package) and its 0.4 algorithm classes cannot write
into nested output folders such as `images/fetal-abdomen-segmentation/`. The contract is small enough to
own: one input socket, two output sockets.
"""
from __future__ import annotations

import json
import os
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import SimpleITK as sitk

from .errors import InputError, OutputError

INPUT_SLUG = "stacked-fetal-ultrasound"
INPUT_FOLDER = Path("images") / INPUT_SLUG
OUTPUT_MASK = Path("images") / "fetal-abdomen-segmentation" / "output.mha"
OUTPUT_FRAME = Path("fetal-abdomen-frame-number.json")
IMAGE_SUFFIXES = (".mha", ".mhd", ".tif", ".tiff", ".nii", ".nii.gz")


@dataclass
class Stack:
    """A (frames, height, width) uint8 stack with the geometry its outputs must repeat."""

    array: np.ndarray
    spacing: tuple[float, ...]
    origin: tuple[float, ...]
    direction: tuple[float, ...]
    path: Path
    note: str = ""  # how the pixels were converted, if they were

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.array.shape)  # type: ignore[return-value]


# ---------------------------------------------------------------------------------------------- input

def _is_image(path: Path) -> bool:
    name = path.name.lower()
    return path.is_file() and not name.startswith(".") and name.endswith(IMAGE_SUFFIXES)


def _folder_from_inputs_json(input_dir: Path) -> Path | None:
    """The image folder named by grand-challenge's inputs.json, or None when there is no such file."""
    listing = input_dir / "inputs.json"
    if not listing.is_file():
        return None
    try:
        sockets = json.loads(listing.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise InputError(f"{listing}: not valid JSON ({error})") from None
    if not isinstance(sockets, list):
        raise InputError(f"{listing}: expected a list of socket values")
    for socket in sockets:
        interface = socket.get("interface", {}) if isinstance(socket, dict) else {}
        if isinstance(interface, dict) and interface.get("slug") == INPUT_SLUG:
            return input_dir / interface.get("relative_path", str(INPUT_FOLDER))
    raise InputError(f"{listing}: no socket '{INPUT_SLUG}'")


def find_input_image(input_dir: Path) -> Path:
    """The one stacked-ultrasound image of a case folder laid out as grand-challenge mounts /input."""
    input_dir = Path(input_dir)
    if not input_dir.is_dir():
        raise InputError(f"input folder {input_dir} does not exist")
    folder = _folder_from_inputs_json(input_dir)
    named_by_json = folder is not None
    folder = folder if named_by_json else input_dir / INPUT_FOLDER
    if not folder.is_dir():
        raise InputError(f"no image folder {folder}")
    images = sorted(p for p in folder.iterdir() if _is_image(p))
    if not images:
        raise InputError(f"no image (.mha or .tif) in {folder}")
    if len(images) > 1:
        names = ", ".join(p.name for p in images)
        where = "inputs.json names this folder but it" if named_by_json else "no inputs.json, and the folder"
        raise InputError(f"{folder}: {where} holds {len(images)} images ({names}); expected one")
    return images[0]


def to_uint8(array: np.ndarray, chunk: int = 32) -> tuple[np.ndarray, str]:
    """Grey levels of any numeric dtype -> uint8, frame chunk by frame chunk (no float copy of the stack).

    Values already inside [0, 255] are kept (rounded); wider ranges are rescaled linearly from their
    finite min..max; NaN and infinities become 0.
    """
    if array.dtype == np.uint8:
        return array, ""
    if array.dtype == np.bool_:
        return array.astype(np.uint8) * 255, "boolean pixels mapped to 0/255"
    low, high = np.inf, -np.inf
    for start in range(0, len(array), chunk):
        block = array[start:start + chunk]
        finite = block[np.isfinite(block)] if np.issubdtype(block.dtype, np.floating) else block
        if finite.size:
            low, high = min(low, float(finite.min())), max(high, float(finite.max()))
    if not np.isfinite(low):
        return np.zeros(array.shape, dtype=np.uint8), f"{array.dtype} pixels with no finite value: all zero"
    keep = low >= 0 and high <= 255
    offset = 0.0 if keep else low
    # Halves keep the span finite for any finite range (float64 extremes overflow `high - low`); 64-bit inputs
    # are worked in float64 so their finite extremes do not become float32 infinities.
    half_span = 0.0 if keep else high / 2 - low / 2
    work = np.float64 if array.dtype.itemsize > 4 else np.float32
    out = np.empty(array.shape, dtype=np.uint8)
    for start in range(0, len(array), chunk):
        block = array[start:start + chunk].astype(work)
        block = np.nan_to_num(block, nan=offset, posinf=offset, neginf=offset)
        if half_span > 0:
            block = (block / 2 - offset / 2) / half_span * 255.0
        elif not keep:  # one value, outside 0..255
            block = np.zeros_like(block)
        out[start:start + chunk] = np.clip(np.rint(block), 0, 255).astype(np.uint8)
    how = "kept" if keep else f"rescaled from [{low:g}, {high:g}]"
    return out, f"{array.dtype} pixels {how} to uint8"


def vector_to_grey(array: np.ndarray, chunk: int = 32) -> np.ndarray:
    """(Z, H, W, C) colour pixels -> (Z, H, W) grey: the mean of the first three channels (alpha ignored).

    Integer pixels stay integer (rounded) so an RGB uint8 export costs no float copy of the stack.
    """
    channels = array[..., :3]
    dtype = array.dtype if np.issubdtype(array.dtype, np.integer) else np.float32
    grey = np.empty(array.shape[:3], dtype=dtype)
    for start in range(0, len(array), chunk):
        mean = channels[start:start + chunk].mean(axis=-1, dtype=np.float32)
        grey[start:start + chunk] = np.rint(mean) if np.issubdtype(dtype, np.integer) else mean
    return grey


def read_stack(path: Path) -> Stack:
    """Read a 3-D grey (or RGB) stack as (frames, height, width) uint8."""
    path = Path(path)
    try:
        image = sitk.ReadImage(str(path))
    except RuntimeError as error:
        reason = str(error).strip().splitlines()[-1] if str(error).strip() else "unreadable"
        raise InputError(f"{path}: cannot be read as an image ({reason[:200]})") from None
    if image.GetDimension() != 3:
        raise InputError(f"{path}: expected a 3-D stack (frames, height, width), got a "
                         f"{image.GetDimension()}-D image of size {image.GetSize()}")
    if min(image.GetSize()) == 0:
        raise InputError(f"{path}: empty image of size {image.GetSize()}")
    channels = image.GetNumberOfComponentsPerPixel()
    array = sitk.GetArrayFromImage(image)
    geometry = dict(spacing=image.GetSpacing(), origin=image.GetOrigin(), direction=image.GetDirection())
    del image
    notes = []
    if channels > 1:
        array = vector_to_grey(array)
        notes.append(f"{channels}-component pixels averaged to grey")
    array, conversion = to_uint8(array)
    notes.append(conversion)
    return Stack(array=array, path=path, note="; ".join(n for n in notes if n), **geometry)


# --------------------------------------------------------------------------------------------- output

def mask_stack_image(stack: Stack, frame: int, mask: np.ndarray | None) -> sitk.Image:
    """The output socket's image: zeros of the input's shape, `mask` on `frame` only, input geometry."""
    volume = np.zeros(stack.shape, dtype=np.uint8)
    if frame >= 0 and mask is not None:
        volume[frame] = (mask > 0).astype(np.uint8)
    image = sitk.GetImageFromArray(volume)
    image.SetSpacing(stack.spacing)
    image.SetOrigin(stack.origin)
    image.SetDirection(stack.direction)
    return image


class OutputTransaction:
    """Stage files under temporary names next to their targets; rename them all only on success.

    A crash or an exception leaves no half-written output: staged files are deleted, and a rename within
    one folder is atomic.
    """

    def __init__(self, output_dir: Path):
        self.output_dir = Path(output_dir)
        self._staged: list[tuple[Path, Path]] = []
        self._token = uuid.uuid4().hex[:8]

    def stage(self, relative: Path, write: Callable[[Path], None]) -> None:
        target = self.output_dir / relative
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            # Keep the real suffix last: SimpleITK and OpenCV pick the format from it.
            temporary = target.with_name(f".{target.stem}.{self._token}.partial{''.join(target.suffixes)}")
            self._staged.append((temporary, target))
            write(temporary)
        except OSError as error:
            raise OutputError(f"cannot write {target}: {error.strerror or error}") from None
        except RuntimeError as error:  # SimpleITK writer
            raise OutputError(f"cannot write {target}: {str(error).strip().splitlines()[-1][:200]}") from None

    def stage_json(self, relative: Path, value: object) -> None:
        self.stage(relative, lambda path: path.write_text(json.dumps(value, indent=2) + "\n"))

    def commit(self) -> list[Path]:
        for temporary, target in self._staged:
            os.replace(temporary, target)
        written = [target for _, target in self._staged]
        self._staged.clear()
        return written

    def abort(self) -> None:
        for temporary, _ in self._staged:
            temporary.unlink(missing_ok=True)
        self._staged.clear()


def check_writable(output_dir: Path) -> None:
    """Fail before minutes of inference, not after, when the output folder cannot be written."""
    output_dir = Path(output_dir)
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        probe = output_dir / f".write-probe-{uuid.uuid4().hex[:8]}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as error:
        raise OutputError(f"output folder {output_dir} is not writable: {error.strerror or error}") from None


def write_outputs(output_dir: Path, stack: Stack, frame: int, mask: np.ndarray | None,
                  extras: dict[Path, Callable[[Path], None]] | None = None) -> list[Path]:
    """Write both output sockets (and optional extra files) atomically; returns the written paths."""
    transaction = OutputTransaction(output_dir)
    try:
        image = mask_stack_image(stack, frame, mask)
        transaction.stage(OUTPUT_MASK, lambda path: sitk.WriteImage(image, str(path), useCompression=True))
        transaction.stage_json(OUTPUT_FRAME, int(frame))
        for relative, write in (extras or {}).items():
            transaction.stage(relative, write)
        return transaction.commit()
    except BaseException:
        transaction.abort()
        raise
