"""The paper-style reference: the same weights run the way the published FetalCLIPSEG code runs them.

It is another network and another search for `algorithm.predict.predict`, so both pipelines share the
field of view, the selection and the post-processing, and differ only where the published code differs.
"""
from __future__ import annotations

import numpy as np
import torch

from algorithm.config import Config
from algorithm.preprocess import preprocess_frames
from algorithm.progress import SearchProgress
from algorithm.runtime import StageTimer
from algorithm.search import FrameScores, Searched


class ReferenceNetwork:
    """FetalCLIPSEG run like the published code: fp32, LoRA adapters unmerged, hooks, host post-processing.

    The model is used as loaded. Intermediate token maps come from forward hooks on the transformer blocks
    of `visual(x)`; the network's outputs are the same as `FetalCLIPSeg.forward`. `decode` turns the mask
    logits into probabilities and mask fractions frame by frame on the host, as the published code does.
    """

    precision = "fp32"
    pad_batches = False

    def __init__(self, model: torch.nn.Module, config: Config, device: torch.device, batch_size: int):
        self.model = model.to(device).eval()
        self.config, self.device, self.batch_size = config, device, batch_size
        self.runtime = {"device": str(device), "precision": self.precision, "batch_size": batch_size}
        visual = self.model.encoder.visual
        self.visual = visual
        self.blocks = [visual.transformer.resblocks[i - 1] for i in config.model.skip_layers]
        self.batch_first = getattr(visual.transformer, "batch_first", True)
        self.captured: dict[int, torch.Tensor] = {}
        self.handles = [block.register_forward_hook(self._hook(i)) for i, block in enumerate(self.blocks)]

    def _hook(self, position: int):
        def capture(_module, _inputs, output):
            self.captured[position] = output if self.batch_first else output.transpose(0, 1)
        return capture

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()

    def preprocess(self, frames: np.ndarray | torch.Tensor) -> torch.Tensor:
        """Preprocessed on the host, then moved to the device."""
        return preprocess_frames(frames, self.config.model.image_size).to(self.device)

    @torch.no_grad()
    def encode_logits(self, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """(skip features from the hooks, frame logits)."""
        self.captured.clear()
        embedding = self.visual(x)
        grid = self.config.model.grid_size
        features = [self.captured[i][:, 1:].transpose(1, 2).reshape(x.shape[0], -1, grid, grid)
                    for i in range(len(self.blocks))]
        return features, self.model.frame_head(embedding)

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(mask logits, frame logits), as `FetalCLIPSeg.forward` computes them."""
        features, frame_logits = self.encode_logits(x)
        return self.model.decoder(x, features), frame_logits

    def encode(self, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        features, frame_logits = self.encode_logits(x)
        return features, torch.softmax(frame_logits, dim=1)

    @torch.no_grad()
    def decode(self, x: torch.Tensor, features: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        masks = torch.softmax(self.model.decoder(x, features), dim=1).cpu().numpy()
        maps, fractions = [], []
        for row in range(len(masks)):  # the published code's per-frame loop over host arrays
            abdomen = 1.0 - masks[row, 0]
            binary = (abdomen >= self.config.inference.mask_threshold).astype(np.uint8)
            fractions.append(binary.sum() / float(binary.size))
            maps.append(abdomen.astype(np.float32))
        return torch.from_numpy(np.stack(maps)), torch.tensor(fractions, dtype=torch.float64)

    def describe(self) -> dict:
        return {"device": str(self.device), "precision": self.precision, "lora_merged": False,
                "batch_size": self.batch_size}


class ReferenceSearch:
    """Every frame in order, lift-off included, batch by batch, each frame decoded."""

    def describe(self) -> dict:
        return {"coarse_stride": 1, "lazy_decoder": False}

    def frames_to_encode(self, stack: np.ndarray) -> np.ndarray:
        return np.arange(len(stack))

    def __call__(self, stack: np.ndarray, network: ReferenceNetwork, frames: np.ndarray,
                 progress: SearchProgress | None = None, timer: StageTimer | None = None) -> Searched:
        progress = progress or SearchProgress()
        timer = timer or StageTimer(network.device)
        scores = FrameScores.empty(len(stack))
        progress.start(len(stack), len(frames))
        progress.stage("scan", len(frames))
        for start in range(0, len(frames), network.batch_size):
            chunk = frames[start:start + network.batch_size]
            with timer("preprocess"):
                x = network.preprocess(torch.from_numpy(stack[chunk]))
            with timer("encode"):
                features, probabilities = network.encode(x)
            with timer("decode"):
                abdomen, fractions = network.decode(x, features)
            scores.probabilities[chunk] = probabilities.cpu().numpy()
            scores.mask_fractions[chunk] = fractions.numpy()
            scores.abdomen_maps.update(zip(chunk.tolist(), abdomen))
            progress.advance(len(chunk))
        progress.finish(len(frames), len(frames))
        return Searched(scores, len(frames), {"coarse_stride": 1, "lift_off_frames": 0, "precision": "fp32",
                                              "batch_size": network.batch_size, "lazy_decoder": False})
