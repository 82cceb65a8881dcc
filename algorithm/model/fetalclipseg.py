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
from algorithm.model.decoder import UNETRDecoder
from algorithm.model.encoder import FetalCLIPEncoder


class SegOutput(NamedTuple):
    mask_logits: torch.Tensor  # (B, mask_classes, image_size, image_size)
    frame_logits: torch.Tensor  # (B, frame_classes)


class FrameHead(nn.Sequential):
    """FetalCLIPCLS: LayerNorm + linear on the image embedding (LayerNorm lets a from-scratch encoder train too)."""

    def __init__(self, embed_dim: int, num_classes: int):
        super().__init__(nn.LayerNorm(embed_dim), nn.Linear(embed_dim, num_classes))


class FetalCLIPSeg(nn.Module):
    def __init__(self, config: ModelConfig, fetalclip_weights: str | Path | None = None):
        super().__init__()
        if len(config.skip_layers) != 4:
            raise ValueError(f"FetalCLIPSeg takes 4 skip layers, got {config.skip_layers}")
        self.config = config
        self.encoder = FetalCLIPEncoder(config, weights=fetalclip_weights)
        self.decoder = UNETRDecoder(config.width, config.mask_classes, filters=config.decoder_filters)
        self.frame_head = FrameHead(config.embed_dim, config.frame_classes)

    def forward(self, x: torch.Tensor) -> SegOutput:
        size = self.config.image_size
        if x.ndim != 4 or x.shape[1] != 3 or x.shape[-2:] != (size, size):
            raise ValueError(f"expected (B, 3, {size}, {size}) normalised images, got {tuple(x.shape)}")
        # encoder_no_grad reproduces the published training code, whose LoRA therefore never learns.
        grad_ctx = torch.no_grad() if self.config.encoder_no_grad else contextlib.nullcontext()
        with grad_ctx:
            features, embedding = self.encoder(x)
        return SegOutput(self.decoder(x, features), self.frame_head(embedding))

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


def total_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
