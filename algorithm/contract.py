"""The grand-challenge contract: find and read the input stack, write the outputs atomically.

We do not use evalutils: it is retired (0.6 is an empty package) and its 0.4 algorithm classes cannot write
into nested output folders such as our mask's. The contract is small enough to own: one input socket, two
output sockets, named here and nowhere else.

Reading is bounded and confined. The socket folder and inputs.json must lie inside the input folder
(compared after resolving links, because on grand-challenge `/input` is itself a link to
`/opt/ml/input/data/<job>-input`); the image itself may be a symbolic link to a regular file anywhere: the
platform writes real files, so a link there was made by whoever staged the case, and following it is what
they asked for. A MetaImage's pixels come only from its own folder (metaimage.py). The header is read before
any pixel and checked against the caps and the geometry rules below, and pixel data shorter than its header
promises is an error, never uninitialised memory.
"""
from __future__ import annotations

import fcntl
import json
import logging
import os
import re
import tempfile
import threading
import uuid
import zlib
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np
import SimpleITK as sitk

from . import metaimage, signals
from .errors import InputError, OutputError

log = logging.getLogger("algorithm")

# The algorithm's sockets on grand-challenge: one image in, an image and a number out.
INPUT_SLUG = "stacked-fetal-ultrasound"
MASK_SLUG = "fetal-abdomen-segmentation"
FRAME_SLUG = "fetal-abdomen-frame-number"
INPUT_FOLDER = Path("images") / INPUT_SLUG  # the input image's folder under /input
INPUTS_JSON = "inputs.json"  # grand-challenge's listing of a job's socket values, in /input
OUTPUT_MASK = Path("images") / MASK_SLUG / "output.mha"
OUTPUT_FRAME = Path(f"{FRAME_SLUG}.json")
EXTRAS_DIR = Path("fetalclipseg")  # what we write for people, beside the sockets
OUR_OUTPUTS = (OUTPUT_MASK, OUTPUT_FRAME, EXTRAS_DIR / "result.json", EXTRAS_DIR / "chosen_frame.png")
IMAGE_SUFFIXES = (".mha", ".mhd", ".tif", ".tiff", ".nii", ".nii.gz")
ACCEPTED_FORMATS = ", ".join(IMAGE_SUFFIXES)  # how every message and document lists them
IMAGE_IOS = {".mha": "MetaImageIO", ".mhd": "MetaImageIO", ".tif": "TIFFImageIO", ".tiff": "TIFFImageIO",
             ".nii": "NiftiImageIO", ".nii.gz": "NiftiImageIO"}  # never let SimpleITK guess from the content

# Caps on what a header may claim, checked before any pixel is read. The challenge's stack is 840 frames of
# 562 x 744 uint8 pixels; each cap is at least four times what it needs.
CHALLENGE_VOXELS = 840 * 562 * 744
MAX_VOXELS = 4 * CHALLENGE_VOXELS  # 1,404,887,040 frame pixels (a 1.31 GiB uint8 stack)
MAX_FRAMES = 4 * 840
# Pixels, height or width of a frame. Frames are padded to a square of the longer side for the network, and
# preprocessing a batch of 2048-pixel squares alone takes 1.3 GiB: 1024 keeps any accepted stack below 3 GiB.
MAX_SIDE = 1024
MAX_ASPECT = 32  # longer side / shorter side of a frame
MAX_PIXEL_BYTES = 2 * 1024**3  # the decoded pixel data: voxels x channels x bytes per value
MAX_INPUTS_JSON_BYTES = 1024**2
MAX_FOLDER_ENTRIES = 10_000  # files looked at in the socket folder
# How far from orthonormal a direction matrix may be (largest entry of D D^T - I): MetaIO writes 6 significant
# digits, so a rotation read back is off by about 1e-6.
DIRECTION_TOLERANCE = 1e-3


def inputs_json(image_name: str) -> list[dict]:
    """What grand-challenge writes to /input/inputs.json for a job of ours: the one image socket value."""
    pk = 1000001
    return [{
        "pk": pk,
        "url": f"https://grand-challenge.org/components/component-interface-values/{pk}/",
        "file": None,
        "image": {"pk": str(uuid.uuid5(uuid.NAMESPACE_URL, image_name)), "name": image_name},
        "value": None,
        "interface": {"pk": 588, "title": "Stacked Fetal Ultrasound",
                      "description": "Stacked blind-sweep fetal abdominal ultrasound frames",
                      "slug": INPUT_SLUG, "kind": "Image", "super_kind": "Image",
                      "relative_path": str(INPUT_FOLDER), "default_value": None, "example_value": None},
    }]


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

def image_suffix(path: Path) -> str:
    name = path.name.lower()
    return next((s for s in sorted(IMAGE_SUFFIXES, key=len, reverse=True) if name.endswith(s)), "")


def is_image(path: Path) -> bool:
    return not path.name.startswith(".") and bool(image_suffix(path)) and path.is_file()


def not_regular(path: Path) -> str:
    """Why an image-named entry cannot be read: a link to a device, a FIFO or a folder, or a broken link."""
    if path.is_symlink():
        target = os.path.realpath(path)
        return f"a link to {target}, which is not a regular file" if os.path.exists(target) else \
            f"a broken link to {os.readlink(path)}"
    return "not a regular file"


def _inside(root: str, path: Path) -> bool:
    """Whether `path`, links resolved, lies in the resolved folder `root`."""
    resolved = os.path.realpath(path)
    return os.path.commonpath([root, resolved]) == root


def _folder_from_inputs_json(input_dir: Path, root: str) -> Path | None:
    """The image folder named by grand-challenge's inputs.json, or None when there is no such file.

    Refused (InputError): a file that is not small UTF-8 JSON, not a list, or whose entry for our socket does
    not name a folder inside the input folder (or names two). Entries that are not socket objects cannot be
    ours: they are ignored with a warning.
    """
    listing = input_dir / INPUTS_JSON
    if not os.path.lexists(listing):
        return None
    if not _inside(root, listing) or not listing.is_file():
        raise InputError(f"{listing}: not a regular file inside the input folder")
    try:
        with open(listing, "rb") as fh:
            raw = fh.read(MAX_INPUTS_JSON_BYTES + 1)
    except OSError as error:
        raise InputError(f"{listing}: cannot be read ({error.strerror or error})") from None
    if len(raw) > MAX_INPUTS_JSON_BYTES:
        raise InputError(f"{listing}: larger than {MAX_INPUTS_JSON_BYTES // 1024} KiB")
    try:
        sockets = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as error:  # RecursionError: nested absurdly deep
        reason = "nested too deeply" if isinstance(error, RecursionError) else str(error)[:120]
        raise InputError(f"{listing}: not valid JSON ({reason})") from None
    if not isinstance(sockets, list):
        raise InputError(f"{listing}: expected a list of socket values, got {type(sockets).__name__}")
    paths = []
    for index, socket in enumerate(sockets):
        interface = socket.get("interface") if isinstance(socket, dict) else None
        if not isinstance(interface, dict):
            log.warning("%s: entry %d is not a socket value (no 'interface' object); ignored", listing, index)
            continue
        if interface.get("slug") != INPUT_SLUG:
            continue
        relative = interface.get("relative_path", str(INPUT_FOLDER))
        if not isinstance(relative, str) or not relative.strip() or "\0" in relative:
            raise InputError(f"{listing}: socket '{INPUT_SLUG}' has relative_path {str(relative)[:60]!r}, "
                             "not a folder name")
        if os.path.isabs(relative):
            raise InputError(f"{listing}: socket '{INPUT_SLUG}' has an absolute relative_path "
                             f"{relative[:60]!r}; only folders inside the input folder are read")
        paths.append(relative)
    if not paths:
        raise InputError(f"{listing}: no socket '{INPUT_SLUG}'")
    if len({os.path.normpath(p) for p in paths}) > 1:
        raise InputError(f"{listing}: socket '{INPUT_SLUG}' appears {len(paths)} times with different folders")
    folder = input_dir / paths[0]
    if not _inside(root, folder):
        raise InputError(f"{listing}: socket '{INPUT_SLUG}' names {paths[0][:60]!r}, which lies outside the "
                         "input folder")
    return folder


def find_input_image(input_dir: Path) -> Path:
    """The one stacked-ultrasound image of a case folder laid out as grand-challenge mounts /input."""
    input_dir = Path(input_dir)
    if not input_dir.is_dir():
        raise InputError(f"input folder {input_dir} does not exist")
    root = os.path.realpath(input_dir)
    folder = _folder_from_inputs_json(input_dir, root)
    named_by_json = folder is not None
    folder = folder if named_by_json else input_dir / INPUT_FOLDER
    if not folder.is_dir():
        raise InputError(f"no image folder {folder}")
    if not _inside(root, folder):
        raise InputError(f"{folder} lies outside the input folder (a link to {os.path.realpath(folder)})")
    images, unreadable = [], []
    try:
        with os.scandir(folder) as entries:
            for count, entry in enumerate(entries):
                if count >= MAX_FOLDER_ENTRIES:
                    raise InputError(f"{folder} holds more than {MAX_FOLDER_ENTRIES} entries")
                path = Path(entry.path)
                if is_image(path):
                    images.append(path)
                elif image_suffix(path) and not path.name.startswith("."):
                    unreadable.append(path)
    except OSError as error:
        raise InputError(f"{folder}: cannot be listed ({error.strerror or error})") from None
    images.sort()
    if not images and unreadable:
        first = min(unreadable)
        raise InputError(f"{first}: {not_regular(first)}")
    if not images:
        raise InputError(f"no image ({ACCEPTED_FORMATS}) in {folder}")
    if len(images) > 1:
        names = ", ".join(p.name for p in images[:10]) + (", ..." if len(images) > 10 else "")
        where = "inputs.json names this folder but it" if named_by_json else "no inputs.json, and the folder"
        raise InputError(f"{folder}: {where} holds {len(images)} images ({names}); expected one")
    return images[0]


def check_caps(path: Path, size: tuple[int, ...], channels: int, itemsize: int) -> None:
    """Refuse, from the header alone, stacks that are empty, not 3-D or beyond the caps."""
    if len(size) != 3:
        raise InputError(f"{path}: expected a 3-D stack (frames, height, width), got a {len(size)}-D image of "
                         f"size {tuple(size)}")
    width, height, frames = size
    if min(size) == 0:
        raise InputError(f"{path}: empty image of size {tuple(size)}")
    voxels = width * height * frames
    problems = []
    if frames > MAX_FRAMES:
        problems.append(f"{frames} frames (at most {MAX_FRAMES})")
    if max(width, height) > MAX_SIDE:
        problems.append(f"frames of {height} x {width} px (sides at most {MAX_SIDE})")
    elif max(width, height) > MAX_ASPECT * min(width, height):
        problems.append(f"frames of {height} x {width} px (aspect ratio at most {MAX_ASPECT}:1)")
    if voxels > MAX_VOXELS:
        problems.append(f"{voxels:,} voxels (at most {MAX_VOXELS:,})")
    elif voxels * channels * itemsize > MAX_PIXEL_BYTES:
        problems.append(f"{voxels * channels * itemsize / 2**30:.1f} GiB of pixel data ({channels} x {itemsize}-byte "
                        f"values per voxel; at most {MAX_PIXEL_BYTES / 2**30:.0f} GiB)")
    if problems:
        raise InputError(f"{path}: refused: " + "; ".join(problems))


def check_geometry(path: Path, spacing: Iterable[float], origin: Iterable[float],
                   direction: Iterable[float]) -> None:
    """Refuse, from the header alone, geometry that the output socket cannot repeat: spacing that is not
    finite and positive, an origin that is not finite, a direction that is not an orthonormal matrix. Found
    here, not by the writer after minutes of inference."""
    spacing, origin, direction = (np.asarray(tuple(values), dtype=np.float64) for values in (spacing, origin,
                                                                                             direction))
    if not (np.isfinite(spacing).all() and (spacing > 0).all()):
        raise InputError(f"{path}: refused: spacing {_numbers(spacing)} (each value must be finite and positive)")
    if not np.isfinite(origin).all():
        raise InputError(f"{path}: refused: origin {_numbers(origin)} is not finite")
    side = int(round(np.sqrt(direction.size)))
    if side * side != direction.size or not np.isfinite(direction).all() or \
            np.abs(direction.reshape(side, side) @ direction.reshape(side, side).T - np.eye(side)).max() \
            > DIRECTION_TOLERANCE:
        raise InputError(f"{path}: refused: direction {_numbers(direction)} is not an orthonormal matrix")


def _numbers(values: np.ndarray) -> str:
    return "(" + ", ".join(f"{value:g}" for value in values) + ")"


def _grey_blocks(blocks: Iterable[tuple[int, np.ndarray]], channels: int) -> Iterator[tuple[int, np.ndarray]]:
    for start, block in blocks:
        yield start, (vector_to_grey(block) if channels > 1 else block)


def _rescale_blocks(blocks: Callable[[], Iterable[tuple[int, np.ndarray]]], shape: tuple[int, ...],
                    dtype: np.dtype) -> tuple[np.ndarray, str]:
    """Grey levels of any numeric dtype, given twice as (start, frames) blocks -> a uint8 stack.

    Values already inside [0, 255] are kept (rounded); wider ranges are rescaled linearly from their
    finite min..max; NaN and infinities become 0.
    """
    low, high = np.inf, -np.inf
    for _, block in blocks():
        finite = block[np.isfinite(block)] if np.issubdtype(block.dtype, np.floating) else block
        if finite.size:
            low, high = min(low, float(finite.min())), max(high, float(finite.max()))
    if not np.isfinite(low):
        return np.zeros(shape, dtype=np.uint8), f"{dtype} pixels with no finite value: all zero"
    keep = low >= 0 and high <= 255
    offset = 0.0 if keep else low
    # Halves keep the span finite for any finite range (float64 extremes overflow `high - low`); 64-bit inputs
    # are worked in float64 so their finite extremes do not become float32 infinities.
    half_span = 0.0 if keep else high / 2 - low / 2
    work = np.float64 if dtype.itemsize > 4 else np.float32
    out = np.empty(shape, dtype=np.uint8)
    for start, block in blocks():
        block = block.astype(work)
        block = np.nan_to_num(block, nan=offset, posinf=offset, neginf=offset)
        if half_span > 0:
            block = (block / 2 - offset / 2) / half_span * 255.0
        elif not keep:  # one value, outside 0..255
            block = np.zeros_like(block)
        out[start:start + len(block)] = np.clip(np.rint(block), 0, 255).astype(np.uint8)
    how = "kept" if keep else f"rescaled from [{low:g}, {high:g}]"
    return out, f"{dtype} pixels {how} to uint8"


def to_uint8(array: np.ndarray, chunk: int = 32) -> tuple[np.ndarray, str]:
    """Grey levels of any numeric dtype -> uint8, frame chunk by frame chunk (no float copy of the stack).

    Values already inside [0, 255] are kept (rounded); wider ranges are rescaled linearly from their
    finite min..max; NaN and infinities become 0.
    """
    if array.dtype == np.uint8:
        return array, ""
    if array.dtype == np.bool_:
        return array.astype(np.uint8) * 255, "boolean pixels mapped to 0/255"
    return _rescale_blocks(lambda: ((s, array[s:s + chunk]) for s in range(0, len(array), chunk)),
                           array.shape, array.dtype)


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


def _stack_from_blocks(blocks: Callable[[], Iterable[tuple[int, np.ndarray]]], shape: tuple[int, int, int],
                       dtype: np.dtype, channels: int) -> tuple[np.ndarray, str]:
    """The uint8 stack from (start, frames) blocks: one pass for uint8, two (range, then convert) otherwise."""
    notes = [f"{channels}-component pixels averaged to grey"] if channels > 1 else []
    if dtype == np.uint8:
        out = np.empty(shape, dtype=np.uint8)
        for start, block in _grey_blocks(blocks(), channels):
            out[start:start + len(block)] = block
        return out, "; ".join(notes)
    grey_dtype = dtype if channels == 1 or np.issubdtype(dtype, np.integer) else np.dtype(np.float32)
    out, conversion = _rescale_blocks(lambda: _grey_blocks(blocks(), channels), shape, grey_dtype)
    return out, "; ".join(notes + [conversion])


def _geometry(path: Path, io_name: str) -> sitk.ImageFileReader:
    """SimpleITK's reading of the header alone (no pixel is read), with the format fixed by the suffix."""
    reader = sitk.ImageFileReader()
    reader.SetImageIO(io_name)
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError as error:
        raise InputError(f"{path}: cannot be read as an image ({_sitk_reason(error)})") from None
    return reader


def _sitk_reason(error: Exception) -> str:
    text = str(error).strip()
    return (text.splitlines()[-1] if text else "unreadable")[:200]


def _metaimage_input_error(path: Path, error: metaimage.MetaImageError) -> InputError:
    if isinstance(error, metaimage.MetaImageRefused):
        return InputError(f"{path}: refused: {error}")
    return InputError(f"{path}: cannot be read as an image ({error})")


def _read_metaimage(path: Path) -> tuple[np.ndarray, str, sitk.ImageFileReader]:
    try:
        header = metaimage.read_header(path)
    except metaimage.MetaImageError as error:
        raise _metaimage_input_error(path, error) from None
    check_caps(path, header.size, header.channels, header.dtype.itemsize)
    reader = _geometry(path, "MetaImageIO")
    check_geometry(path, reader.GetSpacing(), reader.GetOrigin(), reader.GetDirection())
    if tuple(reader.GetSize()) != header.size or reader.GetNumberOfComponents() != header.channels:
        raise InputError(f"{path}: header read two ways: size {header.size} x {header.channels} here, "
                         f"{reader.GetSize()} x {reader.GetNumberOfComponents()} by SimpleITK")
    width, height, frames = header.size
    try:
        array, note = _stack_from_blocks(lambda: metaimage.frame_blocks(header), (frames, height, width),
                                         header.dtype.newbyteorder("="), header.channels)
    except metaimage.MetaImageError as error:
        raise _metaimage_input_error(path, error) from None
    return array, note, reader


def _nifti_data_end(path: Path, data_bytes: int) -> int:
    """Where the pixels of a one-file NIfTI (.nii, .nii.gz) end: vox_offset + `data_bytes`."""
    import gzip
    import struct

    opener = gzip.open if path.name.lower().endswith(".gz") else open
    with opener(path, "rb") as fh:
        head = fh.read(544)
    for order in "<>":
        if len(head) >= 348 and struct.unpack(order + "i", head[:4])[0] == 348:  # NIfTI-1
            magic, offset = head[344:348], struct.unpack(order + "f", head[108:112])[0]
            break
        if len(head) >= 544 and struct.unpack(order + "i", head[:4])[0] == 540:  # NIfTI-2
            magic, offset = head[4:8], struct.unpack(order + "q", head[168:176])[0]
            break
    else:
        raise InputError(f"{path}: not a NIfTI header")
    if not magic.startswith((b"n+1", b"n+2")):
        raise InputError(f"{path}: a two-file NIfTI (header and .img): only one-file .nii / .nii.gz is read")
    if not 0 <= offset < 2**40:
        raise InputError(f"{path}: NIfTI vox_offset {offset} is not a file position")
    return int(offset) + data_bytes


def _check_nifti_length(path: Path, data_bytes: int) -> None:
    """A NIfTI shorter than its header promises is refused (SimpleITK would fill the rest with zeros)."""
    import gzip
    import zlib

    end = _nifti_data_end(path, data_bytes)
    if not path.name.lower().endswith(".gz"):
        length = path.stat().st_size
    else:
        length = 0
        try:
            with gzip.open(path, "rb") as fh:
                while length < end and (piece := fh.read(metaimage.BLOCK_BYTES)):
                    length += len(piece)
        except (OSError, EOFError, zlib.error) as error:
            raise InputError(f"{path}: compressed payload is corrupt or truncated ({error})") from None
    if length < end:
        raise InputError(f"{path}: payload shorter than the header promises: {length} of {end} bytes")


def _read_with_sitk(path: Path, io_name: str) -> tuple[np.ndarray, str, sitk.ImageFileReader]:
    reader = _geometry(path, io_name)
    size, channels = tuple(reader.GetSize()), reader.GetNumberOfComponents()
    itemsize = _itemsize(reader)
    check_caps(path, size, channels, itemsize)
    check_geometry(path, reader.GetSpacing(), reader.GetOrigin(), reader.GetDirection())
    if io_name == "NiftiImageIO":
        _check_nifti_length(path, int(np.prod(size, dtype=object)) * channels * itemsize)
    try:
        image = reader.Execute()
    except RuntimeError as error:
        raise InputError(f"{path}: cannot be read as an image ({_sitk_reason(error)})") from None
    view = sitk.GetArrayViewFromImage(image)  # no copy: converted block by block into the uint8 stack
    frames = len(view)
    array, note = _stack_from_blocks(lambda: ((s, view[s:s + 32]) for s in range(0, frames, 32)),
                                     view.shape[:3], view.dtype, channels)
    del view, image
    return array, note, reader


def _itemsize(reader: sitk.ImageFileReader) -> int:
    """Bytes per value of the pixel type SimpleITK will allocate for this file."""
    probe = sitk.Image([1] * reader.GetDimension(), reader.GetPixelID(), reader.GetNumberOfComponents())
    return sitk.GetArrayViewFromImage(probe).dtype.itemsize


def read_stack(path: Path) -> Stack:
    """Read a 3-D grey (or RGB) stack as (frames, height, width) uint8, header first (see the module doc)."""
    path = Path(path)
    suffix = image_suffix(path)
    if suffix not in IMAGE_IOS:
        raise InputError(f"{path}: not an image file this algorithm reads ({ACCEPTED_FORMATS})")
    try:
        if IMAGE_IOS[suffix] == "MetaImageIO":
            array, note, reader = _read_metaimage(path)
        else:
            array, note, reader = _read_with_sitk(path, IMAGE_IOS[suffix])
    except MemoryError:
        raise InputError(f"{path}: not enough memory to read this image") from None
    except OSError as error:
        raise InputError(f"{path}: cannot be read ({error.strerror or error})") from None
    return Stack(array=array, path=path, note=note, spacing=reader.GetSpacing(), origin=reader.GetOrigin(),
                 direction=reader.GetDirection())


# --------------------------------------------------------------------------------------------- output

def mask_stack_image(stack: Stack, frame: int, mask: np.ndarray | None) -> sitk.Image:
    """The output socket's image in memory: zeros of the input's shape, `mask` on `frame` only, input geometry.

    The socket itself is written by `write_mask`, which never holds the whole volume; this is for callers
    that want the image object.
    """
    frames, height, width = stack.shape
    image = sitk.Image([width, height, frames], sitk.sitkUInt8)
    if frame >= 0 and mask is not None:
        image[:, :, int(frame)] = sitk.GetImageFromArray((np.asarray(mask) > 0).astype(np.uint8))
    image.SetSpacing(stack.spacing)
    image.SetOrigin(stack.origin)
    image.SetDirection(stack.direction)
    return image


def _metaimage_header(stack: Stack, compressed_size: int) -> bytes:
    """The header SimpleITK writes for an image of the stack's geometry (a one-voxel probe written to a
    temporary folder), with the stack's size and our compressed payload's size filled in."""
    probe = sitk.Image([1, 1, 1], sitk.sitkUInt8)
    probe.SetSpacing(stack.spacing)
    probe.SetOrigin(stack.origin)
    probe.SetDirection(stack.direction)
    with tempfile.TemporaryDirectory(prefix="fetalclipseg-") as folder:
        sitk.WriteImage(probe, str(Path(folder) / "probe.mha"), useCompression=True)
        text = (Path(folder) / "probe.mha").read_bytes()
    head = text[:text.index(b"ElementDataFile = LOCAL\n") + len(b"ElementDataFile = LOCAL\n")].decode("ascii")
    frames, height, width = stack.shape
    head = re.sub(r"(?m)^DimSize = .*$", f"DimSize = {width} {height} {frames}", head)
    head = re.sub(r"(?m)^CompressedDataSize = .*$", f"CompressedDataSize = {compressed_size}", head)
    if f"CompressedDataSize = {compressed_size}\n" not in head or "CompressedData = True\n" not in head:
        raise RuntimeError("unexpected MetaImage header from SimpleITK: " + head[:300])
    return head.encode("ascii")


def write_mask(path: Path, stack: Stack, frame: int, mask: np.ndarray | None) -> None:
    """The output socket (`mask_stack_image` as a compressed .mha) streamed frame by frame.

    SimpleITK would need the whole zero volume in memory (1.3 GiB at the input caps) to write a few hundred
    KiB of compressed zeros; here zlib compresses frame by frame, as MetaIO does (one zlib stream after a
    header that SimpleITK itself wrote), so the file reads back identically in SimpleITK.
    """
    frames, height, width = stack.shape
    zeros = bytes(height * width)
    chosen = (np.asarray(mask) > 0).astype(np.uint8).tobytes() if frame >= 0 and mask is not None else zeros
    if len(chosen) != len(zeros):
        raise ValueError(f"mask of shape {np.shape(mask)} for frames of {height} x {width}")
    deflate = zlib.compressobj()
    payload = [deflate.compress(chosen if index == frame else zeros) for index in range(frames)]
    payload.append(deflate.flush())
    with open(path, "wb") as fh:
        fh.write(_metaimage_header(stack, sum(len(piece) for piece in payload)))
        fh.writelines(payload)


# Staged files of ours (see OutputTransaction.stage) and write probes, left by a run that was killed.
_LEFTOVER = re.compile(r"^\.(?:[\w-]+\.[0-9a-f]{8}\.partial.*|write-probe-[0-9a-f]{8})$")
_held_locks: dict[str, tuple[int, int, int]] = {}  # resolved folder -> (fd, depth, owning thread)
_held_guard = threading.Lock()


@contextmanager
def output_lock(output_dir: Path) -> Iterator[None]:
    """Exclusive use of an output folder by this run (re-entrant in the thread that holds it).

    An advisory lock (flock) on the folder itself, so no lock file is ever left behind; it ends with the
    process however it ends. A second run into the same folder gets an OutputError (exit 4) at once. The CLI
    holds it from start to end; `write_outputs` takes it too, so an in-process server calling `predict_case`
    is covered without doing anything.
    """
    key = os.path.realpath(output_dir)
    me = threading.get_ident()
    with _held_guard:
        held = _held_locks.get(key)
        if held is not None and held[2] != me:
            raise OutputError(f"another thread of this process is writing into {output_dir}")
        if held is None:
            try:
                fd = os.open(key, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            except OSError as error:
                raise OutputError(f"output folder {output_dir} cannot be opened: {error.strerror or error}") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                os.close(fd)
                raise OutputError(f"another run is writing into {output_dir}; wait for it to end or choose "
                                  "another output folder") from None
            held = (fd, 0, me)
        _held_locks[key] = (held[0], held[1] + 1, me)
    try:
        yield
    finally:
        with _held_guard:
            fd, depth, _ = _held_locks[key]
            if depth == 1:
                del _held_locks[key]
                os.close(fd)
            else:
                _held_locks[key] = (fd, depth - 1, me)


class OutputTransaction:
    """Stage files under temporary names next to their targets; rename them all only on success.

    A crash or an exception leaves no half-written output: staged files are deleted, and a rename within
    one folder is atomic. Commit and abort run with SIGTERM / SIGINT held back (signals.deferred), so a
    signal cannot leave one socket committed without the other, nor staged files behind. Commit also removes
    what an earlier run of ours left in the folder and this run did not write (e.g. result.json after a run
    with --no-extras), so the folder describes one run.
    """

    def __init__(self, output_dir: Path, ours: Iterable[Path] = OUR_OUTPUTS):
        self.output_dir = Path(output_dir)
        self.ours = tuple(ours)
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
        with signals.deferred():
            for temporary, target in self._staged:
                os.replace(temporary, target)
            written = [target for _, target in self._staged]
            self._staged.clear()
            self._remove_stale(set(written))
        return written

    def abort(self) -> None:
        with signals.deferred():
            for temporary, _ in self._staged:
                temporary.unlink(missing_ok=True)
            self._staged.clear()

    def _remove_stale(self, written: set[Path]) -> None:
        remove_outputs(self.output_dir, keep=written, ours=self.ours)


def remove_outputs(output_dir: Path, keep: Iterable[Path] = (), ours: Iterable[Path] = OUR_OUTPUTS) -> None:
    """Remove the files of ours an earlier run left in `output_dir` (outputs, staged temporaries, probes).

    Nothing else in the folder is touched; `keep` holds the paths the current run has just committed.
    """
    keep = set(keep)
    ours = tuple(ours)
    try:
        for relative in ours:
            path = output_dir / relative
            if path not in keep and (path.is_file() or path.is_symlink()):
                path.unlink(missing_ok=True)
        for folder in {(output_dir / relative).parent for relative in ours}:
            if not folder.is_dir():
                continue
            for entry in folder.iterdir():
                if _LEFTOVER.match(entry.name) and entry.is_file():
                    entry.unlink(missing_ok=True)
            if folder != output_dir and not any(folder.iterdir()):
                try:
                    folder.rmdir()
                except OSError:
                    pass
    except OSError as error:
        raise OutputError(f"cannot remove an earlier output in {output_dir}: {error.strerror or error}") from None


def check_writable(output_dir: Path) -> None:
    """Fail before minutes of inference, not after, when the output folder cannot be written."""
    output_dir = Path(output_dir)
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        probe = output_dir / f".write-probe-{uuid.uuid4().hex[:8]}"
        probe.write_bytes(b"")
        probe.unlink(missing_ok=True)  # a concurrent run's clean-up may have taken it already
    except OSError as error:
        raise OutputError(f"output folder {output_dir} is not writable: {error.strerror or error}") from None


def write_outputs(output_dir: Path, stack: Stack, frame: int, mask: np.ndarray | None,
                  extras: dict[Path, Callable[[Path], None]] | None = None) -> list[Path]:
    """Write both output sockets (and optional extra files) atomically; returns the written paths.

    Holds the output folder's lock while it writes (see `output_lock`).
    """
    check_writable(output_dir)
    with output_lock(output_dir):
        transaction = OutputTransaction(output_dir)
        try:
            transaction.stage(OUTPUT_MASK, lambda path: write_mask(path, stack, frame, mask))
            transaction.stage_json(OUTPUT_FRAME, int(frame))
            for relative, write in (extras or {}).items():
                transaction.stage(relative, write)
            return transaction.commit()
        except BaseException:
            transaction.abort()
            raise
