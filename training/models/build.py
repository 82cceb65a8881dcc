"""A mode's network with requires_grad set as that mode trains it, and its parameter counts (`python -m training
params`). What each mode is: training.models.modes.
"""
from __future__ import annotations

import argparse
import gc
import json
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from algorithm.config import CLIP_MEAN, CLIP_STD
from algorithm.model.fetalclipseg import build_model, effective_parameters, trainable_parameters
from training.cli import CommandParser, number, run_command
from training.models.baselines import build_baseline
from training.models.modes import (FETALCLIP_MODES, SPECS, ModelOptions, mode_argument, model_config_for,
                                   parameters_table)


def configure_trainable(model: nn.Module, mode: str, train_encoder: bool = False) -> None:
    """requires_grad per mode. build_model leaves only LoRA trainable in a LoRA encoder; `paper` keeps its
    adapters flagged trainable, as the published code did (no_grad is what stops them)."""
    encoder = getattr(model, "encoder", None)
    if encoder is not None and not getattr(encoder, "has_lora", True):
        for p in encoder.parameters():
            p.requires_grad = train_encoder
    if getattr(model, "decoder", None) is not None:
        for p in model.decoder.parameters():
            p.requires_grad = True
    for p in model.frame_head.parameters():
        p.requires_grad = True


@torch.no_grad()
def centre_temporal_stem(visual: nn.Module) -> None:
    """Re-express the patch embedding so that frame t alone (the centre channel) gives exactly what the grey
    frame in all three channels gave, the neighbours nothing, and let it train.

    A grey frame g enters every channel c as x_c = (g - m_c) / s_c (CLIP's mean and std), so the stem computes
    sum_c W_c * x_c. With t alone in channel 1, (g - m_1) / s_1 = x_1, that is (sum_c W_c s_1 / s_c) * x_1
    plus, per output channel, the constant sum_c sum(W_c) (m_1 - m_c) / s_c: the first is the new centre
    filter, the second (the stem has no bias) is added to the patch tokens' positional embedding. The network
    thus starts as the single-frame network, and the neighbours' filters (zero) learn what they add. A
    pretrained stem instead reads each neighbour through a colour channel's filter it learnt on grey frames.
    """
    stem = visual.conv1
    if stem.bias is not None or stem.in_channels != 3:
        raise ValueError("expected open_clip's three-channel patch embedding without bias")
    weight = stem.weight  # (width, 3, patch, patch)
    mean = torch.tensor(CLIP_MEAN, dtype=weight.dtype, device=weight.device)
    std = torch.tensor(CLIP_STD, dtype=weight.dtype, device=weight.device)
    centre = (weight * (std[1] / std).view(1, 3, 1, 1)).sum(dim=1)
    offset = (weight.sum(dim=(2, 3)) * ((mean[1] - mean) / std).view(1, 3)).sum(dim=1)  # (width,)
    new = torch.zeros_like(weight)
    new[:, 1] = centre
    weight.copy_(new)
    visual.positional_embedding[1:] += offset
    stem.weight.requires_grad = True


def build_training_model(options: ModelOptions) -> nn.Module:
    """The network of `options.mode` (a `TrainConfig` is one), with requires_grad set as that mode trains it."""
    options.validate()
    if options.mode == "baseline":
        return build_baseline(options.backbone, options.pretrained, options.adapt, options.lora_rank, options.alpha)
    model = build_model(model_config_for(options), options.fetalclip)
    configure_trainable(model, options.mode, options.train_encoder)
    if options.temporal_stem == "centred":
        centre_temporal_stem(model.encoder.visual)
    return model


def parameter_counts(model: nn.Module, mode: str, config: str = "full") -> dict[str, Any]:
    """{"trainable", "effective", "paper"}: flagged trainable, able to change, and the paper's figure (full
    size only: the paper's models are full size)."""
    return {"trainable": trainable_parameters(model), "effective": effective_parameters(model),
            "paper": SPECS[mode].paper_parameters if config == "full" else None}


def count_parameters(config: str = "full", modes: tuple[str, ...] = FETALCLIP_MODES, lora_rank: int = 8,
                     lora_alpha: int | None = None) -> dict[str, dict[str, Any]]:
    """Per mode, its parameter counts (built with random weights, one model at a time)."""
    counts = {}
    for mode in modes:
        torch.manual_seed(0)
        model = build_training_model(ModelOptions(mode, config, lora_rank=lora_rank, lora_alpha=lora_alpha))
        counts[mode] = parameter_counts(model, mode, config)
        del model
        gc.collect()
    return counts


# ------------------------------------------------------------------------------------------ command

def params_main(argv: Sequence[str] | None = None) -> int:
    """`python -m training params`: every mode's trainable parameters (and those that can change) beside the paper's."""
    par = CommandParser(prog="python -m training params", description="trainable parameters of every mode beside "
                                                                      "the paper's")
    par.add_argument("--config", default="full", choices=["full", "small"],
                     help="full: FetalCLIP's ViT-L/14 encoder (the paper's figures); small: a small network")
    par.add_argument("--modes", nargs="+", choices=FETALCLIP_MODES, type=mode_argument,
                     help="the modes to count (default: every FetalCLIP mode)")
    par.add_argument("--lora-rank", type=number(int, minimum=1), default=8, help="LoRA rank")
    par.add_argument("--lora-alpha", type=number(int, minimum=1), help="LoRA alpha (default: 2 x rank)")
    par.add_argument("--json", type=Path, help="also write the counts here (default: printed only)")
    args = par.parse_args(argv)
    return run_command(lambda: _params_command(args))


def _params_command(args: argparse.Namespace) -> int:
    counts = count_parameters(args.config, tuple(args.modes or FETALCLIP_MODES), args.lora_rank, args.lora_alpha)
    print(parameters_table(counts))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"config": args.config, "modes": counts}, indent=2) + "\n")
    return 0
