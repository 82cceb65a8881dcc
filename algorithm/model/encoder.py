"""FetalCLIP's image encoder: open_clip's ViT, FetalCLIP checkpoint loading, and LoRA through peft.

The encoder is open_clip's own `VisionTransformer`, built from the same config dict open_clip would use for
the whole FetalCLIP model, so the published checkpoint's `visual.*` keys load into it unchanged. The
decoder reads intermediate token maps through `forward_intermediates`; the frame head reads FetalCLIP's
image embedding (class token after `ln_post`, projected by `proj`: the vector FetalCLIP was trained to
align with text, and the one the FetalCLIPCLS head of the paper classifies).
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import torch
from torch import nn

from open_clip.model import _build_vision_tower
from open_clip.transformer import VisionTransformer

from algorithm.config import ModelConfig
from algorithm.errors import WeightsError

if TYPE_CHECKING:  # peft pulls in transformers (seconds): imported only where adapters are built
    from peft import LoraConfig

# FetalCLIP_config.json as published with the weights (github.com/BioMedIA-MBZUAI/FetalCLIP): the whole
# CLIP model (the checkpoint holds both towers). open_clip fills the rest with its defaults: 16 heads
# (head_width 64), mlp_ratio 4, nn.GELU (no quick_gelu), class-token pooling.
FETALCLIP_CONFIG: dict[str, Any] = {
    "embed_dim": 768,
    "vision_cfg": {"image_size": 224, "layers": 24, "width": 1024, "patch_size": 14},
    "text_cfg": {"context_length": 117, "vocab_size": 49408, "width": 768, "heads": 12, "layers": 12},
}

# open_clip's defaults, left out of derived configs so the full config reproduces FETALCLIP_CONFIG exactly.
_OPEN_CLIP_HEAD_WIDTH = 64
_OPEN_CLIP_MLP_RATIO = 4.0


class EncoderOutput(NamedTuple):
    features: list[torch.Tensor]  # one (B, width, grid, grid) map per ModelConfig.skip_layers entry
    embedding: torch.Tensor  # (B, embed_dim) FetalCLIP image embedding


def clip_config(config: ModelConfig) -> dict[str, Any]:
    """open_clip CLIP config dict (both towers) for `config`.

    The text tower follows one rule (width = embed_dim, 64-wide heads, half the vision depth) that gives
    FetalCLIP's published text tower for the default config and a proportionally small one for `small()`.
    """
    vision: dict[str, Any] = {
        "image_size": config.image_size,
        "layers": config.layers,
        "width": config.width,
        "patch_size": config.patch_size,
    }
    if config.width % config.heads:
        raise ValueError(f"width {config.width} is not divisible by heads {config.heads}")
    if config.width // config.heads != _OPEN_CLIP_HEAD_WIDTH:
        vision["head_width"] = config.width // config.heads
    if config.mlp_ratio != _OPEN_CLIP_MLP_RATIO:
        vision["mlp_ratio"] = config.mlp_ratio
    text = {
        "context_length": FETALCLIP_CONFIG["text_cfg"]["context_length"],
        "vocab_size": FETALCLIP_CONFIG["text_cfg"]["vocab_size"],
        "width": config.embed_dim,
        "heads": max(1, config.embed_dim // _OPEN_CLIP_HEAD_WIDTH),
        "layers": max(1, config.layers // 2),
    }
    return {"embed_dim": config.embed_dim, "vision_cfg": vision, "text_cfg": text}


def build_visual(config: ModelConfig) -> VisionTransformer:
    """The visual tower exactly as `open_clip.model.CLIP(**clip_config(config)).visual` builds it."""
    cfg = clip_config(config)
    return _build_vision_tower(cfg["embed_dim"], copy.deepcopy(cfg["vision_cfg"]))


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise WeightsError(f"FetalCLIP weights not found: {path}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            obj: Any = load_file(str(path), device="cpu")
        else:
            # Never unpickle: weights_only=True reads tensors and plain containers and refuses code.
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises UnpicklingError, RuntimeError, EOFError... for bad files
        raise WeightsError(f"cannot read FetalCLIP weights {path} (read with weights_only=True, which "
                           f"refuses pickled objects other than tensors and plain containers): {exc}") from exc
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise WeightsError(f"{path} holds neither a state dict nor a dict with a 'state_dict' entry")
    return {k.removeprefix("module."): v for k, v in obj.items()}


def load_fetalclip_visual(visual: VisionTransformer, path: str | Path) -> None:
    """Load the `visual.*` part of a whole-CLIP FetalCLIP checkpoint into `visual`, strictly.

    Accepts `{'state_dict': sd}` (DDP's `module.` prefix allowed) or a plain state dict, as `.pt` or
    `.safetensors`; also an exported FetalCLIPSEG model of the same configuration (`encoder.visual.*`,
    LoRA merged), so one run's encoder can be the starting point of another. Every visual key must match
    in name and shape; anything else raises `WeightsError` naming the file. Call before injecting LoRA
    (adapters rename the wrapped weights).
    """
    path = Path(path)
    state = _read_state_dict(path)
    prefix = "visual." if any(k.startswith("visual.") for k in state) else "encoder.visual."
    visual_state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    if not visual_state:
        raise WeightsError(f"{path} has no 'visual.*' keys: neither a whole-CLIP FetalCLIP checkpoint nor an "
                           "exported FetalCLIPSEG model")
    expected = visual.state_dict()
    missing = sorted(set(expected) - set(visual_state))
    unexpected = sorted(set(visual_state) - set(expected))
    wrong_shape = sorted(k for k in set(expected) & set(visual_state) if expected[k].shape != visual_state[k].shape)
    if missing or unexpected or wrong_shape:
        def show(keys: list[str]) -> str:
            return ", ".join(keys[:8]) + (f" ... (+{len(keys) - 8})" if len(keys) > 8 else "")
        problems = [f"{name}: {show(keys)}" for name, keys in
                    (("missing", missing), ("unexpected", unexpected), ("shape mismatch", wrong_shape)) if keys]
        raise WeightsError(f"FetalCLIP weights {path} do not fit the visual tower; " + "; ".join(problems))
    visual.load_state_dict(visual_state, strict=True)


def lora_config(config: ModelConfig, targets: tuple[str, ...] | None = None) -> LoraConfig:
    """peft LoraConfig from the model config (`targets` overrides `lora_targets`, e.g. for tests)."""
    from peft import LoraConfig

    return LoraConfig(r=config.lora_rank, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                      target_modules=list(targets or config.lora_targets), bias="none")


def inject_lora(module: nn.Module, config: ModelConfig, targets: tuple[str, ...] | None = None) -> nn.Module:
    """Add LoRA adapters in place; the module stays a plain nn.Module with peft's key names.

    Targeting `attn` uses peft's nn.MultiheadAttention layer, which adapts both in_proj and out_proj by
    merging the low-rank update into the weights around each call. Targeting `out_proj` alone has no
    effect: MultiheadAttention hands `out_proj.weight` straight to its fused kernel and never calls the
    wrapper's forward.
    """
    from peft import inject_adapter_in_model

    return inject_adapter_in_model(lora_config(config, targets), module)


def _is_lora_layer(module: nn.Module) -> bool:
    from peft.tuners.lora import LoraLayer

    return isinstance(module, LoraLayer)


class FetalCLIPEncoder(nn.Module):
    """FetalCLIP's ViT returning the decoder's token maps and the frame head's embedding in one pass."""

    def __init__(self, config: ModelConfig, weights: str | Path | None = None):
        super().__init__()
        layers = list(config.skip_layers)
        if layers != sorted(set(layers)) or layers[0] < 1 or layers[-1] > config.layers:
            raise ValueError(f"skip_layers must be increasing 1-based block indices in 1..{config.layers}: {layers}")
        self.config = config
        self.visual = build_visual(config)
        if weights is not None:
            load_fetalclip_visual(self.visual, weights)
        self.has_lora = False
        if config.use_lora:
            inject_lora(self.visual, config)
            self.has_lora = True
            self.freeze_base()
        self._take = [i - 1 for i in layers]

    @property
    def width(self) -> int:
        return self.config.width

    def freeze_base(self) -> None:
        """Train only the adapters: every pretrained encoder weight stops taking gradients."""
        for name, p in self.visual.named_parameters():
            p.requires_grad = "lora_" in name

    def merge_lora(self) -> None:
        """Fold the adapters into the base weights and remove them (inference only, irreversible).

        Afterwards the encoder has plain open_clip keys, i.e. the `use_lora=False` architecture. It also
        avoids peft's per-call merge/unmerge of the attention weights, which costs a little time and leaves
        fp32 rounding residue in the base weights on every call.
        """
        if not self.has_lora:
            return
        names = [name for name, m in self.visual.named_modules()
                 if _is_lora_layer(m) and name.rsplit(".", 1)[-1] in self.config.lora_targets]
        for name in names:
            layer = self.visual.get_submodule(name)
            if isinstance(layer.get_base_layer(), nn.MultiheadAttention):
                base = layer.unload_and_optionally_merge_module(merge=True, safe_merge=False, adapter_names=None)
            else:
                layer.merge()
                base = layer.get_base_layer()
            parent, _, child = name.rpartition(".")
            setattr(self.visual.get_submodule(parent) if parent else self.visual, child, base)
        if any(_is_lora_layer(m) for m in self.visual.modules()):
            raise RuntimeError("LoRA layers left after merge_lora (unexpected lora_targets?)")
        self.has_lora = False

    def forward(self, x: torch.Tensor) -> EncoderOutput:
        if self.has_lora and torch.is_inference_mode_enabled():
            # peft re-registers the attention weights on every call; created under inference_mode they
            # would become inference tensors, and later in-place updates (load_state_dict, optimiser
            # steps) of the model's own parameters would fail. no_grad gives the same speed here.
            with torch.inference_mode(False), torch.no_grad():
                return self._forward(x)
        return self._forward(x)

    def _forward(self, x: torch.Tensor) -> EncoderOutput:
        out = self.visual.forward_intermediates(x, indices=self._take, output_fmt="NCHW")
        return EncoderOutput(out["image_intermediates"], out["image_features"])
