"""`python -m algorithm` end to end: the contract on generated cases, determinism, read-only input."""
from __future__ import annotations

import hashlib
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from algorithm.contract import INPUT_FOLDER, OUTPUT_FRAME, OUTPUT_MASK
from tools.check_outputs import check_outputs

REPO = Path(__file__).resolve().parents[1]


def run_cli(*args: str, check: bool = False) -> subprocess.CompletedProcess:
    completed = subprocess.run([sys.executable, "-m", "algorithm", *args], cwd=REPO, capture_output=True,
                               text=True, timeout=900)
    if check and completed.returncode != 0:
        raise AssertionError(f"exit {completed.returncode}: {completed.stderr[-2000:]}")
    return completed


def run_cli_peak_rss(*args: str) -> float:
    """Run the CLI, require exit 0, return the peak resident memory it reports (GiB, Linux VmHWM of its own
    address space). Not the child's ru_maxrss: for a process spawned from pytest that includes pytest's own
    resident memory at the time of the fork (3.36 GiB in a full test session, for runs that peak near 2 GiB)."""
    completed = run_cli(*args, check=True)
    found = re.findall(r"peak memory ([0-9.]+) GiB", completed.stderr)
    assert found, completed.stderr[-2000:]
    return float(found[-1])


def tree_digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def assert_contract(input_image: Path, output: Path) -> int:
    """Every property grand-challenge relies on (tools/check_outputs.py, the container test's checker too);
    returns the frame number."""
    report = check_outputs(input_image, output)
    assert not report.failures, "\n".join(report.failures)
    return report.frame


def test_small_case_contract_and_extras(small_case, random_weights, tmp_path):
    case, _, uuid = small_case
    output = tmp_path / "out"
    completed = run_cli("--input", str(case), "--output", str(output), "--weights", str(random_weights),
                        "--device", "cpu", check=True)
    frame = assert_contract(next((case / INPUT_FOLDER).glob("*.mha")), output)
    result = json.loads((output / "fetalclipseg" / "result.json").read_text())
    assert result["frame"] == frame
    assert len(result["sweep_candidates"]) == 6
    assert (output / "fetalclipseg" / "chosen_frame.png").stat().st_size > 1000
    assert "not for clinical use" in completed.stderr


def test_no_extras_writes_only_the_sockets(small_case, random_weights, tmp_path):
    case, _, _ = small_case
    run_cli("--input", str(case), "--output", str(tmp_path), "--weights", str(random_weights), "--device", "cpu",
            "--no-extras", check=True)
    files = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file())
    assert files == [str(OUTPUT_FRAME), str(OUTPUT_MASK)]


@pytest.mark.slow
def test_full_case_contract_deterministic_and_input_untouched(full_case, random_weights, tmp_path):
    """840 frames: exact contract, byte-identical outputs twice, /input unchanged, bounded memory."""
    case, _, _ = full_case
    before = tree_digest(case)
    digests, peaks = [], []
    for run in range(2):
        output = tmp_path / f"out{run}"
        peaks.append(run_cli_peak_rss("--input", str(case), "--output", str(output), "--weights",
                                      str(random_weights), "--device", "cpu", "--no-extras"))
        assert_contract(next((case / INPUT_FOLDER).glob("*.mha")), output)
        digests.append(tree_digest(output))
    assert digests[0] == digests[1]
    assert tree_digest(case) == before
    peak_gib = max(peaks)
    print(f"peak resident memory of one CPU run on an 840-frame case: {peak_gib:.2f} GiB "
          f"({peak_gib * 2**30 / 1e9:.2f} GB)")
    assert peak_gib * 2**30 < 3e9  # under 3 GB with the small model


# ------------------------------------------------------------------------------------------ progress

def network_lines(stderr: str) -> list[str]:
    """The progress lines of a run's log, without their time stamps."""
    return [line.split(" INFO ", 1)[1] for line in stderr.splitlines() if " INFO network: " in line]


def test_without_a_terminal_the_network_logs_start_each_pass_and_end_and_quiet_hides_them(small_case,
                                                                                         random_weights, tmp_path):
    """stderr is a pipe here, as in a container's log: a line when the network starts, one per pass of the
    search, one when it is done, never one per batch (72 frames at batch 4 are 18 batches)."""
    case, _, _ = small_case
    common = ("--input", str(case), "--weights", str(random_weights), "--device", "cpu", "--batch-size", "4")
    dense = run_cli(*common, "--output", str(tmp_path / "dense"), check=True)
    lines = network_lines(dense.stderr)
    assert re.fullmatch(r"network: started on 72 frames, \d+ of them not lift-off", lines[0]), lines
    assert re.fullmatch(r"network: scan, \d+ frames", lines[1]), lines
    assert re.fullmatch(r"network: done in [0-9.]+ s, \d+ frames encoded, \d+ decoded", lines[-1]), lines
    assert len(lines) <= 4  # start, scan, perhaps the late masks, end
    log = dense.stderr
    assert log.index("running on") < log.index("network: started") < log.index("network: done") \
        < log.index("chosen frame")

    coarse = network_lines(run_cli(*common, "--coarse-stride", "3", "--output", str(tmp_path / "coarse"),
                                   check=True).stderr)
    assert re.fullmatch(r"network: coarse pass, stride 3, \d+ frames", coarse[1]), coarse
    assert all(re.fullmatch(r"network: (refinement \d+|late masks), \d+ frames", line) for line in coarse[2:-1])
    assert coarse[-1].startswith("network: done in ")

    quiet = run_cli(*common, "--quiet", "--output", str(tmp_path / "quiet"), check=True)
    assert "network:" not in quiet.stderr and " INFO " not in quiet.stderr


# ------------------------------------------------------------------------------------------ options

@pytest.mark.parametrize("module", ["algorithm", "algorithm.serve"])
@pytest.mark.parametrize("option, value", [("--batch-size", "0"), ("--batch-size", "-3"),
                                           ("--coarse-stride", "0"), ("--batch-size", "many")])
def test_a_bad_number_is_an_argparse_error_naming_the_option(module, option, value):
    completed = subprocess.run([sys.executable, "-m", module, option, value], cwd=REPO, capture_output=True,
                               text=True, timeout=120)
    assert completed.returncode == 2
    assert f"error: argument {option}: expected a positive integer or 'auto', got '{value}'" in completed.stderr


def test_every_inference_option_reaches_the_configuration_typed():
    from algorithm.__main__ import parse_args
    from algorithm.config import Config
    from algorithm.options import inference_overrides

    args = parse_args(["--device", "cpu", "--precision", "fp32", "--batch-size", "6", "--coarse-stride", "auto"])
    overrides = inference_overrides(args)
    assert overrides == {"device": "cpu", "precision": "fp32", "batch_size": 6, "coarse_stride": 0}
    inference = Config().replace(**overrides).inference
    assert (inference.device, inference.precision, inference.batch_size, inference.coarse_stride) == \
        ("cpu", "fp32", 6, 0)
    assert inference_overrides(parse_args([])) == {"device": "auto"}  # the rest: the configuration's own


def test_every_help_text_states_its_default():
    from algorithm.__main__ import build_parser as cli_parser
    from algorithm.serve import build_parser as serve_parser
    from training.speed.bench import build_parser as speed_parser

    for build in (cli_parser, serve_parser, speed_parser):
        for action in build()._actions:
            if action.option_strings and action.dest not in ("help", "version"):
                assert "default" in (action.help or ""), (build.__module__, action.option_strings)
