"""`python -m training compare`: reproduce runs side by side, paired per test case."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from training.scoring.compare import compare

REPO = Path(__file__).resolve().parents[1]


def write_run(root: Path, scores: dict[str, float], all_sweeps: bool = False, decoder: str = "unetr",
              modes: tuple[str, ...] = ("fixed",)) -> Path:
    """A reproduce output folder as `reproduce` writes it: reproduce.json, per mode summary.json and
    challenge/challenge.json."""
    entries = {}
    for mode in modes:
        cases = {uuid: {"frame": 3, "score": s} for uuid, s in scores.items()}
        aggregate = {"n_cases": len(scores), "score": float(np.mean(list(scores.values()))), "wfss": 0.5,
                     "dsc_soft": 0.4, "nae_ac": 0.3, "hd": 9.0}
        (root / mode / "challenge").mkdir(parents=True)
        (root / mode / "challenge" / "challenge.json").write_text(json.dumps({"cases": cases, "aggregate": aggregate}))
        (root / mode / "summary.json").write_text(json.dumps({"config": {"decoder": decoder, "epochs": 5}}))
        entries[mode] = {"challenge": aggregate, "parameters": {"trainable": 1_003_397},
                         "test_mean_std": {"mask_rule": {"f1": {"mean": 0.5, "std": 0.1}},
                                           "head": {"f1": {"mean": 0.4, "std": 0.0}}}}
    (root / "reproduce.json").write_text(json.dumps({"all_sweeps": all_sweeps, "modes": entries}))
    return root


def test_rows_are_paired_over_the_common_test_cases(tmp_path):
    reference = {"case-a": 0.9, "case-b": 0.0, "case-c": 0.5, "only-in-ac": 1.0}
    other = {"case-a": 0.7, "case-b": 0.0, "case-c": 0.8, "only-in-all": 0.2}
    ac = write_run(tmp_path / "ac", reference)
    every = write_run(tmp_path / "every", other, all_sweeps=True, decoder="separable")
    result = compare([f"AC={ac}", f"all={every}"], tmp_path / "out")
    pairs = result["paired"]
    assert pairs["cases"] == ["case-a", "case-b", "case-c"] and pairs["reference"] == "AC"
    difference = pairs["against_reference"]["all"]
    assert difference["mean_difference"] == pytest.approx(np.mean([0.7 - 0.9, 0.0, 0.8 - 0.5]))
    assert (difference["higher"], difference["same"], difference["lower"]) == (1, 1, 1)
    table = (tmp_path / "out" / "comparison.md").read_text()
    assert "| AC | AC sweeps | unetr | 5 | 1.00 M |" in table and "| all | all sweeps | separable |" in table
    assert "0.500 ± 0.100" in table and "3 cases common to every row" in table and "only-in" not in table
    with Image.open(tmp_path / "out" / "comparison.png") as png:
        assert png.format == "PNG" and png.width >= 400
    assert json.loads((tmp_path / "out" / "comparison.json").read_text())["paired"] == pairs


def test_several_modes_of_one_run_are_rows_of_their_own(tmp_path):
    run = write_run(tmp_path / "r", {"x": 0.25, "y": 0.75}, modes=("fixed", "paper"))
    result = compare([str(run)], tmp_path / "out")
    assert [r["row"] for r in result["rows"]] == ["r / fixed", "r / paper"]
    assert result["paired"]["against_reference"]["r / paper"]["same"] == 2


def test_rows_named_alike_are_refused(tmp_path):
    run = write_run(tmp_path / "r", {"x": 0.5})
    with pytest.raises(ValueError, match="LABEL=RUN"):
        compare([str(run), str(run)], tmp_path / "out")


def test_a_folder_that_is_not_a_reproduce_output_is_one_error_line(tmp_path):
    (tmp_path / "empty").mkdir()
    result = subprocess.run([sys.executable, "-m", "training", "compare", str(tmp_path / "empty"), "--out",
                             str(tmp_path / "out")], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [f"error: {tmp_path / 'empty' / 'reproduce.json'} is missing "
                                                  "(not a finished `reproduce` output?)"]
    assert not (tmp_path / "out" / "comparison.md").exists()


def test_a_reproduce_json_that_is_not_an_object_is_refused(tmp_path):
    run = write_run(tmp_path / "r", {"x": 0.5})
    (run / "reproduce.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="holds a JSON list"):
        compare([str(run)], tmp_path / "out")
