"""Our fine-tuned checkpoint: one `.safetensors` file, weights plus everything needed to rebuild and use them.

The safetensors header metadata (str -> str) carries the ModelConfig (JSON), the preprocessing the weights
expect, a free-text provenance, the algorithm version that wrote it and a format version. Reading it never
executes pickled code.
"""
from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Any, Mapping

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from algorithm import __version__
from algorithm.config import CLIP_MEAN, CLIP_STD, ModelConfig
from algorithm.model.fetalclipseg import FetalCLIPSeg, build_model

FORMAT_NAME = "fetalclipseg"
FORMAT_VERSION = 1


class CheckpointError(ValueError):
    """A checkpoint file that is missing, unreadable, or not one of ours."""


@dataclass(frozen=True)
class CheckpointInfo:
    config: ModelConfig
    provenance: str
    version: str  # algorithm version that wrote the file
    format_version: int = FORMAT_VERSION
    preprocessing: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)


def default_preprocessing(config: ModelConfig) -> dict[str, Any]:
    """What the network input is: normalised RGB at image_size; callers should pass the exact recipe."""
    return {
        "image_size": config.image_size,
        "mean": list(CLIP_MEAN),
        "std": list(CLIP_STD),
        "channels": "grey frame replicated to 3 channels, scaled to [0, 1]",
        "padding": "zero-pad to square, then resize to image_size",
    }


def _library_versions() -> dict[str, str]:
    versions = {}
    for dist in ("torch", "open_clip_torch", "peft", "safetensors"):
        try:
            versions[dist] = importlib_metadata.version(dist)
        except importlib_metadata.PackageNotFoundError:
            versions[dist] = "absent"
    return versions


def save_checkpoint(path: str | Path, model: FetalCLIPSeg, config: ModelConfig, provenance: str,
                    extra: Mapping[str, Any] | None = None,
                    preprocessing: Mapping[str, Any] | None = None) -> Path:
    """Write `model` to `path` atomically (a temp file in the same folder, then rename). Returns `path`.

    `config` must be the model's own (after `merge_lora()` that is the use_lora=False variant); `extra`
    and `preprocessing` must be JSON-serialisable.
    """
    path = Path(path)
    if config != model.config:
        raise ValueError(f"config does not describe this model (model has {model.config}); not writing {path}")
    metadata = {
        "format": FORMAT_NAME,
        "format_version": str(FORMAT_VERSION),
        "algorithm_version": __version__,
        "provenance": provenance,
        "model_config": json.dumps(config.to_dict(), sort_keys=True),
        "preprocessing": json.dumps(dict(preprocessing or default_preprocessing(config)), sort_keys=True),
        "extra": json.dumps(dict(extra or {}), sort_keys=True),
        # state-dict key names come from open_clip and peft: recorded to diagnose a future key mismatch
        "libraries": json.dumps(_library_versions(), sort_keys=True),
    }
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file(tensors, tmp_name, metadata=metadata)
        with open(tmp_name, "rb") as fh:
            os.fsync(fh.fileno())
        # mkstemp makes the file 0600; a container running as another user must still read it
        os.chmod(tmp_name, 0o644)
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    return path


def read_checkpoint_info(path: str | Path) -> CheckpointInfo:
    """The metadata of a checkpoint, without reading its weights."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as fh:
            meta = fh.metadata() or {}
    except Exception as exc:  # safetensors raises its own SafetensorError, or OSError
        raise CheckpointError(f"{path} is not a readable safetensors file: {exc}") from exc
    if meta.get("format") != FORMAT_NAME:
        raise CheckpointError(f"{path} is not a {FORMAT_NAME} checkpoint (metadata format={meta.get('format')!r})")
    try:
        format_version = int(meta["format_version"])
        if format_version > FORMAT_VERSION:
            raise CheckpointError(f"{path} has format version {format_version}; this code reads up to {FORMAT_VERSION}")
        return CheckpointInfo(
            config=ModelConfig.from_dict(json.loads(meta["model_config"])),
            provenance=meta["provenance"],
            version=meta["algorithm_version"],
            format_version=format_version,
            preprocessing=json.loads(meta["preprocessing"]),
            extra=json.loads(meta["extra"]),
        )
    except CheckpointError:
        raise
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{path} has incomplete or invalid metadata: {exc!r}") from exc


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu",
                    merge_lora: bool = False) -> tuple[FetalCLIPSeg, CheckpointInfo]:
    """Rebuild the network a checkpoint describes, load its weights strictly, return it in eval mode.

    `merge_lora=True` folds the adapters into the encoder weights (inference: plain open_clip modules, no
    per-call weight merging); `info.config` stays the file's.
    """
    path = Path(path)
    info = read_checkpoint_info(path)
    try:
        state = load_file(str(path), device="cpu")
    except Exception as exc:
        raise CheckpointError(f"{path}: cannot read weights: {exc}") from exc
    model = build_model(info.config)
    try:
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # shape mismatches
        raise CheckpointError(f"{path}: weights do not match its config: {exc}") from exc
    if result.missing_keys or result.unexpected_keys:
        raise CheckpointError(f"{path}: weights do not match its config: missing {result.missing_keys[:5]}"
                              f" ({len(result.missing_keys)}), unexpected {result.unexpected_keys[:5]}"
                              f" ({len(result.unexpected_keys)})")
    if merge_lora:
        model.merge_lora()
    return model.to(device).eval(), info
