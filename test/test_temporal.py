"""The temporal input (ModelConfig.input_frames "temporal"): frames t-1, t, t+1 of a sweep as the three
channels, picked the same way by the algorithm's search (`input_rows`) and by training (`temporal_rows`)."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import algorithm
from algorithm.__main__ import main as algorithm_main
from algorithm.config import ModelConfig
from algorithm.contract import read_stack
from algorithm.model.checkpoint import CheckpointError, load_checkpoint, read_checkpoint_info, save_checkpoint
from algorithm.network import load_network
from algorithm.preprocess import input_rows, preprocess_frames
from algorithm.search import FrameSearch
from training.__main__ import main as training_main
from training.data import layout
from training.data.augment import FrameAugment
from training.data.dataset import FrameDataset, SplitArrays, temporal_rows, to_network_input
from training.data.prepare import prepare
from training.cli import UsageError
from training.data.replica import write_dataset
from training.models.build import build_training_model
from training.models.modes import ModelOptions
from training.run.train import TrainConfig, Trainer, train

BUNDLED = Path(algorithm.__file__).resolve().parent / "weights" / "fetalclipseg_small_replica.safetensors"


def as_temporal(weights: Path, out: Path) -> Path:
    """The same weights, declared to take the temporal input."""
    model, info = load_checkpoint(weights)
    model.merge_lora()
    config = dataclasses.replace(model.config, input_frames="temporal")
    model.config = config
    return save_checkpoint(out, model, config, "the bundled weights fed frame triplets")


# ------------------------------------------------------------------------------------------ which frames
def test_input_rows_take_the_neighbours_within_the_sweep_only():
    frames = np.array([0, 3, 4, 5, 11])
    # 12 frames, 3 sweeps: [0, 4), [4, 8), [8, 12)
    assert input_rows(frames, 12, 3, "temporal").tolist() == [[0, 0, 1], [2, 3, 3], [4, 4, 5], [4, 5, 6],
                                                              [10, 11, 11]]
    assert input_rows(frames, 12, 3, "single").tolist() == frames.tolist()
    # uneven sweeps are cut as sweep_bounds cuts them: 7 frames in 2 sweeps are [0, 4) and [4, 7)
    assert input_rows(np.array([3, 4]), 7, 2, "temporal").tolist() == [[2, 3, 3], [4, 4, 5]]
    with pytest.raises(ValueError, match="single or temporal"):
        input_rows(frames, 12, 3, "rgb")


def test_a_triplet_is_preprocessed_one_frame_per_channel():
    rng = np.random.default_rng(0)
    triplet = rng.integers(0, 256, (3, 30, 40), dtype=np.uint8)
    together = preprocess_frames(triplet[None], 32)
    for channel in range(3):
        alone = preprocess_frames(triplet[channel][None], 32)
        torch.testing.assert_close(together[0, channel], alone[0, channel])
    assert not torch.equal(together[0, 0], together[0, 1])
    with pytest.raises(ValueError, match="triplets"):
        preprocess_frames(np.zeros((2, 2, 30, 40), np.uint8), 32)


def test_a_checkpoint_declares_its_input_and_an_unknown_one_is_refused(tmp_path):
    temporal = as_temporal(BUNDLED, tmp_path / "temporal.safetensors")
    assert read_checkpoint_info(temporal).config.input_frames == "temporal"
    assert read_checkpoint_info(BUNDLED).config.input_frames == "single"  # files written before the option
    with safe_open(str(temporal), "pt") as handle:
        metadata, tensors = handle.metadata(), {k: handle.get_tensor(k) for k in handle.keys()}
    config = json.loads(metadata["model_config"])
    config["input_frames"] = "video"
    save_file(tensors, str(tmp_path / "bad.safetensors"), {**metadata, "model_config": json.dumps(config)})
    with pytest.raises(CheckpointError, match="input_frames"):
        read_checkpoint_info(tmp_path / "bad.safetensors")


# ------------------------------------------------------------------------------------------ the search
def test_the_search_feeds_a_temporal_network_each_frame_with_its_neighbours(tmp_path, one_torch_thread):
    """Every frame of the stack holds its own number as grey level, so the batches the network is given say
    which rows they were made of: the encode pass and the flip pass both see t-1, t, t+1 of t's sweep."""
    n_frames, sweeps = 48, 6
    stack = np.broadcast_to((np.arange(n_frames, dtype=np.uint8) + 10)[:, None, None], (n_frames, 40, 52)).copy()
    network, _ = load_network(as_temporal(BUNDLED, tmp_path / "t.safetensors"),
                              {"device": "cpu", "tta": "flip", "coarse_stride": 1})
    seen: list[np.ndarray] = []
    preprocess = network.preprocess

    def recording(frames):
        seen.append(np.asarray(frames)[..., 0, 0].astype(np.int64) - 10)
        return preprocess(frames)

    network.preprocess = recording
    search = FrameSearch.for_network(network)
    search(stack, network, search.frames_to_encode(stack))
    rows = np.concatenate(seen)
    assert rows.ndim == 2 and rows.shape[1] == 3
    assert set(rows[:, 1]) == set(range(n_frames))  # every frame encoded ...
    expected = input_rows(rows[:, 1], n_frames, sweeps, "temporal")
    assert np.array_equal(rows, expected)  # ... with its own sweep's neighbours, in the flip pass too
    assert (rows[:, 0] == rows[:, 1]).sum() >= sweeps  # a sweep's first frame stands in for its missing t-1


def test_the_temporal_input_changes_what_the_network_says(small_case, tmp_path, one_torch_thread):
    """The same weights, single against temporal, on a replica case: different inputs, different scores."""
    _, release, uuid = small_case
    stack = read_stack(layout.image_path(release, uuid)).array
    probabilities = {}
    for name, weights in (("single", BUNDLED), ("temporal", as_temporal(BUNDLED, tmp_path / "t.safetensors"))):
        network, _ = load_network(weights, {"device": "cpu", "tta": "none", "coarse_stride": 1})
        search = FrameSearch.for_network(network)
        probabilities[name] = search(stack, network, search.frames_to_encode(stack)).scores.probabilities
    frames = np.isfinite(probabilities["single"]).all(axis=1)
    assert np.abs(probabilities["single"][frames] - probabilities["temporal"][frames]).max() > 1e-3


# ------------------------------------------------------------------------------------------ training
@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("temporal")
    write_dataset(root / "release", cases=3, frames_per_sweep=8, seed=4, progress=False)
    prepare(root / "release", root / "prepared", seed=1, all_sweeps=True, progress=False)
    return root / "prepared"


def test_temporal_rows_of_a_prepared_split_match_the_search_and_stay_in_their_sweep(prepared):
    arrays = SplitArrays.open(prepared, "train")
    index = np.asarray(arrays.index)
    rows = temporal_rows(index)
    for row, (case, frame, sweep) in enumerate(index):
        neighbours = index[rows[row]]
        assert (neighbours[:, 0] == case).all() and (neighbours[:, 2] == sweep).all()
        # the frames the search would take in a stack of 6 sweeps of 8 frames
        assert neighbours[:, 1].tolist() == input_rows(np.array([frame]), 48, 6, "temporal")[0].tolist()


def test_the_dataset_gives_a_triplet_and_the_augmentation_one_draw_for_it(prepared):
    dataset = FrameDataset(prepared, "train", input_frames="temporal")
    arrays = SplitArrays.open(prepared, "train")
    rows = temporal_rows(arrays.index)
    middle = int(np.flatnonzero(rows[:, 0] != rows[:, 1])[0])
    image, mask, label = dataset[middle]
    assert image.shape == (3, 224, 224)
    torch.testing.assert_close(image, to_network_input(np.asarray(arrays.images[rows[middle]]), temporal=True))
    torch.testing.assert_close(image[1], FrameDataset(prepared, "train")[middle][0][1])
    assert not torch.equal(image[0], image[1])
    # one draw for the three frames: a triplet of one frame stays three equal frames, augmented
    augment = FrameAugment(seed=7)
    grey = np.asarray(arrays.images[middle])
    for _ in range(10):
        warped, _ = augment(np.stack([grey, grey, grey]), np.asarray(arrays.masks[middle]))
        assert warped.shape == (3, 224, 224) and (warped[0] == warped[1]).all() and (warped[2] == warped[1]).all()
    with pytest.raises(ValueError, match="input_frames"):
        FrameDataset(prepared, "train", input_frames="video")


def test_training_with_the_temporal_input_writes_a_checkpoint_the_algorithm_runs_as_temporal(
        prepared, tmp_path, small_case, one_torch_thread):
    cfg = TrainConfig(prepared=prepared, out=tmp_path / "run", config="small", fetalclip=BUNDLED, epochs=1,
                      batch_size=4, lr=1e-3, device="cpu", precision="fp32", max_steps=2, val_max_frames=4,
                      progress=False, input_frames="temporal")
    summary = train(cfg)
    weights = Path(summary["checkpoint"])
    assert read_checkpoint_info(weights).config.input_frames == "temporal"
    input_folder, _, _ = small_case
    out = tmp_path / "output"
    assert algorithm_main(["--input", str(input_folder), "--output", str(out), "--weights", str(weights),
                           "--device", "cpu", "--quiet"]) == 0
    result = json.loads((out / "fetalclipseg" / "result.json").read_text())
    assert result["checkpoint"]["input_frames"] == "temporal"
    with pytest.raises(SystemExit):
        training_main(["train", "--prepared", str(prepared), "--out", str(tmp_path / "x"), "--input-frames", "rgb"])


def test_a_stem_that_cannot_learn_the_temporal_input_is_warned_about(prepared, tmp_path, caplog, one_torch_thread):
    """The patch embedding is the one layer that sees the three channels apart. paper mode never trains its
    encoder, fixed mode's LoRA leaves the stem as pretrained on grey frames: on the replica the temporal input
    lowered both modes' scores, so the run says so; a centred stem trains and is not warned about."""
    for mode, stem, warned in (("paper", "pretrained", True), ("fixed", "pretrained", True),
                               ("fixed", "centred", False)):
        caplog.clear()
        cfg = TrainConfig(prepared=prepared, out=tmp_path / mode, mode=mode, config="small", fetalclip=BUNDLED,
                          device="cpu", precision="fp32", progress=False, input_frames="temporal",
                          temporal_stem=stem)
        with caplog.at_level("WARNING", logger="training"):
            Trainer(cfg, out=tmp_path / f"{mode}-{stem}")
        assert any(f"--input-frames temporal with mode {mode}" in r.message for r in caplog.records) == warned


def test_a_centred_stem_starts_as_the_single_frame_network(one_torch_thread):
    """Frame t alone in the centre channel, the neighbours at zero: the encoder says what it said of the grey
    frame, to float rounding, whatever the neighbours hold; and the stem is trainable."""
    torch.manual_seed(0)
    single = build_training_model(ModelOptions("fixed", "small", fetalclip=BUNDLED)).eval()
    centred = build_training_model(ModelOptions("fixed", "small", fetalclip=BUNDLED, input_frames="temporal",
                                                temporal_stem="centred")).eval()
    pretrained = build_training_model(ModelOptions("fixed", "small", fetalclip=BUNDLED,
                                                   input_frames="temporal")).eval()
    stem = centred.encoder.visual.conv1.weight
    assert stem.requires_grad and not pretrained.encoder.visual.conv1.weight.requires_grad
    assert stem[:, 0].abs().max() == 0 and stem[:, 2].abs().max() == 0 and stem[:, 1].abs().max() > 0
    frames = torch.from_numpy(np.random.default_rng(3).integers(0, 256, (2, 3, 96, 128), dtype=np.uint8))
    with torch.no_grad():
        grey = single.encoder(preprocess_frames(frames[:, 1]))
        for model, equal in ((centred, True), (pretrained, False)):
            triplet = model.encoder(preprocess_frames(frames))
            close = [torch.allclose(a, b, atol=2e-4, rtol=1e-4) for a, b in
                     zip([*triplet.features, triplet.embedding], [*grey.features, grey.embedding])]
            assert all(close) if equal else not any(close)
    for bad in (dict(mode="paper", input_frames="temporal"), dict(mode="fixed", input_frames="single")):
        with pytest.raises(UsageError, match="temporal-stem centred"):
            build_training_model(ModelOptions(config="small", temporal_stem="centred", **bad))


def test_training_a_centred_stem_teaches_the_neighbours_and_exports_them(prepared, tmp_path, one_torch_thread):
    """Two steps move the neighbours' filters off zero and the export carries them with the shifted positional
    embedding; with the pretrained stem the exported patch embedding is FetalCLIP's, unchanged."""
    stems, positions = {}, {}
    for stem in ("centred", "pretrained"):
        cfg = TrainConfig(prepared=prepared, out=tmp_path / stem, config="small", fetalclip=BUNDLED, epochs=1,
                          batch_size=4, lr=1e-3, device="cpu", precision="fp32", max_steps=2, val_max_frames=4,
                          progress=False, input_frames="temporal", temporal_stem=stem)
        weights = Path(train(cfg)["checkpoint"])
        with safe_open(str(weights), "pt") as handle:
            stems[stem] = handle.get_tensor("encoder.visual.conv1.weight")
            positions[stem] = handle.get_tensor("encoder.visual.positional_embedding")
    with safe_open(str(BUNDLED), "pt") as handle:
        fetalclip = handle.get_tensor("encoder.visual.conv1.weight")
        fetalclip_positions = handle.get_tensor("encoder.visual.positional_embedding")
    assert stems["centred"][:, 0].abs().max() > 0 and stems["centred"][:, 2].abs().max() > 0
    torch.testing.assert_close(stems["pretrained"], fetalclip)
    # the stem's constant lives in the patch tokens' positions (not the class token's): without it the
    # exported network would not be the one that trained
    torch.testing.assert_close(positions["pretrained"], fetalclip_positions)
    torch.testing.assert_close(positions["centred"][0], fetalclip_positions[0])
    assert (positions["centred"][1:] - fetalclip_positions[1:]).abs().max() > 1e-3
    with pytest.raises(SystemExit):
        training_main(["train", "--prepared", str(prepared), "--out", str(tmp_path / "x"), "--input-frames",
                       "temporal", "--temporal-stem", "zero"])


# ------------------------------------------------------------------------------------------ measuring it
def test_the_levers_study_pairs_temporal_seeds_with_the_single_frame_ones(tmp_path, random_weights,
                                                                          one_torch_thread):
    data = tmp_path / "test"
    write_dataset(data, cases=2, frames_per_sweep=8, seed=31, progress=False)
    single = tmp_path / "single" / "fetalclipseg.safetensors"
    single.parent.mkdir()
    single.write_bytes(BUNDLED.read_bytes())
    temporal = [as_temporal(BUNDLED, tmp_path / "t1" / "fetalclipseg.safetensors"),
                as_temporal(random_weights, tmp_path / "t2" / "fetalclipseg.safetensors")]
    out = tmp_path / "levers"
    assert training_main(["levers", "--weights", str(single), "--candidate", "temporal", *map(str, temporal),
                          "--data", str(data), "--out", str(out), "--no-flops", "--no-progress"]) == 0
    records = [json.loads(line) for line in (out / "levers.jsonl").read_text().splitlines()]
    summary = json.loads((out / "levers.json").read_text())
    assert summary["weights"] == ["single"] and summary["candidates"] == {"temporal": ["t1", "t2"]}
    by = {(r["weights"], r["case"], r["variant"]): r["score"] for r in records}
    cases = sorted({r["case"] for r in records})
    for row, variant in (("temporal", "baseline"), ("temporal, tta flip", "tta flip")):
        expected = np.mean([(by[("t1", c, variant)] + by[("t2", c, variant)]) / 2 - by[("single", c, variant)]
                            for c in cases])
        assert summary["variants"][row]["score_difference"]["mean"] == pytest.approx(expected)
    assert summary["verdicts"]["temporal"] in ("train with it", "option")
    assert "| temporal |" in (out / "levers.md").read_text()
    # a name alone, or a taken name, is a usage error
    for bad in (["--candidate", "temporal"], ["--candidate", "tta flip", str(single)]):
        assert training_main(["levers", "--weights", str(single), *bad, "--data", str(data), "--out",
                              str(tmp_path / "x"), "--no-flops", "--no-progress"]) == 2
