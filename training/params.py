"""Training options, declared once: the `TrainConfig` a run depends on and the arguments that build it.

`train` declares them all; `reproduce` shares the recipe (`add_recipe_arguments`) and `demo-weights` the
schedule and sampling groups with its own defaults, so an option means the same everywhere it appears.
"""
from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from algorithm.runtime import PRECISIONS
from training.models.modes import FORMER_NAMES, MODES, ModelOptions, mode_argument


@dataclass
class TrainConfig(ModelOptions):
    """Everything one training run depends on; stored in every checkpoint and summary.

    Its model's part (mode, configuration, FetalCLIP weights, LoRA, baseline backbone) comes from `ModelOptions`."""

    prepared: Path = field(kw_only=True)
    out: Path = field(kw_only=True)
    init: Path | None = None  # start from these weights (our .safetensors, or a last.pt/best.pt): fine-tuning
    epochs: int = 5
    batch_size: int = 32  # frames per optimiser step, all processes together
    augment_copies: int = 2  # augmented copies of every training frame per epoch (the paper's offline x2)
    lr: float = 3e-4
    weight_decay: float = 0.01  # AdamW's default
    schedule: str = "constant"  # constant (paper) | cosine (linear warm-up, cosine decay)
    warmup_steps: int = 0
    clip_grad: float | None = None
    device: str = "auto"
    precision: str = "auto"  # auto | fp32 | fp16 | bf16 (algorithm.runtime.choose_precision)
    accumulate: int | None = None  # micro-batches per step; None: 1, or more when the step does not fit
    grad_checkpointing: bool | None = None  # None: on only when the step does not fit otherwise
    memory_budget_gib: float | None = None  # None: the GPU's free memory (no adaptation on the CPU)
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
    # Hard-negative mining (training.data.mining): this fraction of each epoch's negatives is drawn in proportion
    # to the frame head's P(abdomen) on a fresh pool of `hard_negative_pool` negatives, from epoch
    # `hard_negatives_from` (0-based) on. 0 = uniform negatives (the paper).
    hard_negatives: float = 0.0
    hard_negative_pool: int = 4096
    hard_negatives_from: int = 0
    class_weight_power: float | None = None  # None: 0.5, or 0 with the balanced sampler (training.models.losses)
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
        super().validate()
        if self.sampler not in ("uniform", "balanced"):
            raise ValueError(f"sampler must be uniform or balanced, got {self.sampler!r}")
        if self.schedule not in ("constant", "cosine"):
            raise ValueError(f"schedule must be constant or cosine, got {self.schedule!r}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if self.epochs < 1 or self.batch_size < 1 or self.trials < 1:
            raise ValueError("epochs, batch size and trials must be positive")
        if self.augment_copies < 0 or self.lora_rank < 1 or (self.accumulate is not None and self.accumulate < 1):
            raise ValueError("augment copies must be >= 0, LoRA rank and accumulate >= 1")
        if not 0.0 <= self.hard_negatives <= 1.0:
            raise ValueError(f"hard_negatives is a fraction in [0, 1], got {self.hard_negatives}")
        if self.hard_negatives and self.negatives_per_positive is None and not self.head_negatives_per_positive:
            raise ValueError("hard negatives need a negative draw: set negatives_per_positive or "
                             "head_negatives_per_positive (the uniform sampler otherwise shows every frame)")
        if self.hard_negatives and self.sampler != "uniform":
            raise ValueError("hard negatives go with the uniform sampler (the balanced one draws by class only)")
        if self.hard_negatives and self.augment and self.augment_copies:
            raise ValueError("hard negatives score the frames of one pass: use augment_copies 0 with them")


# ------------------------------------------------------------------------------------------ options

def add_schedule_arguments(p: argparse.ArgumentParser) -> None:
    """How long and how fast: epochs, batch, learning rate, seed, step limit, resuming, CPU threads."""
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=32, help="frames per optimiser step, all processes together")
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--warmup-steps", type=int, default=0)
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resume", action="store_true", help="continue each trial from its last.pt")
    p.add_argument("--max-steps", type=int, help="optimiser steps per trial (the epoch reaching it ends early)")


def add_sampling_arguments(p: argparse.ArgumentParser) -> None:
    """Which frames an epoch shows: negatives per positive (decoded, or through the frame head only), validation."""
    p.add_argument("--negatives-per-positive", type=float,
                   help="per epoch: every positive frame plus this many random negatives per positive")
    p.add_argument("--head-negatives-per-positive", type=float,
                   help="per epoch: extra negatives per positive through encoder + frame head only (cheap)")
    p.add_argument("--val-max-frames", type=int, help="fixed validation subset size (positives first)")


def add_recipe_arguments(p: argparse.ArgumentParser) -> None:
    """Options shared by `train` and `reproduce`: the recipe, precision, memory, LoRA, baselines."""
    p.add_argument("--config", default="full", choices=["full", "small"])
    p.add_argument("--fetalclip", type=Path, help="FetalCLIP weights (whole-CLIP checkpoint)")
    p.add_argument("--train-encoder", action="store_true", help="mode fixed: train every encoder weight, no LoRA")
    p.add_argument("--decoder", choices=["unetr", "separable"], help="mode fixed: its decoder (default: unetr)")
    p.add_argument("--lora-rank", type=int, default=8)
    p.add_argument("--lora-alpha", type=int, help="default: 2 x rank (16 at rank 8, the paper's)")
    add_schedule_arguments(p)
    p.add_argument("--augment-copies", type=int, default=2,
                   help="augmented copies of every training frame per epoch (the paper's offline x2); 0: each "
                        "frame once, augmented")
    p.add_argument("--device", default="auto")
    p.add_argument("--precision", default="auto", choices=list(PRECISIONS),
                   help="auto: bf16 where native (GPU capability >= 8.0, CPUs with bf16 units), fp16 with "
                        "gradient scaling on older GPUs (T4), fp32 elsewhere")
    p.add_argument("--accumulate", type=int, help="micro-batches per optimiser step (default: 1, or what fits)")
    p.add_argument("--grad-checkpointing", action=argparse.BooleanOptionalAction, default=None,
                   help="recompute encoder blocks in backward (default: only when the step does not fit)")
    p.add_argument("--memory-budget-gib", type=float,
                   help="device memory a step may use (default: the GPU's free memory; none on the CPU)")
    p.add_argument("--trials", type=int, default=1)
    add_sampling_arguments(p)
    p.add_argument("--mask-ce-weight", type=float, default=0.0, help="add pixel cross-entropy to the Dice")
    p.add_argument("--workers", type=int)
    p.add_argument("--pretrained", help="mode baseline: backbone weights, a local file or 'hub' (downloads)")
    p.add_argument("--adapt", choices=["lora", "full", "probe"], help="mode baseline (default: as published)")


def train_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m training train",
                                description="Train one mode (training.models.modes) on prepared frames; write a checkpoint "
                                            "in algorithm's format.",
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prepared", type=Path, required=True, help="output of python -m training prepare")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--mode", default="fixed", type=mode_argument, choices=MODES, help=FORMER_NAMES)
    p.add_argument("--backbone",
                   help="mode baseline: a name of training.models.baselines.BASELINES, timm, or open_clip:ARCH[@TAG]")
    add_recipe_arguments(p)
    p.add_argument("--init", type=Path, help="start from these weights (.safetensors or last.pt/best.pt)")
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--schedule", default="constant", choices=["constant", "cosine"])
    p.add_argument("--clip-grad", type=float)
    p.add_argument("--no-channels-last", action="store_true", help="keep NCHW tensors")
    p.add_argument("--no-augment", action="store_true")
    p.add_argument("--sampler", default="uniform", choices=["uniform", "balanced"])
    p.add_argument("--hard-negatives", type=float, default=0.0,
                   help="fraction of each epoch's negatives drawn by the frame head's P(abdomen) (training.data.mining)")
    p.add_argument("--hard-negative-pool", type=int, default=4096, help="negatives scored per epoch for mining")
    p.add_argument("--hard-negatives-from", type=int, default=0, help="first epoch (0-based) that mines")
    p.add_argument("--class-weight-power", type=float,
                   help="frame-head CE weights (N/(K n_c))**power; default 0.5 (0 with --sampler balanced)")
    p.add_argument("--dice-weight", type=float, default=1.0)
    p.add_argument("--frame-weight", type=float, default=1.0)
    p.add_argument("--eval-batch-size", type=int)
    p.add_argument("--deterministic", action="store_true")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--replica", action=argparse.BooleanOptionalAction, default=None,
                   help="say in the provenance that the data is the replica (default: from the manifest)")
    p.add_argument("--note", default="", help="appended to the checkpoint's provenance")
    return p


def schedule_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """The TrainConfig fields `add_schedule_arguments` declares."""
    return dict(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, warmup_steps=args.warmup_steps,
                threads=args.threads, seed=args.seed, resume=args.resume, max_steps=args.max_steps)


def sampling_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """The TrainConfig fields `add_sampling_arguments` declares."""
    return dict(negatives_per_positive=args.negatives_per_positive,
                head_negatives_per_positive=args.head_negatives_per_positive, val_max_frames=args.val_max_frames)


def recipe_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """The TrainConfig fields `add_recipe_arguments` declares."""
    return dict(config=args.config, fetalclip=args.fetalclip, train_encoder=args.train_encoder,
                decoder=args.decoder, lora_rank=args.lora_rank, lora_alpha=args.lora_alpha,
                augment_copies=args.augment_copies, device=args.device, precision=args.precision,
                accumulate=args.accumulate, grad_checkpointing=args.grad_checkpointing,
                memory_budget_gib=args.memory_budget_gib, trials=args.trials, mask_ce_weight=args.mask_ce_weight,
                workers=args.workers, pretrained=args.pretrained, adapt=args.adapt,
                **schedule_from_args(args), **sampling_from_args(args))


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    return TrainConfig(
        prepared=args.prepared, out=args.out, mode=args.mode, backbone=args.backbone,
        init=args.init, **recipe_from_args(args),
        weight_decay=args.weight_decay, schedule=args.schedule,
        clip_grad=args.clip_grad, channels_last=not args.no_channels_last,
        augment=not args.no_augment, sampler=args.sampler, hard_negatives=args.hard_negatives,
        hard_negative_pool=args.hard_negative_pool, hard_negatives_from=args.hard_negatives_from,
        class_weight_power=args.class_weight_power, dice_weight=args.dice_weight, frame_weight=args.frame_weight,
        eval_batch_size=args.eval_batch_size, deterministic=args.deterministic, progress=not args.no_progress,
        replica=args.replica, note=args.note)
