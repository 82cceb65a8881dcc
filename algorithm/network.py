"""The prepared network: a loaded FetalCLIPSEG made ready, once, to run on one device in one precision.

`Network` owns everything about running the model and nothing about which frames to run it on (that is
`search.py`'s job). Its public `preprocess`, `encode` and `decode` are the seam the search and the tools
use: an ensemble or a test-time-augmentation wrapper is another object with the same three methods and
the same public attributes (`config`, `device`, `precision`, `batch_size`, `runtime`; the frame search also
reads `pad_batches` and `waiting_limit`, the memory plan's answer to how many encoded frames may wait for
their decode decision).

Speed (`python -m training speed` measures every item against the paper-style reference):

* LoRA is merged into the encoder weights at load (`InferenceConfig.merge_lora`). peft's adapter on
  `nn.MultiheadAttention` re-merges and unmerges the attention weights on every call and its Linear
  adapters add two small matmuls each; merged, the encoder is plain open_clip, whose attention goes through
  PyTorch's fused `_native_multi_head_attention` / `scaled_dot_product_attention` kernels. Same outputs.
* Precision: `runtime.choose_precision` picks it, `runtime.PrecisionPlan` says what is cast once and what
  runs under autocast; `tools/gpu_check.py` measures the largest activation against fp16's range.
* On CUDA: the batch size comes from the free GPU memory (measured with a probe batch at load); every call
  of the encoder and decoder has that one shape (shorter calls are padded with repeats of their last
  frame), and the network is warmed up at load, so cuDNN autotuning or `torch.compile` never meets a new
  shape inside a case; channels-last convolutions.
* On the CPU the decoder runs in chunks of `cpu_decoder_chunk` frames: its full-resolution activations
  (~30 MB per frame for the small model) are what bounds peak memory, not the batch's inputs.
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from .config import Config
from .preprocess import preprocess_frames
from .runtime import (DeviceError, PrecisionPlan, choose_precision, cuda_batch_plan, cuda_memory_available,
                      describe_runtime, select_device)

log = logging.getLogger(__name__)

# Automatic CUDA batch size: frames of the probe batch that measures activation memory per frame, the case
# size whose decoder inputs must fit beside the batch (840 frames, the challenge's), and the share of the
# remaining memory left untouched (allocator fragmentation, cuBLAS / cuDNN workspaces).
_PROBE_FRAMES = 8
_TYPICAL_CASE_FRAMES = 840
_MEMORY_HEADROOM = 0.15

Features = list[torch.Tensor]  # the decoder's inputs from the encoder: four (B, width, g, g) token maps


class Network:
    """A loaded FetalCLIPSEG (encoder, decoder, frame head) prepared for inference.

    The model is prepared in place: LoRA merged into the encoder (unless `merge_lora=False`), parameters
    frozen, moved to the device, cast as the precision plan says; on CUDA the batch size is chosen from the
    free memory, the parts are compiled if asked, and every shape a case uses is run once (warm-up).
    `device_warning` is the reason of a CPU fallback (`runtime.select_device`), recorded in `runtime`.
    """

    def __init__(self, model: torch.nn.Module, config: Config, device: torch.device | None = None,
                 device_warning: str | None = None):
        self.config = config
        inference = config.inference
        if device is None:
            choice = select_device(inference.device)
            device, device_warning = choice.device, device_warning or choice.fallback
        self.device = device
        try:
            self.precision = choose_precision(inference.precision, device)
        except ValueError as error:
            raise DeviceError(str(error)) from None
        self.plan = PrecisionPlan.of(self.precision, device)
        if inference.threads > 0:
            torch.set_num_threads(inference.threads)
        if inference.merge_lora and getattr(model.encoder, "has_lora", False):
            model.merge_lora()
        self.model = model.to(device).eval().requires_grad_(False)
        cuda = device.type == "cuda"
        if cuda:
            torch.backends.cudnn.benchmark = True
            self.model = self.model.to(memory_format=torch.channels_last)
        self.plan.prepare(self.model.encoder)
        self.pad_batches = cuda  # one shape per network part
        # The batch plan measures the plain modules (a compiled one would compile the probe's shape too).
        self._encoder, self._decoder = self.model.encoder, self.model.decoder
        self.batch_size, self.waiting_limit, self.memory = self._batch_plan()
        if inference.compile:
            self._encoder = torch.compile(self._encoder, dynamic=False)
            self._decoder = torch.compile(self._decoder, dynamic=False)
        if cuda:
            self.warm_up()
        self.runtime = {**describe_runtime(device, self.precision, device_warning), "batch_size": self.batch_size}

    # ------------------------------------------------------------------------------------------ the seam

    def preprocess(self, frames: np.ndarray | torch.Tensor) -> torch.Tensor:
        """(N, H, W) uint8 frames, or (N, 3, H, W) triplets for a temporal input (the search reads the rows
        `algorithm.preprocess.input_rows` names; host memory, pinned on CUDA) -> (N, 3, s, s) network input on
        the device."""
        inputs = preprocess_frames(frames, self.config.model.image_size, device=self.device)
        if self.device.type == "cuda":
            inputs = inputs.contiguous(memory_format=torch.channels_last)
        return inputs

    @torch.inference_mode()
    def encode(self, inputs: torch.Tensor) -> tuple[Features, torch.Tensor]:
        """Encoder + frame head: (decoder features, frame-head probabilities (N, 3) float32), on the device.

        The features are in the precision plan's feature type (the half type on CUDA)."""
        features, probabilities = self._encode(self._padded(inputs))
        return [f[:len(inputs)] for f in features], probabilities[:len(inputs)]

    @torch.inference_mode()
    def embed(self, inputs: torch.Tensor) -> tuple[Features, torch.Tensor]:
        """The encoder alone: (decoder features, image embedding); what a shared-encoder ensemble runs once
        before each member's `classify`."""
        features, embedding = self._embed(self._padded(inputs))
        return [f[:len(inputs)] for f in features], embedding[:len(inputs)]

    @torch.inference_mode()
    def classify(self, embedding: torch.Tensor) -> torch.Tensor:
        """The frame head alone: image embeddings -> frame-class probabilities (N, 3) float32."""
        return self._classify(embedding)

    @torch.inference_mode()
    def decode(self, inputs: torch.Tensor, features: Features) -> tuple[torch.Tensor, torch.Tensor]:
        """Mask decoder: (abdomen probability (N, s, s) float16, share of the input the mask covers (N,)), on
        the device. Runs in batches of the batch size on CUDA (the last padded), in chunks of
        `cpu_decoder_chunk` frames on the CPU."""
        size = self.batch_size if self.pad_batches else max(1, self.config.inference.cpu_decoder_chunk)
        parts = []
        for start in range(0, len(inputs), size):
            real = len(inputs[start:start + size])
            chunk = self._padded(inputs[start:start + size])
            maps = [self._padded(f[start:start + size]) for f in features]
            abdomen, fractions = self._decode(chunk, maps)
            parts.append((abdomen[:real], fractions[:real]))
        if len(parts) == 1:
            return parts[0]
        return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])

    def describe(self) -> dict:
        """The speed-relevant settings actually in force (for logs and the benchmark)."""
        return {"device": str(self.device), "precision": self.precision,
                "lora_merged": not getattr(self.model.encoder, "has_lora", False), "batch_size": self.batch_size,
                "padded_batches": self.pad_batches, "compile": self.config.inference.compile,
                "threads": torch.get_num_threads(), "runtime": self.runtime,
                **({"memory": self.memory} if self.memory else {})}

    # ------------------------------------------------------------------------------------------ set-up

    def _batch_plan(self) -> tuple[int, int, dict]:
        """(batch size, frames whose decode decision may wait before the host must decide, memory figures).

        Given batch sizes are kept. Auto on the CPU: `cpu_batch_size`, deciding after every batch. Auto on
        CUDA: a probe batch measures the activation memory per frame and the decoder inputs a waiting frame
        holds; the batch is the largest that fits beside the decoder inputs of a typical case, and as many
        frames may wait as half the memory left then holds (every frame of a case, on a T4 as on an H200).
        """
        inference = self.config.inference
        given = inference.batch_size if inference.batch_size > 0 else None
        if self.device.type != "cuda":
            batch = given or max(1, inference.cpu_batch_size)
            return batch, batch, {}
        probe = min(_PROBE_FRAMES, given or inference.max_batch_size)
        per_frame, stored = self._measure_frame_memory(probe)
        available = int(cuda_memory_available(self.device) * (1.0 - _MEMORY_HEADROOM))
        batch, waiting = cuda_batch_plan(available, per_frame, stored if inference.decodes_lazily else 0.0,
                                         _TYPICAL_CASE_FRAMES, given, inference.max_batch_size)
        memory = {"probe_frames": probe, "activation_mb_per_frame": round(per_frame / 2**20, 1),
                  "stored_mb_per_frame": round(stored / 2**20, 2), "available_gb": round(available / 2**30, 2),
                  "frames_waiting_at_most": waiting}
        return batch, waiting, memory

    @torch.inference_mode()
    def _measure_frame_memory(self, frames: int) -> tuple[float, float]:
        """CUDA bytes per frame of one forward pass (peak above what was allocated before), and bytes a frame
        waiting for its decode decision holds (network input + decoder features)."""
        torch.cuda.synchronize(self.device)
        before = torch.cuda.memory_allocated(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        inputs = self._blank(frames)
        features, _ = self._encode(inputs)
        self._decode(inputs, features)
        stored = sum(f[0].numel() * f.element_size() for f in features) + inputs[0].numel() * inputs.element_size()
        torch.cuda.synchronize(self.device)
        peak = torch.cuda.max_memory_allocated(self.device) - before
        return peak / frames, stored

    @torch.inference_mode()
    def warm_up(self) -> None:
        """Run every shape a case uses once (encoder and decoder at the batch size), so that cuDNN's autotuning
        and `torch.compile` happen at load rather than inside the first case."""
        inputs = self._blank(self.batch_size)
        features, _ = self._encode(inputs)
        self._decode(inputs, features)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _blank(self, frames: int) -> torch.Tensor:
        size = self.config.model.image_size
        inputs = torch.zeros(frames, 3, size, size, device=self.device)
        return inputs.contiguous(memory_format=torch.channels_last) if self.device.type == "cuda" else inputs

    # ------------------------------------------------------------------------------------------ one call

    def _padded(self, tensor: torch.Tensor) -> torch.Tensor:
        """`tensor` filled up to the batch size with repeats of its last frame (CUDA: one shape per part)."""
        missing = self.batch_size - len(tensor)
        if not self.pad_batches or missing <= 0 or not len(tensor):
            return tensor
        return torch.cat([tensor, *[tensor[-1:]] * missing])

    def _encode(self, inputs: torch.Tensor) -> tuple[Features, torch.Tensor]:
        features, embedding = self._embed(inputs)
        return features, self._classify(embedding)

    def _embed(self, inputs: torch.Tensor) -> tuple[Features, torch.Tensor]:
        """Encoder only: decoder features (feature type) and the image embedding."""
        with self.plan.autocast():
            features, embedding = self._encoder(inputs.to(self.plan.encoder_dtype))
            return [f.to(self.plan.feature_dtype) for f in features], embedding

    def _classify(self, embedding: torch.Tensor) -> torch.Tensor:
        """Frame head: image embedding -> frame-class probabilities (N, 3) float32."""
        with self.plan.autocast():
            logits = self.model.frame_head(embedding.float())
        return torch.softmax(logits.float(), dim=1)

    def _decode(self, inputs: torch.Tensor, features: Features) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, C, s, s) logits -> abdomen probability (B, s, s) float16 and mask fraction (B,), on device."""
        with self.plan.autocast():
            mask_logits = self._decoder(inputs, features)
        abdomen = 1.0 - torch.softmax(mask_logits.float(), dim=1)[:, 0]
        fractions = (abdomen >= self.config.inference.mask_threshold).float().mean(dim=(1, 2))
        return abdomen.half(), fractions


def load_network(weights: Path, config_overrides: dict | None = None) -> tuple[Network, dict]:
    """Load our checkpoint (one network, or an ensemble: algorithm.ensemble) and prepare it; returns the
    network and the checkpoint's description.

    The device is chosen first, so that `--device cuda` without a usable GPU fails before the weights are
    read; a CPU fallback while an NVIDIA GPU is visible is logged as a WARNING with its reason.
    """
    from .ensemble import EnsembleNetwork
    from .model.checkpoint import CheckpointError, load_checkpoint, read_checkpoint_info
    from .model.ensemble import load_ensemble

    choice = select_device((config_overrides or {}).get("device", "auto"))
    if choice.fallback:
        log.warning(choice.fallback)
    declared = read_checkpoint_info(weights)
    if declared.config.decoder == "none" or declared.config.frame_classes != 3:
        raise CheckpointError(f"{weights} holds a frame classifier (decoder {declared.config.decoder!r}, "
                              f"{declared.config.frame_classes} frame class(es)); the algorithm needs a mask "
                              "decoder and three frame classes")
    if declared.ensemble:
        models, info = load_ensemble(weights, device="cpu")
    else:
        model, info = load_checkpoint(weights, device="cpu")
        models = [model]
    # the dataclass's defaults < the checkpoint's own inference defaults < the command line
    config = Config(model=info.config).replace(**info.inference_defaults).replace(**(config_overrides or {}))
    members = [Network(model, config, choice.device, device_warning=choice.fallback) for model in models]
    network = members[0] if len(members) == 1 else EnsembleNetwork(members, info.ensemble.shared_encoder)
    described = {"weights": str(weights), "provenance": info.provenance, "version": info.version,
                 "input_frames": info.config.input_frames}
    if info.ensemble:
        described["ensemble"] = {"members": info.members, "shared_encoder": info.ensemble.shared_encoder}
    if info.inference_defaults:
        described["inference_defaults"] = info.inference_defaults
    return network, described
