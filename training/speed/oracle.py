"""A stand-in network that answers from a replica case's labels: checks the frame search without trained weights."""
from __future__ import annotations

import numpy as np
import torch

from algorithm.preprocess import preprocess_frames


class LabelOracle(torch.nn.Module):
    """A stand-in network for checking the frame search without trained weights (dev tool).

    It recognises each frame of one replica case by a signature of its network input (4 x 4 block means)
    and answers what a good network would: frame-head logits from the ground-truth labels blurred along
    time (a network is unsure at the ends of a run) plus Gaussian logit noise, and the ground-truth mask
    as the mask logits. It has FetalCLIPSeg's three parts, so `algorithm.network.Network` runs it like the
    real model.
    """

    def __init__(self, stack: np.ndarray, labels: np.ndarray, image_size: int, noise: float, seed: int):
        super().__init__()
        from scipy import ndimage

        self.image_size = image_size
        signatures = []
        for start in range(0, len(stack), 64):
            signatures.append(self.signature(preprocess_frames(stack[start:start + 64], image_size)))
        self.signatures = torch.cat(signatures)
        annotated = labels.reshape(len(labels), -1)
        optimal = (annotated == 1).any(axis=1).astype(np.float64)
        suboptimal = (annotated == 2).any(axis=1).astype(np.float64)
        rng = np.random.default_rng(seed)
        q_opt = ndimage.gaussian_filter1d(optimal, 1.0)
        q_sub = ndimage.gaussian_filter1d(suboptimal, 1.0)
        logits = np.stack([np.zeros(len(labels)), 6.0 * q_sub - 2.5, 6.0 * q_opt - 2.5], axis=1)
        self.frame_logits = torch.tensor(logits + rng.normal(0.0, noise, logits.shape), dtype=torch.float32)
        self.masks: dict[int, torch.Tensor] = {}
        for frame in np.flatnonzero(optimal + suboptimal):
            square = preprocess_frames((labels[frame:frame + 1] > 0).astype(np.uint8) * 255, image_size)
            self.masks[int(frame)] = square[0, 0] > square[0, 0].mean()
        outer = self

        class Encoder(torch.nn.Module):
            def forward(self, x):
                index = outer.lookup(x).float().view(-1, 1, 1, 1)
                return [index] * 4, index.view(-1, 1)

        class Head(torch.nn.Module):
            def forward(self, embedding):
                return outer.frame_logits[embedding.view(-1).long()]

        class Decoder(torch.nn.Module):
            def forward(self, x, features):
                frames = features[0].view(-1).long().tolist()
                logits = torch.full((len(frames), 2, outer.image_size, outer.image_size), -8.0)
                logits[:, 0] = 8.0
                for row, frame in enumerate(frames):
                    if frame in outer.masks:
                        logits[row, 1] = torch.where(outer.masks[frame], 8.0, -8.0)
                return logits

        self.encoder, self.frame_head, self.decoder = Encoder(), Head(), Decoder()

    @staticmethod
    def signature(x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.adaptive_avg_pool2d(x[:, :1].float(), 4).flatten(1).double()

    def lookup(self, x: torch.Tensor) -> torch.Tensor:
        distances = torch.cdist(self.signature(x), self.signatures)
        return distances.argmin(dim=1)
