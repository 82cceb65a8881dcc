"""One training step: what it runs (`TrainView`) and a step function over copies of one sample (`make_step`).

Below both the training loop (training.run.train) and the memory planner (training.run.memory): the loop
trains the view, the planner measures a step of it before training starts.
"""
from __future__ import annotations

import contextlib
from typing import Callable

import torch
from torch import nn

from algorithm.runtime import autocast
from training.models.losses import SegLoss


class TrainView(nn.Module):
    """What one training step runs: the whole network, or (segmenting modes) the decoder on some frames only.

    A module of its own so DistributedDataParallel wraps exactly the computation that produces the loss.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor, decode: torch.Tensor | None = None
                ) -> tuple[torch.Tensor | None, torch.Tensor]:
        """(mask logits or None, frame logits); with `decode` (bool (B,)) the decoder runs on those frames only."""
        if decode is None or getattr(self.model, "decoder", None) is None:
            out = self.model(images)
            return out.mask_logits, out.frame_logits
        # FetalCLIPSeg.forward, with the decoder restricted to the frames that need a mask.
        with torch.no_grad() if self.model.config.encoder_no_grad else contextlib.nullcontext():
            features, embedding = self.model.encoder(images)
        mask_logits = self.model.decoder(images[decode], [f[decode] for f in features])
        return mask_logits, self.model.frame_head(embedding)


def make_step(view: TrainView, loss: SegLoss, sample: tuple[torch.Tensor, ...], device: torch.device,
              precision: str, channels_last: bool = True) -> Callable[[int], torch.Tensor]:
    """step(batch) -> the training loss of `batch` copies of `sample` (forward and loss, no backward)."""
    def step(batch: int) -> torch.Tensor:
        images = sample[0][None].expand(batch, -1, -1, -1).contiguous().to(device)
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        mask = sample[1][None].expand(batch, -1, -1).contiguous().to(device)
        label = sample[2].reshape(1).repeat(batch).to(device)
        view.train()
        with autocast(device, precision):
            mask_logits, frame_logits = view(images)
        return loss(mask_logits, frame_logits, mask, label)[0]

    return step
