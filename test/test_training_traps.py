"""A newcomer's first hour with `python -m training`: what a mistake costs.

Every expected failure (missing or corrupt FetalCLIP weights, a missing prepared or data folder, a bad option
value) is one `error: ...` line and exit 2, with no traceback and no run folder left behind; `--config full`
refuses to train a random encoder unless asked (`--fetalclip none`); a run stopped by Ctrl-C keeps its
finished epochs in `<out>.partial`, which `--resume` completes; every option's help states its default.
"""
from __future__ import annotations

import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from training.__main__ import COMMANDS, main
from training.data import layout
from training.data.prepare import prepare
from training.data.replica import write_dataset
from training.params import config_from_args, train_parser

REPO = Path(__file__).resolve().parents[1]
# The speed benchmark's options are its owners' (training/speed).
HELP_CHECKED = [command for command in COMMANDS if command != "speed"]
SMALL_RUN = ["--config", "small", "--train-encoder", "--device", "cpu", "--precision", "fp32", "--batch-size", "4",
             "--negatives-per-positive", "1", "--val-max-frames", "4", "--no-augment", "--no-progress",
             "--threads", "1"]


@pytest.fixture(scope="module")
def replica(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("replica")
    write_dataset(root, cases=4, frames_per_sweep=6, seed=5, progress=False)
    return root


@pytest.fixture(scope="module")
def prepared(replica, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("prepared")
    prepare(replica, out, seed=1, all_sweeps=True, progress=False)
    return out


def run_training(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "training", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout)


def one_error_line(stderr: str) -> str:
    """The only line of `stderr` that is neither a log line nor a progress bar: it starts with 'error: '; no
    traceback anywhere."""
    assert "Traceback" not in stderr, stderr
    lines = [line for line in stderr.splitlines()
             if line.strip() and not re.match(r"\d\d:\d\d:\d\d |[\w ]+: +\d+%\|", line)]
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    return lines[0]


def assert_no_run_folder(out: Path) -> None:
    assert not out.exists() and not out.with_name(out.name + ".partial").exists()


# ------------------------------------------------------------------------------------------ FetalCLIP weights

def test_full_config_without_fetalclip_refuses_to_start(prepared, tmp_path):
    out = tmp_path / "run"
    done = run_training("train", "--prepared", str(prepared), "--out", str(out), "--config", "full")
    assert done.returncode == 2
    assert "--fetalclip" in one_error_line(done.stderr) and "none" in done.stderr
    assert_no_run_folder(out)


def test_fetalclip_none_asks_for_random_weights_on_purpose(prepared, tmp_path):
    base = ["--prepared", str(prepared), "--out", str(tmp_path / "run"), "--config", "full"]
    cfg = config_from_args(train_parser().parse_args([*base, "--fetalclip", "none"]))
    assert cfg.config == "full" and cfg.fetalclip is None
    weights = tmp_path / "fetalclip.pt"
    weights.write_bytes(b"weights")
    assert config_from_args(train_parser().parse_args([*base, "--fetalclip", str(weights)])).fetalclip == weights


def test_reproduce_refuses_the_full_config_without_fetalclip_the_same_way(replica, tmp_path, capsys):
    out = tmp_path / "reproduce"
    assert main(["reproduce", "--data", str(replica), "--out", str(out), "--config", "full"]) == 2
    assert "--fetalclip" in one_error_line(capsys.readouterr().err)
    assert not out.exists()


def test_a_missing_fetalclip_file_is_one_line_naming_it(prepared, tmp_path):
    out = tmp_path / "run"
    done = run_training("train", "--prepared", str(prepared), "--out", str(out), "--fetalclip",
                        str(tmp_path / "FetalCLIP_weights.pt"))
    assert done.returncode == 2
    line = one_error_line(done.stderr)
    assert "--fetalclip" in line and "FetalCLIP_weights.pt" in line
    assert_no_run_folder(out)


def test_a_corrupt_fetalclip_file_is_one_line_and_leaves_no_run_folder(prepared, tmp_path):
    corrupt = tmp_path / "FetalCLIP_weights.pt"
    corrupt.write_bytes(b"PK\x03\x04 not a checkpoint" * 50)
    out = tmp_path / "run"
    done = run_training("train", "--prepared", str(prepared), "--out", str(out), "--fetalclip", str(corrupt),
                        *SMALL_RUN[:2], "--device", "cpu")
    assert done.returncode == 2
    assert str(corrupt) in one_error_line(done.stderr)
    assert_no_run_folder(out)


# ------------------------------------------------------------------------------------------ folders

def test_a_missing_or_unprepared_prepared_folder_is_one_line(tmp_path):
    for prepared, says in ((tmp_path / "absent", "no such folder"), (tmp_path, "run python -m training prepare")):
        out = tmp_path / "run"
        done = run_training("train", "--prepared", str(prepared), "--out", str(out), "--config", "small")
        assert done.returncode == 2
        line = one_error_line(done.stderr)
        assert "--prepared" in line and says in line
        assert_no_run_folder(out)


def test_a_missing_data_folder_is_one_line(tmp_path, capsys):
    for command in ("prepare", "reproduce"):
        with pytest.raises(SystemExit) as exit_info:
            main([command, "--data", str(tmp_path / "absent"), "--out", str(tmp_path / "out")])
        assert exit_info.value.code == 2
        assert "--data" in one_error_line(capsys.readouterr().err)
        assert not (tmp_path / "out").exists()


def test_an_out_folder_that_is_not_a_run_is_refused_and_left_alone(prepared, tmp_path):
    out = tmp_path / "notes"
    out.mkdir()
    (out / "mine.txt").write_text("keep me")
    done = run_training("train", "--prepared", str(prepared), "--out", str(out), *SMALL_RUN)
    assert done.returncode == 2
    assert "not a folder this command wrote" in one_error_line(done.stderr)
    assert [p.name for p in out.iterdir()] == ["mine.txt"]


def test_a_preparation_that_fails_part_way_leaves_no_folder(replica, tmp_path):
    data = tmp_path / "data"
    for sub in (layout.IMAGES_DIR, layout.MASKS_DIR):
        (data / sub).mkdir(parents=True)
        for path in sorted((replica / sub).glob("*.mha")):
            (data / sub / path.name).symlink_to(path)
    last = sorted((data / layout.MASKS_DIR).glob("*.mha"))[-1]
    last.unlink()
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((6, 10, 12), np.uint8)), str(last))  # not the image's shape
    out = tmp_path / "prepared"
    done = run_training("prepare", "--data", str(data), "--out", str(out), "--all-sweeps")
    assert done.returncode == 2
    assert "differ" in one_error_line(done.stderr)
    assert_no_run_folder(out)


# ------------------------------------------------------------------------------------------ options

@pytest.mark.parametrize("command, option, value, says", [
    ("train", "--batch-size", "0", "must be at least 1, got 0"),
    ("train", "--epochs", "0", "must be at least 1, got 0"),
    ("train", "--lr", "0", "must be more than 0, got 0"),
    ("train", "--lr", "-0.001", "must be more than 0, got -0.001"),
    ("train", "--lr", "nan", "expected a finite number"),
    ("train", "--trials", "two", "expected an integer, got 'two'"),
    ("train", "--hard-negatives", "1.5", "must be at most 1, got 1.5"),
    ("train", "--workers", "-1", "must be at least 0, got -1"),
    ("reproduce", "--batch-size", "0", "must be at least 1, got 0"),
    ("demo-weights", "--epochs", "0", "must be at least 1, got 0"),
    ("memory", "--batch-size", "0", "must be at least 1, got 0"),
])
def test_bad_numbers_are_refused_at_the_parser_naming_the_option(prepared, tmp_path, capsys, command, option,
                                                                  value, says):
    needed = {"train": ["--prepared", str(prepared), "--out", str(tmp_path / "run")],
              "reproduce": ["--data", str(prepared), "--out", str(tmp_path / "run")]}.get(command, [])
    with pytest.raises(SystemExit) as exit_info:
        main([command, *needed, option, value])
    assert exit_info.value.code == 2
    line = one_error_line(capsys.readouterr().err)
    assert line.startswith(f"error: argument {option}: {says}")
    assert not (tmp_path / "run").exists()


def test_the_former_mode_name_is_read_as_the_current_one(prepared, tmp_path):
    args = train_parser().parse_args(["--prepared", str(prepared), "--out", str(tmp_path), "--mode", "cls"])
    assert args.mode == "probe"


def test_the_acceptance_seed_is_refused_by_demo_weights(tmp_path, capsys):
    assert main(["demo-weights", "--seed", "424242", "--work", str(tmp_path / "work")]) == 2
    assert "424242" in one_error_line(capsys.readouterr().err)
    assert not (tmp_path / "work").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="a usable GPU: --device cuda is a valid choice here")
def test_memory_on_a_gpu_this_machine_lacks_is_one_error_line(capsys):
    assert main(["memory", "--device", "cuda"]) == 2
    assert "no usable CUDA GPU" in one_error_line(capsys.readouterr().err)


def option_blocks(help_text: str) -> dict[str, str]:
    """--option -> its help text, from `--help` output."""
    blocks: dict[str, str] = {}
    current = None
    for line in help_text.split("\n\n", 1)[1].splitlines():
        match = re.match(r"  (-\w, )?(--[\w-]+)", line)
        if match:
            current = match.group(2)
            blocks[current] = line
        elif current and line.startswith("   "):
            blocks[current] += " " + line.strip()
        else:
            current = None
    return blocks


def required_options(help_text: str) -> set[str]:
    """The options the usage line shows outside brackets."""
    usage = help_text.split("\n\n", 1)[0]
    while re.search(r"\[[^\[\]]*\]", usage):
        usage = re.sub(r"\[[^\[\]]*\]", "", usage)
    return set(re.findall(r"--[\w-]+", usage))


@pytest.mark.parametrize("command", HELP_CHECKED)
def test_every_option_states_its_default(command, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "100")
    with pytest.raises(SystemExit):
        main([command, "--help"])
    text = capsys.readouterr().out
    blocks = option_blocks(text)
    assert len(blocks) > 2
    required = required_options(text)
    silent = [option for option, block in blocks.items()
              if option != "--help" and option not in required and "default" not in block]
    assert not silent, f"{command}: options whose help does not state the default: {silent}"


# ------------------------------------------------------------------------------------------ Ctrl-C

@pytest.mark.slow  # three training processes: about a minute and a half
def test_ctrl_c_keeps_the_finished_epochs_and_resume_completes_the_run(prepared, tmp_path):
    out = tmp_path / "run"
    partial = tmp_path / "run.partial"
    run = subprocess.Popen([sys.executable, "-m", "training", "train", "--prepared", str(prepared), "--out", str(out),
                            "--epochs", "200", *SMALL_RUN], cwd=REPO, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 240
        while not (partial / "trial_0" / "last.pt").is_file():
            assert run.poll() is None, run.communicate()
            assert time.monotonic() < deadline, "no epoch finished in time"
            time.sleep(0.5)
        time.sleep(1.0)
        run.send_signal(signal.SIGINT)
        _, stderr = run.communicate(timeout=120)
    finally:
        if run.poll() is None:
            run.kill()
    assert run.returncode == 130
    line = one_error_line(stderr)
    assert line.startswith("error: interrupted by SIGINT") and str(partial) in line and "--resume" in line
    assert not out.exists()
    assert (partial / "trial_0" / "last.pt").is_file() and (partial / "trial_0" / "best.pt").is_file()

    again = run_training("train", "--prepared", str(prepared), "--out", str(out), "--epochs", "2", *SMALL_RUN)
    assert again.returncode == 2 and "--resume" in one_error_line(again.stderr)
    assert (partial / "trial_0" / "last.pt").is_file()

    resumed = run_training("train", "--prepared", str(prepared), "--out", str(out), "--epochs", "2", "--resume",
                           *SMALL_RUN)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert not partial.exists()
    assert (out / "summary.json").is_file() and (out / "fetalclipseg.safetensors").is_file()
    assert (out / "trial_0" / "last.pt").is_file()
