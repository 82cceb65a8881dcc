"""Several prepared networks run as one: the frame search sees the `Network` seam and never knows.

Frame-head probabilities and abdomen probabilities are averaged over the members (probability space, as
the test-time flip averages). With a shared encoder (algorithm.model.ensemble) the encoder runs once per
frame and every member's frame head and decoder read its output; otherwise each member encodes, and the
features handed to the search are the members' lists one after the other, split again at decode.
"""
from __future__ import annotations

import torch

from .network import Features, Network


class EnsembleNetwork:
    """`members` prepared on one device in one precision; `shared_encoder`: they hold one encoder module."""

    def __init__(self, members: list[Network], shared_encoder: bool):
        if len(members) < 2:
            raise ValueError("an ensemble needs at least two members")
        first = members[0]
        self.members, self.shared_encoder = members, shared_encoder
        self.config, self.device, self.precision = first.config, first.device, first.precision
        self.batch_size = min(member.batch_size for member in members)
        self.pad_batches = first.pad_batches
        # A frame waiting for its decode decision holds every member's features unless they share them.
        held = 1 if shared_encoder else len(members)
        self.waiting_limit = max(self.batch_size, min(member.waiting_limit for member in members) // held)
        self.encoder_passes = 1 if shared_encoder else len(members)
        self.runtime = {**first.runtime, "batch_size": self.batch_size,
                        "ensemble": {"members": len(members), "shared_encoder": shared_encoder}}

    def preprocess(self, frames) -> torch.Tensor:
        return self.members[0].preprocess(frames)

    @torch.inference_mode()
    def encode(self, inputs: torch.Tensor) -> tuple[Features, torch.Tensor]:
        """(features the decoders need, frame-class probabilities averaged over the members)."""
        if self.shared_encoder:
            features, embedding = self.members[0].embed(inputs)
            probabilities = torch.stack([member.classify(embedding) for member in self.members]).mean(dim=0)
            return features, probabilities
        features, probabilities = [], []
        for member in self.members:
            own, member_probabilities = member.encode(inputs)
            features.extend(own)
            probabilities.append(member_probabilities)
        return features, torch.stack(probabilities).mean(dim=0)

    @torch.inference_mode()
    def decode(self, inputs: torch.Tensor, features: Features) -> tuple[torch.Tensor, torch.Tensor]:
        """(abdomen probability averaged over the members, float16; the share of the input that average's
        mask covers)."""
        per_member = len(features) // self.encoder_passes
        total = None
        for index, member in enumerate(self.members):
            start = 0 if self.shared_encoder else index * per_member
            abdomen, _ = member.decode(inputs, features[start:start + per_member])
            total = abdomen.float() if total is None else total + abdomen.float()
        abdomen = total / len(self.members)
        fractions = (abdomen >= self.config.inference.mask_threshold).float().mean(dim=(1, 2))
        return abdomen.half(), fractions

    def describe(self) -> dict:
        return {**self.members[0].describe(), "batch_size": self.batch_size, "runtime": self.runtime}
