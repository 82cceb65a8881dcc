"""`make demo` (python -m training demo): the answer, then the case's challenge score against the replica."""
from __future__ import annotations

import re

import pytest

from algorithm.weights_location import MODEL_MOUNT
from training.__main__ import main as training_main


@pytest.mark.skipif(MODEL_MOUNT.exists(), reason=f"{MODEL_MOUNT} exists: the demo would not use the bundled weights")
def test_the_demo_prints_the_answer_then_its_score_against_the_replica(tmp_path, capsys):
    assert training_main(["demo", "--folder", str(tmp_path / "demo"), "--frames-per-sweep", "4",
                          "--device", "cpu"]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.strip()]
    answer = next(i for i, line in enumerate(lines) if line.startswith("chosen frame: "))
    scored = re.fullmatch(r"challenge score against the replica's reference: (-?[0-9.]+) \(WFSS [0-9.]+, DSC_soft "
                          r"[0-9.]+, NAE_AC [0-9.]+, HD [0-9.]+ mm(, reference AC [0-9.]+ mm)?\)", lines[answer + 1])
    assert scored and float(scored.group(1)) <= 1.0, lines
    assert (tmp_path / "demo" / "output" / "fetalclipseg" / "chosen_frame.png").is_file()
