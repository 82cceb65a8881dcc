"""Inputs written to hurt: headers that claim more than the file holds, data files outside the input folder,
absurd frame shapes, hostile inputs.json. Each is refused with exit 2 and one line, reads nothing outside the
input folder, and stays within bounded memory."""
from __future__ import annotations

import json
import os
import shutil
import zlib
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from algorithm.__main__ import main
from algorithm.contract import INPUT_FOLDER, INPUT_SLUG, MAX_FRAMES, MAX_SIDE, OUTPUT_FRAME
from conftest import case_from_array
from training.data.layout import image_path, stage_case
from hostile import OpenWatch, mha_header, run_measured, write_short_compressed
from test_cli import assert_contract

EXIT_INPUT = 2


def run(case: Path, output: Path, weights: Path, *extra: str) -> int:
    return main(["--input", str(case), "--output", str(output), "--weights", str(weights), "--device", "cpu",
                 "--quiet", *extra])


def refused(capsys, case: Path, output: Path, weights: Path, *needles: str) -> str:
    assert run(case, output, weights) == EXIT_INPUT
    err = capsys.readouterr().err.strip().splitlines()
    assert err and err[-1].startswith("error: ") and "Traceback" not in "\n".join(err), err
    for needle in needles:
        assert needle in err[-1], err[-1]
    assert not output.exists() or not [p for p in output.rglob("*") if p.is_file()]
    return err[-1]


class Outside:
    """A folder beside the case, holding files no run may open; `watch()` starts looking (after the test has
    written what it needs there), and the fixture fails the test if anything in it was opened."""

    def __init__(self, folder: Path):
        self.folder = folder
        self._watch: OpenWatch | None = None

    def __truediv__(self, name: str) -> Path:
        return self.folder / name

    def __str__(self) -> str:
        return str(self.folder)

    def watch(self) -> None:
        self._watch = OpenWatch(self.folder)
        self._watch.drain()

    def opened(self) -> list[Path]:
        return self._watch.opened() if self._watch else []


@pytest.fixture
def outside(tmp_path):
    folder = tmp_path / "outside"
    folder.mkdir()
    (folder / "secret.raw").write_bytes(np.arange(64 * 64 * 8, dtype=np.uint32).astype(np.uint8).tobytes())
    sitk.WriteImage(sitk.GetImageFromArray(np.full((6, 16, 16), 50, np.uint8)), str(folder / "elsewhere.mha"))
    place = Outside(folder)
    yield place
    assert place._watch is not None, "the test never started watching"
    assert place.opened() == [], "a file outside the input folder was opened"
    place._watch.close()


def socket_folder(tmp_path) -> Path:
    folder = tmp_path / "in" / INPUT_FOLDER
    folder.mkdir(parents=True)
    return folder


# ------------------------------------------------------------------------------------- data files

@pytest.mark.parametrize("name", ["ABSOLUTE", "../../../outside/secret.raw", "/dev/urandom", "/etc/passwd",
                                  "LIST", "slice%03d.raw 1 8 1", "link.raw"])
def test_data_file_outside_the_image_folder_is_refused(tmp_path, random_weights, capsys, outside, name):
    folder = socket_folder(tmp_path)
    os.symlink(outside / "secret.raw", folder / "link.raw")
    if name == "LIST":
        (folder / "slice.raw").write_bytes(bytes(64 * 64))
        header = mha_header((64, 64, 8), data_file="LIST 2D") + b"slice.raw\n" * 8
    else:
        header = mha_header((64, 64, 8), data_file=str(outside / "secret.raw") if name == "ABSOLUTE" else name)
    (folder / "case.mha").write_bytes(header)
    outside.watch()
    refused(capsys, tmp_path / "in", tmp_path / "out", random_weights, "case.mha", "ElementDataFile")


def test_data_file_inside_the_image_folder_is_read(tmp_path, random_weights):
    """A .mhd with its pixels in a .raw beside it (also through a sub-folder and back) is an ordinary input."""
    folder = socket_folder(tmp_path)
    pixels = np.random.default_rng(0).integers(0, 120, (12, 40, 50), dtype=np.uint8)
    (folder / "pixels.raw").write_bytes(pixels.tobytes())
    (folder / "sub").mkdir()
    (folder / "case.mhd").write_bytes(mha_header((50, 40, 12), data_file="sub/../pixels.raw",
                                                 extra="ElementSpacing = 0.28 0.28 1"))
    assert run(tmp_path / "in", tmp_path / "out", random_weights) == 0
    frame = json.loads((tmp_path / "out" / OUTPUT_FRAME).read_text())
    assert -1 <= frame < 12


# ---------------------------------------------------------------------------------- short payloads

def test_issue_example_huge_claim_tiny_payload_is_refused_at_once(tmp_path, random_weights):
    """293 bytes claiming 744 x 562 x 14400: refused from the header, in bounded memory (main took 44 s,
    7 GB, then a MemoryError traceback)."""
    folder = socket_folder(tmp_path)
    path = write_short_compressed(folder / "case.mha", (744, 562, 14400))
    assert path.stat().st_size < 400
    run_ = run_measured("--input", str(tmp_path / "in"), "--output", str(tmp_path / "out"), "--weights",
                        str(random_weights), "--device", "cpu")
    run_.assert_refused(2, "case.mha", "14400 frames")
    assert run_.peak_gib < 1.0, run_.peak_gib
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").rglob("*.*"))


def test_short_compressed_payload_within_the_caps_is_refused(tmp_path, random_weights, capsys):
    """The header promises 64 x 64 x 12 pixels, the zlib payload holds 1000: SimpleITK would hand over
    uninitialised memory for the rest (different on every read)."""
    write_short_compressed(socket_folder(tmp_path) / "case.mha", (64, 64, 12))
    refused(capsys, tmp_path / "in", tmp_path / "out", random_weights, "case.mha", "shorter than the header")


@pytest.mark.parametrize("damage", ["short", "long", "corrupt", "compressed_size_beyond_file"])
def test_payload_not_matching_its_header_is_refused(tmp_path, random_weights, capsys, damage):
    pixels = np.random.default_rng(1).integers(0, 200, (12, 30, 40), dtype=np.uint8).tobytes()
    data = {"short": pixels[:-1], "long": pixels + b"\x01"}.get(damage, pixels)
    payload = zlib.compress(data)
    if damage == "corrupt":
        payload = payload[:20] + bytes(len(payload) - 20)
    size = len(payload) + (10 if damage == "compressed_size_beyond_file" else 0)
    header = mha_header((40, 30, 12), compressed=True, compressed_size=size)
    (socket_folder(tmp_path) / "case.mha").write_bytes(header + payload)
    refused(capsys, tmp_path / "in", tmp_path / "out", random_weights, "case.mha", "payload")


def test_short_uncompressed_payload_is_refused(tmp_path, random_weights, capsys):
    header = mha_header((40, 30, 12))
    (socket_folder(tmp_path) / "case.mha").write_bytes(header + bytes(40 * 30 * 11))
    refused(capsys, tmp_path / "in", tmp_path / "out", random_weights, "case.mha", "shorter than the header")


def test_short_nifti_is_refused(tmp_path, random_weights, capsys):
    folder = socket_folder(tmp_path)
    sitk.WriteImage(sitk.GetImageFromArray(np.full((12, 30, 40), 9, np.uint8)), str(folder / "case.nii"))
    data = (folder / "case.nii").read_bytes()
    (folder / "case.nii").write_bytes(data[:-1000])
    refused(capsys, tmp_path / "in", tmp_path / "out", random_weights, "case.nii", "shorter than the header")


@pytest.mark.parametrize("name", ["case.nii", "case.nii.gz", "case.mhd"])
def test_other_formats_stay_accepted(tmp_path, random_weights, name):
    array = np.random.default_rng(2).integers(0, 120, (12, 30, 40), dtype=np.uint8)
    case = case_from_array(tmp_path / "in", array, name=name)
    assert run(case, tmp_path / "out", random_weights) == 0
    assert_contract(case / INPUT_FOLDER / name, tmp_path / "out")


def test_content_does_not_choose_the_reader(tmp_path, random_weights, capsys, outside):
    """An NRRD header (which may name any data file) saved as .mha is not handed to SimpleITK's NRRD reader."""
    folder = socket_folder(tmp_path)
    (folder / "case.mha").write_text(f"NRRD0004\ntype: uint8\ndimension: 3\nsizes: 64 64 8\nencoding: raw\n"
                                     f"data file: {outside / 'secret.raw'}\n\n")
    outside.watch()
    refused(capsys, tmp_path / "in", tmp_path / "out", random_weights, "case.mha")


# ---------------------------------------------------------------------------------- caps and shapes

@pytest.mark.parametrize("size, needle", [
    ((30000, 2, 12), "sides at most"),
    ((8000, 1, 12), "sides at most"),
    ((MAX_SIDE, 1, 12), "aspect ratio"),
    ((8, 8, MAX_FRAMES + 1), "frames (at most"),
    ((1024, 1024, 1400), "voxels (at most"),
    ((1500, 1100, 12), "sides at most"),
    ((744, 562, 840), "GiB of pixel data"),  # as float64: 2.6 GiB
])
def test_absurd_shapes_are_refused_from_the_header(tmp_path, random_weights, capsys, size, needle):
    element = "MET_DOUBLE" if needle.startswith("GiB") else "MET_UCHAR"
    header = mha_header(size, element=element, compressed=True, compressed_size=12)
    (socket_folder(tmp_path) / "case.mha").write_bytes(header + zlib.compress(b"\0" * 64)[:12])
    refused(capsys, tmp_path / "in", tmp_path / "out", random_weights, "case.mha", needle)


def test_memory_error_while_reading_is_a_bad_input(tmp_path, random_weights, capsys, monkeypatch):
    case = case_from_array(tmp_path / "in", np.zeros((6, 16, 16), np.uint8))

    def exhausted(header):
        raise MemoryError
        yield  # pragma: no cover

    monkeypatch.setattr("algorithm.metaimage.frame_blocks", exhausted)
    refused(capsys, case, tmp_path / "out", random_weights, "case.mha", "not enough memory")


# ----------------------------------------------------------------------------- links and inputs.json

def test_input_folder_that_is_a_link_works(tmp_path, random_weights, small_case):
    """On grand-challenge /input is a link to /opt/ml/input/data/<job>-input; paths inside it are fine."""
    case, _, _ = small_case
    job = tmp_path / "opt" / "ml" / "input" / "data" / "job-input"
    shutil.copytree(case, job)
    (job / "inputs.json").write_text(json.dumps([{"interface": {"slug": INPUT_SLUG,
                                                                "relative_path": str(INPUT_FOLDER)}}]))
    os.symlink(job, tmp_path / "input")
    assert run(tmp_path / "input", tmp_path / "out", random_weights) == 0
    assert_contract(next((job / INPUT_FOLDER).iterdir()), tmp_path / "out")


def test_image_linked_from_outside_runs(tmp_path, random_weights, small_case):
    """A case staged with a symbolic link to its image (no copy of a 350 MB stack) is read through the link."""
    _, release, uuid = small_case
    stage_case(image_path(release, uuid), tmp_path / "in", how="symlink")
    assert run(tmp_path / "in", tmp_path / "out", random_weights) == 0
    assert_contract(image_path(release, uuid), tmp_path / "out")


@pytest.mark.parametrize("target", ["/dev/urandom", "/dev/zero", "FIFO", "FOLDER", "MISSING"])
def test_image_linked_to_what_is_not_a_regular_file_is_refused(tmp_path, random_weights, capsys, target):
    folder = socket_folder(tmp_path)
    special = {"FIFO": tmp_path / "fifo", "FOLDER": tmp_path / "folder", "MISSING": tmp_path / "missing"}
    if target == "FIFO":
        os.mkfifo(special[target])  # opening it for reading would wait for a writer for ever
    if target == "FOLDER":
        special[target].mkdir()
    os.symlink(special.get(target, target), folder / "case.mha")
    message = refused(capsys, tmp_path / "in", tmp_path / "out", random_weights, "case.mha")
    assert "broken link" in message if target == "MISSING" else "not a regular file" in message


@pytest.mark.parametrize("data_file", ["secret.raw", "../outside/secret.raw", "ABSOLUTE"])
def test_header_linked_from_elsewhere_reads_pixels_only_beside_the_link(tmp_path, random_weights, capsys,
                                                                         outside, data_file):
    """Following a link to a header does not widen where its pixels may come from: the data file is looked for
    beside the link, inside the input folder. Beside the header's real place lie pixels of exactly the size it
    declares (a run reading them would succeed), and from there `../outside/` reaches the watched folder."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    shutil.copyfile(outside / "secret.raw", elsewhere / "secret.raw")
    name = str(outside / "secret.raw") if data_file == "ABSOLUTE" else data_file
    (elsewhere / "header.mhd").write_bytes(mha_header((64, 64, 8), data_file=name))
    os.symlink(elsewhere / "header.mhd", socket_folder(tmp_path) / "case.mhd")
    outside.watch()
    refused(capsys, tmp_path / "in", tmp_path / "out", random_weights, "case.mhd", "ElementDataFile")


@pytest.mark.parametrize("relative", ["../outside", "ABSOLUTE", "images/../../outside"])
def test_inputs_json_pointing_outside_is_refused(tmp_path, random_weights, capsys, outside, relative):
    (tmp_path / "in").mkdir()
    path = str(outside) if relative == "ABSOLUTE" else relative
    (tmp_path / "in" / "inputs.json").write_text(json.dumps(
        [{"interface": {"slug": INPUT_SLUG, "relative_path": path}}]))
    outside.watch()
    refused(capsys, tmp_path / "in", tmp_path / "out", random_weights, "inputs.json")


@pytest.mark.parametrize("content, needle", [
    ("null", "expected a list"),
    ("42", "expected a list"),
    ("[" * 100_000 + "]" * 100_000, "nested too deeply"),
    (json.dumps([{"interface": {"slug": INPUT_SLUG, "relative_path": None}}]), "relative_path"),
    (json.dumps([{"interface": {"slug": INPUT_SLUG, "relative_path": 7}}]), "relative_path"),
    (json.dumps([{"interface": {"slug": INPUT_SLUG, "relative_path": "a"}},
                 {"interface": {"slug": INPUT_SLUG, "relative_path": "b"}}]), "appears 2 times"),
    ("\udcff", "not valid JSON"),
    ("1" * 5000, "not valid JSON"),
])
def test_malformed_inputs_json_is_a_bad_input(tmp_path, random_weights, capsys, content, needle):
    case = case_from_array(tmp_path / "in", np.zeros((6, 16, 16), np.uint8))
    (case / "inputs.json").write_bytes(content.encode("utf-8", "surrogateescape"))
    refused(capsys, case, tmp_path / "out", random_weights, "inputs.json", needle)


def test_inputs_json_entries_that_are_not_sockets_are_ignored_with_a_warning(tmp_path, random_weights, caplog):
    """Entries that cannot be ours (null, a number, an object without an interface) do not hide our socket."""
    case = case_from_array(tmp_path / "in", np.zeros((6, 16, 16), np.uint8))
    (case / "inputs.json").write_text(json.dumps([None, 3, {"image": 1}, {"interface": {
        "slug": INPUT_SLUG, "relative_path": str(INPUT_FOLDER)}}]))
    assert run(case, tmp_path / "out", random_weights) == 0
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING" and "inputs.json" in r.getMessage()]
    assert len(warnings) == 3 and "entry 0" in warnings[0]
    assert_contract(case / INPUT_FOLDER / "case.mha", tmp_path / "out")
