"""Ensembles: the checkpoint format (shared encoder or whole members), the network that averages them, the
`python -m training ensemble` command, the algorithm on a case, and the ensemble rows of the levers study.

The members are the bundled small weights and copies of them whose decoder and frame head (and, for whole
members, encoder) are perturbed, so every average below differs from each member's own output.
"""
from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import algorithm
from algorithm.__main__ import main as algorithm_main
from algorithm.contract import read_stack
from algorithm.ensemble import EnsembleNetwork
from algorithm.model.checkpoint import (CheckpointError, load_checkpoint, read_checkpoint_info, save_checkpoint,
                                        write_inference_defaults)
from algorithm.model.ensemble import load_ensemble, save_ensemble
from algorithm.model.fetalclipseg import build_model
from algorithm.network import Network, load_network
from algorithm.search import FrameSearch
from training.__main__ import main as training_main
from training.data import layout
from training.data.replica import write_dataset
from training.speed.levers import VARIANTS

BUNDLED = Path(algorithm.__file__).resolve().parent / "weights" / "fetalclipseg_small_replica.safetensors"


def perturbed(seed: int, encoder: bool):
    """The bundled network with noise added to its decoder and frame head (and its encoder if asked)."""
    model, _ = load_checkpoint(BUNDLED)
    model.merge_lora()
    generator = torch.Generator().manual_seed(seed)
    parts = [model.decoder, model.frame_head] + ([model.encoder] if encoder else [])
    with torch.no_grad():
        for part in parts:
            for parameter in part.parameters():
                parameter.add_(0.05 * parameter.std().nan_to_num(0.0) * torch.randn(parameter.shape, generator=generator))
    return model


def plain(seed: int | None = None, encoder: bool = False):
    if seed is None:
        model, _ = load_checkpoint(BUNDLED)
        model.merge_lora()
        return model
    return perturbed(seed, encoder)


@pytest.fixture(scope="module")
def shared_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("ensemble") / "shared.safetensors"
    layout_written = save_ensemble(path, [plain(), plain(1), plain(2)], "test ensemble, shared encoder")
    assert layout_written.shared_encoder and layout_written.members == 3
    return path


@pytest.fixture(scope="module")
def whole_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("ensemble") / "whole.safetensors"
    layout_written = save_ensemble(path, [plain(), plain(3, encoder=True)], "test ensemble, whole members")
    assert not layout_written.shared_encoder and layout_written.members == 2
    return path


@pytest.fixture(scope="module")
def frames(small_case) -> np.ndarray:
    _, release, uuid = small_case
    return read_stack(layout.image_path(release, uuid)).array[20:26]


def single_networks(members) -> list[Network]:
    from algorithm.config import Config

    return [Network(member, Config(model=member.config).replace(device="cpu"), torch.device("cpu"))
            for member in members]


# ------------------------------------------------------------------------------------------ the file

def test_a_shared_encoder_is_stored_once_and_loaded_as_one_module(shared_file):
    with safe_open(str(shared_file), framework="pt") as handle:
        names = list(handle.keys())
    encoders = {name.split(".")[0] for name in names if name.split(".", 1)[1].startswith("encoder.")}
    assert encoders == {"member0"}
    assert {name.split(".")[0] for name in names} == {"member0", "member1", "member2"}
    members, info = load_ensemble(shared_file)
    assert info.members == 3 and info.ensemble.shared_encoder
    assert members[0].encoder is members[1].encoder is members[2].encoder
    assert not torch.equal(members[0].decoder.state_dict()[next(iter(members[0].decoder.state_dict()))],
                           members[1].decoder.state_dict()[next(iter(members[1].decoder.state_dict()))])


def test_members_with_different_encoders_are_stored_whole_and_cannot_be_forced_to_share(whole_file, tmp_path):
    with safe_open(str(whole_file), framework="pt") as handle:
        encoders = {name.split(".")[0] for name in handle.keys() if ".encoder." in name}
    assert encoders == {"member0", "member1"}
    with pytest.raises(ValueError, match="encoders differ"):
        save_ensemble(tmp_path / "x.safetensors", [plain(), plain(3, encoder=True)], "x", shared_encoder=True)
    config = dataclasses.replace(read_checkpoint_info(BUNDLED).config, use_lora=True)
    with pytest.raises(ValueError, match="merge"):
        save_ensemble(tmp_path / "y.safetensors", [build_model(config), build_model(config)], "y")
    with pytest.raises(ValueError, match="twice"):
        save_ensemble(tmp_path / "z.safetensors", [plain()] * 2, "z")


def test_an_ensemble_file_is_refused_where_one_network_is_read_and_a_tampered_one_everywhere(shared_file, tmp_path):
    with pytest.raises(CheckpointError, match="ensemble of 3"):
        load_checkpoint(shared_file)
    with pytest.raises(CheckpointError, match="not an ensemble"):
        load_ensemble(BUNDLED)
    with safe_open(str(shared_file), framework="pt") as handle:
        metadata = handle.metadata()
    tensors = load_file(str(shared_file))
    # one member's decoder missing
    cut = tmp_path / "cut.safetensors"
    save_file({k: v for k, v in tensors.items() if not k.startswith("member2.decoder.")}, str(cut), metadata)
    with pytest.raises(CheckpointError, match="missing"):
        load_ensemble(cut)
    # more members declared than a file may hold
    absurd = tmp_path / "absurd.safetensors"
    save_file(tensors, str(absurd), {**metadata, "ensemble": json.dumps({"members": 99, "shared_encoder": True})})
    with pytest.raises(CheckpointError, match="members"):
        read_checkpoint_info(absurd)
    # NaN in a member that is not the first
    poisoned = dict(tensors)
    name = next(k for k in tensors if k.startswith("member1.frame_head.") and k.endswith("weight"))
    poisoned[name] = torch.full_like(tensors[name], float("nan"))
    nan = tmp_path / "nan.safetensors"
    save_file(poisoned, str(nan), metadata)
    with pytest.raises(CheckpointError, match="NaN"):
        load_ensemble(nan)


# ------------------------------------------------------------------------------------------ the network

def test_a_shared_encoder_ensemble_encodes_once_and_averages_its_members(shared_file, frames, one_torch_thread):
    network, described = load_network(shared_file, {"device": "cpu"})
    assert isinstance(network, EnsembleNetwork) and network.encoder_passes == 1
    assert described["ensemble"] == {"members": 3, "shared_encoder": True}
    calls = []
    hook = network.members[0].model.encoder.register_forward_hook(lambda *_: calls.append(1))
    try:
        inputs = network.preprocess(frames)
        features, probabilities = network.encode(inputs)
        abdomen, fractions = network.decode(inputs, features)
    finally:
        hook.remove()
    assert len(calls) == 1 and len(features) == 4
    singles = single_networks(load_ensemble(shared_file)[0])
    own = [single.encode(single.preprocess(frames)) for single in singles]
    expected = torch.stack([p for _, p in own]).mean(dim=0)
    assert torch.allclose(probabilities, expected, atol=1e-6)
    assert not torch.allclose(probabilities, own[0][1], atol=1e-4)  # averaging is not a no-op
    maps = [single.decode(single.preprocess(frames), f)[0].float() for single, (f, _) in zip(singles, own)]
    assert torch.allclose(abdomen.float(), torch.stack(maps).mean(dim=0), atol=2e-3)
    assert (abdomen.float() - maps[0]).abs().max() > 1e-3
    mean_map = torch.stack(maps).mean(dim=0)
    assert torch.allclose(fractions, (mean_map >= network.config.inference.mask_threshold).float().mean(dim=(1, 2)),
                          atol=0.02)


def test_whole_members_each_encode_and_their_features_are_split_again_at_decode(whole_file, frames,
                                                                               one_torch_thread):
    network, _ = load_network(whole_file, {"device": "cpu"})
    assert network.encoder_passes == 2
    inputs = network.preprocess(frames)
    features, probabilities = network.encode(inputs)
    assert len(features) == 8
    abdomen, _ = network.decode(inputs, features)
    singles = single_networks(load_ensemble(whole_file)[0])
    own = [single.encode(single.preprocess(frames)) for single in singles]
    assert torch.allclose(probabilities, (own[0][1] + own[1][1]) / 2, atol=1e-6)
    maps = [single.decode(single.preprocess(frames), f)[0].float() for single, (f, _) in zip(singles, own)]
    assert torch.allclose(abdomen.float(), (maps[0] + maps[1]) / 2, atol=2e-3)


def test_the_frame_search_runs_an_ensemble_as_it_runs_one_network(shared_file, small_case, one_torch_thread):
    _, release, uuid = small_case
    stack = read_stack(layout.image_path(release, uuid)).array
    network, _ = load_network(shared_file, {"device": "cpu", "tta": "flip"})
    search = FrameSearch.for_network(network)
    frames = search.frames_to_encode(stack)
    found = search(stack, network, frames)
    decoded = int(found.scores.decoded.sum())
    assert decoded > 0 and found.details["frames_augmented"] == decoded  # the flip composes with the ensemble
    assert found.frames_encoded == len(frames) + decoded
    assert np.isfinite(found.scores.probabilities[frames]).all()


# ------------------------------------------------------------------------------------------ commands

def test_the_ensemble_command_takes_run_folders_and_trials_and_the_algorithm_runs_the_result(
        tmp_path, small_case, capsys):
    runs = tmp_path / "runs"
    for index, seed in enumerate((None, 4)):
        folder = runs / f"s{index}"
        folder.mkdir(parents=True)
        model = plain(seed)
        save_checkpoint(folder / "fetalclipseg.safetensors", model, model.config, f"member {index}",
                        extra={"inference": {"tta": "flip"}})
    trials = runs / "reproduce"
    for index in range(2):
        (trials / f"trial_{index}").mkdir(parents=True)
        shutil.copy(runs / f"s{index}" / "fetalclipseg.safetensors", trials / f"trial_{index}")
    out = tmp_path / "ens.safetensors"
    assert training_main(["ensemble", str(runs / "s0"), str(runs / "s1"), "--out", str(out)]) == 0
    assert "2 members, one shared encoder" in capsys.readouterr().out
    info = read_checkpoint_info(out)
    assert info.members == 2 and info.ensemble.shared_encoder
    assert info.inference_defaults == {"tta": "flip"}  # the members agreed on it
    assert training_main(["ensemble", str(trials), "--out", str(tmp_path / "trials.safetensors")]) == 0
    assert read_checkpoint_info(tmp_path / "trials.safetensors").members == 2
    # one checkpoint is not an ensemble; the same one twice neither
    assert training_main(["ensemble", str(runs / "s0"), "--out", str(tmp_path / "one.safetensors")]) == 2
    assert training_main(["ensemble", str(runs / "s0"), str(runs / "s0" / "fetalclipseg.safetensors"),
                          "--out", str(tmp_path / "twice.safetensors")]) == 2
    assert "named twice" in capsys.readouterr().err

    case, _, _ = small_case
    result_dir = tmp_path / "out"
    assert algorithm_main(["--input", str(case), "--output", str(result_dir), "--weights", str(out), "--device",
                           "cpu", "--quiet"]) == 0
    result = json.loads((result_dir / "fetalclipseg" / "result.json").read_text())
    assert result["checkpoint"]["ensemble"] == {"members": 2, "shared_encoder": True}
    assert result["levers"]["tta"] == "flip"
    assert 0 <= json.loads((result_dir / "fetal-abdomen-frame-number.json").read_text()) < 72 or \
        json.loads((result_dir / "fetal-abdomen-frame-number.json").read_text()) == -1

    # inference defaults written into an ensemble keep it an ensemble
    assert write_inference_defaults(out, tmp_path / "defaults.safetensors", {"selection": "sweep"}) == \
        {"tta": "flip", "selection": "sweep"}
    assert read_checkpoint_info(tmp_path / "defaults.safetensors").members == 2


def test_the_levers_study_pairs_an_ensemble_with_the_mean_of_its_members(tmp_path, shared_file):
    data = tmp_path / "test"
    write_dataset(data, cases=2, frames_per_sweep=8, seed=29)
    members = tmp_path / "members"
    for index, model in enumerate(load_ensemble(shared_file)[0][:2]):
        (members / f"m{index}").mkdir(parents=True)
        save_checkpoint(members / f"m{index}" / "fetalclipseg.safetensors", model, model.config, f"member {index}")
    weights = [members / f"m{index}" / "fetalclipseg.safetensors" for index in range(2)]
    ensemble = tmp_path / "pair" / "fetalclipseg.safetensors"
    assert training_main(["ensemble", *map(str, weights), "--out", str(ensemble)]) == 0
    out = tmp_path / "levers"
    assert training_main(["levers", "--weights", *map(str, weights), "--ensemble", str(ensemble), "--data", str(data),
                          "--out", str(out), "--no-flops", "--no-progress"]) == 0
    records = [json.loads(line) for line in (out / "levers.jsonl").read_text().splitlines()]
    assert len(records) == 3 * 2 * len(VARIANTS)
    summary = json.loads((out / "levers.json").read_text())
    assert summary["weights"] == ["m0", "m1"] and summary["ensembles"] == ["pair"]
    row = summary["variants"]["ensemble pair"]
    assert row["encoder_passes"] == 1 and row["decoder_passes"] == 2
    by = {(r["weights"], r["case"], r["variant"]): r["score"] for r in records}
    cases = sorted({r["case"] for r in records})
    expected = np.mean([by[("pair", c, "baseline")] - (by[("m0", c, "baseline")] + by[("m1", c, "baseline")]) / 2
                        for c in cases])
    assert row["score_difference"]["mean"] == pytest.approx(expected)
    assert "ensemble pair, tta flip" in summary["variants"]
    # the flip as the ensemble's own lever: its flip paired with itself, not with the members
    alone = summary["variants"]["ensemble pair: tta flip against it alone"]
    assert alone["score_difference"]["mean"] == pytest.approx(
        np.mean([by[("pair", c, "tta flip")] - by[("pair", c, "baseline")] for c in cases]))
    assert alone["frames_decoded"] > row["frames_decoded"]
    assert summary["verdicts"]["ensemble pair: tta flip against it alone"] in ("default", "option")
    assert "| ensemble pair |" in (out / "levers.md").read_text()
