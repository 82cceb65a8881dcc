"""The ellipse-fit study: placement of cut abdomens, the predicted-edge conditions, the written outputs."""
import json

import cv2
import numpy as np
import pytest

from algorithm.biometry import EDGE_TOLERANCE_PX
from training.scoring import ellipse_study as study
from training.data.replica import sector_fov

FOV = sector_fov()


def test_abdomens_are_placed_at_the_asked_cut():
    truths = study.place_ellipses(np.random.default_rng(3), 4, FOV)
    for truth in truths:
        assert 0.18 <= truth.cut <= 0.52
        assert truth.cut == pytest.approx(study.outside_share(truth.center, truth.semi_axes, truth.angle_deg, FOV))
        assert 141.0 <= truth.perimeter_px * 0.28 <= 352.0  # Ramanujan vs exact: within 1e-5


def test_a_mask_stopping_short_of_the_edge_is_what_the_band_is_for():
    truths = study.place_ellipses(np.random.default_rng(5), 3, FOV)
    names = ["drawn", "stops 3 px short of the FOV edge"]
    records = study.run_study(truths, FOV, chosen_conditions={k: study.conditions()[k] for k in names})
    summary = study.summarise(records)
    chosen = f"project, {EDGE_TOLERANCE_PX} px band"
    assert summary["drawn"][chosen]["max_abs"] < 0.01
    assert summary["stops 3 px short of the FOV edge"][chosen]["max_abs"] < 0.01
    assert summary["stops 3 px short of the FOV edge"]["project, 2 px band"]["mean"] < -0.05
    assert all(s["n"] == 3 for by_fit in summary.values() for s in by_fit.values())


def test_the_command_writes_table_records_and_picture(tmp_path, capsys):
    assert study.main(["--out", str(tmp_path), "--ellipses", "2", "--seed", "1"]) == 0
    table = (tmp_path / "table.md").read_text()
    assert "the replica's sector" in table
    for condition in study.conditions():
        assert f"| {condition} |" in table
    results = json.loads((tmp_path / "results.json").read_text())
    assert len(results["records"]) == 2 * len(study.conditions()) * len(study.fits())
    picture = cv2.imread(str(tmp_path / "examples.png"))
    assert picture is not None and picture.shape[0] >= 300 and picture.shape[1] == 900
    assert "fits in" in capsys.readouterr().out
    assert study.main(["--out", str(tmp_path), "--fov-mask", str(tmp_path / "absent.mha")]) == 2
