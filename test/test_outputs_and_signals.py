"""The output folder: one run at a time, nothing stale from an earlier run, and SIGTERM / SIGINT never leave
staged files or one socket without the other (also when the CLI is PID 1, as in a container without init)."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from algorithm.__main__ import main
from algorithm.contract import INPUT_FOLDER, OUTPUT_FRAME, OUTPUT_MASK, output_lock
from algorithm.errors import OutputError
from conftest import case_from_array
from test_cli import assert_contract

REPO = Path(__file__).resolve().parents[1]


def files(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()) if folder.exists() else []


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "algorithm", *args]


@pytest.fixture(scope="module")
def long_case(tmp_path_factory) -> Path:
    """A case that keeps the small model busy for a few seconds on the CPU (time to send a signal)."""
    rng = np.random.default_rng(3)
    return case_from_array(tmp_path_factory.mktemp("long") / "in", rng.integers(20, 160, (240, 64, 64), dtype=np.uint8))


def speckle_case(root: Path, shape=(12, 40, 50)) -> Path:
    return case_from_array(root, np.random.default_rng(0).integers(0, 120, shape, dtype=np.uint8))


# ------------------------------------------------------------------------------------- stale outputs

def test_a_successful_run_leaves_nothing_stale_of_ours(tmp_path, random_weights):
    out = tmp_path / "out"
    first = speckle_case(tmp_path / "a", (12, 40, 50))
    assert main(["--input", str(first), "--output", str(out), "--weights", str(random_weights), "--device", "cpu",
                 "--quiet"]) == 0
    assert "fetalclipseg/result.json" in files(out)
    # what a killed run leaves behind, and a file that is not ours
    (out / OUTPUT_MASK.parent / ".output.0a1b2c3d.partial.mha").write_bytes(b"half")
    (out / f".{OUTPUT_FRAME.stem}.0a1b2c3d.partial.json").write_text("3")
    (out / ".write-probe-0a1b2c3d").write_bytes(b"")
    (out / "notes.txt").write_text("mine")
    second = speckle_case(tmp_path / "b", (6, 30, 20))
    assert main(["--input", str(second), "--output", str(out), "--weights", str(random_weights), "--device", "cpu",
                 "--quiet", "--no-extras"]) == 0
    assert files(out) == sorted([str(OUTPUT_FRAME), str(OUTPUT_MASK), "notes.txt"])
    assert_contract(second / INPUT_FOLDER / "case.mha", out)


# ------------------------------------------------------------------------------------------ locking

_HOLD = """
import sys, time
from algorithm.contract import output_lock
with output_lock(sys.argv[1]):
    print("held", flush=True)
    time.sleep(float(sys.argv[2]))
"""


def test_a_second_run_into_the_same_folder_is_refused_with_exit_4(tmp_path, random_weights, capsys):
    out = tmp_path / "out"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", _HOLD, str(out), "60"], cwd=REPO, stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        case = speckle_case(tmp_path / "in")
        assert main(["--input", str(case), "--output", str(out), "--weights", str(random_weights),
                     "--device", "cpu", "--quiet"]) == 4
        err = capsys.readouterr().err.strip().splitlines()
        assert err == [f"error: another run is writing into {out}; wait for it to end or choose another output "
                       "folder"]
        assert files(out) == []
    finally:
        holder.kill()
        holder.wait()
    with output_lock(out):  # released with the process that held it
        pass


def test_two_cli_runs_at_once(tmp_path, random_weights, long_case):
    out = tmp_path / "out"
    first = subprocess.Popen(cli("--input", str(long_case), "--output", str(out), "--weights", str(random_weights),
                                 "--device", "cpu"), cwd=REPO, stderr=subprocess.PIPE, text=True)
    try:
        for line in first.stderr:  # the first run logs its input once it holds the folder
            if " input " in line:
                break
        second = subprocess.run(cli("--input", str(speckle_case(tmp_path / "in")), "--output", str(out),
                                    "--weights", str(random_weights), "--device", "cpu"),
                                cwd=REPO, capture_output=True, text=True, timeout=300)
        assert second.returncode == 4, second.stderr[-2000:]
        assert second.stderr.strip().splitlines()[-1].startswith("error: another run is writing into")
        first.stderr.read()
        assert first.wait(timeout=600) == 0
    finally:
        first.kill()
    assert_contract(long_case / INPUT_FOLDER / "case.mha", out)


def test_the_lock_is_reentrant_in_one_thread_and_exclusive_across_threads(tmp_path):
    import threading

    errors = []
    with output_lock(tmp_path), output_lock(tmp_path):
        def other():
            try:
                with output_lock(tmp_path):
                    pass
            except OutputError as error:
                errors.append(str(error))

        thread = threading.Thread(target=other)
        thread.start()
        thread.join()
    assert len(errors) == 1 and "another thread" in errors[0]
    with output_lock(tmp_path):  # free again
        pass


# ------------------------------------------------------------------------------------------ signals

# Runs the CLI with a hook that sends SIGTERM to the process itself at a chosen moment of writing.
_SIGNAL_AT = """
import os, signal, sys
import SimpleITK as sitk
import algorithm.contract as contract
from algorithm.__main__ import main

when = sys.argv[1]
real_replace, real_write = os.replace, sitk.WriteImage

def replace(src, dst):
    real_replace(src, dst)
    if when == "commit" and str(dst).endswith(".mha"):  # the mask is committed, the frame JSON not yet
        os.kill(os.getpid(), signal.SIGTERM)

def write(image, path, *args, **kwargs):
    real_write(image, path, *args, **kwargs)
    if when == "stage":  # the mask is staged, nothing committed
        os.kill(os.getpid(), signal.SIGTERM)

contract.os.replace = replace
contract.sitk.WriteImage = write
sys.exit(main(sys.argv[2:]))
"""


def test_sigterm_while_committing_commits_both_sockets_then_stops(tmp_path, random_weights):
    case, out = speckle_case(tmp_path / "in"), tmp_path / "out"
    completed = subprocess.run([sys.executable, "-c", _SIGNAL_AT, "commit", "--input", str(case), "--output",
                                str(out), "--weights", str(random_weights), "--device", "cpu", "--quiet"],
                               cwd=REPO, capture_output=True, text=True, timeout=300)
    assert completed.returncode == 128 + signal.SIGTERM, completed.stderr[-2000:]
    assert completed.stderr.strip().splitlines()[-1] == "error: interrupted by SIGTERM"
    assert_contract(case / INPUT_FOLDER / "case.mha", out)  # both sockets, nothing staged left
    assert not [p for p in out.rglob(".*") if p.is_file()]


def test_sigterm_while_staging_leaves_nothing(tmp_path, random_weights):
    case, out = speckle_case(tmp_path / "in"), tmp_path / "out"
    completed = subprocess.run([sys.executable, "-c", _SIGNAL_AT, "stage", "--input", str(case), "--output",
                                str(out), "--weights", str(random_weights), "--device", "cpu", "--quiet"],
                               cwd=REPO, capture_output=True, text=True, timeout=300)
    assert completed.returncode == 128 + signal.SIGTERM, completed.stderr[-2000:]
    assert "Traceback" not in completed.stderr
    assert files(out) == []


def _wait_for_input_line(process: subprocess.Popen) -> None:
    for line in process.stderr:
        if " input " in line:
            return
    raise AssertionError("the run ended before reading its input")


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_during_inference_stops_the_run_promptly_and_cleanly(tmp_path, random_weights, long_case, signum):
    out = tmp_path / "out"
    process = subprocess.Popen(cli("--input", str(long_case), "--output", str(out), "--weights",
                                   str(random_weights), "--device", "cpu"),
                               cwd=REPO, stderr=subprocess.PIPE, text=True)
    try:
        _wait_for_input_line(process)
        time.sleep(1.0)  # model loading and the first batches
        sent = time.monotonic()
        process.send_signal(signum)
        code = process.wait(timeout=30)
        seconds = time.monotonic() - sent
        rest = process.stderr.read()
    finally:
        process.kill()
    assert code == 128 + signum, rest[-2000:]
    assert rest.strip().splitlines()[-1] == f"error: interrupted by {signal.Signals(signum).name}"
    assert seconds < 5, f"{seconds:.1f} s to stop"
    assert files(out) == []


@pytest.mark.skipif(shutil.which("unshare") is None, reason="needs util-linux unshare")
def test_sigterm_ends_the_cli_when_it_is_pid_1(tmp_path, random_weights, long_case):
    """As PID 1 of a container without an init, a process with no SIGTERM handler ignores SIGTERM; the CLI has
    one. The CLI runs as PID 1 of a new PID namespace (unshare, as an unprivileged user namespace)."""
    probe = subprocess.run(["unshare", "--user", "--map-root-user", "--pid", "--fork", "true"],
                           capture_output=True, timeout=30)
    if probe.returncode != 0:
        pytest.skip(f"unprivileged PID namespaces are not available: {probe.stderr.decode()[-200:]}")
    out = tmp_path / "out"
    launcher = subprocess.Popen(["unshare", "--user", "--map-root-user", "--pid", "--fork", *cli(
        "--input", str(long_case), "--output", str(out), "--weights", str(random_weights), "--device", "cpu")],
        cwd=REPO, stderr=subprocess.PIPE, text=True)
    try:
        _wait_for_input_line(launcher)
        children = Path(f"/proc/{launcher.pid}/task/{launcher.pid}/children").read_text().split()
        assert len(children) == 1
        init = int(children[0])
        nspid = next(line for line in Path(f"/proc/{init}/status").read_text().splitlines()
                     if line.startswith("NSpid:"))
        assert nspid.split()[-1] == "1", nspid  # PID 1 in its namespace
        time.sleep(1.0)
        sent = time.monotonic()
        os.kill(init, signal.SIGTERM)
        code = launcher.wait(timeout=20)
        seconds = time.monotonic() - sent
        rest = launcher.stderr.read()
    finally:
        launcher.kill()
        for child in Path(f"/proc/{launcher.pid}/task/{launcher.pid}/children").read_text().split() \
                if Path(f"/proc/{launcher.pid}").exists() else []:
            os.kill(int(child), signal.SIGKILL)
    assert code == 128 + signal.SIGTERM, rest[-2000:]
    assert "error: interrupted by SIGTERM" in rest and seconds < 5
    assert files(out) == []
