"""The paper's baselines: frame classifiers on generic backbones, built by name with timm or open_clip.

The published comparison (github.com/donglihe-hub/FetalCLIP-IQA) puts a linear layer with one output on the
pooled features of each backbone and trains it with binary cross-entropy (abdomen plane on the frame or
not), exactly like FetalCLIPCLS. Transformers are adapted with LoRA (r 8, alpha 16, dropout 0.1 on `proj`,
`fc1`, `fc2`, the base frozen); CNNs are fine-tuned whole (the published parameter counts, e.g. DenseNet
7.0 M and VGG 134 M, are their full sizes). `BASELINES` lists the published models under short names;
any other timm name, or `open_clip:ARCH[@TAG]` for an open_clip image tower, works too.

Weights: `pretrained` is a local file (timm or open_clip checkpoint, `.safetensors` or a `weights_only`
`.pth`), `"hub"` to download the published variant (needs internet), or None for random initialisation
(tests only). Input: the prepared CLIP-normalised 224 px frame is converted to the backbone's own
normalisation, and, like the published code's timm eval transform, zoomed by 1 / crop_pct and centre-cropped.
"""
from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import open_clip
import timm
import torch
import torch.nn.functional as F
from peft import LoraConfig, inject_adapter_in_model
from torch import nn

from algorithm.config import CLIP_MEAN, CLIP_STD
from algorithm.model.fetalclipseg import SegOutput
from training.cli import MissingInput, UsageError

log = logging.getLogger("training")

ADAPTATIONS = ("auto", "lora", "full", "probe")
TIMM_LORA_TARGETS = ("proj", "fc1", "fc2")  # the published targets for timm transformers
OPEN_CLIP_LORA_TARGETS = ("c_fc", "c_proj", "out_proj")  # as for FetalCLIPCLS (out_proj inert, see README)


@dataclass(frozen=True)
class Baseline:
    """A published baseline: the timm / open_clip name of the published variant and how it was adapted."""

    backbone: str
    adapt: str
    label: str
    paper: dict[str, float] | None = None  # published figures: parameters, accuracy, f1, precision, recall


# github.com/donglihe-hub/FetalCLIP-IQA main.py (names) and README (figures, mean of five runs).
BASELINES: dict[str, Baseline] = {
    "densenet": Baseline("densenet121", "full", "DenseNet-121",
                         {"parameters": 7.0e6, "accuracy": 0.9516, "f1": 0.7024, "precision": 0.7805, "recall": 0.6420}),
    "resnet": Baseline("resnet50", "full", "ResNet-50"),
    "mobilenet": Baseline("mobilenetv3_small_100", "full", "MobileNetV3-S"),
    "efficientnet": Baseline("efficientnet_b0", "full", "EfficientNet-B0",
                             {"parameters": 4.0e6, "accuracy": 0.9537, "f1": 0.7253, "precision": 0.7725,
                              "recall": 0.6855}),
    "vgg": Baseline("vgg16", "full", "VGG-16",
                    {"parameters": 134e6, "accuracy": 0.9510, "f1": 0.7084, "precision": 0.7580, "recall": 0.6671}),
    "vit_small": Baseline("vit_small_patch16_224.augreg_in21k_ft_in1k", "lora", "ViT-S/16"),
    "deit": Baseline("deit3_large_patch16_224.fb_in22k_ft_in1k", "lora", "DeiT3-L/16",
                     {"parameters": 2.4e6, "accuracy": 0.9554, "f1": 0.7466, "precision": 0.7619, "recall": 0.7363}),
    "cait": Baseline("cait_s24_224.fb_dist_in1k", "lora", "CaiT-S24"),
    "swin": Baseline("swin_large_patch4_window7_224.ms_in22k_ft_in1k", "lora", "Swin-L",
                     {"parameters": 1.7e6, "accuracy": 0.9565, "f1": 0.7429, "precision": 0.7864, "recall": 0.7113}),
    "clip_openai": Baseline("vit_large_patch14_clip_224.openai_ft_in12k_in1k", "lora", "CLIP ViT-L/14 (OpenAI)"),
    "clip_laion": Baseline("vit_large_patch14_clip_224.laion2b_ft_in12k_in1k", "lora", "CLIP ViT-L/14 (LAION-2B)"),
}


@dataclass(frozen=True)
class BaselineConfig:
    """What a baseline checkpoint needs to be rebuilt (stored in snapshots and the exported file)."""

    backbone: str  # timm name, or open_clip:ARCH[@TAG]
    adapt: str = "lora"
    lora_rank: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.1
    name: str = ""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def resolve(name: str) -> tuple[str, str | None]:
    """A short name of `BASELINES` or a backbone name -> (backbone, published adaptation or None)."""
    if name in BASELINES:
        return BASELINES[name].backbone, BASELINES[name].adapt
    return name, None


def _split_open_clip(backbone: str) -> tuple[str, str | None]:
    arch = backbone.removeprefix("open_clip:")
    arch, _, tag = arch.partition("@")
    return arch, tag or None


def _build_backbone(backbone: str, pretrained: str | Path | None) -> tuple[nn.Module, dict[str, Any], int]:
    """(module returning pooled features, its preprocessing {mean, std, size, crop_pct, interpolation}, dim)."""
    if backbone.startswith("open_clip:"):
        arch, tag = _split_open_clip(backbone)
        weights = None if pretrained is None else (tag if str(pretrained) == "hub" else str(pretrained))
        if str(pretrained) == "hub" and tag is None:
            raise UsageError(f"{backbone}: name the pretrained tag to download, e.g. open_clip:{arch}@openai")
        clip = open_clip.create_model(arch, pretrained=weights)
        visual = clip.visual
        size = visual.image_size if isinstance(visual.image_size, int) else visual.image_size[0]
        mean = getattr(visual, "image_mean", None) or CLIP_MEAN
        std = getattr(visual, "image_std", None) or CLIP_STD
        return visual, {"mean": tuple(mean), "std": tuple(std), "size": int(size), "crop_pct": 1.0,
                        "interpolation": "bicubic"}, int(visual.output_dim)

    if pretrained is None:
        model = timm.create_model(backbone, pretrained=False, num_classes=0)
    elif str(pretrained) == "hub":
        model = timm.create_model(backbone, pretrained=True, num_classes=0)
    else:
        path = Path(pretrained)
        if not path.is_file():
            raise MissingInput(f"baseline weights not found: {path}")
        # timm reads the file itself (safetensors, or torch.load with weights_only=True) and drops the classifier
        model = timm.create_model(backbone, pretrained=True, num_classes=0, pretrained_cfg_overlay={"file": str(path)})
    cfg = model.pretrained_cfg
    dim = getattr(model, "head_hidden_size", None) or model.num_features
    return model, {"mean": tuple(cfg.get("mean", CLIP_MEAN)), "std": tuple(cfg.get("std", CLIP_STD)),
                   "size": int(cfg.get("input_size", (3, 224, 224))[-1]), "crop_pct": float(cfg.get("crop_pct") or 1.0),
                   "interpolation": cfg.get("interpolation", "bicubic")}, int(dim)


def _lora_targets(backbone: str, model: nn.Module) -> tuple[str, ...]:
    targets = OPEN_CLIP_LORA_TARGETS if backbone.startswith("open_clip:") else TIMM_LORA_TARGETS
    names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    found = tuple(t for t in targets if t in names)
    if not found:
        raise UsageError(f"{backbone} has no module named {', '.join(targets)} for LoRA; use adapt 'full' or 'probe'")
    return found


class BaselineClassifier(nn.Module):
    """backbone -> pooled features -> linear layer -> one logit (abdomen plane present)."""

    def __init__(self, config: BaselineConfig, pretrained: str | Path | None = None):
        super().__init__()
        if config.adapt not in ADAPTATIONS:
            raise UsageError(f"adapt must be one of {ADAPTATIONS}, got {config.adapt!r}")
        self.encoder, self.preprocessing, dim = _build_backbone(config.backbone, pretrained)
        if config.adapt == "auto":  # as published: LoRA for transformers, full fine-tuning for CNNs
            transformer = config.backbone.startswith("open_clip:") or any(
                name.endswith("attn") for name, _ in self.encoder.named_modules())
            config = dataclasses.replace(config, adapt="lora" if transformer else "full")
        self.config = config
        self.frame_head = nn.Linear(dim, 1)
        for p in self.encoder.parameters():
            p.requires_grad = config.adapt == "full"
        if config.adapt == "lora":
            lora = LoraConfig(r=config.lora_rank, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                              target_modules=list(_lora_targets(config.backbone, self.encoder)), bias="none")
            inject_adapter_in_model(lora, self.encoder)
            for name, p in self.encoder.named_parameters():
                p.requires_grad = "lora_" in name
        self.register_buffer("_in_mean", torch.tensor(CLIP_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("_in_std", torch.tensor(CLIP_STD).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("_mean", torch.tensor(self.preprocessing["mean"]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("_std", torch.tensor(self.preprocessing["std"]).view(1, 3, 1, 1), persistent=False)

    def backbone_input(self, x: torch.Tensor) -> torch.Tensor:
        """CLIP-normalised frames -> the backbone's normalisation, size and centre crop."""
        x = (x * self._in_std + self._in_mean - self._mean) / self._std
        size, crop = self.preprocessing["size"], self.preprocessing["crop_pct"]
        scaled = int(size / crop) if crop < 1 else size
        if x.shape[-1] != scaled or x.shape[-2] != scaled:
            mode = "bicubic" if self.preprocessing["interpolation"] == "bicubic" else "bilinear"
            x = F.interpolate(x, size=(scaled, scaled), mode=mode, align_corners=False)
        if scaled != size:
            top = (scaled - size) // 2
            x = x[..., top:top + size, top:top + size]
        return x

    def forward(self, x: torch.Tensor) -> SegOutput:
        with torch.no_grad() if self.config.adapt == "probe" else torch.enable_grad():
            features = self.encoder(self.backbone_input(x))
        return SegOutput(None, self.frame_head(features))

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        if hasattr(self.encoder, "set_grad_checkpointing"):
            self.encoder.set_grad_checkpointing(enable)


def build_baseline(name: str, pretrained: str | Path | None, adapt: str | None = None, lora_rank: int = 8,
                   lora_alpha: int = 16) -> BaselineClassifier:
    """A short name of `BASELINES` or any timm / open_clip:ARCH[@TAG] name -> the classifier. `adapt` None:
    the published adaptation of a listed baseline, else LoRA for transformers and full fine-tuning for CNNs."""
    backbone, published = resolve(name)
    if pretrained is None:
        log.warning("baseline %s: random initialisation (no --pretrained file or 'hub')", name)
    config = BaselineConfig(backbone, adapt or published or "auto", lora_rank, lora_alpha, name=name)
    return BaselineClassifier(config, pretrained)
