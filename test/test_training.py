"""training/: preparation, augmentation, the training loop (modes, resume), export and evaluation.

Everything runs on a tiny replica (4 cases of 6 sweeps x 12 frames) with the small configuration.
"""
from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from algorithm.config import FRAME_NONE, FRAME_OPTIMAL, FRAME_SUBOPTIMAL, ModelConfig
from algorithm.contract import OUTPUT_FRAME
from training.data import layout
from training.data.augment import AugmentConfig, FrameAugment
from training.data.dataset import FrameDataset, SplitArrays, frame_labels, read_manifest
from training.models.losses import class_weights
from training.data.prepare import prepare, read_circumferences, split_by_subject
from training.models.modes import SPECS, ModelOptions, model_config_for, parameters_table
from training.data.sampling import EpochSampler, MixedBatches
from training.run.train import Trainer, TrainConfig, train

REPO = Path(__file__).resolve().parents[1]
FRAMES_PER_SWEEP = 12


@pytest.fixture(scope="module")
def replica(tmp_path_factory) -> Path:
    from training.data.replica import write_dataset

    root = tmp_path_factory.mktemp("replica")
    write_dataset(root, cases=4, frames_per_sweep=FRAMES_PER_SWEEP, seed=1, progress=False)
    return root


@pytest.fixture(scope="module")
def prepared(replica, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("prepared")
    prepare(replica, out, seed=3, all_sweeps=True, progress=False)
    return out


def small_config(prepared: Path, out: Path, **changes) -> TrainConfig:
    base = TrainConfig(prepared=prepared, out=out, config="small", train_encoder=True, epochs=1, batch_size=4,
                       lr=1e-3, device="cpu", precision="fp32", negatives_per_positive=1.0, val_max_frames=4,
                       progress=False, augment=False)
    return dataclasses.replace(base, **changes)


# ------------------------------------------------------------------------------------------ preparation

def test_split_by_subject_keeps_subjects_together_and_is_seeded():
    subjects = {f"case{i:02d}": f"s{i // 2}" for i in range(20)}  # 10 subjects of 2 cases
    a = split_by_subject(subjects, seed=7)
    assert a == split_by_subject(subjects, seed=7)
    assert a != split_by_subject(subjects, seed=8)
    assert sorted(sum(a.values(), [])) == sorted(subjects)
    owner = {u: split for split, uuids in a.items() for u in uuids}
    for i in range(0, 20, 2):
        assert owner[f"case{i:02d}"] == owner[f"case{i + 1:02d}"]
    assert [len(a[s]) for s in ("train", "val", "test")] == [14, 2, 4]


def test_split_gives_every_split_a_case_when_possible():
    a = split_by_subject({"a": "1", "b": "2", "c": "3"}, seed=0)
    assert all(len(v) == 1 for v in a.values())


def test_prepare_writes_consistent_splits(replica, prepared):
    manifest = read_manifest(prepared)
    subjects = manifest["subjects"]
    seen: dict[str, str] = {}
    for split, uuids in manifest["splits"].items():
        for uuid in uuids:
            assert seen.setdefault(subjects[uuid], split) == split  # a subject never straddles splits
    assert sorted(sum(manifest["splits"].values(), [])) == layout.list_case_ids(replica)
    assert manifest["seed"] == 3 and manifest["all_sweeps"]

    for split in ("train", "val", "test"):
        arrays = SplitArrays.open(prepared, split)
        n = len(manifest["splits"][split]) * 6 * FRAMES_PER_SWEEP
        assert arrays.images.shape == arrays.masks.shape == (n, 224, 224)
        assert arrays.images.dtype == np.uint8 and arrays.labels.shape == (n,)
        counts = manifest["counts"][split]
        assert counts["frames"] == n == counts["none"] + counts["suboptimal"] + counts["optimal"]
        # Labels come from the full-resolution release masks, in the head's class order.
        for case_number, uuid in enumerate(arrays.uuids):
            full = sitk.GetArrayFromImage(sitk.ReadImage(str(layout.mask_path(replica, uuid))))
            rows = np.flatnonzero(arrays.index[:, 0] == case_number)
            frames = arrays.index[rows, 1]
            expected = np.where((full[frames] == 1).any(axis=(1, 2)), FRAME_OPTIMAL,
                                np.where((full[frames] == 2).any(axis=(1, 2)), FRAME_SUBOPTIMAL, FRAME_NONE))
            np.testing.assert_array_equal(arrays.labels[rows], expected)
            np.testing.assert_array_equal(arrays.index[rows, 2], frames // FRAMES_PER_SWEEP)
        # The resized masks keep the labels: every annotated frame keeps its value, unannotated stay empty.
        labels = np.asarray(arrays.labels)
        small = frame_labels(np.asarray(arrays.masks))
        assert np.all(small[labels == FRAME_NONE] == FRAME_NONE)
        assert np.mean(small[labels != FRAME_NONE] == labels[labels != FRAME_NONE]) > 0.9


def test_prepare_default_keeps_only_sweeps_with_an_ac(replica, tmp_path):
    manifest = prepare(replica, tmp_path / "p", seed=3, progress=False)
    acs = read_circumferences(replica)
    for split, uuids in manifest["splits"].items():
        index = np.load(tmp_path / "p" / split / "index.npy")
        for case_number, uuid in enumerate(uuids):
            sweeps = set(index[index[:, 0] == case_number, 2].tolist())
            assert sweeps == {s for s, ac in enumerate(acs[uuid]["ac"]) if ac is not None}


def test_dataset_matches_inference_preprocessing(replica, prepared):
    """A prepared frame, normalised, equals algorithm.preprocess on the raw frame (up to uint8 rounding)."""
    from algorithm.preprocess import preprocess_frames

    dataset = FrameDataset(prepared, "train")
    arrays = dataset.arrays
    uuid = arrays.uuids[int(arrays.index[5, 0])]
    frame = int(arrays.index[5, 1])
    raw = sitk.GetArrayFromImage(sitk.ReadImage(str(layout.image_path(replica, uuid))))[frame:frame + 1]
    image, mask, label = dataset[5]
    reference = preprocess_frames(raw)[0]
    assert image.shape == reference.shape == (3, 224, 224)
    assert torch.max(torch.abs(image - reference)) < 0.6 / 255 / 0.26  # half a grey level after CLIP's std
    assert mask.dtype == torch.int64 and set(mask.unique().tolist()) <= {0, 1}


# ------------------------------------------------------------------------------------------ augmentation

def test_augmentation_moves_image_and_mask_together():
    yy, xx = np.mgrid[0:224, 0:224]
    disc = (yy - 90) ** 2 + (xx - 130) ** 2 < 25 ** 2
    grey = np.where(disc, 220, 30).astype(np.uint8)
    mask = np.where(disc, 2, 0).astype(np.uint8)  # a suboptimal-plane label
    augment = FrameAugment(AugmentConfig(affine_p=1.0, jitter_p=1.0, clahe_p=1.0), seed=0)
    moved = 0
    for seed in range(8):
        augment.set_seed(seed)
        image_out, mask_out = augment(grey, mask)
        assert set(np.unique(mask_out).tolist()) <= {0, 2}  # nearest: labels never blended
        bright = image_out > 128
        labelled = mask_out > 0
        iou = (bright & labelled).sum() / max((bright | labelled).sum(), 1)
        assert iou > 0.9
        moved += not np.array_equal(labelled, disc)
    assert moved >= 6
    augment.set_seed(3)
    first = augment(grey, mask)
    augment.set_seed(3)
    again = augment(grey, mask)
    assert np.array_equal(first[0], again[0]) and np.array_equal(first[1], again[1])


# ------------------------------------------------------------------------------------------ sampling, weights

def test_epoch_sampler_subsamples_negatives_and_shards():
    labels = np.array([0] * 90 + [1] * 6 + [2] * 4)
    sampler = EpochSampler(labels, seed=1, negatives_per_positive=2.0)
    epoch0 = sampler.epoch_indices()
    assert len(epoch0) == 30 and np.sum(labels[epoch0] != 0) == 10
    sampler.set_epoch(1)
    assert not np.array_equal(np.sort(epoch0), np.sort(sampler.epoch_indices()))
    shards = [EpochSampler(labels, 1, "uniform", 2.0, rank, 3).epoch_indices() for rank in range(3)]
    assert sorted(np.concatenate(shards).tolist()) == sorted(epoch0.tolist())


def test_mixed_batches_add_head_only_negatives():
    labels = np.array([0] * 90 + [1] * 6 + [2] * 4)
    sampler = MixedBatches(labels, seed=2, batch_size=4, negatives_per_positive=1.0, head_negatives_per_positive=3.0)
    batches = sampler.batches()
    decoded = [i for b in batches for i, d in b if d]
    head = [i for b in batches for i, d in b if not d]
    assert len(batches) == len(sampler) == 5 and all(sum(d for _, d in b) == 4 for b in batches)
    assert sum(labels[decoded] != 0) == 10 and len(decoded) == 20
    assert len(head) == 30 and all(labels[head] == 0) and not set(head) & set(decoded)
    shards = [MixedBatches(labels, 2, 4, 1.0, 3.0, rank, 2).batches() for rank in range(2)]
    assert len(shards[0]) == len(shards[1]) == 3  # 5 batches padded to 6, three per rank


def test_draw_negatives_takes_its_hard_share_from_the_frames_the_head_gets_wrong():
    from training.data.mining import Hardness, draw_negatives

    negatives = np.arange(1000)
    pool = np.arange(0, 1000, 2)  # every even frame scored
    p_abdomen = np.where(pool < 20, 0.99, 0.0)  # ten look-alikes among them, the rest clearly rejected
    hardness = Hardness(pool, p_abdomen, fraction=0.5)
    assert hardness.summary() == {"pool": 500, "mean_p_abdomen": pytest.approx(0.0198), "called_abdomen": 10}
    draws = [draw_negatives(np.random.default_rng(s), negatives, 40, hardness) for s in range(20)]
    for drawn in draws:
        assert len(drawn) == 40 and len(set(drawn.tolist())) == 40 and set(drawn.tolist()) <= set(negatives)
        assert set(range(0, 20, 2)) <= set(drawn.tolist())  # all ten look-alikes, every time
    uniform = [draw_negatives(np.random.default_rng(s), negatives, 40) for s in range(20)]
    hits = np.mean([np.isin(np.arange(0, 20, 2), u).sum() for u in uniform])
    assert hits < 2  # uniformly, about 40/1000 of them
    # the hard share is capped by the pool that lies inside `negatives`, and the size is kept
    few = draw_negatives(np.random.default_rng(0), np.arange(5, 30), 20, dataclasses.replace(hardness, fraction=1.0))
    assert len(set(few.tolist())) == 20 and set(few.tolist()) <= set(range(5, 30))


def test_samplers_draw_mined_negatives_and_keep_their_size():
    from training.data.mining import Hardness

    labels = np.array([0] * 900 + [1] * 6 + [2] * 4)
    hard = np.arange(0, 900, 100)  # nine negatives the head calls abdomen
    hardness = Hardness(np.arange(900), np.isin(np.arange(900), hard).astype(float), fraction=1.0)
    mixed = MixedBatches(labels, seed=2, batch_size=4, negatives_per_positive=1.0, head_negatives_per_positive=3.0)
    before = mixed.batches()
    mixed.hardness = hardness
    after = mixed.batches()
    assert len(after) == len(before) == len(mixed)
    assert sorted(len(b) for b in after) == sorted(len(b) for b in before)
    shown = {i for b in after for i, _ in b}
    assert set(hard.tolist()) <= shown and len({i for b in before for i, _ in b} & set(hard.tolist())) < 9
    epoch = EpochSampler(labels, seed=1, negatives_per_positive=2.0)
    size = len(epoch.epoch_indices())
    epoch.hardness = hardness
    indices = epoch.epoch_indices()
    assert len(indices) == size and set(hard.tolist()) <= set(indices.tolist())


def test_mining_scores_the_pool_with_the_frame_head_and_logs_it(prepared, tmp_path):
    cfg = small_config(prepared, tmp_path / "run", head_negatives_per_positive=1.0, hard_negatives=0.5,
                       hard_negative_pool=16, hard_negatives_from=1, epochs=2)
    trainer = Trainer(cfg)
    assert trainer.mine_hard_negatives(0) is None  # before hard_negatives_from
    summary = trainer.mine_hard_negatives(1)
    hardness = trainer.sampler.hardness
    assert summary["pool"] == len(hardness.frames) == 16 and hardness.fraction == 0.5
    assert np.all(trainer.train_set.labels[hardness.frames] == FRAME_NONE)
    # the scores are the head's: recompute one frame by hand
    frame = int(hardness.frames[3])
    image = FrameDataset(prepared, "train")[frame][0][None]
    with torch.no_grad():
        logits = trainer.model.frame_head(trainer.model.encoder(image)[1])
    assert hardness.p_abdomen[3] == pytest.approx(1 - torch.softmax(logits, 1)[0, FRAME_NONE].item(), abs=1e-5)
    trainer.fit()
    assert "mined_pool" not in trainer.state.history[0] and trainer.state.history[1]["mined_pool"] == 16
    with pytest.raises(ValueError, match="hard negatives need"):
        TrainConfig(prepared=prepared, out=tmp_path, hard_negatives=0.5).validate()
    with pytest.raises(ValueError, match="uniform sampler"):
        TrainConfig(prepared=prepared, out=tmp_path, hard_negatives=0.5, negatives_per_positive=1.0,
                    sampler="balanced").validate()


def test_class_weights_from_counts():
    w = class_weights([900, 60, 40], power=1.0)
    assert w[2] > w[1] > w[0]
    assert np.isclose(float((w * torch.tensor([900, 60, 40.0])).sum()) / 1000, 1.0)
    assert torch.allclose(class_weights([900, 60, 40], power=0.0), torch.ones(3))


# ------------------------------------------------------------------------------------------ training

def test_modes_build_the_published_and_fixed_models():
    paper = model_config_for(ModelOptions("paper", "small"))
    assert paper.lora_targets == ("c_fc", "c_proj", "out_proj") and paper.encoder_no_grad and paper.use_lora
    assert paper.decoder == "separable" and paper.frame_classes == 3
    fixed = model_config_for(ModelOptions("fixed", "small"))
    assert fixed.lora_targets == ("c_fc", "c_proj", "attn") and not fixed.encoder_no_grad
    assert not model_config_for(ModelOptions("fixed", "small", train_encoder=True)).use_lora  # --train-encoder
    cls = model_config_for(ModelOptions("paper-cls", "small"))
    assert cls.decoder == "none" and cls.frame_head == "linear" and cls.frame_classes == 1 and cls.use_lora
    assert cls.lora_targets == paper.lora_targets and not cls.encoder_no_grad
    probe = model_config_for(ModelOptions("probe", "small"))
    assert probe == dataclasses.replace(cls, use_lora=False, encoder_no_grad=True, lora_targets=probe.lora_targets)
    assert model_config_for(ModelOptions("cls", "small")) == probe  # the probe's former name
    assert model_config_for(ModelOptions("fixed", "small", lora_rank=4)).lora_alpha == 8  # alpha 2 x rank by default
    with pytest.raises(ValueError, match="applies to mode fixed"):
        model_config_for(ModelOptions("paper", "small", train_encoder=True))


def test_the_parameters_table_has_a_row_for_a_baseline_run():
    counts = {"fixed": {"trainable": 9_060_000, "effective": 9_060_000, "paper": None},
              "baseline-densenet": {"trainable": 6_950_000, "effective": 6_950_000, "paper": 7_000_000}}
    rows = parameters_table(counts).splitlines()[2:]
    assert rows[1] == f"| baseline-densenet | {SPECS['baseline'].reproduces} | 6.95 M | 6.95 M | 7.00 M |"


def _lora_snapshot(trainer: Trainer) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in trainer.model.encoder.named_parameters() if "lora_" in n}


@pytest.mark.parametrize("mode", ["paper", "fixed"])
def test_lora_trains_only_in_fixed_mode(prepared, tmp_path, mode):
    cfg = small_config(prepared, tmp_path, mode=mode, train_encoder=False, max_steps=2, lr=1e-2)
    trainer = Trainer(cfg)
    lora = _lora_snapshot(trainer)
    decoder = [p.detach().clone() for p in trainer.model.decoder.parameters()]
    assert lora
    trainer.fit()
    changed = [not torch.equal(before, dict(trainer.model.encoder.named_parameters())[n]) for n, before in lora.items()]
    if mode == "paper":
        assert not any(changed)  # no_grad: the published code's LoRA never learns
    else:
        assert all(changed[i] for i, n in enumerate(lora) if "lora_B" in n)
    assert any(not torch.equal(a, b) for a, b in zip(decoder, trainer.model.decoder.parameters()))


def test_training_steps_reduce_the_loss(prepared, tmp_path):
    trainer = Trainer(small_config(prepared, tmp_path))
    dataset = trainer.train_set
    positives = np.flatnonzero(dataset.labels != FRAME_NONE)[:2].tolist()
    batch = [dataset[i] for i in positives + [0]]
    images, mask, label = (torch.stack(x) for x in zip(*batch))

    def loss() -> torch.Tensor:
        mask_logits, frame_logits = trainer.view(images)
        return trainer.loss(mask_logits, frame_logits, mask, label)[0]

    trainer.view.train()
    with torch.no_grad():
        first = float(loss())
    for _ in range(4):
        trainer.optimizer.zero_grad()
        loss().backward()
        trainer.optimizer.step()
    with torch.no_grad():
        assert float(loss()) < 0.8 * first


def test_resume_continues_from_the_saved_epoch(prepared, tmp_path):
    cfg = small_config(prepared, tmp_path / "run", max_steps=None, negatives_per_positive=0.5,
                       head_negatives_per_positive=1.0)
    first = Trainer(cfg)
    first.fit()
    assert first.state.epoch == 0 and first.last_path.is_file()
    steps = first.state.global_step
    weights_after_one = {k: v.clone() for k, v in first.model.state_dict().items()}

    resumed = Trainer(dataclasses.replace(cfg, epochs=2, resume=True))
    assert resumed.load_last() and resumed.state.epoch == 0
    for key, value in resumed.model.state_dict().items():
        assert torch.equal(value, weights_after_one[key])
    resumed = Trainer(dataclasses.replace(cfg, epochs=2, resume=True))
    resumed.fit()
    assert resumed.state.epoch == 1 and resumed.state.global_step == 2 * steps
    assert [h["epoch"] for h in resumed.state.history] == [0, 1]
    assert resumed.state.history[0] == first.state.history[0]
    history = json.loads((cfg.out / "trial_0" / "history.json").read_text())
    assert len(history) == 2 and (cfg.out / "trial_0" / "curves.png").is_file()


def test_init_starts_from_saved_weights_and_rejects_another_architecture(prepared, tmp_path):
    from algorithm.model.checkpoint import save_checkpoint

    cfg = small_config(prepared, tmp_path / "run", max_steps=1)
    source = Trainer(cfg)
    source.fit()
    exported = save_checkpoint(tmp_path / "w.safetensors", source.model, source.model.config, "test")
    fresh = Trainer(dataclasses.replace(cfg, out=tmp_path / "fresh"))
    assert any(not torch.equal(a, b) for a, b in zip(fresh.model.state_dict().values(),
                                                       source.model.state_dict().values()))
    for init in (exported, source.last_path):  # our checkpoint format, and a trainer's last.pt
        started = Trainer(dataclasses.replace(cfg, out=tmp_path / f"init_{init.suffix[1:]}", init=init))
        for key, value in started.model.state_dict().items():
            assert torch.equal(value, source.model.state_dict()[key]), key
    lora = dataclasses.replace(cfg, out=tmp_path / "lora", train_encoder=False, init=exported)
    with pytest.raises(ValueError, match="does not fit this model"):
        Trainer(lora)


@pytest.mark.slow
def test_train_export_run_algorithm_and_score(replica, prepared, tmp_path):
    """The chain: train a few steps -> algorithm's checkpoint -> python -m algorithm on a case -> score."""
    from algorithm.model.checkpoint import load_checkpoint
    from training.run.recipes import cli_case_folder
    from training.scoring.evaluate import evaluate
    from training.scoring.evaluate_frames import evaluate_weights

    cfg = small_config(prepared, tmp_path / "run", max_steps=2, augment=True, mask_ce_weight=1.0, replica=True)
    summary = train(cfg)
    weights = Path(summary["checkpoint"])
    model, info = load_checkpoint(weights)
    assert "not for clinical use" in info.provenance and info.extra["mode"] == "fixed"
    assert model.config == dataclasses.replace(ModelConfig.small(), use_lora=False, lora_targets=("c_fc", "c_proj", "attn"))
    test = summary["trials"][0]["test"]
    assert set(test) >= {"mask_rule", "head", "trainable_parameters"} and 0 <= test["mask_rule"]["f1"] <= 1
    assert (cfg.out / "frame_table.md").read_text().count("|") > 20

    frames = evaluate_weights(weights, prepared, "test", device="cpu", progress=False)
    assert frames["mask_rule"] == test["mask_rule"] and frames["head"] == test["head"]

    uuid = read_manifest(prepared)["splits"]["test"][0]
    case = cli_case_folder(replica, uuid, tmp_path / "input" / uuid)
    out = tmp_path / "predictions" / uuid
    subprocess.run([sys.executable, "-m", "algorithm", "--input", str(case), "--output", str(out),
                    "--weights", str(weights), "--device", "cpu", "--quiet", "--no-extras"],
                   check=True, cwd=REPO)
    assert (out / OUTPUT_FRAME).is_file()
    report = evaluate(tmp_path / "predictions", replica)
    assert report["cases"][uuid]["score"] is not None
    assert 0.0 <= report["cases"][uuid]["score"] <= 1.0


@pytest.mark.slow
def test_demo_weights_command_trains_then_mines_and_writes_labelled_weights(tmp_path):
    """`python -m training demo-weights` end to end at toy size: stage 1, the hard-negative stage from its
    best weights, and the bundled-weights file with its provenance."""
    from algorithm.model.checkpoint import load_checkpoint

    out = tmp_path / "demo.safetensors"
    subprocess.run([sys.executable, "-m", "training", "demo-weights", "--work", str(tmp_path / "work"),
                    "--out", str(out), "--cases", "8", "--frames-per-sweep", "6", "--epochs", "1",
                    "--mine-epochs", "1", "--val-max-frames", "8", "--batch-size", "4", "--warmup-steps", "1"],
                   check=True, cwd=REPO, capture_output=True)
    model, info = load_checkpoint(out)
    assert "not for clinical use" in info.provenance
    assert "1 epochs + 1 epochs of hard-negative mining (0.5 of the negatives" in info.provenance
    mined = json.loads((tmp_path / "work" / "mine" / "trial_0" / "history.json").read_text())
    assert mined[0]["mined_pool"] > 0 and 0.0 <= mined[0]["mined_mean_p_abdomen"] <= 1.0
    config = json.loads((tmp_path / "work" / "mine" / "train_config.json").read_text())
    assert config["init"] == str(tmp_path / "work" / "train" / "fetalclipseg.safetensors")
    assert config["hard_negatives"] == 0.5 and config["lr"] == 3e-4
