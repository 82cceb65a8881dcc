"""FetalCLIPSEG: FetalCLIP encoder (+LoRA) -> UNETR decoder for the abdomen mask, and a frame-quality head.

One forward pass gives both outputs, so frame selection and segmentation of a stack cost one encoder pass
per frame.
"""
from __future__ import annotations

import contextlib
import dataclasses
from pathlib import Path
from typing import NamedTuple

import torch
from torch import nn

from algorithm.config import ModelConfig
from algorithm.model.decoder import SeparableUNETRDecoder, UNETRDecoder
from algorithm.model.encoder import FetalCLIPEncoder


DECODERS = ("unetr", "separable", "none")
FRAME_HEADS = ("norm-linear", "linear")


class SegOutput(NamedTuple):
    mask_logits: torch.Tensor | None  # (B, mask_classes, image_size, image_size); None without a decoder
    frame_logits: torch.Tensor  # (B, frame_classes)


class FrameHead(nn.Sequential):
    """A head on the image embedding: LayerNorm + linear (ours: the LayerNorm lets a from-scratch encoder
    train too), or the published FetalCLIPCLS's single linear layer."""

    def __init__(self, embed_dim: int, num_classes: int, kind: str = "norm-linear"):
        if kind not in FRAME_HEADS:
            raise ValueError(f"frame_head must be one of {FRAME_HEADS}, got {kind!r}")
        layers = [nn.LayerNorm(embed_dim)] if kind == "norm-linear" else []
        super().__init__(*layers, nn.Linear(embed_dim, num_classes))


def build_decoder(config: ModelConfig) -> nn.Module | None:
    """The mask decoder `config.decoder` names (None for a frame classifier)."""
    if config.decoder == "unetr":
        return UNETRDecoder(config.width, config.mask_classes, filters=config.decoder_filters)
    if config.decoder == "separable":
        return SeparableUNETRDecoder(config.width, config.mask_classes, filters=config.decoder_filters,
                                     image_size=config.image_size)
    if config.decoder == "none":
        return None
    raise ValueError(f"decoder must be one of {DECODERS}, got {config.decoder!r}")


class FetalCLIPSeg(nn.Module):
    """`encoder`, when given, is used instead of a new one: the members of a shared-encoder ensemble hold
    one encoder module between them (algorithm.model.ensemble)."""

    def __init__(self, config: ModelConfig, fetalclip_weights: str | Path | None = None,
                 encoder: FetalCLIPEncoder | None = None):
        super().__init__()
        if len(config.skip_layers) != 4:
            raise ValueError(f"FetalCLIPSeg takes 4 skip layers, got {config.skip_layers}")
        self.config = config
        self.encoder = encoder if encoder is not None else FetalCLIPEncoder(config, weights=fetalclip_weights)
        self.decoder = build_decoder(config)
        self.frame_head = FrameHead(config.embed_dim, config.frame_classes, config.frame_head)

    def forward(self, x: torch.Tensor) -> SegOutput:
        size = self.config.image_size
        if x.ndim != 4 or x.shape[1] != 3 or x.shape[-2:] != (size, size):
            raise ValueError(f"expected (B, 3, {size}, {size}) normalised images, got {tuple(x.shape)}")
        # encoder_no_grad reproduces the published training code, whose LoRA therefore never learns.
        grad_ctx = torch.no_grad() if self.config.encoder_no_grad else contextlib.nullcontext()
        with grad_ctx:
            features, embedding = self.encoder(x)
        mask_logits = self.decoder(x, features) if self.decoder is not None else None
        return SegOutput(mask_logits, self.frame_head(embedding))

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute encoder blocks in backward (ViT-L fine-tuning at larger batches)."""
        self.encoder.visual.set_grad_checkpointing(enable)

    def merge_lora(self) -> None:
        """Fold LoRA into the encoder weights for inference; `config` becomes the use_lora=False architecture."""
        self.encoder.merge_lora()
        self.config = dataclasses.replace(self.config, use_lora=False)


def build_model(config: ModelConfig, fetalclip_weights: str | Path | None = None) -> FetalCLIPSeg:
    """FetalCLIPSeg from `config`, its encoder initialised from the published FetalCLIP checkpoint if given.

    With LoRA the pretrained encoder weights are frozen; decoder, frame head and adapters train.
    """
    return FetalCLIPSeg(config, fetalclip_weights)


def trainable_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def inert_parameter_names(model: nn.Module) -> set[str]:
    """Trainable parameters that can never change, named as in `model.named_parameters()`.

    Two kinds: everything in an encoder run under torch.no_grad (`ModelConfig.encoder_no_grad`, the published
    FetalCLIPSEG), and LoRA adapters on the `out_proj` of a plain nn.MultiheadAttention, which hands
    `out_proj.weight` to its fused kernel and never calls the adapter (the published FetalCLIPCLS's
    `out_proj` target). Neither gets a gradient, so AdamW never moves them.
    """
    from peft.tuners.lora import LoraLayer

    inert: set[str] = set()
    config = getattr(model, "config", None)
    modules = dict(model.named_modules())
    for prefix, module in modules.items():
        if not (isinstance(module, nn.MultiheadAttention) and isinstance(getattr(module, "out_proj", None), LoraLayer)):
            continue
        parent = modules.get(prefix.rpartition(".")[0]) if prefix.endswith("base_layer") else None
        if isinstance(parent, LoraLayer):  # peft's own MultiheadAttention layer, which does apply out_proj's adapter
            continue
        inert |= {f"{prefix}.out_proj.{n}" for n, p in module.out_proj.named_parameters()
                  if "lora_" in n and p.requires_grad}
    if getattr(config, "encoder_no_grad", False) and hasattr(model, "encoder"):
        inert |= {f"encoder.{n}" for n, p in model.encoder.named_parameters() if p.requires_grad}
    return inert


def effective_parameters(model: nn.Module) -> int:
    """Trainable parameters that can actually change (`trainable_parameters` minus `inert_parameter_names`)."""
    inert = inert_parameter_names(model)
    return sum(p.numel() for n, p in model.named_parameters() if p.requires_grad and n not in inert)


def total_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
