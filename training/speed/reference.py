"""The paper-style reference path: the same weights run the way the published FetalCLIPSEG code runs them."""
from __future__ import annotations

import numpy as np
import torch

from algorithm.config import Config
from algorithm.inference import StageTimer
from algorithm.postprocess import abdomen_probability, clean_mask
from algorithm.preprocess import preprocess_frames
from algorithm.select import NO_FRAME, select_frame


class ReferencePipeline:
    """FetalCLIPSEG run like the published code: every frame, fp32, hooks, per-frame host post-processing.

    The model is used as loaded (LoRA adapters unmerged). Intermediate token maps come from forward hooks
    on the transformer blocks of `visual(x)`; the network's outputs are the same as `FetalCLIPSeg.forward`.
    """

    def __init__(self, model: torch.nn.Module, config: Config, device: torch.device):
        self.model = model.to(device).eval()
        self.config = config
        self.device = device
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

    def forward(self, x: torch.Tensor, timer: StageTimer) -> tuple[torch.Tensor, torch.Tensor]:
        with timer("encode"):
            self.captured.clear()
            embedding = self.visual(x)
            grid = self.config.model.grid_size
            features = [self.captured[i][:, 1:].transpose(1, 2).reshape(x.shape[0], -1, grid, grid)
                        for i in range(len(self.blocks))]
            frame_logits = self.model.frame_head(embedding)
        with timer("decode"):
            mask_logits = self.model.decoder(x, features)
        return mask_logits, frame_logits

    @torch.no_grad()
    def predict(self, stack: np.ndarray, timer: StageTimer) -> dict:
        n_frames, height, width = stack.shape
        inference = self.config.inference
        size = self.config.model.image_size
        probabilities = np.zeros((n_frames, 3))
        fractions = np.zeros(n_frames)
        maps: list[np.ndarray] = []
        with timer("field_of_view"):
            from algorithm.fov import fov_from_stack
            fov = fov_from_stack(stack)
        batch = max(1, inference.batch_size)
        for start in range(0, n_frames, batch):
            with timer("preprocess"):
                x = preprocess_frames(torch.from_numpy(stack[start:start + batch]), size).to(self.device)
            mask_logits, frame_logits = self.forward(x, timer)
            with timer("scores"):  # the published code's per-frame loop over host arrays
                probs = torch.softmax(frame_logits, dim=1).cpu().numpy()
                masks = torch.softmax(mask_logits, dim=1).cpu().numpy()
                for row in range(len(probs)):
                    abdomen = 1.0 - masks[row, 0]
                    binary = (abdomen >= inference.mask_threshold).astype(np.uint8)
                    probabilities[start + row] = probs[row]
                    fractions[start + row] = binary.sum() / float(binary.size)
                    maps.append(abdomen.astype(np.float32))
        with timer("select"):
            selection = select_frame(probabilities, fractions, inference)
        with timer("postprocess"):
            mask = None
            if selection.frame != NO_FRAME:
                probability = abdomen_probability(torch.from_numpy(maps[selection.frame]), height, width)
                mask = clean_mask(probability, fov, inference.mask_threshold)
        return {"frame": selection.frame, "mask": mask, "frames_encoded": n_frames, "frames_decoded": n_frames,
                "probabilities": probabilities, "fractions": fractions}
