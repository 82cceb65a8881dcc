"""MetaImage (.mha / .mhd) read by us: a bounded header parse, and pixels decoded only from the file it names.

SimpleITK (MetaIO) trusts the header: it allocates what `DimSize` claims before reading, leaves the rest of
that buffer uninitialised when a compressed payload is short, and reads whatever `ElementDataFile` names
(an absolute path, `../x`, `/dev/urandom`, a `LIST` of files, a `%d` pattern). So the header is parsed
here the way MetaIO parses it (`name = value` lines, `=` or `:` as separator, names case-sensitive, the
header ends at `ElementDataFile`), the data file is confined to the image's own folder, and the pixels are
streamed out of exactly that file, frame block by frame block, with their length checked: a payload
shorter (or longer) than the header promises is an error, never uninitialised memory. Geometry (spacing,
origin, direction) is still SimpleITK's, read from the header alone; its fields are checked here first,
because MetaIO reads `nan` or a word as 0 and would hand over an origin the file never had.
"""
from __future__ import annotations

import math
import os
import stat
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

HEADER_BYTES = 64 * 1024  # MetaIO headers are a few hundred bytes
LINE_LIMIT = 499  # MetaIO reads at most this many characters of a name or value
READ_BYTES = 1 << 20  # compressed input read per step
BLOCK_BYTES = 32 << 20  # decoded pixels handed out per step (whole frames; at least one)

# MetaIO's element types and their sizes (metaTypes.h: MET_LONG is 32-bit).
ELEMENT_TYPES = {
    "MET_CHAR": "i1", "MET_UCHAR": "u1", "MET_SHORT": "i2", "MET_USHORT": "u2", "MET_INT": "i4",
    "MET_UINT": "u4", "MET_LONG": "i4", "MET_ULONG": "u4", "MET_LONG_LONG": "i8", "MET_ULONG_LONG": "u8",
    "MET_FLOAT": "f4", "MET_DOUBLE": "f8",
}
LOCAL = ("LOCAL", "Local", "local")  # the spellings MetaIO takes for "pixels follow the header"
# Geometry fields (MetaIO's synonyms included): every value a finite number; spacing and size also positive.
POSITIVE_FIELDS = ("ElementSpacing", "ElementSize")
FINITE_FIELDS = ("Offset", "Origin", "Position", "CenterOfRotation", "TransformMatrix", "Rotation", "Orientation")
FIELDS = ("ObjectType", "NDims", "DimSize", "ElementType", "ElementNumberOfChannels", "CompressedData",
          "CompressedDataSize", "BinaryData", "BinaryDataByteOrderMSB", "ElementByteOrderMSB", "HeaderSize",
          "ElementDataFile") + POSITIVE_FIELDS + FINITE_FIELDS


class MetaImageError(ValueError):
    """The file is not a MetaImage we can read; the message says why (without the path)."""


class MetaImageRefused(MetaImageError):
    """A MetaImage that names a data file outside its folder, or a feature we do not read."""


@dataclass(frozen=True)
class MetaHeader:
    """What a MetaImage header says about its pixels, after validation."""

    size: tuple[int, ...]  # DimSize: x (width), y (height), z (frames), fastest first
    dtype: np.dtype  # element type with the file's byte order
    channels: int
    compressed: bool
    compressed_size: int | None  # CompressedDataSize, when given
    data_file: Path  # the header file itself for LOCAL
    data_offset: int

    @property
    def voxels(self) -> int:
        return int(np.prod(self.size, dtype=object))

    @property
    def data_bytes(self) -> int:
        return self.voxels * self.channels * self.dtype.itemsize


def _flag(value: str) -> bool:
    return value[:1] in ("T", "t", "1")  # MetaIO's reading of True


def _int(name: str, value: str, low: int = 0) -> int:
    try:
        number = int(value)
    except ValueError:
        raise MetaImageError(f"{name} = {value[:40]!r} is not an integer") from None
    if number < low:
        raise MetaImageError(f"{name} = {number} is below {low}")
    return number


def _check_geometry_fields(fields: dict[str, str]) -> None:
    for name in POSITIVE_FIELDS + FINITE_FIELDS:
        if name not in fields:
            continue
        try:
            values = [float(word) for word in fields[name].split()]
        except ValueError:
            raise MetaImageRefused(f"{name} = {fields[name][:60]!r} is not a list of numbers") from None
        if not all(math.isfinite(value) for value in values):
            raise MetaImageRefused(f"{name} = {fields[name][:60]!r} is not finite")
        if name in POSITIVE_FIELDS and not all(value > 0 for value in values):
            raise MetaImageRefused(f"{name} = {fields[name][:60]!r}: spacing must be positive")


def parse_fields(head: bytes) -> tuple[dict[str, str], int]:
    """The header's known fields (name -> value) and the byte offset where the data follows the header."""
    fields: dict[str, str] = {}
    position = 0
    while position < len(head):
        end = head.find(b"\n", position)
        if end < 0:
            if len(head) >= HEADER_BYTES:
                raise MetaImageError(f"no end of header (ElementDataFile) in the first {HEADER_BYTES} bytes")
            end = len(head)
        raw, position = head[position:end], end + 1
        try:
            line = raw.decode("ascii").strip()
        except UnicodeDecodeError:
            raise MetaImageError("the header is not ASCII text") from None
        cut = min((i for i in (line.find("="), line.find(":")) if i >= 0), default=-1)
        if cut < 0:
            continue  # MetaIO skips lines without a separator
        name, value = line[:cut].strip(), line[cut:].lstrip("=: \t").strip()
        if len(name) > LINE_LIMIT or len(value) > LINE_LIMIT:
            raise MetaImageError(f"header line longer than {LINE_LIMIT} characters")
        if name not in FIELDS:
            continue
        if name in fields:
            raise MetaImageError(f"{name} appears twice in the header")
        fields[name] = value
        if name == "ElementDataFile":
            return fields, min(position, len(head))
    raise MetaImageError("no ElementDataFile line: not a MetaImage header")


def _data_file(header_path: Path, name: str) -> Path:
    """The file holding the pixels: the header itself (LOCAL) or a regular file inside the header's folder."""
    if name in LOCAL:
        return header_path
    if not name or name.startswith("LIST") or "%" in name or "\0" in name:
        raise MetaImageRefused(f"ElementDataFile = {name[:60]!r}: only LOCAL or one file beside the header is read")
    if os.path.isabs(name) or name.startswith("~"):
        raise MetaImageRefused(f"ElementDataFile = {name[:60]!r} is an absolute path: only files inside the "
                             "image's folder are read")
    folder = os.path.realpath(header_path.parent)
    resolved = os.path.realpath(os.path.join(header_path.parent, name))
    if os.path.commonpath([folder, resolved]) != folder:
        raise MetaImageRefused(f"ElementDataFile = {name[:60]!r} lies outside the image's folder")
    if not os.path.isfile(resolved):
        raise MetaImageError(f"ElementDataFile = {name[:60]!r}: no such regular file beside the header")
    return Path(resolved)


def read_header(path: Path) -> MetaHeader:
    """Parse and validate the header of `path` (reads at most HEADER_BYTES)."""
    with _open_regular(path) as fh:
        head = fh.read(HEADER_BYTES)
    fields, offset = parse_fields(head)
    _check_geometry_fields(fields)
    if fields.get("ObjectType", "Image") != "Image":
        raise MetaImageError(f"ObjectType = {fields['ObjectType'][:40]!r}, not Image")
    for required in ("NDims", "DimSize", "ElementType"):
        if required not in fields:
            raise MetaImageError(f"no {required} in the header")
    ndims = _int("NDims", fields["NDims"], low=1)
    words = fields["DimSize"].split()
    if len(words) != ndims:
        raise MetaImageError(f"DimSize has {len(words)} values for NDims = {ndims}")
    size = tuple(_int("DimSize", word) for word in words)
    element = fields["ElementType"]
    if element not in ELEMENT_TYPES:
        raise MetaImageError(f"ElementType = {element[:40]!r} is not a numeric MetaIO type")
    channels = _int("ElementNumberOfChannels", fields.get("ElementNumberOfChannels", "1"), low=1)
    if not _flag(fields.get("BinaryData", "True")):
        raise MetaImageRefused("BinaryData = False (pixels as text) is not supported")
    if _int("HeaderSize", fields.get("HeaderSize", "0"), low=0) != 0:
        raise MetaImageRefused("HeaderSize is not supported (pixels must follow the header or fill a data file)")
    big_endian = _flag(fields.get("BinaryDataByteOrderMSB", "False")) or _flag(fields.get("ElementByteOrderMSB",
                                                                                           "False"))
    dtype = np.dtype(ELEMENT_TYPES[element]).newbyteorder(">" if big_endian else "<")
    compressed = _flag(fields.get("CompressedData", "False"))
    compressed_size = None
    if compressed and "CompressedDataSize" in fields:
        compressed_size = _int("CompressedDataSize", fields["CompressedDataSize"], low=1)
    data_file = _data_file(path, fields["ElementDataFile"])
    return MetaHeader(size=size, dtype=dtype, channels=channels, compressed=compressed,
                      compressed_size=compressed_size, data_file=data_file,
                      data_offset=offset if data_file == path else 0)


def _open_regular(path: Path):
    """`path` opened for reading, refused unless it is a regular file (non-blocking: a FIFO cannot hang us)."""
    fh = os.fdopen(os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC), "rb")
    if not stat.S_ISREG(os.fstat(fh.fileno()).st_mode):  # e.g. a link swapped for a device after the check
        fh.close()
        raise MetaImageRefused(f"{path.name} is not a regular file")
    return fh


def _raw_blocks(header: MetaHeader, block: int) -> Iterator[bytes]:
    """The pixel bytes in pieces of `block` bytes (the last may be shorter); exactly `data_bytes` in all."""
    total = header.data_bytes
    with _open_regular(header.data_file) as fh:
        available = os.fstat(fh.fileno()).st_size - header.data_offset
        fh.seek(header.data_offset)
        if not header.compressed:
            if available != total:
                raise MetaImageError(f"payload {'shorter' if available < total else 'longer'} than the header "
                                     f"promises: {max(available, 0)} bytes for {total}")
            for start in range(0, total, block):
                yield fh.read(min(block, total - start))
            return
        budget = available if header.compressed_size is None else header.compressed_size
        if budget > available:
            raise MetaImageError(f"compressed payload shorter than the header promises: {max(available, 0)} "
                                 f"of {budget} bytes (CompressedDataSize)")
        inflate = zlib.decompressobj(47)  # zlib or gzip stream, as MetaIO accepts

        def more(limit: int) -> bytes:
            """Up to `limit` more decompressed bytes; b"" once the stream or the payload has ended."""
            nonlocal budget
            while True:
                if inflate.unconsumed_tail:
                    return inflate.decompress(inflate.unconsumed_tail, limit)
                if budget <= 0 or inflate.eof:
                    return b""
                data = fh.read(min(READ_BYTES, budget))
                if not data:
                    return b""
                budget -= len(data)
                out = inflate.decompress(data, limit)
                if out:
                    return out

        try:
            produced = 0
            while produced < total:
                want = min(block, total - produced)
                piece = bytearray()
                while len(piece) < want:
                    out = more(want - len(piece))
                    if not out:
                        raise MetaImageError(f"compressed payload shorter than the header promises: it "
                                             f"decompresses to {produced + len(piece)} of {total} bytes")
                    piece += out
                produced += len(piece)
                yield bytes(piece)
            if more(1):
                raise MetaImageError(f"compressed payload longer than the header promises ({total} bytes)")
            if not inflate.eof:
                raise MetaImageError("compressed payload is truncated (its stream has no end)")
        except zlib.error as error:
            raise MetaImageError(f"compressed payload is corrupt ({error})") from None


def frame_blocks(header: MetaHeader) -> Iterator[tuple[int, np.ndarray]]:
    """(first frame, pixels) blocks of whole frames, (k, height, width[, channels]) in native byte order."""
    width, height, frames = header.size
    frame_values = width * height * header.channels
    per_block = max(1, BLOCK_BYTES // max(1, frame_values * header.dtype.itemsize))
    shape = (height, width) + ((header.channels,) if header.channels > 1 else ())
    start = 0
    for raw in _raw_blocks(header, per_block * frame_values * header.dtype.itemsize):
        block = np.frombuffer(raw, dtype=header.dtype).reshape((-1,) + shape)
        if not header.dtype.isnative:
            block = block.astype(header.dtype.newbyteorder("="))
        yield start, block
        start += len(block)
