"""Train FetalCLIPSEG (or the FetalCLIPCLS baseline) on prepared frames; write a checkpoint in algorithm's format.

    python -m training.train --prepared DIR --out DIR [--mode fixed|paper|cls] [--config full|small]
        [--fetalclip PATH] [--epochs 5] [--batch-size 32] [--lr 3e-4] [--device auto] [--seed 0]
        [--trials 1] [--resume] [--max-steps N] [--train-encoder]
    torchrun --nproc-per-node 4 -m training.train ...      (DDP; batch size is per process)

Modes:
* `fixed` (default): LoRA r8/alpha16/dropout0.1 on `c_fc`, `c_proj` and the whole `attn`
  (nn.MultiheadAttention, so in_proj and out_proj are both adapted), gradients through the encoder.
* `paper`: the published behaviour: LoRA on `c_fc`, `c_proj`, `out_proj` (the out_proj adapter is never
  called by MultiheadAttention's fused kernel) and the encoder run under torch.no_grad(), so no LoRA weight
  ever changes: effectively a frozen encoder with a trained decoder and head.
* `cls`: FetalCLIPCLS: the encoder frozen (no LoRA), only the frame head on the image embedding trains; its
  frame-level metrics are the head's.
`--train-encoder` makes every encoder weight trainable instead of LoRA (use_lora=False): the right choice
for `--config small` without FetalCLIP weights, whose encoder starts from random numbers.

Recipe (paper): AdamW 3e-4, batch 32, 5 epochs, bf16 autocast on GPU, the epoch with the lowest validation
loss is kept. `--trials N` repeats training with seeds seed..seed+N-1 and reports mean +- std of the test
metrics; the trial with the lowest validation loss becomes `<out>/fetalclipseg.safetensors`.

Outputs in `--out` (per trial in trial_<k>/): last.pt (resumable: model, optimizer, scheduler, epoch, RNG
states, history), best.pt, curves.png, history.json, frame_metrics.json, fetalclipseg.safetensors; and
summary.json + frame_table.md for all trials.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import json
import logging
import math
import os
import random
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, DistributedSampler, Sampler
from tqdm import tqdm

from algorithm import __version__
from algorithm.config import FRAME_NONE, ModelConfig
from algorithm.model.checkpoint import save_checkpoint
from algorithm.model.fetalclipseg import FetalCLIPSeg, build_model, total_parameters, trainable_parameters
from training.augment import build_augment
from training.dataset import FrameDataset, read_manifest
from training.evaluate_frames import (METRIC_COLUMNS, FrameStats, accumulate, autocast_for, frame_loader,
                                      frame_report, markdown_table, table_rows)
from training.losses import LossWeights, SegLoss, class_weights
from training.mining import Hardness, draw_negatives, mining_pool, score_negatives
from training.report_plots import plot_history

log = logging.getLogger("training")

MODES = ("fixed", "paper", "cls")
PAPER_LORA_TARGETS = ("c_fc", "c_proj", "out_proj")
FIXED_LORA_TARGETS = ("c_fc", "c_proj", "attn")
CHECKPOINT_NAME = "fetalclipseg.safetensors"


@dataclass
class TrainConfig:
    """Everything one training run depends on; stored in every checkpoint and summary."""

    prepared: Path
    out: Path
    mode: str = "fixed"  # fixed | paper | cls
    config: str = "full"  # full | small (ModelConfig / ModelConfig.small())
    fetalclip: Path | None = None  # published FetalCLIP weights (whole-CLIP checkpoint)
    init: Path | None = None  # start from these weights (our .safetensors, or a last.pt/best.pt): fine-tuning
    train_encoder: bool = False  # all encoder weights trainable, no LoRA
    epochs: int = 5
    batch_size: int = 32  # per process
    lr: float = 3e-4
    weight_decay: float = 0.01  # AdamW's default
    schedule: str = "constant"  # constant (paper) | cosine (linear warm-up, cosine decay)
    warmup_steps: int = 0
    clip_grad: float | None = None
    device: str = "auto"
    precision: str = "auto"  # auto (bf16 on GPU, fp32 on CPU) | fp32 | bf16
    # torch intra-op threads (None: torch's default). On a CPU shared with other jobs 1 thread did the same
    # work for a third of the CPU time of 2 (OpenMP threads spin-wait for a descheduled partner).
    threads: int | None = None
    channels_last: bool = True  # NHWC convolutions: ~1.5x faster decoder steps on CPU (oneDNN) and on GPU
    seed: int = 0
    trials: int = 1
    resume: bool = False
    max_steps: int | None = None  # optimiser steps per trial; the epoch reaching it ends early
    augment: bool = True
    sampler: str = "uniform"  # uniform | balanced (class-balanced, with replacement)
    negatives_per_positive: float | None = None  # per epoch: all positives + this many negatives each
    # per epoch and positive, extra negatives that run through encoder + frame head only (no decoder pass:
    # ~1/6 of a full step's CPU cost); they teach the head to reject, added to every batch in proportion
    head_negatives_per_positive: float | None = None
    # Hard-negative mining (training.mining): this fraction of each epoch's negatives is drawn in proportion
    # to the frame head's P(abdomen) on a fresh pool of `hard_negative_pool` negatives, from epoch
    # `hard_negatives_from` (0-based) on. 0 = uniform negatives (the paper).
    hard_negatives: float = 0.0
    hard_negative_pool: int = 4096
    hard_negatives_from: int = 0
    class_weight_power: float | None = None  # None: 0.5, or 0 with the balanced sampler (training.losses)
    dice_weight: float = 1.0
    mask_ce_weight: float = 0.0  # paper: Dice only
    frame_weight: float = 1.0
    val_max_frames: int | None = None  # fixed validation subset (all positives first) to save time
    workers: int | None = None  # DataLoader workers; None: 0 on CPU, 6 on GPU
    eval_batch_size: int | None = None
    deterministic: bool = False
    progress: bool = True
    replica: bool | None = None  # trained on the replica (adds "not for clinical use"); None: from manifest
    note: str = ""  # appended to the provenance

    def to_dict(self) -> dict[str, Any]:
        return {k: str(v) if isinstance(v, Path) else v for k, v in dataclasses.asdict(self).items()}

    def validate(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.config not in ("full", "small"):
            raise ValueError(f"config must be full or small, got {self.config!r}")
        if self.sampler not in ("uniform", "balanced"):
            raise ValueError(f"sampler must be uniform or balanced, got {self.sampler!r}")
        if self.schedule not in ("constant", "cosine"):
            raise ValueError(f"schedule must be constant or cosine, got {self.schedule!r}")
        if self.precision not in ("auto", "fp32", "bf16"):
            raise ValueError(f"precision must be auto, fp32 or bf16, got {self.precision!r}")
        if self.epochs < 1 or self.batch_size < 1 or self.trials < 1:
            raise ValueError("epochs, batch size and trials must be positive")
        if not 0.0 <= self.hard_negatives <= 1.0:
            raise ValueError(f"hard_negatives is a fraction in [0, 1], got {self.hard_negatives}")
        if self.hard_negatives and self.negatives_per_positive is None and not self.head_negatives_per_positive:
            raise ValueError("hard negatives need a negative draw: set negatives_per_positive or "
                             "head_negatives_per_positive (the uniform sampler otherwise shows every frame)")
        if self.hard_negatives and self.sampler != "uniform":
            raise ValueError("hard negatives go with the uniform sampler (the balanced one draws by class only)")


# ------------------------------------------------------------------------------------------ plumbing

@dataclass(frozen=True)
class DistContext:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()


def setup_distributed(device_name: str) -> DistContext:
    """torchrun sets WORLD_SIZE/RANK/LOCAL_RANK: then join the process group (NCCL on GPU, gloo on CPU)."""
    from algorithm.inference import resolve_device

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistContext(device=resolve_device(device_name))
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = device_name in ("auto", "cuda") and torch.cuda.is_available()
    if use_cuda:
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
    device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    return DistContext(rank, world, local_rank, device)


def seed_everything(seed: int, deterministic: bool = False) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def atomic_torch_save(obj: Any, path: Path) -> None:
    """A crash while saving leaves the previous file, never a truncated one."""
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _mix(*numbers: int) -> int:
    """A 32-bit seed from several integers (numpy's SeedSequence: well mixed, platform independent)."""
    return int(np.random.SeedSequence([int(n) % (2**32) for n in numbers]).generate_state(1)[0])


def _init_worker(worker_id: int, base: int) -> None:
    """Seed each DataLoader worker's augmentation from (run seed, epoch, rank, worker)."""
    info = torch.utils.data.get_worker_info()
    augment = getattr(info.dataset, "augment", None)
    if augment is not None:
        augment.set_seed(_mix(base, worker_id))


# ------------------------------------------------------------------------------------------ sampling

class EpochSampler(Sampler[int]):
    """One epoch's frame indices, the same on every rank (seeded by seed and epoch), then sharded.

    uniform: every frame once, shuffled; with `negatives_per_positive` r: every positive frame plus a fresh
    random draw of r x (positives) negative frames each epoch (over the epochs the network still sees all
    negatives, at a fraction of the cost per epoch). balanced: frames drawn with replacement with
    probability 1 / (count of their class), so each class fills a third of the epoch.
    """

    def __init__(self, labels: np.ndarray, seed: int, strategy: str = "uniform",
                 negatives_per_positive: float | None = None, rank: int = 0, world: int = 1):
        self.labels = np.asarray(labels)
        self.seed, self.strategy, self.ratio = seed, strategy, negatives_per_positive
        self.rank, self.world = rank, world
        self.epoch = 0
        self.hardness: Hardness | None = None  # hard-negative mining (training.mining), set by the trainer
        self._length = len(self.epoch_indices())

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def epoch_size(self) -> int:
        positives = int(np.sum(self.labels != FRAME_NONE))
        negatives = len(self.labels) - positives
        if self.ratio is not None and positives:
            negatives = min(negatives, int(round(self.ratio * positives)))
        return positives + negatives

    def epoch_indices(self) -> np.ndarray:
        rng = np.random.default_rng([self.seed, self.epoch, 7919])
        n = len(self.labels)
        if self.strategy == "balanced":
            counts = np.bincount(self.labels, minlength=3).astype(np.float64)
            weights = 1.0 / counts[self.labels]
            indices = rng.choice(n, size=self.epoch_size(), replace=True, p=weights / weights.sum())
        else:
            positives = np.flatnonzero(self.labels != FRAME_NONE)
            negatives = np.flatnonzero(self.labels == FRAME_NONE)
            if self.ratio is not None and len(positives):
                negatives = draw_negatives(rng, negatives, round(self.ratio * len(positives)), self.hardness)
            indices = rng.permutation(np.concatenate([positives, negatives]))
        padded = math.ceil(len(indices) / self.world) * self.world
        if padded > len(indices):  # as DistributedSampler: repeat the head so every rank gets as many
            indices = np.concatenate([indices, indices[: padded - len(indices)]])
        return indices[self.rank::self.world]

    def __iter__(self):
        return iter(self.epoch_indices().tolist())

    def __len__(self) -> int:
        return self._length


class MixedBatches(Sampler[list]):
    """Batches of (frame, decode) pairs: `batch_size` frames for the whole network (every positive plus
    `negatives_per_positive` negatives per positive) and, spread evenly over the same batches, head-only
    negatives (`head_negatives_per_positive` per positive, disjoint from the others) for which the decoder
    is skipped. The decoder at 224 px is most of a step's cost, the frame head needs many negatives to
    learn what is *not* an abdomen plane: this buys those negatives cheaply. Same seeding and sharding
    rules as EpochSampler (whole batches are sharded)."""

    def __init__(self, labels: np.ndarray, seed: int, batch_size: int, negatives_per_positive: float | None,
                 head_negatives_per_positive: float, rank: int = 0, world: int = 1):
        self.labels = np.asarray(labels)
        self.seed, self.batch_size = seed, batch_size
        self.ratio, self.head_ratio = negatives_per_positive, head_negatives_per_positive
        self.rank, self.world = rank, world
        self.epoch = 0
        self.hardness: Hardness | None = None  # as EpochSampler
        self._length = len(self.batches())

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def plan(self) -> tuple[np.ndarray, np.ndarray]:
        """(frames for the whole network, head-only frames) of this epoch, each shuffled."""
        rng = np.random.default_rng([self.seed, self.epoch, 7919])
        positives = np.flatnonzero(self.labels != FRAME_NONE)
        negatives = np.flatnonzero(self.labels == FRAME_NONE)
        if self.ratio is not None and len(positives):
            decoded_negatives = draw_negatives(rng, negatives, round(self.ratio * len(positives)), self.hardness)
        else:
            decoded_negatives = negatives
        rest = np.setdiff1d(negatives, decoded_negatives)
        head = draw_negatives(rng, rest, round(self.head_ratio * max(len(positives), 1)), self.hardness)
        return rng.permutation(np.concatenate([positives, decoded_negatives])), rng.permutation(head)

    def batches(self) -> list[list[tuple[int, bool]]]:
        decoded, head = self.plan()
        count = max(1, math.ceil(len(decoded) / self.batch_size))
        head_chunks = np.array_split(head, count)
        batches = [[(int(i), True) for i in decoded[b * self.batch_size:(b + 1) * self.batch_size]]
                   + [(int(i), False) for i in head_chunks[b]] for b in range(count)]
        padded = math.ceil(len(batches) / self.world) * self.world
        batches += batches[: padded - len(batches)]
        return batches[self.rank::self.world]

    def frames(self) -> int:
        decoded, head = self.plan()
        return len(decoded) + len(head)

    def __iter__(self):
        return iter(self.batches())

    def __len__(self) -> int:
        return self._length


def validation_subset(labels: np.ndarray, max_frames: int | None, seed: int = 0) -> np.ndarray | None:
    """A fixed validation subset: every positive frame (up to the budget), then random negatives."""
    if max_frames is None or max_frames >= len(labels):
        return None
    rng = np.random.default_rng([seed, 104729])
    positives = np.flatnonzero(labels != FRAME_NONE)
    negatives = rng.permutation(np.flatnonzero(labels == FRAME_NONE))
    positives = rng.permutation(positives)[:max_frames]
    chosen = np.concatenate([positives, negatives[: max_frames - len(positives)]])
    return np.sort(chosen)


# ------------------------------------------------------------------------------------------ the model

def model_config_for(cfg: TrainConfig) -> ModelConfig:
    """The ModelConfig a training mode implies (stored in the checkpoint)."""
    base = ModelConfig.small() if cfg.config == "small" else ModelConfig()
    if cfg.mode == "paper":
        return dataclasses.replace(base, use_lora=not cfg.train_encoder, lora_targets=PAPER_LORA_TARGETS,
                                   encoder_no_grad=True)
    if cfg.mode == "cls":
        return dataclasses.replace(base, use_lora=False, encoder_no_grad=not cfg.train_encoder)
    return dataclasses.replace(base, use_lora=not cfg.train_encoder, lora_targets=FIXED_LORA_TARGETS,
                               encoder_no_grad=False)


def configure_trainable(model: FetalCLIPSeg, cfg: TrainConfig) -> None:
    """requires_grad per mode. LoRA models come from build_model with only the adapters trainable in the
    encoder; `paper` keeps them flagged trainable (as the published code did): no_grad is what stops them."""
    encoder_trainable = cfg.train_encoder
    if not model.encoder.has_lora:
        for p in model.encoder.parameters():
            p.requires_grad = encoder_trainable
    for p in model.decoder.parameters():
        p.requires_grad = cfg.mode != "cls"
    for p in model.frame_head.parameters():
        p.requires_grad = True


def load_weights(model: FetalCLIPSeg, path: Path) -> None:
    """Initialise `model` from a previous run: our checkpoint format or a trainer's last.pt / best.pt.

    The architecture must match (same mode / config / LoRA setting); LoRA checkpoints are exported merged,
    so continue LoRA runs from their best.pt instead."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path), device="cpu")
    else:
        state = torch.load(path, map_location="cpu", weights_only=False)["model"]
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as error:
        raise ValueError(f"--init {path} does not fit this model ({str(error).splitlines()[0]})") from None


def effective_trainable_parameters(model: FetalCLIPSeg) -> int:
    """Parameters that can actually change: without those behind torch.no_grad (paper mode's encoder)."""
    encoder = sum(p.numel() for p in model.encoder.parameters() if p.requires_grad)
    return trainable_parameters(model) - (encoder if model.config.encoder_no_grad else 0)


class TrainView(nn.Module):
    """What one training step runs: the whole network, or (cls mode) encoder + frame head only.

    A module of its own so DistributedDataParallel wraps exactly the computation that produces the loss.
    """

    def __init__(self, model: FetalCLIPSeg, mode: str):
        super().__init__()
        self.model, self.mode = model, mode

    def forward(self, images: torch.Tensor, decode: torch.Tensor | None = None
                ) -> tuple[torch.Tensor | None, torch.Tensor]:
        """(mask logits, frame logits); with `decode` (bool (B,)) the decoder runs on those frames only."""
        if self.mode == "cls":
            frozen = self.model.config.encoder_no_grad
            with torch.no_grad() if frozen else torch.enable_grad():
                _, embedding = self.model.encoder(images)
            return None, self.model.frame_head(embedding)
        if decode is None:
            out = self.model(images)
            return out.mask_logits, out.frame_logits
        # FetalCLIPSeg.forward, with the decoder restricted to the frames that need a mask.
        with torch.no_grad() if self.model.config.encoder_no_grad else contextlib.nullcontext():
            features, embedding = self.model.encoder(images)
        mask_logits = self.model.decoder(images[decode], [f[decode] for f in features])
        return mask_logits, self.model.frame_head(embedding)


# ------------------------------------------------------------------------------------------ training

@dataclass
class TrialState:
    epoch: int = -1  # last completed epoch (0-based)
    global_step: int = 0
    best_val_loss: float = float("inf")
    best_epoch: int = -1
    history: list[dict[str, Any]] = field(default_factory=list)
    train_seconds: float = 0.0


class Trainer:
    """One trial: model, data, optimiser and the resumable loop."""

    def __init__(self, cfg: TrainConfig, trial: int = 0, out: Path | None = None,
                 ctx: DistContext | None = None):
        cfg.validate()
        self.cfg, self.trial = cfg, trial
        self.ctx = ctx or DistContext(device=_resolve(cfg.device))
        self.seed = cfg.seed + trial
        self.out = Path(out) if out is not None else Path(cfg.out) / f"trial_{trial}"
        self.manifest = read_manifest(cfg.prepared)
        seed_everything(self.seed, cfg.deterministic)

        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        self.model_config = model_config_for(cfg)
        if cfg.fetalclip is None and not cfg.train_encoder and self.ctx.main:
            log.warning("no --fetalclip weights: the encoder is random and frozen (only LoRA/decoder/head "
                        "learn); use --train-encoder for a from-scratch encoder")
        self.model = build_model(self.model_config, cfg.fetalclip)
        if cfg.init is not None:
            load_weights(self.model, Path(cfg.init))
        configure_trainable(self.model, cfg)
        self.model.to(self.ctx.device)
        if cfg.channels_last:
            self.model.to(memory_format=torch.channels_last)
        self.view: nn.Module = TrainView(self.model, cfg.mode)
        if self.ctx.world > 1:
            ids = [self.ctx.local_rank] if self.ctx.device.type == "cuda" else None
            # paper mode: the LoRA adapters require grad but sit behind no_grad, i.e. unused parameters.
            self.view = DDP(self.view, device_ids=ids, find_unused_parameters=cfg.mode == "paper")

        workers = cfg.workers if cfg.workers is not None else (6 if self.ctx.device.type == "cuda" else 0)
        self.workers = workers
        self.augment = build_augment(cfg.augment, seed=self.seed)
        self.train_set = FrameDataset(cfg.prepared, "train", self.augment)
        self.val_set = FrameDataset(cfg.prepared, "val")
        if len(self.train_set) == 0:
            raise ValueError(f"{cfg.prepared}: the train split is empty")
        counts = np.bincount(self.train_set.labels, minlength=3)
        power = cfg.class_weight_power
        if power is None:
            power = 0.0 if cfg.sampler == "balanced" else 0.5
        self.class_weights = class_weights(counts, power).to(self.ctx.device)
        self.loss = SegLoss(self.class_weights, LossWeights(cfg.dice_weight, cfg.mask_ce_weight, cfg.frame_weight),
                            use_mask=cfg.mode != "cls").to(self.ctx.device)
        self.sampler: Sampler
        if cfg.head_negatives_per_positive:
            if cfg.sampler != "uniform":
                raise ValueError("head-only negatives go with the uniform sampler")
            self.sampler = MixedBatches(self.train_set.labels, self.seed, cfg.batch_size, cfg.negatives_per_positive,
                                        cfg.head_negatives_per_positive, self.ctx.rank, self.ctx.world)
        elif cfg.sampler == "uniform" and cfg.negatives_per_positive is None and self.ctx.world > 1:
            self.sampler = DistributedSampler(self.train_set, self.ctx.world, self.ctx.rank, shuffle=True,
                                              seed=self.seed)
        else:
            self.sampler = EpochSampler(self.train_set.labels, self.seed, cfg.sampler, cfg.negatives_per_positive,
                                        self.ctx.rank, self.ctx.world)
        self.batched = isinstance(self.sampler, MixedBatches)
        self.steps_per_epoch = len(self.sampler) if self.batched else max(1, math.ceil(len(self.sampler) / cfg.batch_size))
        self.val_indices = validation_subset(self.val_set.labels, cfg.val_max_frames, cfg.seed)

        params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self._lr_factor)
        self.state = TrialState()
        self.info = {
            "mode": cfg.mode,
            "model": self.model_config.name,
            "trainable_parameters": trainable_parameters(self.model),
            "effective_trainable_parameters": effective_trainable_parameters(self.model),
            "total_parameters": total_parameters(self.model),
            "train_class_counts": counts.tolist(),
            "class_weights": [round(float(w), 4) for w in self.class_weights.cpu()],
            "frames_per_epoch": self.sampler.frames() if self.batched else len(self.sampler) * self.ctx.world,
        }

    # -- schedule
    def _lr_factor(self, step: int) -> float:
        cfg = self.cfg
        if cfg.warmup_steps and step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        if cfg.schedule == "cosine":
            total = self.steps_per_epoch * cfg.epochs
            if cfg.max_steps:
                total = min(total, cfg.max_steps)
            progress = min(1.0, (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps))
            return 0.5 * (1 + math.cos(math.pi * progress))
        return 1.0

    # -- persistence
    @property
    def last_path(self) -> Path:
        return self.out / "last.pt"

    @property
    def best_path(self) -> Path:
        return self.out / "best.pt"

    def save_last(self) -> None:
        if not self.ctx.main:
            return
        atomic_torch_save({
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "state": dataclasses.asdict(self.state),
            "rng": rng_state(),
            "train_config": self.cfg.to_dict(),
            "model_config": self.model_config.to_dict(),
            "seed": self.seed,
        }, self.last_path)

    def load_last(self) -> bool:
        """Restore a previous run of this trial from last.pt; False when there is none."""
        if not self.last_path.is_file():
            return False
        saved = torch.load(self.last_path, map_location=self.ctx.device, weights_only=False)
        if saved["model_config"] != self.model_config.to_dict():
            raise ValueError(f"{self.last_path} was written for another model configuration; "
                             "resume with the same --mode/--config/--train-encoder or use another --out")
        self.model.load_state_dict(saved["model"])
        self.optimizer.load_state_dict(saved["optimizer"])
        self.scheduler.load_state_dict(saved["scheduler"])
        self.state = TrialState(**saved["state"])
        set_rng_state(saved["rng"])
        return True

    # -- loops
    def _train_loader(self, epoch: int) -> DataLoader:
        if hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(epoch)
        base = _mix(self.seed, epoch, self.ctx.rank)
        if self.workers == 0 and self.augment is not None:
            self.augment.set_seed(base)
        batching = {"batch_sampler": self.sampler} if self.batched else \
            {"batch_size": self.cfg.batch_size, "sampler": self.sampler, "drop_last": False}
        return DataLoader(self.train_set, **batching,
                          num_workers=self.workers, pin_memory=self.ctx.device.type == "cuda",
                          worker_init_fn=functools.partial(_init_worker, base=base) if self.workers else None,
                          persistent_workers=False)

    def train_epoch(self, epoch: int) -> dict[str, float]:
        self.view.train()
        loader = self._train_loader(epoch)
        totals: dict[str, float] = {}
        batches = 0
        bar = tqdm(loader, total=len(loader), desc=f"trial {self.trial} epoch {epoch + 1}/{self.cfg.epochs}",
                   unit="batch", disable=not (self.cfg.progress and self.ctx.main), leave=False)
        for batch in bar:
            if self.cfg.max_steps is not None and self.state.global_step >= self.cfg.max_steps:
                break
            images, mask, label = (t.to(self.ctx.device, non_blocking=True) for t in batch[:3])
            images = self._layout(images)
            decode = batch[3].to(self.ctx.device) if len(batch) > 3 else None
            if decode is not None:
                mask = mask[decode]
            with autocast_for(self.ctx.device, self.cfg.precision):
                mask_logits, frame_logits = self.view(images, decode)
            loss, parts = self.loss(mask_logits, frame_logits, mask, label)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if self.cfg.clip_grad:
                torch.nn.utils.clip_grad_norm_(self.optimizer.param_groups[0]["params"], self.cfg.clip_grad)
            self.optimizer.step()
            self.scheduler.step()
            self.state.global_step += 1
            batches += 1
            for key, value in parts.items():
                totals[key] = totals.get(key, 0.0) + value
            bar.set_postfix(loss=f"{parts['loss']:.3f}", lr=f"{self.scheduler.get_last_lr()[0]:.1e}")
        bar.close()
        means = {k: v / max(batches, 1) for k, v in totals.items()}
        if self.ctx.world > 1:  # average the per-rank means (equal batch counts per rank)
            keys = sorted(means)
            tensor = torch.tensor([means[k] for k in keys], dtype=torch.float64, device=self._reduce_device())
            dist.all_reduce(tensor)
            means = {k: float(v) / self.ctx.world for k, v in zip(keys, tensor.cpu())}
        means["batches"] = batches
        return means

    def mine_hard_negatives(self, epoch: int) -> dict[str, float] | None:
        """Score this epoch's pool of negatives with the current model and hand it to the sampler
        (training.mining). Every rank scores the same pool, so all ranks draw the same batches."""
        cfg = self.cfg
        if not cfg.hard_negatives or epoch < cfg.hard_negatives_from:
            return None
        started = time.perf_counter()
        rng = np.random.default_rng([self.seed, epoch, 6151])
        pool = mining_pool(self.train_set.labels, cfg.hard_negative_pool, rng)
        plain = FrameDataset(cfg.prepared, "train")  # unaugmented: score what the frame looks like
        loader = frame_loader(plain, pool, cfg.eval_batch_size or cfg.batch_size, self.workers)
        p_abdomen = score_negatives(self.model, loader, self.ctx.device,
                                    lambda: autocast_for(self.ctx.device, cfg.precision))
        self.sampler.hardness = Hardness(pool, p_abdomen, cfg.hard_negatives)
        summary = {**self.sampler.hardness.summary(), "seconds": round(time.perf_counter() - started, 1)}
        if self.ctx.main:
            log.info("trial %d epoch %d: mined %d negatives, %d called abdomen (mean P %.3f), %.0f s", self.trial,
                     epoch + 1, summary["pool"], summary["called_abdomen"], summary["mean_p_abdomen"],
                     summary["seconds"])
        return summary

    def _reduce_device(self) -> torch.device:
        return self.ctx.device if self.ctx.device.type == "cuda" else torch.device("cpu")

    def _layout(self, images: torch.Tensor) -> torch.Tensor:
        return images.contiguous(memory_format=torch.channels_last) if self.cfg.channels_last else images

    def _forward_eval(self, images: torch.Tensor):
        view = self.view.module if isinstance(self.view, DDP) else self.view
        return view(self._layout(images))

    def evaluate(self, split: str, indices: np.ndarray | None = None, keep_frames: bool = False) -> FrameStats:
        """Loss terms and confusion counts on a split (sharded over ranks, summed)."""
        dataset = self.val_set if split == "val" else FrameDataset(self.cfg.prepared, split)
        batch = self.cfg.eval_batch_size or self.cfg.batch_size
        loader = frame_loader(dataset, indices, batch, self.workers, self.ctx.rank, self.ctx.world)
        self.view.eval()
        stats = accumulate(self._forward_eval, loader, self.ctx.device, self.class_weights, self.cfg.precision,
                           keep_frames=keep_frames and self.ctx.world == 1,
                           progress=self.cfg.progress and self.ctx.main, total=len(loader), desc=f"{split}")
        stats.all_reduce()
        return stats

    def _val_losses(self, stats: FrameStats) -> dict[str, float]:
        return stats.losses(self.cfg.dice_weight, self.cfg.mask_ce_weight, self.cfg.frame_weight,
                            use_mask=self.cfg.mode != "cls")

    def fit(self) -> TrialState:
        """Train the remaining epochs (all, or those after last.pt with --resume)."""
        self.out.mkdir(parents=True, exist_ok=True)
        if self.cfg.resume and self.load_last():
            if self.ctx.main:
                log.info("trial %d: resumed after epoch %d (step %d)", self.trial, self.state.epoch + 1,
                         self.state.global_step)
        elif self.ctx.main:
            for stale in (self.last_path, self.best_path):
                stale.unlink(missing_ok=True)
        self.ctx.barrier()
        for epoch in range(self.state.epoch + 1, self.cfg.epochs):
            if self.cfg.max_steps is not None and self.state.global_step >= self.cfg.max_steps:
                break
            started = time.perf_counter()
            mined = self.mine_hard_negatives(epoch)
            train = self.train_epoch(epoch)
            train_seconds = time.perf_counter() - started
            val_stats = self.evaluate("val", self.val_indices) if len(self.val_set) else None
            val = self._val_losses(val_stats) if val_stats else {"loss": train["loss"]}
            row = {
                "epoch": epoch,
                "steps": self.state.global_step,
                "train_loss": train.get("loss", float("nan")),
                **{f"train_{k}": v for k, v in train.items() if k not in ("loss", "batches")},
                "val_loss": val["loss"],
                **{f"val_{k}": v for k, v in val.items() if k != "loss"},
                "val_f1_head": val_stats.metrics("head")["f1"] if val_stats else None,
                "val_f1_mask": val_stats.metrics("mask")["f1"] if val_stats and self.cfg.mode != "cls" else None,
                "lr": self.scheduler.get_last_lr()[0],
                "seconds": round(time.perf_counter() - started, 1),
                "train_seconds": round(train_seconds, 1),
                **({f"mined_{k}": v for k, v in mined.items()} if mined else {}),
            }
            self.state.history.append(row)
            self.state.epoch = epoch
            self.state.train_seconds += time.perf_counter() - started
            if val["loss"] < self.state.best_val_loss:
                self.state.best_val_loss, self.state.best_epoch = val["loss"], epoch
                if self.ctx.main:
                    atomic_torch_save({"model": self.model.state_dict(), "epoch": epoch}, self.best_path)
            self.save_last()
            if self.ctx.main:
                log.info("trial %d epoch %d: train %.4f  val %.4f  F1 mask %s head %s  (%.0f s)%s", self.trial,
                         epoch + 1, row["train_loss"], row["val_loss"], _f(row["val_f1_mask"]),
                         _f(row["val_f1_head"]), row["seconds"],
                         "  best" if self.state.best_epoch == epoch else "")
                (self.out / "history.json").write_text(json.dumps(self.state.history, indent=2) + "\n")
                plot_history(self.state.history, self.out / "curves.png",
                             f"{self.cfg.mode} ({self.model_config.name}), trial {self.trial}, seed {self.seed}")
            self.ctx.barrier()
        return self.state

    def load_best(self) -> None:
        if self.best_path.is_file():
            saved = torch.load(self.best_path, map_location=self.ctx.device, weights_only=False)
            self.model.load_state_dict(saved["model"])

    def provenance(self) -> str:
        cfg, manifest = self.cfg, self.manifest
        replica = cfg.replica if cfg.replica is not None else bool(manifest.get("replica"))
        counts = manifest["counts"]["train"]
        encoder = ("all encoder weights trained" if cfg.train_encoder else
                   "encoder frozen" if cfg.mode == "cls" else
                   f"LoRA r{self.model_config.lora_rank} on {','.join(self.model_config.lora_targets)}"
                   + (" under no_grad (never trained)" if self.model_config.encoder_no_grad else ""))
        init = (f"{Path(cfg.init).name}" if cfg.init else
                "FetalCLIP weights" if cfg.fetalclip else "random initialisation")
        text = (f"FetalCLIPSEG {self.model_config.name}, mode {cfg.mode} ({encoder}; encoder from {init}); "
                f"trained {self.state.epoch + 1} epoch(s), best epoch {self.state.best_epoch + 1}, seed {self.seed}, "
                f"on {'the replica dataset' if replica else 'the ACOUSLIC-AI training data'} "
                f"({counts['cases']} cases, {counts['frames']} frames) at {manifest['data']}; "
                f"training/train.py, algorithm {__version__}")
        if replica:
            text += "; replica-trained, not for clinical use"
        if cfg.note:
            text += f"; {cfg.note}"
        return text

    def export(self, path: Path, test_report: dict[str, Any] | None = None) -> Path:
        """Best weights -> algorithm's checkpoint format (LoRA merged into the encoder for inference)."""
        self.load_best()
        model = self.model
        model.merge_lora()  # irreversible: the trainer is done with this model
        extra = {**self.info, "train_config": self.cfg.to_dict(), "best_epoch": self.state.best_epoch,
                 "best_val_loss": self.state.best_val_loss, "epochs_trained": self.state.epoch + 1,
                 "split_seed": self.manifest.get("seed"), "lora_merged": True}
        if test_report is not None:
            extra["test_frame_metrics"] = test_report
        return save_checkpoint(path, model, model.config, self.provenance(), extra=extra)


def _resolve(device: str) -> torch.device:
    from algorithm.inference import resolve_device

    return resolve_device(device)


def _f(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


# ------------------------------------------------------------------------------------------ trials

def run_trial(cfg: TrainConfig, trial: int, ctx: DistContext) -> dict[str, Any]:
    """Train one trial, score its best epoch on the test split, export its checkpoint."""
    trainer = Trainer(cfg, trial, ctx=ctx)
    started = time.perf_counter()
    state = trainer.fit()
    trainer.load_best()
    test_stats = trainer.evaluate("test", keep_frames=True) if _split_size(cfg.prepared, "test") else None
    report = frame_report(test_stats, trainer.info["trainable_parameters"],
                          trainer.info["effective_trainable_parameters"], use_mask=cfg.mode != "cls") \
        if test_stats else None
    result = {
        "trial": trial, "seed": trainer.seed, "best_epoch": state.best_epoch, "best_val_loss": state.best_val_loss,
        "epochs_trained": state.epoch + 1, "steps": state.global_step,
        "train_seconds": round(state.train_seconds, 1), "seconds_this_run": round(time.perf_counter() - started, 1),
        "test": report, **trainer.info,
    }
    if ctx.main:
        if test_stats is not None and test_stats.per_frame:
            np.save(trainer.out / "test_frames.npy", test_stats.frames_array())
        checkpoint = trainer.export(trainer.out / CHECKPOINT_NAME, report)
        result["checkpoint"] = str(checkpoint)
        (trainer.out / "frame_metrics.json").write_text(json.dumps(result, indent=2) + "\n")
    ctx.barrier()
    return result


def _split_size(prepared: Path, split: str) -> int:
    return int(read_manifest(prepared)["counts"][split]["frames"])


def summarise(results: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean and standard deviation (over trials) of every test metric of both rules."""
    summary: dict[str, Any] = {}
    for rule in ("mask_rule", "head"):
        values = [r["test"][rule] for r in results if r.get("test") and rule in r["test"]]
        if not values:
            continue
        summary[rule] = {k: {"mean": float(np.mean([v[k] for v in values])),
                             "std": float(np.std([v[k] for v in values], ddof=1)) if len(values) > 1 else 0.0}
                         for k in METRIC_COLUMNS}
    return summary


def summary_table(name: str, results: list[dict[str, Any]], summary: dict[str, Any]) -> str:
    """Markdown: our rows (mean +- std over trials when there are several) and the paper's figures."""
    rows: dict[str, dict[str, Any]] = {}
    params = results[0]["trainable_parameters"] if results else None
    if len(results) == 1 and results[0].get("test"):
        rows = table_rows(name, results[0]["test"])
    else:
        for rule, label in (("mask_rule", "mask >= 1 %"), ("head", "frame head")):
            if rule in summary:
                rows[f"{name}: {label} ({len(results)} trials)"] = {
                    k: f"{v['mean']:.3f} ± {v['std']:.3f}" for k, v in summary[rule].items()}
                rows[f"{name}: {label} ({len(results)} trials)"]["trainable_parameters"] = params
    return markdown_table(rows)


def train(cfg: TrainConfig) -> dict[str, Any]:
    """All trials of one configuration; returns (and writes) the summary."""
    cfg.validate()
    ctx = setup_distributed(cfg.device)
    out = Path(cfg.out)
    if ctx.main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "train_config.json").write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")
    results = [run_trial(cfg, trial, ctx) for trial in range(cfg.trials)]
    summary = {"config": cfg.to_dict(), "trials": results, "test_mean_std": summarise(results)}
    if ctx.main:
        best = min(results, key=lambda r: r["best_val_loss"])
        shutil.copy(best["checkpoint"], out / CHECKPOINT_NAME)
        summary["checkpoint"] = str(out / CHECKPOINT_NAME)
        summary["checkpoint_trial"] = best["trial"]
        (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        table = summary_table(cfg.mode, results, summary["test_mean_std"])
        (out / "frame_table.md").write_text(table)
        log.info("test split, frame level:\n%s", table)
        log.info("checkpoint: %s", out / CHECKPOINT_NAME)
    return summary


# ------------------------------------------------------------------------------------------ CLI

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m training.train", description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prepared", type=Path, required=True, help="output of python -m training.prepare")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--mode", default="fixed", choices=MODES)
    p.add_argument("--config", default="full", choices=["full", "small"])
    p.add_argument("--fetalclip", type=Path, help="FetalCLIP weights (whole-CLIP checkpoint)")
    p.add_argument("--train-encoder", action="store_true", help="train every encoder weight, no LoRA")
    p.add_argument("--init", type=Path, help="start from these weights (.safetensors or last.pt/best.pt)")
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=32, help="per process")
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--schedule", default="constant", choices=["constant", "cosine"])
    p.add_argument("--warmup-steps", type=int, default=0)
    p.add_argument("--clip-grad", type=float)
    p.add_argument("--device", default="auto")
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"],
                   help="auto: bf16 autocast on GPU, fp32 on CPU")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--no-channels-last", action="store_true", help="keep NCHW tensors")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--trials", type=int, default=1)
    p.add_argument("--resume", action="store_true", help="continue each trial from its last.pt")
    p.add_argument("--max-steps", type=int, help="optimiser steps per trial (the epoch reaching it ends early)")
    p.add_argument("--no-augment", action="store_true")
    p.add_argument("--sampler", default="uniform", choices=["uniform", "balanced"])
    p.add_argument("--negatives-per-positive", type=float,
                   help="per epoch: every positive frame plus this many random negatives per positive")
    p.add_argument("--head-negatives-per-positive", type=float,
                   help="per epoch: extra negatives per positive through encoder + frame head only (cheap)")
    p.add_argument("--hard-negatives", type=float, default=0.0,
                   help="fraction of each epoch's negatives drawn by the frame head's P(abdomen) (training.mining)")
    p.add_argument("--hard-negative-pool", type=int, default=4096, help="negatives scored per epoch for mining")
    p.add_argument("--hard-negatives-from", type=int, default=0, help="first epoch (0-based) that mines")
    p.add_argument("--class-weight-power", type=float,
                   help="frame-head CE weights (N/(K n_c))**power; default 0.5 (0 with --sampler balanced)")
    p.add_argument("--dice-weight", type=float, default=1.0)
    p.add_argument("--mask-ce-weight", type=float, default=0.0, help="add pixel cross-entropy to the Dice")
    p.add_argument("--frame-weight", type=float, default=1.0)
    p.add_argument("--val-max-frames", type=int, help="fixed validation subset size (positives first)")
    p.add_argument("--workers", type=int)
    p.add_argument("--eval-batch-size", type=int)
    p.add_argument("--deterministic", action="store_true")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--replica", action=argparse.BooleanOptionalAction, default=None,
                   help="say in the provenance that the data is the replica (default: from the manifest)")
    p.add_argument("--note", default="", help="appended to the checkpoint's provenance")
    return p


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    return TrainConfig(
        prepared=args.prepared, out=args.out, mode=args.mode, config=args.config, fetalclip=args.fetalclip,
        init=args.init,
        train_encoder=args.train_encoder, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
        weight_decay=args.weight_decay, schedule=args.schedule, warmup_steps=args.warmup_steps,
        clip_grad=args.clip_grad, device=args.device, precision=args.precision, threads=args.threads,
        channels_last=not args.no_channels_last, seed=args.seed,
        trials=args.trials, resume=args.resume, max_steps=args.max_steps, augment=not args.no_augment,
        sampler=args.sampler, negatives_per_positive=args.negatives_per_positive,
        head_negatives_per_positive=args.head_negatives_per_positive, hard_negatives=args.hard_negatives,
        hard_negative_pool=args.hard_negative_pool, hard_negatives_from=args.hard_negatives_from,
        class_weight_power=args.class_weight_power, dice_weight=args.dice_weight,
        mask_ce_weight=args.mask_ce_weight, frame_weight=args.frame_weight, val_max_frames=args.val_max_frames,
        workers=args.workers, eval_batch_size=args.eval_batch_size, deterministic=args.deterministic,
        progress=not args.no_progress, replica=args.replica, note=args.note)


def configure_logging() -> None:
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s",
                            datefmt="%H:%M:%S", stream=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    configure_logging()
    cfg = config_from_args(build_parser().parse_args(argv))
    train(cfg)
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
