"""The leaderboard levers: test-time flip, the sweep-first rule, the sub-pixel AC fit, the ellipse as the mask,
checkpoint-carried defaults, and the study that measures them (`python -m training levers`).

Each lever has a test that fails when the lever does nothing.
"""
from __future__ import annotations

import copy
import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import ndimage
from safetensors import safe_open

import algorithm
from algorithm import biometry
from algorithm.__main__ import main as algorithm_main
from algorithm.config import InferenceConfig, ModelConfig
from algorithm.contract import read_stack
from algorithm.model.checkpoint import CheckpointError, read_checkpoint_info, save_checkpoint
from algorithm.model.fetalclipseg import build_model
from algorithm.network import load_network
from algorithm.predict import decide, predict
from algorithm.search import FrameScores, FrameSearch, resolve_tta
from algorithm.select import select_frame
from training.__main__ import main as training_main
from training.cli import UsageError
from training.data import layout
from training.data.replica import write_dataset
from training.speed.levers import VARIANTS, bootstrap_interval, full_size_model

BUNDLED = Path(algorithm.__file__).resolve().parent / "weights" / "fetalclipseg_small_replica.safetensors"


@pytest.fixture(scope="module")
def bundled() -> Path:
    return BUNDLED


@pytest.fixture(scope="module")
def stack(small_case):
    _, release, uuid = small_case
    return read_stack(layout.image_path(release, uuid)).array


# ------------------------------------------------------------------------------------------ test-time flip

def test_flip_averages_each_decoded_frame_with_its_mirror_image(bundled, stack, one_torch_thread):
    network, _ = load_network(bundled, {"device": "cpu", "lazy_decoder": "off"})
    search = FrameSearch.for_network(network)
    found = search(stack, network, search.frames_to_encode(stack))
    flipped = copy.deepcopy(found.scores)
    augmented = search.augment(stack, network, flipped)
    decoded = np.flatnonzero(found.scores.decoded)
    assert augmented == len(decoded) > 0

    # the mirror images by hand, through the network's public seam
    frames = decoded[:4]
    inputs = network.preprocess(torch.from_numpy(np.ascontiguousarray(stack[frames][..., ::-1])))
    features, mirror_probabilities = network.encode(inputs)
    mirror_maps, _ = network.decode(inputs, features)
    expected = 0.5 * (found.scores.probabilities[frames] + mirror_probabilities.float().numpy())
    np.testing.assert_allclose(flipped.probabilities[frames], expected, atol=1e-6)
    for row, frame in enumerate(frames.tolist()):
        averaged = 0.5 * (found.scores.abdomen_maps[frame].float() + mirror_maps[row].flip(-1).float())
        torch.testing.assert_close(flipped.abdomen_maps[frame].float(), averaged, atol=1e-3, rtol=0)
        assert flipped.mask_fractions[frame] == pytest.approx(float((averaged >= 0.5).float().mean()), abs=1e-3)
    assert not np.allclose(flipped.probabilities[decoded], found.scores.probabilities[decoded])
    untouched = found.scores.scored & ~found.scores.decoded
    np.testing.assert_array_equal(flipped.probabilities[untouched], found.scores.probabilities[untouched])


def test_predict_with_flip_encodes_the_decoded_frames_twice_and_says_so(bundled, stack, one_torch_thread):
    plain, _ = load_network(bundled, {"device": "cpu"})
    flip, _ = load_network(bundled, {"device": "cpu", "tta": "flip"})
    without, with_flip = predict(stack, plain), predict(stack, flip)
    assert with_flip.search["frames_augmented"] == without.frames_decoded > 0
    assert with_flip.frames_encoded == without.frames_encoded + without.frames_decoded
    assert with_flip.summary()["levers"]["tta"] == "flip" and without.summary()["levers"]["tta"] == "none"


def test_auto_flips_on_cuda_only_and_an_unknown_mode_is_refused():
    assert resolve_tta(InferenceConfig(), torch.device("cuda")) == "flip"
    assert resolve_tta(InferenceConfig(), torch.device("cpu")) == "none"
    assert resolve_tta(InferenceConfig(tta="flip"), torch.device("cpu")) == "flip"
    assert resolve_tta(InferenceConfig(tta="none"), torch.device("cuda")) == "none"
    with pytest.raises(ValueError, match="rotate"):
        resolve_tta(InferenceConfig(tta="rotate"), torch.device("cpu"))


# ------------------------------------------------------------------------------------------ sweep-first rule

def test_the_sweep_rule_takes_the_sweep_with_most_qualifying_frames_then_its_best_frame():
    frames = 60  # 6 sweeps of 10
    probabilities = np.tile([1.0, 0.0, 0.0], (frames, 1))
    fractions = np.zeros(frames)
    probabilities[5] = [0.0, 0.05, 0.95]  # sweep 1: one excellent frame
    fractions[5] = 0.2
    probabilities[32:38] = [0.0, 0.35, 0.65]  # sweep 4: six good frames, frame 35 the largest
    fractions[32:38] = [0.08, 0.09, 0.1, 0.12, 0.1, 0.09]
    config = InferenceConfig(smoothing_window=1)
    by_frame = select_frame(probabilities, fractions, config)
    by_sweep = select_frame(probabilities, fractions, dataclasses.replace(config, selection="sweep"))
    assert by_frame.frame == 5
    assert by_sweep.frame == 35
    assert [c.qualifying_frames for c in by_sweep.candidates] == [1, 0, 0, 6, 0, 0]
    with pytest.raises(ValueError, match="selection rule"):
        select_frame(probabilities, fractions, dataclasses.replace(config, selection="best"))


def test_both_rules_answer_no_frame_when_nothing_qualifies():
    probabilities = np.tile([0.9, 0.05, 0.05], (60, 1))
    for rule in ("frame", "sweep"):
        assert select_frame(probabilities, np.full(60, 0.2), InferenceConfig(selection=rule)).frame == -1


# ------------------------------------------------------------------------------------------ sub-pixel AC

def soft_ellipse(shape, centre, axes, angle_deg, blur=2.0, supersample=4) -> np.ndarray:
    """A probability map: an ellipse's pixel coverage, blurred (what an upsampled network map looks like)."""
    h, w = shape
    y, x = (np.mgrid[0:h * supersample, 0:w * supersample] + 0.5) / supersample - 0.5
    c, s = np.cos(np.radians(angle_deg)), np.sin(np.radians(angle_deg))
    u = ((x - centre[0]) * c + (y - centre[1]) * s) / axes[0]
    v = (-(x - centre[0]) * s + (y - centre[1]) * c) / axes[1]
    coverage = (u * u + v * v <= 1).reshape(h, supersample, w, supersample).mean(axis=(1, 3))
    return ndimage.gaussian_filter(coverage, blur)


@pytest.mark.parametrize("cut", [None, 470])
def test_the_subpixel_fit_measures_a_soft_ellipse_closer_than_the_pixel_outline(cut):
    probability = soft_ellipse((562, 744), (372.0, 281.0), (150.0, 110.0), 20.0)
    fov = np.ones(probability.shape, bool)
    if cut:
        fov[:, cut:] = False  # the abdomen cut by the field of view: the fits extrapolate across it
    mask = ((probability >= 0.5) & fov).astype(np.uint8)
    truth = biometry.ramanujan_perimeter(150.0, 110.0)
    contour = biometry.fit_ellipse(mask, fov).perimeter_px
    subpixel = biometry.fit_ellipse_subpixel(probability, mask, fov).perimeter_px
    assert abs(subpixel - truth) / truth < 0.001
    assert abs(subpixel - truth) < 0.25 * abs(contour - truth)  # the outline runs half a pixel inside


def test_the_subpixel_fit_ignores_other_blobs_and_answers_none_for_an_empty_mask():
    probability = soft_ellipse((300, 400), (150.0, 150.0), (80.0, 60.0), 0.0)
    probability += soft_ellipse((300, 400), (340.0, 150.0), (30.0, 30.0), 0.0)  # a second, smaller blob
    mask = ndimage.binary_fill_holes(probability >= 0.5)
    labels, _ = ndimage.label(mask)
    abdomen = (labels == labels[150, 150]).astype(np.uint8)
    ellipse = biometry.fit_ellipse_subpixel(probability, abdomen)
    assert ellipse.perimeter_px == pytest.approx(biometry.ramanujan_perimeter(80.0, 60.0), rel=0.002)
    assert biometry.fit_ellipse_subpixel(probability, np.zeros_like(abdomen)) is None


# ------------------------------------------------------------------------------------------ the ellipse as the mask

def test_the_ellipse_mask_is_the_fitted_ellipse_filled_inside_the_fov():
    probability = soft_ellipse((562, 744), (372.0, 281.0), (150.0, 110.0), 20.0)
    probability[250:310, 330:400] *= 0.2  # a dark stomach bubble inside the abdomen
    fov = np.ones(probability.shape, bool)
    fov[:, 480:] = False
    scores = FrameScores.empty(6)
    scores.probabilities[:] = [0.0, 0.1, 0.9]
    scores.mask_fractions[:] = 0.0
    scores.mask_fractions[2] = 0.3
    scores.abdomen_maps[2] = torch.from_numpy(probability).half()  # already at frame size: upsampling is a copy
    config = InferenceConfig(sweeps=1, smoothing_window=1)
    plain = decide(scores, fov, probability.shape, config)
    drawn = decide(scores, fov, probability.shape, dataclasses.replace(config, mask_output="ellipse"))
    assert plain["frame"] == drawn["frame"] == 2
    expected = plain["ellipse"].draw(probability.shape) & fov
    np.testing.assert_array_equal(drawn["mask"], expected)
    assert not np.array_equal(drawn["mask"], plain["mask"])
    assert not drawn["mask"][:, 480:].any()


# ------------------------------------------------------------------------------------------ checkpoint defaults

def test_a_checkpoint_carries_its_levers_and_the_command_line_overrides_them(bundled, tmp_path):
    chosen = tmp_path / "with_levers.safetensors"
    assert training_main(["inference-defaults", str(bundled), "--out", str(chosen), "--tta", "flip",
                          "--selection", "sweep"]) == 0
    assert read_checkpoint_info(chosen).inference_defaults == {"tta": "flip", "selection": "sweep"}
    network, info = load_network(chosen, {"device": "cpu"})
    assert (network.config.inference.tta, network.config.inference.selection) == ("flip", "sweep")
    assert info["inference_defaults"] == {"tta": "flip", "selection": "sweep"}
    network, _ = load_network(chosen, {"device": "cpu", "tta": "none"})
    assert (network.config.inference.tta, network.config.inference.selection) == ("none", "sweep")
    with safe_open(str(chosen), "pt") as new, safe_open(str(bundled), "pt") as old:
        assert set(new.keys()) == set(old.keys())
        assert all(torch.equal(new.get_tensor(k), old.get_tensor(k)) for k in list(old.keys())[:5])


def test_a_checkpoint_with_an_unknown_lever_value_is_refused(bundled, tmp_path):
    from safetensors.torch import load_file, save_file

    with safe_open(str(bundled), "pt") as handle:
        metadata = handle.metadata()
    extra = json.loads(metadata["extra"])
    extra["inference"] = {"tta": "rotate"}
    bad = tmp_path / "bad.safetensors"
    save_file(load_file(str(bundled)), str(bad), metadata={**metadata, "extra": json.dumps(extra)})
    with pytest.raises(CheckpointError, match="tta"):
        read_checkpoint_info(bad)


def test_the_cli_records_the_levers_in_result_json(bundled, small_case, tmp_path):
    case, _, _ = small_case
    out = tmp_path / "out"
    assert algorithm_main(["--input", str(case), "--output", str(out), "--weights", str(bundled), "--device",
                           "cpu", "--quiet", "--selection", "sweep", "--ac-fit", "subpixel"]) == 0
    result = json.loads((out / "fetalclipseg" / "result.json").read_text())
    assert result["levers"] == {"tta": "none", "selection": "sweep", "ac_fit": "subpixel", "mask_output": "mask"}


# ------------------------------------------------------------------------------------------ the study

def test_bootstrap_interval_brackets_the_mean_and_collapses_on_constant_differences():
    assert bootstrap_interval([0.02] * 30) == pytest.approx((0.02, 0.02))
    values = np.random.default_rng(1).normal(0.01, 0.05, size=40)
    low, high = bootstrap_interval(values)
    assert low < values.mean() < high
    assert high - low == pytest.approx(2 * 1.96 * values.std(ddof=1) / np.sqrt(40), rel=0.25)


def test_the_study_scores_every_variant_on_every_case_and_resumes(bundled, tmp_path, capsys):
    data = tmp_path / "test"
    write_dataset(data, cases=2, frames_per_sweep=8, seed=23)
    out = tmp_path / "levers"
    args = ["levers", "--weights", str(bundled), "--data", str(data), "--out", str(out), "--no-flops",
            "--no-progress"]
    assert training_main(args) == 0
    records = [json.loads(line) for line in (out / "levers.jsonl").read_text().splitlines()]
    assert len(records) == 2 * len(VARIANTS)
    summary = json.loads((out / "levers.json").read_text())
    assert summary["cases"] == 2 and set(summary["variants"]) == set(VARIANTS)
    flip, base = summary["variants"]["tta flip"], summary["variants"]["baseline"]
    assert flip["frames_encoded"] == base["frames_encoded"] + base["frames_decoded"]
    assert "| tta flip |" in capsys.readouterr().out
    assert (out / "levers.png").read_bytes().startswith(b"\x89PNG")
    assert training_main(args) == 0  # a second run finds every case done and adds nothing
    assert len((out / "levers.jsonl").read_text().splitlines()) == len(records)


def test_no_flip_skips_the_flip_pass_and_every_flip_row(bundled, tmp_path):
    data = tmp_path / "test"
    write_dataset(data, cases=2, frames_per_sweep=8, seed=23)
    copy_of = tmp_path / "copy" / "fetalclipseg.safetensors"
    copy_of.parent.mkdir()
    copy_of.write_bytes(bundled.read_bytes())
    out = tmp_path / "levers"
    assert training_main(["levers", "--weights", str(bundled), "--candidate", "same", str(copy_of), "--data",
                          str(data), "--out", str(out), "--no-flip", "--no-flops", "--no-progress"]) == 0
    records = [json.loads(line) for line in (out / "levers.jsonl").read_text().splitlines()]
    assert len(records) == 2 * 2 * (len(VARIANTS) - 1)
    assert not any(r["variant"] == "tta flip" for r in records)
    summary = json.loads((out / "levers.json").read_text())
    assert summary["cases"] == 2
    assert set(summary["variants"]) == (set(VARIANTS) - {"tta flip"}) | {"same"}
    assert summary["variants"]["same"]["score_difference"]["mean"] == pytest.approx(0.0)  # the same weights
    assert "tta flip" not in (out / "levers.md").read_text()


def test_two_shards_split_the_cases_and_their_journals_summarise_as_one(bundled, tmp_path):
    data = tmp_path / "test"
    write_dataset(data, cases=2, frames_per_sweep=8, seed=29)
    for k in (1, 2):
        assert training_main(["levers", "--weights", str(bundled), "--data", str(data), "--out",
                              str(tmp_path / f"part{k}"), "--shard", f"{k}/2", "--threads", "1", "--no-flops",
                              "--no-progress"]) == 0
    parts = [(tmp_path / f"part{k}" / "levers.jsonl").read_text() for k in (1, 2)]
    cases = [{json.loads(line)["case"] for line in part.splitlines()} for part in parts]
    assert len(cases[0]) == len(cases[1]) == 1 and cases[0] != cases[1]
    joined = tmp_path / "joined"
    joined.mkdir()
    (joined / "levers.jsonl").write_text("".join(parts))
    assert training_main(["levers", "--weights", str(bundled), "--data", str(data), "--out", str(joined),
                          "--summary-only", "--no-flops"]) == 0
    assert json.loads((joined / "levers.json").read_text())["cases"] == 2


@pytest.mark.parametrize("shard", ["0/2", "3/2", "a/b", "2"])
def test_a_bad_shard_is_refused_at_the_parser(shard, capsys):
    with pytest.raises(SystemExit) as exit_info:
        training_main(["levers", "--weights", "w.safetensors", "--data", ".", "--out", "x", "--shard", shard])
    assert exit_info.value.code == 2 and "--shard" in capsys.readouterr().err


def test_flop_counts_follow_the_decoder_the_weights_have(tmp_path):
    """The paper's separable decoder costs less than ours: the study counts the one the weights carry, and
    refuses to put one count on weights with different decoders."""

    paths = {}
    for decoder in ("unetr", "separable"):
        config = dataclasses.replace(ModelConfig.small(), decoder=decoder, use_lora=False)
        paths[decoder] = save_checkpoint(tmp_path / decoder / "fetalclipseg.safetensors", build_model(config),
                                         config, f"a random {decoder} network")
    separable = full_size_model([paths["separable"]])
    assert (separable.decoder, separable.width, separable.layers) == ("separable", 1024, 24)
    assert full_size_model([paths["unetr"]]).decoder == "unetr"
    with pytest.raises(UsageError, match="different decoders"):
        full_size_model([paths["unetr"], paths["separable"]])
