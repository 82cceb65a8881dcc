"""Helpers for the hostile-input tests: hand-written MetaImage files, a watch that sees every open of a file
outside the input folder (whoever opens it: Python, SimpleITK's C++), and the CLI run in a fresh process that
reports its own peak memory."""
from __future__ import annotations

import re
import subprocess
import sys
import zlib
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# Runs `python -m algorithm` in a fresh interpreter and appends that process's VmHWM (its own address space,
# not the test runner's) to stderr, whatever the exit.
_MEASURED = ("import sys\n"
             "from algorithm.__main__ import main\n"
             "from algorithm.run import peak_memory_gib\n"
             "try:\n"
             "    code = main(sys.argv[1:])\n"
             "finally:\n"
             "    sys.stderr.write(f'\\n#peak-gib {peak_memory_gib():.3f}\\n')\n"
             "sys.exit(code)\n")


@dataclass
class Run:
    code: int
    lines: list[str]  # stderr lines, the peak line removed
    peak_gib: float

    @property
    def message(self) -> str:
        return self.lines[-1] if self.lines else ""

    def assert_refused(self, code: int = 2, *needles: str) -> None:
        text = "\n".join(self.lines)
        assert self.code == code, text[-3000:]
        assert "Traceback" not in text, text[-3000:]
        assert self.message.startswith("error: "), text[-3000:]
        for needle in needles:
            assert needle in self.message, self.message


def run_measured(*args: str, timeout: float = 600) -> Run:
    completed = subprocess.run([sys.executable, "-c", _MEASURED, *args], cwd=REPO, capture_output=True,
                               text=True, timeout=timeout)
    found = re.findall(r"#peak-gib ([0-9.]+)", completed.stderr)
    lines = [line for line in completed.stderr.splitlines() if line.strip() and not line.startswith("#peak-gib")]
    return Run(completed.returncode, lines, float(found[-1]) if found else float("nan"))


def mha_header(size: tuple[int, ...], element: str = "MET_UCHAR", data_file: str = "LOCAL", *,
               compressed: bool = False, compressed_size: int | None = None, channels: int | None = None,
               extra: str = "") -> bytes:
    """A MetaImage header as MetaIO writes one (size is x y z, fastest first)."""
    lines = ["ObjectType = Image", f"NDims = {len(size)}", f"DimSize = {' '.join(map(str, size))}",
             f"ElementType = {element}", "BinaryData = True", "BinaryDataByteOrderMSB = False"]
    if channels is not None:
        lines.append(f"ElementNumberOfChannels = {channels}")
    if compressed:
        lines.append("CompressedData = True")
        if compressed_size is not None:
            lines.append(f"CompressedDataSize = {compressed_size}")
    lines += [extra] if extra else []
    lines.append(f"ElementDataFile = {data_file}")
    return ("\n".join(lines) + "\n").encode()


def write_short_compressed(path: Path, size: tuple[int, int, int], payload_bytes: int = 1000) -> Path:
    """A .mha whose header claims `size` uint8 voxels and whose zlib payload decompresses to far fewer."""
    payload = zlib.compress(b"\x07" * payload_bytes)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(mha_header(size, compressed=True, compressed_size=len(payload)) + payload)
    return path


class OpenWatch:
    """Every open or read of a file inside the watched folders, by any code of any process (inotify).

    Linux only; tests that need it skip elsewhere.
    """

    def __init__(self, *folders: Path):
        inotify_simple = pytest.importorskip("inotify_simple")
        self._flags = inotify_simple.flags
        self._inotify = inotify_simple.INotify()
        self._folders = {}
        for folder in folders:
            wd = self._inotify.add_watch(str(folder), self._flags.OPEN | self._flags.ACCESS)
            self._folders[wd] = Path(folder)

    def drain(self) -> None:
        list(self._inotify.read(timeout=0))

    def opened(self) -> list[Path]:
        return [self._folders[event.wd] / event.name for event in self._inotify.read(timeout=50)
                if event.wd in self._folders]

    def close(self) -> None:
        self._inotify.close()
