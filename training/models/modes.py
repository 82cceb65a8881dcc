"""What each training mode is: the network it builds, the loss it trains, what it reproduces.

* `fixed`: our FetalCLIPSEG. LoRA (r 8, alpha 16, dropout 0.1) on `c_fc`, `c_proj` and the whole `attn`
  (peft's MultiheadAttention layer adapts in_proj and out_proj), gradients through the encoder, a three-class
  frame head (none / suboptimal / optimal) beside the mask; the weights we submit.
* `paper`: the published FetalCLIPSEG as published (github.com/donglihe-hub/FetalCLIP-IQA): the
  depthwise-separable UNETR decoder (`init_filters` 32, token maps of blocks 6, 8, 12, 24), LoRA on `c_fc`,
  `c_proj`, `out_proj`, the encoder under torch.no_grad (so the LoRA never trains: the published bug, kept
  so its effect can be seen), the published Dice loss (foreground only, zero on batches without abdomen)
  and the best epoch by that loss. We add a frame head on the image embedding so that the algorithm can run
  the model on whole cases; behind no_grad it cannot influence the decoder, which trains exactly as
  published.
* `paper-cls`: the published FetalCLIPCLS: the same LoRA (trained: no no_grad here; the `out_proj`
  adapters stay inert), one linear layer with one output on the image embedding, binary cross-entropy
  (abdomen plane on the frame or not). No mask.
* `probe`: the linear-probing ablation: `paper-cls` without LoRA, the encoder frozen.
* `baseline`: a generic backbone with the FetalCLIPCLS head (training.models.baselines).

Light on purpose (no torch): option parsers and reports read it; training.models.build builds the networks.
"""
from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from algorithm.config import INPUT_FRAMES, ModelConfig
from training.cli import UsageError

log = logging.getLogger("training")

MODES = ("fixed", "paper", "paper-cls", "probe", "baseline")
FETALCLIP_MODES = ("fixed", "paper", "paper-cls", "probe")
LEGACY_MODES = {"cls": "probe"}  # former names, still accepted wherever a mode is named

PAPER_LORA_TARGETS = ("c_fc", "c_proj", "out_proj")
FIXED_LORA_TARGETS = ("c_fc", "c_proj", "attn")
# The decoder of `fixed` (`--decoder separable` is the lighter alternative;
# docs/notes/training-replica-results.md compares them).
FIXED_DECODER = "unetr"


@dataclass(frozen=True)
class ModeSpec:
    name: str
    label: str  # row name in the reports
    reproduces: str
    segments: bool  # has a mask decoder: mask-rule metrics, whole-case challenge score
    mask_loss: str | None  # "dice" (ours: both classes, pooled over the batch) | "dice-fg" (published)
    frame_loss: str  # "ce" (three classes, class-weighted) | "bce" (abdomen present or not)
    select_on_mask: bool  # best epoch by the mask loss alone (the published model selection)
    paper_parameters: int | None  # trainable parameters the paper reports
    paper_metrics: dict[str, float | None] | None = None  # the paper's frame-level figures


SPECS: dict[str, ModeSpec] = {
    "fixed": ModeSpec("fixed", "FetalCLIPSEG (ours, fixed)",
                      "our corrected FetalCLIPSEG: LoRA that trains, a 3-class frame head", True, "dice", "ce",
                      False, None),
    "paper": ModeSpec("paper", "FetalCLIPSEG (published code)",
                      "the published FetalCLIPSEG, no_grad encoder included (its LoRA never trains)", True,
                      "dice-fg", "ce", True, 4_000_000,
                      {"f1": 0.771, "precision": 0.70, "recall": 0.86, "accuracy": None, "specificity": None}),
    "paper-cls": ModeSpec("paper-cls", "FetalCLIPCLS (published code)",
                          "the published FetalCLIPCLS: LoRA + one linear layer, binary cross-entropy", False,
                          None, "bce", False, 2_400_000,
                          {"f1": 0.757, "precision": 0.7782, "recall": 0.7397, "accuracy": 0.9575,
                           "specificity": None}),
    "probe": ModeSpec("probe", "FetalCLIP linear probe",
                      "the linear-probing ablation: FetalCLIPCLS without LoRA, frozen encoder", False, None, "bce",
                      False, None),
    "baseline": ModeSpec("baseline", "baseline", "a generic backbone with the FetalCLIPCLS head and loss", False,
                         None, "bce", False, None),
}


def canonical_mode(mode: str) -> str:
    """A mode's current name (a former one is mapped; anything else is returned as given)."""
    return LEGACY_MODES.get(mode, mode)


def mode_argument(name: str) -> str:
    """argparse type of a mode option: a former name is read as the current one, with a warning."""
    current = canonical_mode(name)
    if current != name:
        log.warning("mode %s is now called %s", name, current)
    return current


FORMER_NAMES = "; ".join(f"{old}: the former name of {new}" for old, new in LEGACY_MODES.items())


# How the patch embedding starts when the input is temporal. "pretrained": as FetalCLIP trained it on grey
# frames (three equal channels), and as frozen as the rest of the encoder; "centred": re-expressed so that
# frame t alone gives what the grey frame gave and the neighbours nothing, then trained
# (training.models.build.centre_temporal_stem).
TEMPORAL_STEMS = ("pretrained", "centred")
# The FetalCLIP modes whose encoder gets gradients (the others run it under no_grad or not at all).
ENCODER_TRAINING_MODES = ("fixed", "paper-cls")


@dataclass
class ModelOptions:
    """Which network a run trains and how it starts: the mode and the choices that shape its model.

    `training.params.TrainConfig` extends it, so a run's whole configuration is what `build.build_training_model`
    takes. The mode is stored under its current name.
    """

    mode: str = "fixed"  # MODES
    config: str = "full"  # full | small (ModelConfig / ModelConfig.small())
    fetalclip: Path | None = None  # published FetalCLIP weights (whole-CLIP checkpoint); None: random encoder
    train_encoder: bool = False  # fixed only: all encoder weights trainable, no LoRA
    decoder: str | None = None  # fixed only: unetr | separable (None: FIXED_DECODER)
    input_frames: str = "single"  # single | temporal (ModelConfig.input_frames): FetalCLIP modes
    temporal_stem: str = "pretrained"  # TEMPORAL_STEMS: how the patch embedding starts for the temporal input
    lora_rank: int = 8
    lora_alpha: int | None = None  # None: 2 x rank (16 at rank 8, the paper's)
    backbone: str | None = None  # baseline: a name of baselines.BASELINES, timm, or open_clip:ARCH[@TAG]
    pretrained: str | None = None  # baseline weights: a local file, "hub", or None (random: tests only)
    adapt: str | None = None  # baseline: lora | full | probe (None: as published)

    def __post_init__(self) -> None:
        self.mode = canonical_mode(self.mode)

    @property
    def spec(self) -> ModeSpec:
        return SPECS[self.mode]

    @property
    def alpha(self) -> int:
        """The LoRA alpha the model gets: `lora_alpha`, or 2 x rank."""
        return 2 * self.lora_rank if self.lora_alpha is None else self.lora_alpha

    def validate(self) -> None:
        if self.mode not in MODES:
            raise UsageError(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.config not in ("full", "small"):
            raise UsageError(f"config must be full or small, got {self.config!r}")
        if self.input_frames not in INPUT_FRAMES:
            raise UsageError(f"input frames must be one of {INPUT_FRAMES}, got {self.input_frames!r}")
        if self.mode == "baseline" and self.input_frames != "single":
            raise UsageError("--input-frames temporal applies to the FetalCLIP modes, not to mode baseline")
        if self.temporal_stem not in TEMPORAL_STEMS:
            raise UsageError(f"temporal stem must be one of {TEMPORAL_STEMS}, got {self.temporal_stem!r}")
        if self.temporal_stem == "centred" and self.input_frames != "temporal":
            raise UsageError("--temporal-stem centred applies to --input-frames temporal")
        if self.temporal_stem == "centred" and self.mode not in ENCODER_TRAINING_MODES:
            raise UsageError(f"--temporal-stem centred trains the patch embedding, which mode {self.mode} never "
                             f"trains (modes whose encoder trains: {', '.join(ENCODER_TRAINING_MODES)})")
        if self.mode == "baseline" and not self.backbone:
            raise UsageError("mode baseline needs a backbone (--backbone: a name of training.models.baselines."
                             "BASELINES or timm)")


def model_config_for(options: ModelOptions) -> ModelConfig:
    """The ModelConfig a FetalCLIP mode builds (stored in its checkpoints).

    `train_encoder` (every encoder weight trainable, no LoRA: for a randomly initialised small encoder)
    applies to `fixed` only; `decoder` overrides the decoder of `fixed`.
    """
    mode = options.mode
    base = ModelConfig.small() if options.config == "small" else ModelConfig()
    base = dataclasses.replace(base, input_frames=options.input_frames)
    lora = dict(lora_rank=options.lora_rank, lora_alpha=options.alpha)
    if mode == "fixed":
        return dataclasses.replace(base, **lora, use_lora=not options.train_encoder, lora_targets=FIXED_LORA_TARGETS,
                                   encoder_no_grad=False, decoder=options.decoder or FIXED_DECODER)
    if options.train_encoder:
        raise UsageError(f"--train-encoder applies to mode fixed, not {mode} (which reproduces a published set-up)")
    if options.decoder is not None:
        raise UsageError(f"--decoder applies to mode fixed; {mode} has its published architecture")
    if mode == "paper":
        return dataclasses.replace(base, **lora, use_lora=True, lora_targets=PAPER_LORA_TARGETS,
                                   encoder_no_grad=True, decoder="separable")
    classifier = dict(decoder="none", frame_head="linear", frame_classes=1)
    if mode == "paper-cls":
        return dataclasses.replace(base, **lora, **classifier, use_lora=True, lora_targets=PAPER_LORA_TARGETS,
                                   encoder_no_grad=False)
    if mode == "probe":
        return dataclasses.replace(base, **lora, **classifier, use_lora=False, encoder_no_grad=True)
    raise UsageError(f"mode must be one of {FETALCLIP_MODES}, got {mode!r}")


def format_parameters(n: int | float | None) -> str:
    if n is None:
        return "–"
    return f"{n / 1e6:.2f} M" if n >= 100_000 else f"{int(n):,}"


def parameters_table(counts: dict[str, dict[str, Any]]) -> str:
    """Markdown: per mode, trainable / effective beside the paper's figure. A key is a mode, or a baseline's
    run name (`baseline-NAME`, as `reproduce` names it)."""
    lines = ["| mode | reproduces | trainable | can change | paper |", "|---|---|---|---|---|"]
    for mode, c in counts.items():
        spec = SPECS["baseline" if mode.startswith("baseline-") else mode]
        lines.append(f"| {mode} | {spec.reproduces} | {format_parameters(c['trainable'])} "
                     f"| {format_parameters(c['effective'])} | {format_parameters(c['paper'])} |")
    return "\n".join(lines) + "\n"
