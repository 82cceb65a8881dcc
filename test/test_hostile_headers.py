"""Property: whatever a .mha header claims (dimensions, element type, channels, compression, data file, byte
order) and whatever payload follows, `python -m algorithm` exits 0 or 2 without a traceback, opens no file
outside the input folder, stays in bounded memory, and refuses what it cannot read exactly."""
from __future__ import annotations

import os
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from algorithm.contract import INPUT_FOLDER
from algorithm.metaimage import ELEMENT_TYPES
from hostile import OpenWatch, mha_header, run_measured

pytestmark = pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux (VmHWM, inotify)")

# Generated files hold at most a few hundred KiB, whatever their headers claim. A refusal comes before the
# network is loaded (about 0.1 GiB); a run that reads the stack loads torch and the model (about 1.5 GiB).
PEAK_REFUSED_GIB = 1.0
PEAK_ACCEPTED_GIB = 3.0  # the bound for any input file
OUTSIDE_NAMES = ("../outside/secret.raw", "ABSOLUTE", "/dev/zero", "link.raw", "../../outside/secret.raw")
DATA_FILES = ("LOCAL", "LOCAL", "local", "case.raw", "sub/../case.raw", "missing.raw", "LIST",
              "slice%03d.raw 1 4 1") + OUTSIDE_NAMES


@dataclass
class Header:
    ndims: int
    size: list[int]
    element: str
    channels: int | None
    compressed: bool
    compressed_size: str  # absent | exact | smaller | larger | garbage
    msb: bool
    data_file: str
    payload: str  # exact | short | long | empty | garbage

    @property
    def expected_bytes(self) -> int | None:
        if self.element not in ELEMENT_TYPES:
            return None
        itemsize = np.dtype(ELEMENT_TYPES[self.element]).itemsize
        return int(np.prod(self.size, dtype=object)) * (self.channels or 1) * itemsize


sizes = st.one_of(st.integers(1, 40), st.sampled_from([0, 2, 3, 30000, 14400, 2**31, 10**12]))


@st.composite
def headers(draw) -> Header:
    ndims = draw(st.sampled_from([3, 3, 3, 3, 2, 4]))
    return Header(ndims=ndims, size=[draw(sizes) for _ in range(ndims)],
                  element=draw(st.sampled_from(sorted(ELEMENT_TYPES) + ["MET_STRING", "float", "MET_UCHAR_ARRAY"])),
                  channels=draw(st.sampled_from([None, None, 1, 3, 4, 0])),
                  compressed=draw(st.booleans()),
                  compressed_size=draw(st.sampled_from(["absent", "exact", "exact", "smaller", "larger", "garbage"])),
                  msb=draw(st.booleans()),
                  data_file=draw(st.sampled_from(DATA_FILES)),
                  payload=draw(st.sampled_from(["exact", "exact", "exact", "short", "long", "empty", "garbage"])))


def payload_for(header: Header, rng: np.random.Generator) -> bytes:
    """The pixel bytes (then compressed if the header says so): exact when that is small, else at most 64 KiB."""
    expected = header.expected_bytes
    exact = expected if expected is not None and expected <= 256 * 1024 else None
    length = {"exact": exact if exact is not None else 4096, "short": (exact or 8192) // 2,
              "long": (exact or 4096) + 17, "empty": 0, "garbage": 3000}[header.payload]
    raw = rng.integers(0, 256, length, dtype=np.uint8).tobytes()
    if header.payload == "garbage":
        return raw
    return zlib.compress(raw) if header.compressed else raw


def header_text(header: Header, payload: bytes, outside: Path) -> bytes:
    sizes_text = " ".join(map(str, header.size))
    lines = ["ObjectType = Image", f"NDims = {header.ndims}", f"DimSize = {sizes_text}",
             f"ElementType = {header.element}", f"BinaryDataByteOrderMSB = {header.msb}"]
    if header.channels is not None:
        lines.append(f"ElementNumberOfChannels = {header.channels}")
    if header.compressed:
        lines.append("CompressedData = True")
        size = {"exact": len(payload), "smaller": max(1, len(payload) // 2), "larger": len(payload) + 100,
                "garbage": "lots"}.get(header.compressed_size)
        if size is not None:
            lines.append(f"CompressedDataSize = {size}")
    name = str(outside / "secret.raw") if header.data_file == "ABSOLUTE" else header.data_file
    lines.append(f"ElementDataFile = {name}")
    return ("\n".join(lines) + "\n").encode()


def write_case(root: Path, header: Header, outside: Path) -> Path:
    folder = root / "in" / INPUT_FOLDER
    (folder / "sub").mkdir(parents=True)
    payload = payload_for(header, np.random.default_rng(len(str(header))))
    os.symlink(outside / "secret.raw", folder / "link.raw")
    (folder / "slice001.raw").write_bytes(payload)
    local = header.data_file in ("LOCAL", "local")
    if not local:
        (folder / "case.raw").write_bytes(payload)
    (folder / "case.mha").write_bytes(header_text(header, payload, outside) + (payload if local else b""))
    return root / "in"


@pytest.fixture(scope="module")
def outside_watch(tmp_path_factory):
    folder = tmp_path_factory.mktemp("outside")
    (folder / "secret.raw").write_bytes(bytes(range(256)) * 4096)  # 1 MiB: enough for any small claim
    watch = OpenWatch(folder)
    yield folder, watch
    watch.close()


@settings(max_examples=40, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(header=headers())
def test_any_mha_header_exits_0_or_2_reads_nothing_outside_and_stays_bounded(tmp_path_factory, random_weights,
                                                                               outside_watch, header):
    outside, watch = outside_watch
    root = tmp_path_factory.mktemp("hdr")
    case = write_case(root, header, outside)
    watch.drain()
    run = run_measured("--input", str(case), "--output", str(root / "out"), "--weights", str(random_weights),
                       "--device", "cpu", "--no-extras", "--quiet", timeout=300)
    text = "\n".join(run.lines)
    event(f"exit {run.code}")
    assert run.code in (0, 2), f"{header}\n{text[-3000:]}"
    assert "Traceback" not in text, f"{header}\n{text[-3000:]}"
    if run.code == 2:
        assert run.message.startswith("error: ") and "case.mha" in run.message, f"{header}\n{text[-3000:]}"
    assert watch.opened() == [], f"{header}: opened a file outside the input folder"
    assert run.peak_gib < (PEAK_REFUSED_GIB if run.code == 2 else PEAK_ACCEPTED_GIB), \
        f"{header}: exit {run.code}, peak {run.peak_gib} GiB"
    # What must be refused, whatever else the header says:
    if header.data_file in OUTSIDE_NAMES + ("LIST", "slice%03d.raw 1 4 1", "missing.raw"):
        assert run.code == 2, header
    if header.payload in ("short", "long", "empty", "garbage"):
        assert run.code == 2, header
    if header.compressed and header.compressed_size in ("larger", "smaller", "garbage"):
        assert run.code == 2, header


# ----------------------------------------------------------------------------------------------- geometry

GEOMETRY_REFUSED = [
    ("ElementSpacing = 0 0.28 1", "ElementSpacing"),
    ("ElementSpacing = -0.28 0.28 1", "ElementSpacing"),
    ("ElementSpacing = nan 0.28 1", "ElementSpacing"),
    ("ElementSpacing = 0.28 inf 1", "ElementSpacing"),
    ("ElementSpacing = 0.28 0.28 one", "ElementSpacing"),
    ("Offset = nan 0 0", "Offset"),
    ("Origin = 0 -inf 0", "Origin"),
    ("Position = 0 0 1e400", "Position"),
    ("TransformMatrix = nan 0 0 0 1 0 0 0 1", "TransformMatrix"),
    ("TransformMatrix = 2 0 0 0 1 0 0 0 1", "direction"),  # scaled
    ("TransformMatrix = 1 0.5 0 0 1 0 0 0 1", "direction"),  # skewed
    ("TransformMatrix = 1 0 0 1 0 0 0 0 1", "direction"),  # singular
]


def geometry_case(root: Path, extra: str) -> Path:
    folder = root / "in" / INPUT_FOLDER
    folder.mkdir(parents=True)
    pixels = np.random.default_rng(3).integers(0, 120, (12, 30, 40), dtype=np.uint8).tobytes()
    (folder / "case.mha").write_bytes(mha_header((40, 30, 12), extra=extra) + pixels)
    return root / "in"


@pytest.mark.parametrize("extra, field", GEOMETRY_REFUSED)
def test_geometry_the_writer_would_refuse_is_refused_from_the_header(tmp_path, random_weights, capsys,
                                                                     monkeypatch, extra, field):
    """Spacing that is not finite and positive, an origin that is not finite, a direction that is not
    orthonormal: exit 2 with one line naming the field, before the network is loaded (the writer used to
    find them after the whole case had run, as exit 4 blaming the output folder)."""
    from algorithm import __main__ as cli

    monkeypatch.setattr(cli, "load", lambda *args, **kwargs: pytest.fail("the network was loaded"))
    case = geometry_case(tmp_path, extra)
    code = cli.main(["--input", str(case), "--output", str(tmp_path / "out"), "--weights", str(random_weights),
                     "--device", "cpu", "--quiet"])
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(lines) == 1, lines
    assert lines[0].startswith("error: ") and "case.mha: refused" in lines[0] and field in lines[0], lines[0]
    assert not (tmp_path / "out").exists() or not any(p.is_file() for p in (tmp_path / "out").rglob("*"))


def test_a_negative_nifti_spacing_is_refused(tmp_path, random_weights, capsys):
    """The same rule for formats SimpleITK reads alone: a NIfTI whose pixdim[1] is negative."""
    import struct

    import SimpleITK as sitk

    from algorithm.__main__ import main

    folder = tmp_path / "in" / INPUT_FOLDER
    folder.mkdir(parents=True)
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((12, 30, 40), np.uint8)), str(folder / "case.nii"))
    data = bytearray((folder / "case.nii").read_bytes())
    data[80:84] = struct.pack("<f", -0.28)  # pixdim[1]
    (folder / "case.nii").write_bytes(bytes(data))
    assert main(["--input", str(tmp_path / "in"), "--output", str(tmp_path / "out"), "--weights",
                 str(random_weights), "--device", "cpu", "--quiet"]) == 2
    message = capsys.readouterr().err.strip().splitlines()[-1]
    assert message.startswith("error: ") and "case.nii: refused: spacing (-0.28" in message, message


def test_a_rotated_stack_keeps_its_geometry(tmp_path, random_weights):
    """A rotation written with MetaIO's 6 digits is orthonormal enough: it runs and the mask repeats it."""
    from algorithm.__main__ import main
    from test_cli import assert_contract

    case = geometry_case(tmp_path, "Offset = -3 4.5 10\nTransformMatrix = 0.707107 0.707107 0 -0.707107 "
                                   "0.707107 0 0 0 1\nElementSpacing = 0.28 0.3 1.5")
    assert main(["--input", str(case), "--output", str(tmp_path / "out"), "--weights", str(random_weights),
                 "--device", "cpu", "--quiet", "--no-extras"]) == 0
    assert_contract(case / INPUT_FOLDER / "case.mha", tmp_path / "out")
