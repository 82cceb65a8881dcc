"""The paper's recipe in training/: modes and their parameters, precision and gradient scaling, memory
planning, accumulation, snapshots that hold only what trains (and refuse pickles), baselines, the threshold
sweep, the prepared-data cache, and `reproduce` under torchrun with two CPU processes.

Everything runs on a tiny replica (3-4 cases of 6 sweeps x 12 frames) with the small configuration; the
full-size checks (parameter counts, a T4's memory plan) are marked slow.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
from argparse import Namespace
from pathlib import Path

import numpy as np
import pytest
import torch

from algorithm.config import FRAME_NONE
from algorithm.model.checkpoint import read_checkpoint_info
from training.data.prepare import prepare, prepare_key, prepared_matches
from training.models.build import build_training_model, count_parameters
from training.models.modes import SPECS, ModelOptions
from training.models.snapshot import SnapshotError, read_snapshot
from training.run.memory import GiB, MemoryEstimate, measure_step, plan_memory
from training.run.train import TrainConfig, Trainer, load_weights, train, training_precision

REPO = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def replica(tmp_path_factory) -> Path:
    from training.data.replica import write_dataset

    root = tmp_path_factory.mktemp("replica")
    write_dataset(root, cases=3, frames_per_sweep=12, seed=1, progress=False)
    return root


@pytest.fixture(scope="module")
def prepared(replica, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("prepared")
    prepare(replica, out, seed=3, all_sweeps=True, progress=False)
    return out


def config(prepared: Path, out: Path, **changes) -> TrainConfig:
    base = TrainConfig(prepared=prepared, out=out, config="small", epochs=1, batch_size=4, lr=1e-3, device="cpu",
                       precision="fp32", negatives_per_positive=1.0, val_max_frames=4, progress=False,
                       augment=False)
    return dataclasses.replace(base, **changes)


# ------------------------------------------------------------------------------------------ modes

@pytest.mark.slow
def test_params_command_matches_the_paper_at_full_size(tmp_path):
    """`python -m training params --config full --json F`: paper and paper-cls within 5 % of 4.0 M / 2.4 M."""
    out = tmp_path / "params.json"
    subprocess.run([sys.executable, "-m", "training", "params", "--config", "full", "--json", str(out)],
                   check=True, cwd=REPO, capture_output=True)
    modes = json.loads(out.read_text())["modes"]
    assert set(modes) == {"fixed", "paper", "paper-cls", "probe"}
    for mode, paper in (("paper", 4.0e6), ("paper-cls", 2.4e6)):
        assert modes[mode]["paper"] == paper
        assert abs(modes[mode]["trainable"] - paper) / paper < 0.05, modes[mode]
    lora = 24 * 8 * ((1024 + 4096) * 2 + 2 * 1024)  # r 8 on c_fc, c_proj, out_proj of 24 blocks
    assert modes["paper-cls"]["trainable"] == lora + 768 + 1  # + Linear(768, 1)
    assert modes["paper-cls"]["effective"] == lora - 24 * 8 * 2 * 1024 + 769  # out_proj's adapters are inert
    assert modes["paper"]["effective"] == modes["paper"]["trainable"] - lora  # the no_grad encoder
    assert modes["fixed"]["effective"] == modes["fixed"]["trainable"] and modes["fixed"]["paper"] is None
    assert modes["probe"] == {"trainable": 769, "effective": 769, "paper": None}


def test_counts_per_mode_at_small_size():
    counts = count_parameters("small")
    assert counts["paper"]["effective"] < counts["paper"]["trainable"]
    assert counts["paper-cls"]["effective"] < counts["paper-cls"]["trainable"]
    assert counts["probe"]["trainable"] == 128 + 1  # a linear layer on the 128-d image embedding
    assert all(c["paper"] is None for c in counts.values())  # the paper's figures are full size


def test_paper_mode_frame_head_cannot_change_how_the_decoder_trains():
    """Behind no_grad the frame head's loss reaches the head only: the decoder's gradient is the published
    Dice's alone."""
    from training.models.losses import SegLoss

    torch.manual_seed(0)
    model = build_training_model(ModelOptions("paper", "small")).train()
    x = torch.randn(3, 3, 224, 224)
    mask = torch.zeros(3, 224, 224, dtype=torch.long)
    mask[:, 80:140, 90:150] = 1
    label = torch.tensor([2, 1, 0])
    grads = []
    for frame_weight in (1.0, 0.0):
        torch.manual_seed(1)
        model.zero_grad()
        loss = SegLoss(None, dataclasses.replace(SegLoss(None).weights, frame=frame_weight), mask_loss="dice-fg")
        out = model(x)
        loss(out.mask_logits, out.frame_logits, mask, label)[0].backward()
        grads.append([p.grad.clone() for p in model.decoder.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*grads))


def test_published_dice_is_foreground_only_and_zero_without_abdomen():
    from training.models.losses import dice_sums

    logits = torch.randn(2, 2, 8, 8)
    empty = torch.zeros(2, 8, 8, dtype=torch.long)
    assert float(dice_sums(logits, empty).value("dice-fg")) == 0.0
    assert float(dice_sums(logits, empty).value("dice")) > 0.0  # ours still scores the background
    target = torch.zeros(2, 8, 8, dtype=torch.long)
    target[:, 2:6, 2:6] = 1
    p = torch.softmax(logits, 1)[:, 1]
    expected = 1 - 2 * (p * target).sum() / (p.sum() + target.sum())
    assert float(dice_sums(logits, target).value("dice-fg")) == pytest.approx(float(expected), rel=1e-6)


# ------------------------------------------------------------------------------------------ precision

def test_auto_precision_on_a_t4_is_fp16_with_gradient_scaling_and_bf16_without_from_ampere():
    assert training_precision("auto", "cuda", capability=(7, 5)) == ("fp16", True)
    assert training_precision("auto", "cuda", capability=(8, 0)) == ("bf16", False)
    assert training_precision("fp32", "cuda", capability=(7, 5)) == ("fp32", False)
    with pytest.raises(ValueError, match="fp16 needs a CUDA GPU"):
        training_precision("fp16", "cpu")


def test_fp16_training_scales_the_loss_and_skips_steps_that_overflow(prepared, tmp_path, monkeypatch):
    """The scaler path, on the CPU (autocast fp16 + GradScaler('cpu')), as it runs on a T4."""
    monkeypatch.setattr("training.run.train.training_precision", lambda requested, device: ("fp16", True))
    # probe mode: CPU fp16 kernels are slow, and the scaler's arithmetic is the same for any model
    trainer = Trainer(config(prepared, tmp_path, mode="probe", max_steps=2))
    assert trainer.precision == "fp16" and trainer.scaler.is_enabled()
    trainer.fit()
    assert trainer.state.global_step == 2 and np.isfinite(trainer.state.history[0]["train_loss"])
    assert trainer.state.history[0]["loss_scale"] == trainer.scaler.get_scale() > 1
    # an overflowing gradient: the step is skipped, the weights stay, the scale halves
    batch = next(iter(trainer._train_loader(0)))
    trainer._micro_step(batch, 1.0, sync=True)
    head = trainer.model.frame_head[-1].weight
    head.grad[0, 0] = float("inf")
    before, scale = head.detach().clone(), trainer.scaler.get_scale()
    trainer._optimiser_step()
    assert torch.equal(head.detach(), before) and trainer.scaler.get_scale() == scale / 2
    assert read_snapshot(trainer.last_path)["scaler"]["scale"] > 1  # resumable with its scale


# ------------------------------------------------------------------------------------------ memory

def test_plan_prefers_checkpointing_then_accumulation_within_the_budget():
    estimate = MemoryEstimate(weights=1 * GiB, training_state=GiB // 4, fixed_activations=GiB // 8,
                              per_frame=GiB // 4, per_frame_blocks=GiB // 5, per_frame_block_inputs=GiB // 50,
                              blocks=24)
    full = plan_memory(estimate, 32, None)
    assert (full.micro_batch, full.accumulate, full.grad_checkpointing, full.fits) == (32, 1, False, True)
    roomy = plan_memory(estimate, 32, estimate.step(32) + 1)
    assert (roomy.accumulate, roomy.grad_checkpointing) == (1, False)
    ckpt = plan_memory(estimate, 32, estimate.step(32) - 1)
    assert (ckpt.accumulate, ckpt.grad_checkpointing) == (1, True) and ckpt.estimate_bytes < estimate.step(32)
    tight = plan_memory(estimate, 32, estimate.step(8, True) + 1)
    assert tight.grad_checkpointing and tight.accumulate == 4 and tight.micro_batch == 8 and tight.fits
    hopeless = plan_memory(estimate, 32, GiB)
    assert not hopeless.fits and hopeless.micro_batch == 1 and "DOES NOT FIT" in hopeless.describe()
    assert plan_memory(estimate, 32, GiB, grad_checkpointing=False, accumulate=2).accumulate == 2
    with pytest.raises(ValueError, match="does not divide"):
        plan_memory(estimate, 32, None, accumulate=3)
    no_grad_encoder = dataclasses.replace(estimate, per_frame_blocks=0)
    assert not plan_memory(no_grad_encoder, 32, estimate.step(32) - 1).grad_checkpointing


def test_measured_estimate_sees_encoder_activations_only_where_gradients_reach_them(prepared, tmp_path):
    fixed = Trainer(config(prepared, tmp_path / "f", mode="fixed")).memory_estimate  # LoRA through the encoder
    paper = Trainer(config(prepared, tmp_path / "p", mode="paper")).memory_estimate  # encoder under no_grad
    assert fixed.blocks == paper.blocks == 4
    assert fixed.can_checkpoint and fixed.per_frame > fixed.per_frame_blocks > fixed.per_frame_block_inputs > 0
    assert not paper.can_checkpoint and paper.per_frame_blocks == 0 and paper.per_frame > 0
    assert fixed.activations(8, checkpointing=True) < fixed.activations(8)
    assert fixed.step(8) > fixed.step(4) > fixed.weights + fixed.training_state


def test_half_precision_counts_the_frozen_weight_copies_that_no_saved_tensor_shows(prepared, tmp_path):
    """paper: encoder under no_grad, so the hooks miss autocast's copies of its weights; fixed saves them."""
    estimates = {}
    for mode in ("fixed", "paper"):
        trainer = Trainer(config(prepared, tmp_path / mode, mode=mode))
        for precision in ("fp32", "bf16"):
            estimates[mode, precision] = measure_step(trainer.view, trainer.loss, trainer.train_set[0],
                                                      trainer.ctx.device, precision)
    blocks = build_training_model(ModelOptions("paper", "small")).encoder.visual.transformer.resblocks
    frozen_half = sum(p.numel() * 2 for p in blocks.parameters() if not p.requires_grad)
    assert estimates["paper", "bf16"].cast_copies == frozen_half > 0
    assert estimates["paper", "fp32"].cast_copies == 0
    assert estimates["fixed", "bf16"].cast_copies == 0  # saved for the backward pass: in its activations
    assert estimates["fixed", "bf16"].fixed_activations > estimates["fixed", "fp32"].fixed_activations
    paper = estimates["paper", "bf16"]
    assert paper.step(4) - dataclasses.replace(paper, cast_copies=0).step(4) == frozen_half


def test_a_small_budget_switches_on_checkpointing_and_accumulation_and_still_trains(prepared, tmp_path):
    cfg = config(prepared, tmp_path, mode="fixed", batch_size=4, max_steps=2, memory_budget_gib=1e-9)
    trainer = Trainer(cfg)
    assert trainer.memory.grad_checkpointing and trainer.accumulate == 4 and trainer.micro_batch == 1
    assert trainer.model.encoder.visual.transformer.grad_checkpointing
    trainer.fit()
    assert trainer.state.global_step == 2


def test_accumulated_micro_batches_make_the_same_step_as_one_batch(prepared, tmp_path):
    """probe mode (a linear head, a mean loss): two micro-batches of 2 == one batch of 4."""
    weights = []
    for accumulate in (1, 2):
        trainer = Trainer(config(prepared, tmp_path / f"a{accumulate}", mode="probe", batch_size=4,
                                 accumulate=accumulate, max_steps=1, negatives_per_positive=None, lr=0.1,
                                 class_weight_power=0.0))
        assert trainer.micro_batch == 4 // accumulate and trainer.steps_per_epoch * accumulate >= \
            trainer.micro_batches_per_epoch
        trainer.fit()
        assert trainer.state.global_step == 1
        weights.append(trainer.model.frame_head[0].weight.detach().clone())
    torch.testing.assert_close(weights[0], weights[1], atol=1e-6, rtol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["fixed", "paper"])
def test_the_paper_recipe_at_full_size_fits_a_t4(tmp_path, mode):
    """Batch 32, fp16 (measured as bf16 on the CPU: the same bytes), a T4's 15 GiB: a set-up that fits."""
    out = tmp_path / "memory.json"
    result = subprocess.run([sys.executable, "-m", "training", "memory", "--config", "full", "--mode", mode,
                             "--batch-size", "32", "--precision", "fp16", "--budget-gib", "15", "--json", str(out)],
                            cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    plan = json.loads(out.read_text())["plan"]
    assert plan["fits"] and plan["micro_batch"] * plan["accumulate"] == 32
    assert plan["estimate_bytes"] <= 15 * GiB
    print(json.loads(out.read_text()))


# ------------------------------------------------------------------------------------------ snapshots

class CreatesAFile:
    """A pickle payload: unpickling it would create `path` (what a hostile .pt could do)."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_snapshots_hold_only_what_trains_and_load_without_pickle(prepared, tmp_path):
    trainer = Trainer(config(prepared, tmp_path, mode="fixed", max_steps=1))  # LoRA on a frozen encoder
    trainer.fit()
    for path in (trainer.last_path, trainer.best_path):
        state = torch.load(path, map_location="cpu", weights_only=True)["model"]
        trainable = {n for n, p in trainer.model.named_parameters() if p.requires_grad}
        assert trainable <= set(state)
        frozen = {n for n, p in trainer.model.named_parameters() if not p.requires_grad}
        assert frozen and not frozen & set(state)  # no frozen encoder weight
        expected = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad) + \
            sum(b.numel() for b in trainer.model.buffers())
        assert sum(v.numel() for v in state.values()) == expected


@pytest.mark.parametrize("where", ["init", "resume", "best"])
def test_a_pickle_payload_is_refused_and_never_runs(prepared, tmp_path, where):
    target = tmp_path / "created_by_pickle"
    evil = tmp_path / "evil.pt"
    torch.save({"model": CreatesAFile(target)}, evil)
    cfg = config(prepared, tmp_path / "run", mode="probe", max_steps=1)
    if where == "init":
        with pytest.raises(SnapshotError, match="weights_only=True"):
            Trainer(dataclasses.replace(cfg, init=evil))
        result = subprocess.run([sys.executable, "-m", "training", "train", "--prepared", str(prepared), "--out",
                                 str(tmp_path / "cli"), "--mode", "probe", "--config", "small", "--device", "cpu",
                                 "--init", str(evil)], cwd=REPO, capture_output=True, text=True)
        assert result.returncode == 2 and result.stderr.strip().splitlines()[-1].startswith("error: refusing")
    else:
        trainer = Trainer(dataclasses.replace(cfg, resume=True))
        trainer.out.mkdir(parents=True)
        shutil.copy(evil, trainer.last_path if where == "resume" else trainer.best_path)
        with pytest.raises(SnapshotError, match="refusing"):
            trainer.load_last() if where == "resume" else trainer.load_best()
    assert not target.exists()


def test_init_from_a_snapshot_of_another_mode_is_refused(prepared, tmp_path):
    source = Trainer(config(prepared, tmp_path / "probe", mode="probe", max_steps=1))
    source.fit()
    model = build_training_model(ModelOptions("paper-cls", "small"))
    with pytest.raises(SnapshotError, match="does not fit this model"):
        load_weights(model, source.best_path)
    again = build_training_model(ModelOptions("probe", "small"))
    load_weights(again, source.best_path)
    assert torch.equal(again.frame_head[0].weight, source.model.frame_head[0].weight)


# ------------------------------------------------------------------------------------------ data

def test_augmented_copies_give_the_offline_x2_epoch(prepared):
    from training.data.augment import AugmentConfig, FrameAugment
    from training.data.dataset import FrameDataset

    plain = FrameDataset(prepared, "train")
    augment = FrameAugment(AugmentConfig(affine_p=1.0), seed=0)
    copies = FrameDataset(prepared, "train", augment, copies=2)
    n = len(plain)
    assert len(copies) == 3 * n and np.array_equal(copies.labels, np.tile(plain.labels, 3))
    assert torch.equal(copies[1][0], plain[1][0])  # first pass: the frames as they are
    moved = sum(not torch.equal(copies[k * n + 1][0], plain[1][0]) for k in (1, 2))
    assert moved == 2  # then two augmented draws
    assert len(FrameDataset(prepared, "train", None, copies=2)) == n  # no augmentation, no copies


def test_prepared_cache_is_keyed_by_everything_that_changes_it(replica, tmp_path):
    out = tmp_path / "p"
    manifest = prepare(replica, out, seed=3, progress=False)
    key = prepare_key(replica, seed=3)
    assert manifest["key"] == key and prepared_matches(out, key)
    for other in (prepare_key(replica, seed=4), prepare_key(replica, seed=3, all_sweeps=True),
                  prepare_key(replica, seed=3, fractions=(0.6, 0.2, 0.2)), prepare_key(replica, seed=3, replica=False)):
        assert not prepared_matches(out, other)
    copy = tmp_path / "copy"
    shutil.copytree(replica, copy)
    assert not prepared_matches(out, prepare_key(copy, seed=3))  # other data folder
    csv = next((replica / "circumferences").glob("*.csv"))
    stat = csv.stat()
    os.utime(csv, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    try:
        assert not prepared_matches(out, prepare_key(replica, seed=3))  # a changed input file
    finally:
        os.utime(csv, ns=(stat.st_atime_ns, stat.st_mtime_ns))


def test_reproduce_prepares_once_and_reuses_only_a_matching_preparation(replica, tmp_path, monkeypatch):
    from training.run.distributed import DistContext
    from training.run.recipes import prepare_once

    args = Namespace(data=replica, seed=0, all_sweeps=False, replica=None)
    calls = []
    real = prepare

    def counting(*a, **k):
        calls.append(k.get("all_sweeps"))
        return real(*a, **{**k, "progress": False})

    monkeypatch.setattr("training.run.recipes.prepare", counting)  # the name reproduce calls
    prepare_once(args, tmp_path / "p", DistContext())
    prepare_once(args, tmp_path / "p", DistContext())
    assert calls == [False]
    prepare_once(Namespace(**{**vars(args), "all_sweeps": True}), tmp_path / "p", DistContext())
    assert calls == [False, True]


# ------------------------------------------------------------------------------------------ threshold sweep

def test_threshold_sweep_finds_the_f1_best_threshold_and_draws_the_curve(tmp_path):
    from training.scoring.threshold_sweep import run

    rng = np.random.default_rng(0)
    label = np.array([2] * 20 + [0] * 80)
    fraction = np.where(label != FRAME_NONE, rng.uniform(0.021, 0.04, 100), rng.uniform(0.0, 0.0195, 100))
    files = []
    for trial in range(2):
        files.append(tmp_path / f"t{trial}.npz")
        np.savez(files[-1], index=np.arange(100), mask_fraction=fraction, p_abdomen=fraction, label=label)
    result = run(files, tmp_path / "sweep", "synthetic")
    assert result["best"]["f1"] == 1.0 and 0.0195 < result["best"]["threshold"] <= 0.021
    assert result["paper_threshold"]["threshold"] == 0.01 and result["paper_threshold"]["precision"] < 1
    assert len(result["rows"]) == 50 and result["rows"][0]["threshold"] == 0.001
    png = (tmp_path / "sweep" / "threshold_sweep.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    assert "F1-best" in (tmp_path / "sweep" / "threshold_sweep.md").read_text()
    np.savez(tmp_path / "cls.npz", index=np.arange(3), mask_fraction=np.full(3, np.nan), p_abdomen=np.ones(3),
             label=np.zeros(3))
    from training.scoring.threshold_sweep import main
    assert main(["--frames", str(tmp_path / "cls.npz"), "--out", str(tmp_path / "x")]) == 2


# ------------------------------------------------------------------------------------------ modes trained

@pytest.mark.parametrize("mode", ["paper-cls", "probe"])
def test_classifier_modes_train_binary_heads_and_export_frame_metrics(prepared, tmp_path, mode):
    from algorithm.model.checkpoint import load_checkpoint
    from training.scoring.evaluate_frames import evaluate_weights

    summary = train(config(prepared, tmp_path / mode, mode=mode, max_steps=1))
    trial = summary["trials"][0]
    assert "mask_rule" not in trial["test"] and set(trial["test"]["head"]) >= {"f1", "precision", "recall"}
    model, info = load_checkpoint(summary["checkpoint"])
    assert model.decoder is None and info.config.frame_classes == 1 and info.extra["mode"] == mode
    frames = evaluate_weights(Path(summary["checkpoint"]), prepared, "test", device="cpu", progress=False)
    assert frames["head"] == trial["test"]["head"] and "mask_rule" not in frames
    record = np.load(trial["test_frames"])
    assert np.isnan(record["mask_fraction"]).all() and ((record["p_abdomen"] >= 0) & (record["p_abdomen"] <= 1)).all()


def test_segmenting_modes_keep_every_test_frame_for_the_sweep(prepared, tmp_path):
    summary = train(config(prepared, tmp_path / "paper", mode="paper", max_steps=1))
    trial = summary["trials"][0]
    record = np.load(trial["test_frames"])
    labels = np.load(prepared / "test" / "labels.npy")
    assert np.array_equal(record["index"], np.arange(len(labels))) and np.array_equal(record["label"], labels)
    assert np.isfinite(record["mask_fraction"]).all()
    assert trial["paper_parameters"] is None and trial["trainable_parameters"] > trial["effective_trainable_parameters"]


# ------------------------------------------------------------------------------------------ baselines

def test_baselines_are_built_by_name_with_the_published_adaptation():
    from training.models.baselines import BASELINES, build_baseline

    torch.manual_seed(0)
    cnn = build_baseline("mobilenet", None)
    assert cnn.config.backbone == BASELINES["mobilenet"].backbone and cnn.config.adapt == "full"
    assert all(p.requires_grad for p in cnn.parameters())
    vit = build_baseline("vit_small_patch16_224", None)  # any timm name: a transformer gets LoRA
    trainable = {n for n, p in vit.named_parameters() if p.requires_grad}
    assert vit.config.adapt == "lora" and trainable and all("lora_" in n or n.startswith("frame_head") for n in trainable)
    x = torch.randn(2, 3, 224, 224)
    out = vit(x)
    assert out.mask_logits is None and out.frame_logits.shape == (2, 1)
    out.frame_logits.sum().backward()
    assert all(p.grad is not None for n, p in vit.named_parameters() if "lora_B" in n)
    # the input becomes the backbone's: its normalisation, and timm's eval zoom by 1 / crop_pct (0.875 here)
    assert cnn.preprocessing["crop_pct"] == 0.875
    grey = torch.zeros(1, 3, 224, 224)
    converted = cnn.backbone_input(grey)
    assert converted.shape == (1, 3, 224, 224)
    mean = torch.tensor((0.485, 0.456, 0.406)).view(1, 3, 1, 1)
    std = torch.tensor((0.229, 0.224, 0.225)).view(1, 3, 1, 1)
    clip_mean = torch.tensor((0.48145466, 0.4578275, 0.40821073)).view(1, 3, 1, 1)
    torch.testing.assert_close(converted, ((clip_mean - mean) / std).expand_as(converted), atol=1e-4, rtol=1e-4)


def test_baseline_weights_come_from_a_local_file(tmp_path):
    import open_clip
    import timm
    from safetensors.torch import save_file

    from training.models.baselines import build_baseline

    torch.manual_seed(1)
    reference = timm.create_model("mobilenetv3_small_100", pretrained=False)
    save_file({k: v.contiguous() for k, v in reference.state_dict().items()}, str(tmp_path / "mobilenet.safetensors"))
    loaded = build_baseline("mobilenet", tmp_path / "mobilenet.safetensors")
    assert torch.equal(loaded.encoder.conv_stem.weight, reference.conv_stem.weight)

    clip = open_clip.create_model("ViT-S-32")
    save_file({k: v.contiguous() for k, v in clip.state_dict().items()}, str(tmp_path / "clip.safetensors"))
    tower = build_baseline("open_clip:ViT-S-32", tmp_path / "clip.safetensors")
    assert torch.equal(tower.encoder.conv1.weight, clip.visual.conv1.weight)
    from algorithm.model.fetalclipseg import effective_parameters, trainable_parameters
    assert effective_parameters(tower) < trainable_parameters(tower)  # LoRA as FetalCLIPCLS: out_proj inert
    with pytest.raises(FileNotFoundError):
        build_baseline("mobilenet", tmp_path / "absent.pth")


def test_a_baseline_trains_and_exports_its_trained_tensors(prepared, tmp_path):
    from safetensors import safe_open

    summary = train(config(prepared, tmp_path / "b", mode="baseline", backbone="mobilenet", max_steps=1))
    path = Path(summary["checkpoint"])
    assert path.name == "baseline.safetensors"
    with safe_open(str(path), framework="pt") as fh:
        meta = fh.metadata()
        assert meta["format"] == "fetalclipseg-baseline" and json.loads(meta["config"])["adapt"] == "full"
        assert "frame_head.weight" in fh.keys()
    assert summary["trials"][0]["test"]["head"]["f1"] >= 0


# ------------------------------------------------------------------------------------------ torchrun

@pytest.mark.slow
def test_reproduce_under_torchrun_with_two_cpu_processes(tmp_path):
    """The issue's CI command: data prepared once on rank 0, both modes trained with DDP (gloo), scoring and
    the report on rank 0."""
    from training.data.replica import write_dataset

    data = tmp_path / "data"
    write_dataset(data, cases=3, frames_per_sweep=12, seed=1, progress=False)
    out = tmp_path / "out"
    torchrun = Path(sys.executable).with_name("torchrun")
    command = [str(torchrun), "--standalone", "--nproc_per_node", "2", "-m", "training", "reproduce", "--data",
               str(data), "--out", str(out), "--config", "small", "--epochs", "1", "--max-steps", "3",
               "--modes", "fixed", "paper", "--device", "cpu"]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=1800)
    assert result.returncode == 0, result.stderr[-4000:]
    report = (out / "report.md").read_text()
    assert "## Parameters" in report and "FetalCLIPSEG (ours, fixed)" in report and "published code" in report
    assert "## Challenge metrics" in report and "## Threshold of the mask-size rule" in report
    results = json.loads((out / "reproduce.json").read_text())
    assert results["world_size"] == 2 and set(results["modes"]) == {"fixed", "paper"}
    for mode in ("fixed", "paper"):
        entry = results["modes"][mode]
        assert Path(entry["checkpoint"]).is_file() and "challenge" in entry
        assert entry["parameters"]["trainable"] >= entry["parameters"]["effective"] > 0
        summary = json.loads((out / mode / "summary.json").read_text())
        assert len(summary["trials"]) == 5  # the paper's five trials by default
        assert all(t["world_size"] == 2 and t["steps"] <= 3 for t in summary["trials"])
        record = np.load(summary["trials"][0]["test_frames"])
        # the frozen-encoder mode's trials become one ensemble, scored beside its best trial
        assert ("ensemble" in entry) == (mode == "paper")
        assert np.array_equal(record["index"], np.arange(len(np.load(out / "prepared" / "test" / "labels.npy"))))
    ensemble = results["modes"]["paper"]["ensemble"]
    assert ensemble["members"] == 5 and Path(ensemble["out"]) == out / "paper" / "ensemble.safetensors"
    assert read_checkpoint_info(Path(ensemble["out"])).members == 5
    assert ensemble["challenge"]["n_cases"] == results["modes"]["paper"]["challenge"]["n_cases"]
    assert "FetalCLIPSEG (published code), ensemble of 5 trials |" in report
    assert "## Ensembles of the trials" in report
    assert result.stderr.count("reusing prepared data") == 0 and "prepare:" in result.stderr
    assert json.loads((out / "prepared" / "manifest.json").read_text())["key"]["all_sweeps"] is False
    # the run beside itself in `compare`: every test case the same, paired
    compared = subprocess.run([sys.executable, "-m", "training", "compare", f"a={out}", f"b={out}", "--out",
                               str(tmp_path / "compare")], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert compared.returncode == 0, compared.stderr[-2000:]
    comparison = json.loads((tmp_path / "compare" / "comparison.json").read_text())
    assert [row["row"] for row in comparison["rows"]] == ["a / fixed", "a / paper", "b / fixed", "b / paper"]
    cases = comparison["paired"]["cases"]
    assert cases and comparison["paired"]["against_reference"]["b / fixed"]["same"] == len(cases)
    assert (tmp_path / "compare" / "comparison.png").is_file()
