"""One configuration object for the whole data path.

`ModelConfig` describes the network (it is stored inside every checkpoint, so a checkpoint always rebuilds
the network it was trained with). `InferenceConfig` holds the run-time knobs of frame selection and
post-processing. `Config` bundles both and is what every stage receives; nothing reads globals.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

# CLIP / FetalCLIP image normalisation (open_clip's OPENAI_DATASET_MEAN / STD).
CLIP_MEAN: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)

# The challenge's sampling: 6 sweeps per stack, 0.28 mm square pixels. The spacing between frames is not
# documented for the release; the organisers' baseline writes its stacks with 0.28 mm on all three axes, and
# so does everything here that writes a stack (the algorithm itself only copies the input's spacing).
SWEEPS_PER_CASE = 6
PIXEL_SPACING_MM = 0.28
FRAME_SPACING_MM = 0.28
STACK_SPACING_MM = (PIXEL_SPACING_MM, PIXEL_SPACING_MM, FRAME_SPACING_MM)  # SimpleITK's (x, y, frame) order

# Frames whose mean grey level is below this are probe lift-off (the probe off the belly): never encoded.
LIFTOFF_MAX_MEAN = 2.0

# What the command line may ask for (`algorithm/options.py`; `runtime.py` applies them).
DEVICES = ("auto", "cpu", "cuda")
PRECISIONS = ("auto", "fp32", "fp16", "bf16")
# The leaderboard levers (docs/levers.md measures each): test-time augmentation on the frames that can be
# chosen, the rule that picks the frame, and how the AC ellipse is fitted.
TTA_MODES = ("auto", "none", "flip")
SELECTION_RULES = ("frame", "sweep")
AC_FITS = ("contour", "subpixel")
MASK_OUTPUTS = ("mask", "ellipse")
# The inference settings a checkpoint may carry as its own defaults (its metadata's extra["inference"]), so
# that an exported model runs with the levers it was measured with; the command line still overrides them.
CHECKPOINT_INFERENCE_CHOICES: dict[str, tuple[str, ...]] = {"tta": TTA_MODES, "selection": SELECTION_RULES,
                                                             "ac_fit": AC_FITS, "mask_output": MASK_OUTPUTS}

# What fills the network's three input channels (ModelConfig.input_frames): the frame's grey three times,
# or the frame and its neighbours in the sweep.
INPUT_FRAMES = ("single", "temporal")

# Frame-quality classes of the frame head and of the ground-truth labels (mask value 1 = optimal,
# 2 = suboptimal in the public release; the head orders them by quality instead).
FRAME_NONE, FRAME_SUBOPTIMAL, FRAME_OPTIMAL = 0, 1, 2
FRAME_CLASS_NAMES = ("none", "suboptimal", "optimal")


@dataclass(frozen=True)
class ModelConfig:
    """Architecture of FetalCLIPSEG: open_clip ViT encoder + LoRA + UNETR decoder + frame head.

    The default is FetalCLIP's visual tower (ViT-L/14 at 224 px). `small()` is the same architecture at
    toy width/depth, for tests and CPU demos.
    """

    name: str = "fetalclip-vit-l14"
    image_size: int = 224
    patch_size: int = 14
    width: int = 1024
    layers: int = 24
    heads: int = 16
    mlp_ratio: float = 4.0
    embed_dim: int = 768  # CLIP joint embedding size (the projection is kept only for checkpoint fidelity)
    # 1-based indices of the transformer blocks whose tokens feed the decoder (paper: 6, 8, 12, 24 of 24).
    skip_layers: tuple[int, ...] = (6, 8, 12, 24)
    # Mask decoder: "unetr" (ours: 3x3 convolutions, InstanceNorm), "separable" (the published FetalCLIPSEG
    # decoder: depthwise-separable blocks, BatchNorm) or "none" (a frame classifier without a mask).
    decoder: str = "unetr"
    decoder_filters: int = 32
    mask_classes: int = 2  # background, abdomen
    # Frame head on the image embedding: "norm-linear" (LayerNorm + linear) or "linear" (the published
    # FetalCLIPCLS head). 3 classes (none, suboptimal, optimal; softmax) or 1 (abdomen present; sigmoid).
    frame_head: str = "norm-linear"
    frame_classes: int = 3
    lora_rank: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.1
    # `attn` (the whole nn.MultiheadAttention) rather than `out_proj`: LoRA on out_proj alone is ignored
    # because MultiheadAttention reads out_proj.weight directly in its fused kernel.
    lora_targets: tuple[str, ...] = ("c_fc", "c_proj", "attn")
    use_lora: bool = True
    # The published FetalCLIPSEG code runs the encoder under torch.no_grad(), so its LoRA never trains.
    # True reproduces that (training mode `paper`); our weights use False.
    encoder_no_grad: bool = False
    # What fills the three input channels: "single" (the frame's grey in all three, the paper's) or
    # "temporal" (frames t-1, t, t+1 of its sweep; at a sweep's border the frame itself stands in). The
    # encoder's shape is the same either way. algorithm.preprocess.input_rows picks the frames.
    input_frames: str = "single"

    @classmethod
    def small(cls) -> "ModelConfig":
        """Same architecture, 4 layers of width 128: seconds per case on a CPU."""
        return cls(name="fetalclip-small", width=128, layers=4, heads=4, embed_dim=128,
                   skip_layers=(1, 2, 3, 4), decoder_filters=16)

    @property
    def grid_size(self) -> int:
        return self.image_size // self.patch_size

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ModelConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items() if k in known}
        return cls(**kwargs)


@dataclass(frozen=True)
class InferenceConfig:
    """Run-time settings of one case: batching, device, frame selection and mask post-processing."""

    device: str = "auto"  # auto | cpu | cuda | cuda:N
    # Number format of the network (algorithm/runtime.py's policy): auto = fp16 on GPUs without native bf16
    # (compute capability < 8.0, e.g. a T4), bf16 on newer GPUs and on CPUs with bf16 units, fp32 elsewhere.
    precision: str = "auto"  # auto | fp32 | fp16 | bf16
    # Frames per forward pass. 0 = auto: on CUDA the largest batch (at most `max_batch_size`) that the free
    # GPU memory holds, measured at load; `cpu_batch_size` on the CPU.
    batch_size: int = 0
    max_batch_size: int = 64
    cpu_batch_size: int = 32
    cpu_decoder_chunk: int = 8  # frames per decoder call on the CPU (bounds peak memory; see network.py)
    sweeps: int = SWEEPS_PER_CASE
    # A frame is a candidate when its predicted mask covers at least this fraction of the network input
    # (the paper's 1 % rule: 501 of 224 x 224 pixels).
    min_mask_fraction: float = 0.01
    # Moving-average window (frames) applied to per-frame scores inside each sweep.
    smoothing_window: int = 3
    # Minimum smoothed class probability for a frame to count as optimal / suboptimal.
    min_quality_probability: float = 0.5
    mask_threshold: float = 0.5
    # Coarse-to-fine search: encode every `coarse_stride`-th frame first, then refine around the best
    # candidates of each sweep. 1 = dense scan of every frame; 0 = auto: dense on CUDA, every
    # `cpu_coarse_stride`-th frame on the CPU for wide encoders (see algorithm/search.py).
    coarse_stride: int = 0
    cpu_coarse_stride: int = 8
    cpu_coarse_min_width: int = 512  # auto on the CPU: coarse search only for encoders this wide (ViT-B/L)
    refine_radius: int = 4
    refine_candidates: int = 2  # frames per sweep around which the coarse search refines
    liftoff_max_mean: float = LIFTOFF_MAX_MEAN
    # --- leaderboard levers (docs/levers.md: each measured on whole replica cases, paired, with its cost)
    # Test-time augmentation on the frames the mask decoder runs on (those that can be chosen): "flip" also
    # runs their horizontal mirror image and averages frame-head and abdomen probabilities. auto = flip on
    # CUDA (it raised the challenge score on whole replica cases, docs/levers.md, for a few seconds of a
    # T4), none on the CPU (the full model's minutes per case leave no room for it).
    tta: str = "auto"  # auto | none | flip
    # "frame": the best frame of the case (tier, then evidence); "sweep": the sweep with the most frames that
    # qualify first, then its best frame.
    selection: str = "frame"  # frame | sweep
    # "contour": the ellipse fitted to the pixel outline of the cleaned mask; "subpixel": to the 0.5
    # iso-line of the abdomen probability at frame resolution (algorithm/biometry.py).
    ac_fit: str = "contour"  # contour | subpixel
    # What the segmentation output holds on the chosen frame: the cleaned mask, or the fitted ellipse filled
    # (inside the FOV). The challenge measures its AC on the mask we write, so only this carries a sharper
    # fit to the leaderboard.
    mask_output: str = "mask"  # mask | ellipse
    # --- speed (measured by `python -m training speed`)
    merge_lora: bool = True  # fold LoRA into the encoder weights at load: plain fused kernels, same outputs
    # Run the mask decoder only on frames that can be chosen (smoothed P(abdomen) may reach
    # `min_quality_probability`); the frame choice is the same as decoding all. auto = on (on CUDA the
    # decisions are taken once per call, after every frame is encoded, so the GPU never waits on the host).
    lazy_decoder: str = "auto"  # auto | on | off
    threads: int = 0  # torch CPU threads; 0 = torch's default (one per physical core)
    compile: bool = False  # torch.compile the encoder and decoder (minutes of warm-up; GPU only pays off)
    prefetch: bool = True  # a background thread prepares the next batch (pinned memory on CUDA)

    @property
    def decodes_lazily(self) -> bool:
        """Whether the mask decoder runs only on frames that can be chosen (`lazy_decoder` auto or on)."""
        return self.lazy_decoder in ("auto", "on")


@dataclass(frozen=True)
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    inference: InferenceConfig = field(default_factory=InferenceConfig)

    def replace(self, **inference_overrides: Any) -> "Config":
        """A copy with some inference settings changed (the CLI's overrides)."""
        return dataclasses.replace(self, inference=dataclasses.replace(self.inference, **inference_overrides))
