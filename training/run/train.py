"""Train one mode (training.models.modes) on prepared frames; write a checkpoint in algorithm's format.

    python -m training train --prepared DIR --out DIR [--mode fixed|paper|paper-cls|probe|baseline]
        [--config full|small] [--fetalclip PATH] [--epochs 5] [--batch-size 32] [--lr 3e-4]
        [--precision auto|fp32|fp16|bf16] [--accumulate N] [--grad-checkpointing] [--lora-rank 8]
        [--trials 1] [--resume] [--max-steps N] [--train-encoder] [--backbone NAME --pretrained PATH|hub]
    torchrun --nproc-per-node 4 -m training train ...      (DDP; --batch-size is the batch of all processes)

Recipe (the paper's): AdamW 3e-4, batch 32, 5 epochs over the training frames plus two augmented copies of
each (the published offline x2 augmentation, drawn online: the same number of optimiser steps), the epoch
with the lowest validation loss kept. `--trials N` repeats training with seeds seed..seed+N-1 and reports
mean +- std of the test metrics; the trial with the lowest validation loss becomes `<out>/<checkpoint>`.

Precision: algorithm.runtime's policy (`auto`: bf16 where the GPU has native bf16, capability >= 8.0; fp16
with gradient scaling below, e.g. a T4; bf16 on CPUs with bf16 units, else fp32). Memory: before training
the step's memory is measured (training.run.memory) and printed; when it does not fit the GPU, gradient
checkpointing and then accumulation over micro-batches are switched on (unless given), keeping the batch.

Outputs in `--out` (per trial in trial_<k>/): last.pt (resumable: what trains, optimizer, scheduler, scaler,
RNG states, history), best.pt (what trains, best epoch), curves.png, history.json, frame_metrics.json,
test_frames.npz / val_frames.npz (every frame's mask fraction and P(abdomen): the threshold sweep's input),
the checkpoint; and summary.json + frame_table.md for all trials. last.pt / best.pt hold only the tensors
that train (the frozen encoder comes from the FetalCLIP file) and load with torch.load(weights_only=True).
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import json
import logging
import math
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
from safetensors.torch import load_file, save_file
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, DistributedSampler, Sampler
from tqdm import tqdm

from algorithm import __version__
from algorithm.model.checkpoint import inherited_terms, save_checkpoint
from algorithm.model.fetalclipseg import (effective_parameters, inert_parameter_names, total_parameters,
                                          trainable_parameters)
from algorithm.runtime import autocast, choose_precision, needs_grad_scaling, resolve_device
from training.cli import UsageError, run_command
from training.data.augment import build_augment
from training.data.dataset import FrameDataset, read_manifest
from training.data.mining import Hardness, mining_pool, score_negatives
from training.data.sampling import EpochSampler, MixedBatches, validation_subset
from training.models.build import build_training_model
from training.models.losses import LossWeights, SegLoss, class_weights
from training.models.snapshot import (SnapshotError, load_trainable_state, read_snapshot, rng_state, save_snapshot,
                                      set_rng_state, trainable_state)
from training.params import TrainConfig, check_device, config_from_args, train_parser
from training.run.distributed import DistContext, gather_to_main, reduce_device, setup_distributed, shutdown
from training.run.folder import RunFolder
from training.run.memory import MemoryPlan, device_budget, measure_step, plan_memory
from training.run.step import TrainView
from training.scoring.evaluate_frames import (METRIC_COLUMNS, FrameStats, accumulate, frame_loader, frame_report,
                                              markdown_table, merge_frames, save_frames, table_rows)
from training.scoring.report_plots import plot_history

log = logging.getLogger("training")

CHECKPOINT_NAME = "fetalclipseg.safetensors"
BASELINE_CHECKPOINT_NAME = "baseline.safetensors"
BASELINE_FORMAT = "fetalclipseg-baseline"
SNAPSHOT_FORMAT = 2  # last.pt / best.pt: trainable state only, weights_only-loadable




# ------------------------------------------------------------------------------------------ plumbing

def seed_everything(seed: int, deterministic: bool = False) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False


def _mix(*numbers: int) -> int:
    """A 32-bit seed from several integers (numpy's SeedSequence: well mixed, platform independent)."""
    return int(np.random.SeedSequence([int(n) % (2**32) for n in numbers]).generate_state(1)[0])


def _init_worker(worker_id: int, base: int) -> None:
    """Seed each DataLoader worker's augmentation from (run seed, epoch, rank, worker)."""
    info = torch.utils.data.get_worker_info()
    augment = getattr(info.dataset, "augment", None)
    if augment is not None:
        augment.set_seed(_mix(base, worker_id))


def training_precision(requested: str, device: torch.device | str,
                       capability: tuple[int, int] | None = None) -> tuple[str, bool]:
    """(autocast precision, whether gradients need loss scaling) for training on `device`: the shared
    policy of algorithm.runtime, e.g. fp16 with scaling on a T4 (capability 7.5), bf16 without on an A100."""
    precision = choose_precision(requested, device, capability=capability)
    return precision, needs_grad_scaling(precision)


def load_weights(model: nn.Module, path: Path) -> None:
    """Initialise `model` from a previous run: our `.safetensors` (a whole exported model, or a baseline's
    trained tensors) or a trainer's last.pt / best.pt (read with weights_only=True).

    The architecture must match (same mode / config / LoRA setting); LoRA checkpoints are exported merged,
    so continue LoRA runs from their best.pt instead."""
    path = Path(path)
    if path.suffix == ".safetensors":
        try:
            state = load_file(str(path), device="cpu")
        except Exception as exc:
            raise SnapshotError(f"--init {path}: not a readable safetensors file: {exc}") from None
        if set(state) == set(model.state_dict()):
            try:
                model.load_state_dict(state, strict=True)
            except RuntimeError as error:
                raise SnapshotError(f"--init {path} does not fit this model ({str(error).splitlines()[0]})") from None
            return
    else:
        saved = read_snapshot(path)
        if not isinstance(saved.get("model"), dict):
            raise SnapshotError(f"--init {path} is not a last.pt / best.pt of training (no 'model' entry)")
        state = saved["model"]
    load_trainable_state(model, state, f"--init {path}")


def stem_trains(model: nn.Module) -> bool:
    """Whether the patch embedding of a FetalCLIP network gets gradients: the one layer that sees the three
    input channels apart, so the one that can learn to read a temporal triplet."""
    return not model.config.encoder_no_grad and model.encoder.visual.conv1.weight.requires_grad


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
        self.spec = cfg.spec
        self.ctx = ctx or DistContext(device=resolve_device(cfg.device))
        self.seed = cfg.seed + trial
        self.out = Path(out) if out is not None else Path(cfg.out) / f"trial_{trial}"
        self.manifest = read_manifest(cfg.prepared)
        seed_everything(self.seed, cfg.deterministic)
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        if cfg.batch_size % self.ctx.world:
            raise UsageError(f"batch size {cfg.batch_size} is not divisible by the {self.ctx.world} processes")
        self.precision, scaling = training_precision(cfg.precision, self.ctx.device)
        self.scaler = torch.amp.GradScaler(self.ctx.device.type, enabled=scaling)

        if cfg.fetalclip is None and not cfg.train_encoder and self.spec.name != "baseline" and self.ctx.main:
            log.warning("no --fetalclip weights: the encoder is random and frozen (only LoRA/decoder/head "
                        "learn); use --train-encoder for a from-scratch encoder")
        self.model = build_training_model(cfg)
        self.model_config = self.model.config
        if cfg.input_frames == "temporal" and not stem_trains(self.model) and self.ctx.main:
            why = ("its encoder never trains" if self.model_config.encoder_no_grad else
                   "its patch embedding, the one layer that sees the channels apart, stays frozen")
            log.warning("--input-frames temporal with mode %s: %s, so it cannot learn to read three different "
                        "frames (it saw grey ones); on the replica this input lowered the score in modes paper and "
                        "fixed (docs/levers.md); --temporal-stem centred (modes fixed, paper-cls) trains the patch "
                        "embedding", self.spec.name, why)
        if cfg.init is not None:
            load_weights(self.model, Path(cfg.init))
        self.model.to(self.ctx.device)
        if cfg.channels_last:
            self.model.to(memory_format=torch.channels_last)
        self.view: nn.Module = TrainView(self.model)

        workers = cfg.workers if cfg.workers is not None else (6 if self.ctx.device.type == "cuda" else 0)
        self.workers = workers
        self.augment = build_augment(cfg.augment, seed=self.seed)
        self.train_set = FrameDataset(cfg.prepared, "train", self.augment, copies=cfg.augment_copies,
                                      input_frames=cfg.input_frames)
        self.val_set = FrameDataset(cfg.prepared, "val", input_frames=cfg.input_frames)
        if len(self.train_set) == 0:
            raise UsageError(f"{cfg.prepared}: the train split is empty")
        counts = np.bincount(self.train_set.frame_labels, minlength=3)
        power = cfg.class_weight_power
        if power is None:
            power = 0.0 if cfg.sampler == "balanced" else 0.5
        self.class_weights = class_weights(counts, power).to(self.ctx.device)
        self.loss_weights = LossWeights(cfg.dice_weight, cfg.mask_ce_weight, cfg.frame_weight)
        self.loss = SegLoss(self.class_weights, self.loss_weights, use_mask=self.spec.segments,
                            mask_loss=self.spec.mask_loss or "dice").to(self.ctx.device)

        self.memory = self._plan_memory()
        self.accumulate = self.memory.accumulate
        self.micro_batch = self.memory.micro_batch
        if self.memory.grad_checkpointing:
            self.model.set_grad_checkpointing(True)
        if self.ctx.world > 1:
            ids = [self.ctx.local_rank] if self.ctx.device.type == "cuda" else None
            # LoRA behind no_grad (paper) or on MultiheadAttention's out_proj takes no gradient: unused in DDP's eyes
            unused = bool(inert_parameter_names(self.model)) or bool(cfg.head_negatives_per_positive)
            self.view = DDP(self.view, device_ids=ids, find_unused_parameters=unused)

        self.sampler: Sampler
        if cfg.head_negatives_per_positive:
            if cfg.sampler != "uniform":
                raise UsageError("head-only negatives go with the uniform sampler")
            self.sampler = MixedBatches(self.train_set.labels, self.seed, self.micro_batch,
                                        cfg.negatives_per_positive, cfg.head_negatives_per_positive,
                                        self.ctx.rank, self.ctx.world)
        elif cfg.sampler == "uniform" and cfg.negatives_per_positive is None and self.ctx.world > 1:
            self.sampler = DistributedSampler(self.train_set, self.ctx.world, self.ctx.rank, shuffle=True,
                                              seed=self.seed)
        else:
            self.sampler = EpochSampler(self.train_set.labels, self.seed, cfg.sampler, cfg.negatives_per_positive,
                                        self.ctx.rank, self.ctx.world)
        self.batched = isinstance(self.sampler, MixedBatches)
        micro_batches = len(self.sampler) if self.batched else max(1, math.ceil(len(self.sampler) / self.micro_batch))
        self.micro_batches_per_epoch = micro_batches
        self.steps_per_epoch = math.ceil(micro_batches / self.accumulate)
        self.val_indices = validation_subset(self.val_set.labels, cfg.val_max_frames, cfg.seed)

        params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self._lr_factor)
        self.state = TrialState()
        self.frames: dict[str, dict[str, np.ndarray]] = {}  # split -> every frame's record (evaluate)
        self.info = {
            "mode": cfg.mode,
            "model": getattr(self.model_config, "name", ""),
            "trainable_parameters": trainable_parameters(self.model),
            "effective_trainable_parameters": effective_parameters(self.model),
            "paper_parameters": self.spec.paper_parameters if cfg.config == "full" else None,
            "total_parameters": total_parameters(self.model),
            "train_class_counts": counts.tolist(),
            "class_weights": [round(float(w), 4) for w in self.class_weights.cpu()],
            "frames_per_epoch": self.sampler.frames() if self.batched else len(self.sampler) * self.ctx.world,
            "steps_per_epoch": self.steps_per_epoch,
            "precision": self.precision,
            "grad_scaling": self.scaler.is_enabled(),
            "memory": self.memory.to_dict(),
            "world_size": self.ctx.world,
        }
        if self.ctx.main:
            log.info("trial %d: %s, %s, %d trainable parameters (%d can change), %d steps per epoch; %s",
                     trial, self.info["mode"], self.precision, self.info["trainable_parameters"],
                     self.info["effective_trainable_parameters"], self.steps_per_epoch, self.memory.describe())

    # -- memory
    def _plan_memory(self) -> MemoryPlan:
        """Measure a step and choose checkpointing / accumulation (training.run.memory)."""
        cfg = self.cfg
        self.memory_estimate = measure_step(self.view, self.loss, self.train_set[0], self.ctx.device,
                                            self.precision, cfg.channels_last)
        budget = device_budget(self.ctx.device, cfg.memory_budget_gib)
        return plan_memory(self.memory_estimate, cfg.batch_size // self.ctx.world, budget, cfg.grad_checkpointing,
                           cfg.accumulate)

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
        save_snapshot({
            "format": SNAPSHOT_FORMAT,
            "model": trainable_state(self.model),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "state": dataclasses.asdict(self.state),
            "rng": rng_state(),
            "train_config": self.cfg.to_dict(),
            "model_config": self.model_config.to_dict(),
            "seed": self.seed,
        }, self.last_path)

    def save_best(self, epoch: int) -> None:
        if self.ctx.main:
            save_snapshot({"format": SNAPSHOT_FORMAT, "model": trainable_state(self.model), "epoch": epoch,
                           "model_config": self.model_config.to_dict()}, self.best_path)

    def load_last(self) -> bool:
        """Restore a previous run of this trial from last.pt; False when there is none."""
        if not self.last_path.is_file():
            return False
        saved = read_snapshot(self.last_path)
        if saved.get("model_config") != self.model_config.to_dict():
            raise SnapshotError(f"{self.last_path} was written for another model configuration; "
                             "resume with the same --mode/--config/--train-encoder or use another --out")
        load_trainable_state(self.model, saved["model"], self.last_path)
        self.optimizer.load_state_dict(saved["optimizer"])
        self.scheduler.load_state_dict(saved["scheduler"])
        if saved.get("scaler"):
            self.scaler.load_state_dict(saved["scaler"])
        self.state = TrialState(**saved["state"])
        set_rng_state(saved["rng"])
        return True

    def load_best(self) -> None:
        if self.best_path.is_file():
            load_trainable_state(self.model, read_snapshot(self.best_path)["model"], self.best_path)

    # -- loops
    def _train_loader(self, epoch: int) -> DataLoader:
        if hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(epoch)
        base = _mix(self.seed, epoch, self.ctx.rank)
        if self.workers == 0 and self.augment is not None:
            self.augment.set_seed(base)
        batching = {"batch_sampler": self.sampler} if self.batched else \
            {"batch_size": self.micro_batch, "sampler": self.sampler, "drop_last": False}
        return DataLoader(self.train_set, **batching,
                          num_workers=self.workers, pin_memory=self.ctx.device.type == "cuda",
                          worker_init_fn=functools.partial(_init_worker, base=base) if self.workers else None,
                          persistent_workers=False)

    def train_epoch(self, epoch: int) -> dict[str, float]:
        """One epoch: micro-batches accumulated `self.accumulate` at a time into optimiser steps."""
        self.view.train()
        loader = self._train_loader(epoch)
        total = len(loader)
        totals: dict[str, float] = {}
        batches = 0
        self.optimizer.zero_grad(set_to_none=True)
        bar = tqdm(loader, total=total, desc=f"trial {self.trial} epoch {epoch + 1}/{self.cfg.epochs}",
                   unit="batch", disable=not (self.cfg.progress and self.ctx.main), leave=False)
        for position, batch in enumerate(bar):
            if self.cfg.max_steps is not None and self.state.global_step >= self.cfg.max_steps:
                break
            group_start = position - position % self.accumulate
            group = min(self.accumulate, total - group_start)  # the epoch's last group may be shorter
            last = position - group_start == group - 1
            parts = self._micro_step(batch, 1.0 / group, sync=last)
            if last:
                self._optimiser_step()
            batches += 1
            for key, value in parts.items():
                totals[key] = totals.get(key, 0.0) + value
            bar.set_postfix(loss=f"{parts['loss']:.3f}", lr=f"{self.scheduler.get_last_lr()[0]:.1e}")
        bar.close()
        means = {k: v / max(batches, 1) for k, v in totals.items()}
        if self.ctx.world > 1:  # average the per-rank means (equal batch counts per rank)
            keys = sorted(means)
            tensor = torch.tensor([means[k] for k in keys], dtype=torch.float64, device=reduce_device(self.ctx))
            dist.all_reduce(tensor)
            means = {k: float(v) / self.ctx.world for k, v in zip(keys, tensor.cpu())}
        means["batches"] = batches
        return means

    def _micro_step(self, batch, scale: float, sync: bool) -> dict[str, float]:
        """Forward and backward of one micro-batch; gradients summed over ranks only when `sync`."""
        images, mask, label = (t.to(self.ctx.device, non_blocking=True) for t in batch[:3])
        images = self._layout(images)
        decode = batch[3].to(self.ctx.device) if len(batch) > 3 else None
        if decode is not None:
            mask = mask[decode]
        no_sync = self.view.no_sync() if isinstance(self.view, DDP) and not sync else contextlib.nullcontext()
        with no_sync:
            with autocast(self.ctx.device, self.precision):
                mask_logits, frame_logits = self.view(images, decode)
            loss, parts = self.loss(mask_logits, frame_logits, mask, label)
            self.scaler.scale(loss * scale).backward()
        return parts

    def _optimiser_step(self) -> None:
        """Unscale (fp16), clip, step, update the scale; the scaler skips steps whose gradients overflowed."""
        if self.cfg.clip_grad:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.optimizer.param_groups[0]["params"], self.cfg.clip_grad)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        self.state.global_step += 1

    def mine_hard_negatives(self, epoch: int) -> dict[str, float] | None:
        """Score this epoch's pool of negatives with the current model and hand it to the sampler
        (training.data.mining). Every rank scores the same pool, so all ranks draw the same batches."""
        cfg = self.cfg
        if not cfg.hard_negatives or epoch < cfg.hard_negatives_from:
            return None
        started = time.perf_counter()
        rng = np.random.default_rng([self.seed, epoch, 6151])
        pool = mining_pool(self.train_set.labels, cfg.hard_negative_pool, rng)
        # unaugmented: score what the frame looks like
        plain = FrameDataset(cfg.prepared, "train", input_frames=cfg.input_frames)
        loader = frame_loader(plain, pool, cfg.eval_batch_size or self.micro_batch, self.workers)
        p_abdomen = score_negatives(self.model, loader, self.ctx.device,
                                    lambda: autocast(self.ctx.device, self.precision))
        self.sampler.hardness = Hardness(pool, p_abdomen, cfg.hard_negatives)
        summary = {**self.sampler.hardness.summary(), "seconds": round(time.perf_counter() - started, 1)}
        if self.ctx.main:
            log.info("trial %d epoch %d: mined %d negatives, %d called abdomen (mean P %.3f), %.0f s", self.trial,
                     epoch + 1, summary["pool"], summary["called_abdomen"], summary["mean_p_abdomen"],
                     summary["seconds"])
        return summary

    def _layout(self, images: torch.Tensor) -> torch.Tensor:
        return images.contiguous(memory_format=torch.channels_last) if self.cfg.channels_last else images

    def _forward_eval(self, images: torch.Tensor):
        view = self.view.module if isinstance(self.view, DDP) else self.view
        return view(self._layout(images))

    def evaluate(self, split: str, indices: np.ndarray | None = None, keep_frames: bool = False) -> FrameStats:
        """Loss terms and confusion counts on a split (sharded over ranks, summed); with `keep_frames`
        rank 0 also holds every frame's record (`self.frames[split]`)."""
        dataset = self.val_set if split == "val" else \
            FrameDataset(self.cfg.prepared, split, input_frames=self.cfg.input_frames)
        batch = self.cfg.eval_batch_size or self.micro_batch
        loader = frame_loader(dataset, indices, batch, self.workers, self.ctx.rank, self.ctx.world)
        self.view.eval()
        stats = accumulate(self._forward_eval, loader, self.ctx.device, self.class_weights, self.precision,
                           keep_frames=keep_frames, progress=self.cfg.progress and self.ctx.main,
                           total=len(loader), desc=f"{split}")
        stats.all_reduce()
        if keep_frames:
            parts = gather_to_main(stats.frames(), self.ctx)
            if parts is not None:
                self.frames[split] = merge_frames(parts)
        return stats

    def _val_losses(self, stats: FrameStats) -> dict[str, float]:
        return stats.losses(self.loss_weights, use_mask=self.spec.segments, mask_loss=self.spec.mask_loss or "dice",
                            select_on_mask=self.spec.select_on_mask)

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
                "val_f1_mask": val_stats.metrics("mask")["f1"] if val_stats and self.spec.segments else None,
                "lr": self.scheduler.get_last_lr()[0],
                "loss_scale": self.scaler.get_scale() if self.scaler.is_enabled() else None,
                "seconds": round(time.perf_counter() - started, 1),
                "train_seconds": round(train_seconds, 1),
                **({f"mined_{k}": v for k, v in mined.items()} if mined else {}),
            }
            self.state.history.append(row)
            self.state.epoch = epoch
            self.state.train_seconds += time.perf_counter() - started
            if val["loss"] < self.state.best_val_loss:
                self.state.best_val_loss, self.state.best_epoch = val["loss"], epoch
                self.save_best(epoch)
            self.save_last()
            if self.ctx.main:
                log.info("trial %d epoch %d: train %.4f  val %.4f  F1 mask %s head %s  (%.0f s)%s", self.trial,
                         epoch + 1, row["train_loss"], row["val_loss"], _f(row["val_f1_mask"]),
                         _f(row["val_f1_head"]), row["seconds"],
                         "  best" if self.state.best_epoch == epoch else "")
                (self.out / "history.json").write_text(json.dumps(self.state.history, indent=2) + "\n")
                plot_history(self.state.history, self.out / "curves.png",
                             f"{self.info['mode']} ({self.info['model']}), trial {self.trial}, seed {self.seed}")
            self.ctx.barrier()
        return self.state

    def provenance(self) -> str:
        cfg, manifest = self.cfg, self.manifest
        replica = cfg.replica if cfg.replica is not None else bool(manifest.get("replica"))
        counts = manifest["counts"]["train"]
        config = self.model_config
        if self.spec.name == "baseline":
            encoder = f"{config.backbone}, {config.adapt}"
        elif cfg.train_encoder:
            encoder = "all encoder weights trained"
        elif not config.use_lora:
            encoder = "encoder frozen"
        else:
            encoder = (f"LoRA r{config.lora_rank} on {','.join(config.lora_targets)}"
                       + (" under no_grad (never trained)" if config.encoder_no_grad else ""))
        init = (f"{Path(cfg.init).name}" if cfg.init else
                "FetalCLIP weights" if cfg.fetalclip else
                f"backbone weights {cfg.pretrained}" if cfg.pretrained else "random initialisation")
        text = (f"{self.spec.label} {self.info['model']}, mode {self.info['mode']} ({encoder}; encoder from {init}); "
                f"trained {self.state.epoch + 1} epoch(s), best epoch {self.state.best_epoch + 1}, seed {self.seed}, "
                f"on {'the replica dataset' if replica else 'the ACOUSLIC-AI training data'} "
                f"({counts['cases']} cases, {counts['frames']} frames) at {manifest['data']}; "
                f"training/run/train.py, algorithm {__version__}")
        if replica:
            text += "; replica-trained, not for clinical use"
        if terms := inherited_terms(fetalclip=bool(cfg.fetalclip), challenge_data=not replica):
            text += f"; {terms}"
        if cfg.note:
            text += f"; {cfg.note}"
        return text

    def export(self, path: Path, test_report: dict[str, Any] | None = None) -> Path:
        """Best weights -> algorithm's checkpoint format (LoRA merged into the encoder for inference); a
        baseline -> its trained tensors as .safetensors with its configuration (not an algorithm checkpoint)."""
        self.load_best()
        extra = {**self.info, "train_config": self.cfg.to_dict(), "best_epoch": self.state.best_epoch,
                 "best_val_loss": self.state.best_val_loss, "epochs_trained": self.state.epoch + 1,
                 "split_seed": self.manifest.get("seed")}
        if test_report is not None:
            extra["test_frame_metrics"] = test_report
        if self.spec.name == "baseline":
            metadata = {"format": BASELINE_FORMAT, "config": json.dumps(self.model_config.to_dict()),
                        "provenance": self.provenance(), "extra": json.dumps(extra, default=str)}
            path.parent.mkdir(parents=True, exist_ok=True)
            save_file({k: v.contiguous() for k, v in trainable_state(self.model).items()}, str(path), metadata)
            return path
        model = self.model
        model.merge_lora()  # irreversible: the trainer is done with this model
        extra["lora_merged"] = True
        return save_checkpoint(path, model, model.config, self.provenance(), extra=extra)


def _f(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


# ------------------------------------------------------------------------------------------ trials

def checkpoint_name(cfg: TrainConfig) -> str:
    return BASELINE_CHECKPOINT_NAME if cfg.spec.name == "baseline" else CHECKPOINT_NAME


def run_trial(cfg: TrainConfig, trial: int, ctx: DistContext, folder: RunFolder) -> dict[str, Any]:
    """Train one trial in the run's staged folder, score its best epoch on validation and test (frames kept),
    export its checkpoint. The paths it records are where the files will be once the run is complete."""
    trainer = Trainer(cfg, trial, out=folder.partial / f"trial_{trial}", ctx=ctx)
    started = time.perf_counter()
    state = trainer.fit()
    trainer.load_best()
    use_mask = cfg.spec.segments
    reports = {}
    for split in ("val", "test"):
        if _split_size(cfg.prepared, split):
            stats = trainer.evaluate(split, keep_frames=True)
            reports[split] = frame_report(stats, trainer.info["trainable_parameters"],
                                          trainer.info["effective_trainable_parameters"], use_mask=use_mask)
    result = {
        "trial": trial, "seed": trainer.seed, "best_epoch": state.best_epoch, "best_val_loss": state.best_val_loss,
        "epochs_trained": state.epoch + 1, "steps": state.global_step,
        "train_seconds": round(state.train_seconds, 1), "seconds_this_run": round(time.perf_counter() - started, 1),
        "test": reports.get("test"), "val": reports.get("val"), **trainer.info,
    }
    if ctx.main:
        for split, frames in trainer.frames.items():
            saved = save_frames(frames, trainer.out / f"{split}_frames.npz")
            result[f"{split}_frames"] = str(folder.published(saved))
        checkpoint = trainer.export(trainer.out / checkpoint_name(cfg), reports.get("test"))
        result["checkpoint"] = str(folder.published(checkpoint))
        (trainer.out / "frame_metrics.json").write_text(json.dumps(result, indent=2) + "\n")
    ctx.barrier()
    return result


def _split_size(prepared: Path, split: str) -> int:
    return int(read_manifest(prepared)["counts"][split]["frames"])


def summarise(results: list[dict[str, Any]], split: str = "test") -> dict[str, Any]:
    """Mean and standard deviation (over trials) of every metric of both rules on `split`."""
    summary: dict[str, Any] = {}
    for rule in ("mask_rule", "head"):
        values = [r[split][rule] for r in results if r.get(split) and rule in r[split]]
        if not values:
            continue
        summary[rule] = {k: {"mean": float(np.mean([v[k] for v in values])),
                             "std": float(np.std([v[k] for v in values], ddof=1)) if len(values) > 1 else 0.0}
                         for k in METRIC_COLUMNS}
    return summary


def result_rows(name: str, results: list[dict[str, Any]], summary: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Table rows of one mode: one trial's metrics, or mean ± std over several, with parameter counts."""
    if not results:
        return {}
    first = results[0]
    paper = first.get("paper_parameters")
    if len(results) == 1 and first.get("test"):
        return table_rows(name, first["test"], paper)
    rows = {}
    params = {"trainable_parameters": first["trainable_parameters"],
              "effective_parameters": first["effective_trainable_parameters"], "paper_parameters": paper}
    for rule, label in (("mask_rule", "mask >= 1 %"), ("head", "frame head")):
        if rule in summary:
            rows[f"{name}: {label} ({len(results)} trials)"] = {
                **{k: f"{v['mean']:.3f} ± {v['std']:.3f}" for k, v in summary[rule].items()}, **params}
    return rows


def summary_table(name: str, results: list[dict[str, Any]], summary: dict[str, Any]) -> str:
    """Markdown: our rows (mean +- std over trials when there are several) and the paper's figures."""
    return markdown_table(result_rows(name, results, summary))


def train(cfg: TrainConfig) -> dict[str, Any]:
    """All trials of one configuration; returns (and writes) the summary. Under torchrun every rank
    trains; the summary's checkpoint and files exist on rank 0 only (`summary["main"]`).

    The run's folder appears at `cfg.out` only when the run is complete (training.run.folder): a run that
    stops part-way keeps `<out>.partial` if an epoch finished (the exception carries a note saying so)."""
    cfg.validate()
    ctx = setup_distributed(cfg.device)
    folder = RunFolder(cfg.out)
    folder.check_start(cfg.resume)  # every rank, so that all refuse together
    if ctx.main:
        folder.open(cfg.resume, cfg.to_dict())
    ctx.barrier()
    try:
        results = [run_trial(cfg, trial, ctx, folder) for trial in range(cfg.trials)]
        summary = {"config": cfg.to_dict(), "trials": results, "test_mean_std": summarise(results),
                   "main": ctx.main}
        if ctx.main:
            best = min(results, key=lambda r: r["best_val_loss"])
            name = checkpoint_name(cfg)
            shutil.copy(folder.partial / f"trial_{best['trial']}" / name, folder.partial / name)
            summary["checkpoint"] = str(folder.out / name)
            summary["checkpoint_trial"] = best["trial"]
            (folder.partial / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
            table = summary_table(cfg.mode, results, summary["test_mean_std"])
            (folder.partial / "frame_table.md").write_text(table)
            folder.commit()
            log.info("test split, frame level:\n%s", table)
            log.info("checkpoint: %s", folder.out / name)
    except BaseException as stopped:
        if ctx.main and (kept := folder.stop()):
            stopped.add_note(kept)
        raise
    return summary


# ------------------------------------------------------------------------------------------ CLI

def configure_logging() -> None:
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s",
                            datefmt="%H:%M:%S", stream=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m training train`: exit codes as every training command (training.cli, docs/training.md)."""
    configure_logging()
    args = train_parser().parse_args(argv)
    return run_command(lambda: _train_command(args))


def _train_command(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    cfg.validate()
    check_device(cfg.device, cfg.precision)
    try:
        train(cfg)
    finally:
        shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
