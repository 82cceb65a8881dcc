"""Training options, declared once: the `TrainConfig` a run depends on and the arguments that build it.

`train` declares them all; `reproduce` shares the recipe (`add_recipe_arguments`) and `demo-weights` the
schedule and sampling groups with its own defaults, so an option means the same everywhere it appears.
"""
from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from algorithm.config import INPUT_FRAMES
from algorithm.runtime import PRECISIONS, DeviceError, choose_precision, resolve_device
from training.cli import CommandParser, UsageError, existing_file, number
from training.data.dataset import prepared_folder
from training.models.modes import FETALCLIP_MODES, FORMER_NAMES, MODES, ModelOptions, TEMPORAL_STEMS, mode_argument


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
            raise UsageError(f"sampler must be uniform or balanced, got {self.sampler!r}")
        if self.schedule not in ("constant", "cosine"):
            raise UsageError(f"schedule must be constant or cosine, got {self.schedule!r}")
        if self.precision not in PRECISIONS:
            raise UsageError(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if self.epochs < 1 or self.batch_size < 1 or self.trials < 1:
            raise UsageError("epochs, batch size and trials must be positive")
        if self.augment_copies < 0 or self.lora_rank < 1 or (self.accumulate is not None and self.accumulate < 1):
            raise UsageError("augment copies must be >= 0, LoRA rank and accumulate >= 1")
        if not 0.0 <= self.hard_negatives <= 1.0:
            raise UsageError(f"hard_negatives is a fraction in [0, 1], got {self.hard_negatives}")
        if self.hard_negatives and self.negatives_per_positive is None and not self.head_negatives_per_positive:
            raise UsageError("hard negatives need a negative draw: set negatives_per_positive or "
                             "head_negatives_per_positive (the uniform sampler otherwise shows every frame)")
        if self.hard_negatives and self.sampler != "uniform":
            raise UsageError("hard negatives go with the uniform sampler (the balanced one draws by class only)")
        if self.hard_negatives and self.augment and self.augment_copies:
            raise UsageError("hard negatives score the frames of one pass: use augment_copies 0 with them")


# ------------------------------------------------------------------------------------------ options

POSITIVE = number(int, minimum=1)
COUNT = number(int, minimum=0)
WEIGHT = number(float, minimum=0)
NO_FETALCLIP = "none"  # --fetalclip none: a randomly initialised encoder, asked for


def fetalclip_argument(text: str) -> Path | str:
    """argparse type of --fetalclip: an existing file, or `NO_FETALCLIP`."""
    return NO_FETALCLIP if text == NO_FETALCLIP else existing_file(text)


def add_schedule_arguments(p: Any) -> None:
    """How long and how fast: epochs, batch, learning rate, seed, step limit, resuming, CPU threads (into a
    parser or an argument group)."""
    p.add_argument("--epochs", type=POSITIVE, default=5, help="passes over the training frames")
    p.add_argument("--batch-size", type=POSITIVE, default=32, help="frames per optimiser step, all processes together")
    p.add_argument("--lr", type=number(float, above=0), default=3e-4, help="AdamW learning rate")
    p.add_argument("--warmup-steps", type=COUNT, default=0, help="optimiser steps of linear learning-rate warm-up")
    p.add_argument("--threads", type=POSITIVE, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--seed", type=int, default=0, help="seed of the first trial; trial k uses seed + k")
    p.add_argument("--resume", action="store_true",
                   help="continue each trial from its last.pt (in OUT.partial after a stopped run, or in OUT)")
    p.add_argument("--max-steps", type=POSITIVE,
                   help="optimiser steps per trial; the epoch reaching it ends early (default: no limit)")


def add_sampling_arguments(p: Any) -> None:
    """Which frames an epoch shows: negatives per positive (decoded, or through the frame head only), validation."""
    p.add_argument("--negatives-per-positive", type=WEIGHT,
                   help="per epoch: every positive frame plus this many random negatives per positive "
                        "(default: every frame)")
    p.add_argument("--head-negatives-per-positive", type=WEIGHT,
                   help="per epoch: extra negatives per positive through encoder + frame head only, cheap "
                        "(default: none)")
    p.add_argument("--val-max-frames", type=POSITIVE,
                   help="fixed validation subset size, positives first (default: every validation frame)")


RECIPE_GROUPS = {"model": "model", "schedule": "schedule", "frames": "frames per epoch", "loss": "loss",
                 "device": "device, precision and memory"}


def recipe_groups(p: argparse.ArgumentParser) -> dict[str, Any]:
    """The argument groups of the recipe's options, by key of RECIPE_GROUPS (a command adds its own to them)."""
    return {key: p.add_argument_group(title) for key, title in RECIPE_GROUPS.items()}


def add_recipe_arguments(groups: dict[str, Any]) -> None:
    """Options shared by `train` and `reproduce`: the recipe, precision, memory, LoRA, baselines."""
    model, schedule, frames, loss, device = (groups[key] for key in RECIPE_GROUPS)
    model.add_argument("--config", default="full", choices=["full", "small"],
                       help="full: FetalCLIP's ViT-L/14 encoder; small: a small network for tests and the CPU")
    model.add_argument("--fetalclip", type=fetalclip_argument, metavar="PATH|none",
                       help="the published FetalCLIP weights (whole-CLIP checkpoint) the encoder starts from, or "
                            f"'{NO_FETALCLIP}' to start from random weights on purpose. --config full refuses to "
                            "start without one of the two (default: neither)")
    model.add_argument("--train-encoder", action="store_true", help="mode fixed: train every encoder weight, no LoRA")
    model.add_argument("--decoder", choices=["unetr", "separable"], help="mode fixed: its decoder (default: unetr)")
    model.add_argument("--input-frames", choices=list(INPUT_FRAMES), default="single",
                       help="the three input channels: the frame's grey three times (the paper's), or frames t-1, "
                            "t, t+1 of its sweep (temporal; at a sweep's border the frame itself)")
    model.add_argument("--temporal-stem", choices=list(TEMPORAL_STEMS), default="pretrained",
                       help="with --input-frames temporal in a mode whose encoder trains: the patch embedding as "
                            "pretrained on grey frames and frozen, or centred: re-expressed so that the network "
                            "starts as the single-frame one (frame t alone, the neighbours at zero) and trained")
    model.add_argument("--lora-rank", type=POSITIVE, default=8, help="LoRA rank")
    model.add_argument("--lora-alpha", type=POSITIVE, help="LoRA alpha (default: 2 x rank, 16 at rank 8: the paper's)")
    model.add_argument("--pretrained",
                       help="mode baseline: backbone weights, a local file or 'hub' (downloads) (default: random "
                            "weights, for tests)")
    model.add_argument("--adapt", choices=["lora", "full", "probe"], help="mode baseline (default: as published)")
    add_schedule_arguments(schedule)
    schedule.add_argument("--trials", type=POSITIVE, default=1,
                          help="trainings with seeds seed .. seed + N - 1; tables give mean and std")
    frames.add_argument("--augment-copies", type=COUNT, default=2,
                        help="augmented copies of every training frame per epoch (the paper's offline x2); 0: each "
                             "frame once, augmented")
    add_sampling_arguments(frames)
    loss.add_argument("--mask-ce-weight", type=WEIGHT, default=0.0, help="add pixel cross-entropy to the Dice")
    device.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    device.add_argument("--precision", default="auto", choices=list(PRECISIONS),
                        help="auto: bf16 where native (GPU capability >= 8.0, CPUs with bf16 units), fp16 with "
                             "gradient scaling on older GPUs (T4), fp32 elsewhere")
    device.add_argument("--accumulate", type=POSITIVE,
                        help="micro-batches per optimiser step (default: 1, or what fits)")
    device.add_argument("--grad-checkpointing", action=argparse.BooleanOptionalAction, default=None,
                        help="recompute encoder blocks in backward (default: only when the step does not fit)")
    device.add_argument("--memory-budget-gib", type=number(float, above=0),
                        help="device memory a step may use (default: the GPU's free memory; none on the CPU)")
    device.add_argument("--workers", type=COUNT, help="DataLoader workers (default: 0 on the CPU, 6 on a GPU)")


def train_parser() -> argparse.ArgumentParser:
    p = CommandParser(prog="python -m training train", usage="%(prog)s --prepared DIR --out DIR [options]",
                      description="Train one mode (training.models.modes) on prepared frames; write a checkpoint "
                                  "in algorithm's format.")
    p.add_argument("--prepared", type=prepared_folder, required=True, help="output of python -m training prepare")
    p.add_argument("--out", type=Path, required=True,
                   help="the run's folder; written as OUT.partial until the run is complete")
    groups = recipe_groups(p)
    model, schedule, frames, loss, device = (groups[key] for key in RECIPE_GROUPS)
    model.add_argument("--mode", default="fixed", type=mode_argument, choices=MODES,
                       help=f"what to train (training.models.modes); {FORMER_NAMES}")
    model.add_argument("--backbone",
                       help="mode baseline (which needs one): a name of training.models.baselines.BASELINES, timm, "
                            "or open_clip:ARCH[@TAG] (default: none)")
    add_recipe_arguments(groups)
    model.add_argument("--init", type=existing_file,
                       help="start from these weights, .safetensors or last.pt / best.pt (default: FetalCLIP's, or "
                            "random)")
    schedule.add_argument("--weight-decay", type=WEIGHT, default=0.01, help="AdamW weight decay")
    schedule.add_argument("--schedule", default="constant", choices=["constant", "cosine"],
                          help="learning rate after warm-up: constant (the paper's), or cosine decay")
    schedule.add_argument("--clip-grad", type=number(float, above=0),
                          help="clip the gradient norm (default: no clipping)")
    frames.add_argument("--no-augment", action="store_true", help="train on the frames as prepared")
    frames.add_argument("--sampler", default="uniform", choices=["uniform", "balanced"],
                        help="balanced: class-balanced draws, with replacement")
    frames.add_argument("--hard-negatives", type=number(float, minimum=0, maximum=1), default=0.0,
                        help="fraction of each epoch's negatives drawn by the frame head's P(abdomen) "
                             "(training.data.mining)")
    frames.add_argument("--hard-negative-pool", type=POSITIVE, default=4096,
                        help="negatives scored per epoch for mining")
    frames.add_argument("--hard-negatives-from", type=COUNT, default=0, help="first epoch (0-based) that mines")
    loss.add_argument("--class-weight-power", type=WEIGHT,
                      help="frame-head CE weights (N/(K n_c))**power (default: 0.5, or 0 with --sampler balanced)")
    loss.add_argument("--dice-weight", type=WEIGHT, default=1.0, help="weight of the mask's Dice loss")
    loss.add_argument("--frame-weight", type=WEIGHT, default=1.0, help="weight of the frame head's loss")
    device.add_argument("--no-channels-last", action="store_true", help="keep NCHW tensors")
    device.add_argument("--eval-batch-size", type=POSITIVE,
                        help="frames per evaluation pass (default: the micro-batch)")
    device.add_argument("--deterministic", action="store_true", help="deterministic torch algorithms (slower)")
    output = p.add_argument_group("output")
    output.add_argument("--no-progress", action="store_true", help="no progress bars")
    output.add_argument("--replica", action=argparse.BooleanOptionalAction, default=None,
                        help="say in the provenance that the data is the replica (default: from the manifest)")
    output.add_argument("--note", default="", help="appended to the checkpoint's provenance (default: nothing)")
    return p


def check_fetalclip(args: argparse.Namespace, modes: Sequence[str]) -> None:
    """--config full trains FetalCLIP's encoder: without its weights, or `--fetalclip none`, it would train a
    random frozen encoder for hours by mistake, so refuse to start."""
    if args.fetalclip is None and args.config == "full" and any(mode in FETALCLIP_MODES for mode in modes):
        raise UsageError(f"--config full trains on FetalCLIP's encoder: give its weights (--fetalclip PATH), or "
                         f"--fetalclip {NO_FETALCLIP} to train from random weights on purpose")


def check_device(device: str, precision: str) -> None:
    """Refuse a device or precision this machine cannot give before anything starts."""
    try:
        choose_precision(precision, resolve_device(device))
    except (ValueError, DeviceError) as error:
        raise UsageError(str(error)) from None


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
    fetalclip = None if args.fetalclip == NO_FETALCLIP else args.fetalclip
    return dict(config=args.config, fetalclip=fetalclip, train_encoder=args.train_encoder,
                decoder=args.decoder, input_frames=args.input_frames, temporal_stem=args.temporal_stem,
                lora_rank=args.lora_rank, lora_alpha=args.lora_alpha,
                augment_copies=args.augment_copies, device=args.device, precision=args.precision,
                accumulate=args.accumulate, grad_checkpointing=args.grad_checkpointing,
                memory_budget_gib=args.memory_budget_gib, trials=args.trials, mask_ce_weight=args.mask_ce_weight,
                workers=args.workers, pretrained=args.pretrained, adapt=args.adapt,
                **schedule_from_args(args), **sampling_from_args(args))


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The TrainConfig of `python -m training train` (refusing --config full without --fetalclip)."""
    check_fetalclip(args, [args.mode])
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
