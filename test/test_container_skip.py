"""`make test` changes nothing unasked: without a Docker engine the container test says why it is skipped."""
from __future__ import annotations

import os
import stat
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SKIP_LINE = ("container test skipped: no Docker engine answers; INSTALL_DOCKER=1 make test installs and starts "
             "one (needs root)")


def stub(folder: Path, name: str, body: str) -> None:
    path = folder / name
    path.write_text(f"#!/bin/sh\n{body}\n")
    path.chmod(path.stat().st_mode | stat.S_IXUSR)


def test_without_an_engine_it_skips_with_one_clear_line_and_installs_nothing(tmp_path):
    bin_dir, calls = tmp_path / "bin", tmp_path / "calls.log"
    bin_dir.mkdir()
    stub(bin_dir, "docker", f'echo "docker $*" >> {calls}; exit 1')  # an engine that does not answer
    for tool in ("apt-get", "dockerd", "sudo", "debootstrap"):
        stub(bin_dir, tool, f'echo "{tool} $*" >> {calls}; exit 0')
    env = {k: v for k, v in os.environ.items() if k != "INSTALL_DOCKER"}
    env.update(PATH=f"{bin_dir}:/usr/bin:/bin", CASES_DIR=str(tmp_path / "cases"))
    done = subprocess.run(["bash", "tools/run_container.sh"], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert SKIP_LINE in done.stdout.splitlines()
    assert calls.read_text().splitlines() == ["docker info"]  # asked the engine, touched nothing else
