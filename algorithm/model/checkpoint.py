"""Our fine-tuned checkpoint: one `.safetensors` file, weights plus everything needed to rebuild and use them.

The safetensors header metadata (str -> str) carries the ModelConfig (JSON), the preprocessing the weights
expect, a free-text provenance, the algorithm version that wrote it and a format version. Reading it never
executes pickled code.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import tempfile
from dataclasses import dataclass, field
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Any, Mapping

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from algorithm import __version__
from algorithm.config import CHECKPOINT_INFERENCE_CHOICES, CLIP_MEAN, CLIP_STD, INPUT_FRAMES, ModelConfig
from algorithm.errors import WeightsError
from algorithm.model.fetalclipseg import FetalCLIPSeg, build_model

FORMAT_NAME = "fetalclipseg"
# 1: one network. 2: an ensemble of networks (algorithm.model.ensemble); single checkpoints stay at 1, so
# that older code still reads them.
SINGLE_FORMAT_VERSION = 1
FORMAT_VERSION = 2
MAX_ENSEMBLE_MEMBERS = 16

# What a checkpoint may declare. Generous around FetalCLIP's ViT-L/14 and the small configuration, and bounded
# so that a file cannot ask for an absurd network; the decoder takes exactly four skip layers. Frame heads have
# three classes (what the algorithm's selection reads) or one (training's binary classifiers).
INT_RANGES: dict[str, tuple[int, int]] = {
    "image_size": (28, 1024), "patch_size": (2, 64), "width": (8, 4096), "layers": (1, 64), "heads": (1, 128),
    "embed_dim": (8, 4096), "decoder_filters": (1, 512), "mask_classes": (2, 16), "frame_classes": (1, 3),
    "lora_rank": (1, 512), "lora_alpha": (1, 4096),
}
FLOAT_RANGES: dict[str, tuple[float, float]] = {"mlp_ratio": (0.25, 16.0), "lora_dropout": (0.0, 0.9)}
BOOL_FIELDS = ("use_lora", "encoder_no_grad")
CHOICES: dict[str, tuple[str, ...]] = {"decoder": ("unetr", "separable", "none"),
                                       "frame_head": ("norm-linear", "linear"),
                                       "input_frames": INPUT_FRAMES}
FRAME_CLASSES = (1, 3)
SKIP_LAYER_COUNT = 4
MAX_NAME_LENGTH = 200
MODULE_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}")


# Weights carry the terms of what they were made from; the code's Apache-2.0 licence does not reach them.
FETALCLIP_TERMS = "the FetalCLIP weights (CC BY-NC 4.0)"
CHALLENGE_DATA_TERMS = "the ACOUSLIC-AI data (CC BY-NC-SA 4.0)"


def inherited_terms(fetalclip: bool, challenge_data: bool) -> str:
    """The provenance clause naming the non-commercial terms that weights made from FetalCLIP's weights or the
    challenge's data inherit ("" when made from neither); see the README, Licences."""
    sources = [terms for used, terms in ((fetalclip, FETALCLIP_TERMS), (challenge_data, CHALLENGE_DATA_TERMS))
               if used]
    if not sources:
        return ""
    return f"non-commercial use only: made from {' and '.join(sources)}, whose terms these weights inherit"


class CheckpointError(WeightsError):
    """A checkpoint file that is missing, unreadable, not one of ours, or whose contents cannot be trusted."""


@dataclass(frozen=True)
class EnsembleLayout:
    """How an ensemble checkpoint's members are stored: `shared_encoder` means one encoder for all of them
    (a frame costs one encoder pass and `members` decoder passes), otherwise every member is whole."""
    members: int
    shared_encoder: bool

    @classmethod
    def parse(cls, text: str) -> "EnsembleLayout":
        data = json.loads(text)
        if not isinstance(data, dict) or set(data) != {"members", "shared_encoder"}:
            raise ValueError("ensemble must be a JSON object with exactly members and shared_encoder")
        members, shared = data["members"], data["shared_encoder"]
        if type(members) is not int or not 2 <= members <= MAX_ENSEMBLE_MEMBERS:
            raise ValueError(f"ensemble.members must be an integer in [2, {MAX_ENSEMBLE_MEMBERS}], got {members!r}")
        if type(shared) is not bool:
            raise ValueError(f"ensemble.shared_encoder must be true or false, got {shared!r}")
        return cls(members, shared)

    def to_json(self) -> str:
        return json.dumps({"members": self.members, "shared_encoder": self.shared_encoder}, sort_keys=True)


@dataclass(frozen=True)
class CheckpointInfo:
    config: ModelConfig
    provenance: str
    version: str  # algorithm version that wrote the file
    format_version: int = SINGLE_FORMAT_VERSION
    preprocessing: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
    ensemble: EnsembleLayout | None = None  # None: one network

    @property
    def members(self) -> int:
        return self.ensemble.members if self.ensemble else 1

    @property
    def inference_defaults(self) -> dict[str, str]:
        """The inference settings this checkpoint carries (extra["inference"]); validated when it was read."""
        return dict(self.extra.get("inference") or {})


def check_inference_defaults(value: object) -> dict[str, str]:
    """extra["inference"]: a JSON object of CHECKPOINT_INFERENCE_CHOICES keys and their allowed values."""
    if not isinstance(value, dict):
        raise ValueError(f"extra.inference must be a JSON object, got {type(value).__name__}")
    for key, setting in value.items():
        allowed = CHECKPOINT_INFERENCE_CHOICES.get(key)
        if allowed is None:
            raise ValueError(f"extra.inference.{key} is not a setting a checkpoint may carry "
                             f"({', '.join(CHECKPOINT_INFERENCE_CHOICES)})")
        if setting not in allowed:
            raise ValueError(f"extra.inference.{key} = {setting!r}: expected one of {', '.join(allowed)}")
    return dict(value)


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
    return write_weights(path, model.state_dict(), checkpoint_metadata(config, provenance, extra, preprocessing))


def checkpoint_metadata(config: ModelConfig, provenance: str, extra: Mapping[str, Any] | None = None,
                        preprocessing: Mapping[str, Any] | None = None,
                        format_version: int = SINGLE_FORMAT_VERSION) -> dict[str, str]:
    """The safetensors header metadata every checkpoint of ours carries (str -> str)."""
    return {
        "format": FORMAT_NAME,
        "format_version": str(format_version),
        "algorithm_version": __version__,
        "provenance": provenance,
        "model_config": json.dumps(config.to_dict(), sort_keys=True),
        "preprocessing": json.dumps(dict(preprocessing or default_preprocessing(config)), sort_keys=True),
        "extra": json.dumps(dict(extra or {}), sort_keys=True),
        # state-dict key names come from open_clip and peft: recorded to diagnose a future key mismatch
        "libraries": json.dumps(_library_versions(), sort_keys=True),
    }


def write_weights(path: Path, state: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> Path:
    """Tensors + metadata to `path` atomically (a temp file in the same folder, fsync, rename)."""
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file(tensors, tmp_name, metadata=dict(metadata))
        with open(tmp_name, "rb") as fh:
            os.fsync(fh.fileno())
        # mkstemp makes the file 0600; a container running as another user must still read it
        os.chmod(tmp_name, 0o644)
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    return path


def validate_model_config(data: object) -> ModelConfig:
    """The ModelConfig a checkpoint declares, after checking every field's type and range (ValueError if not).

    JSON has no tuples and bool is an int in Python, so types are checked here rather than trusted to the
    dataclass; a field left out takes its default (older files), an unknown one is ignored (newer files).
    """
    if not isinstance(data, dict):
        raise ValueError(f"model_config must be a JSON object, got {type(data).__name__}")
    known = {f.name for f in dataclasses.fields(ModelConfig)}
    values = {k: v for k, v in data.items() if k in known}
    problems = []
    for name, (low, high) in INT_RANGES.items():
        value = values.get(name, low)
        if type(value) is not int or not low <= value <= high:
            problems.append(f"{name}={str(value)[:40]!r} (an integer in [{low}, {high}])")
    for name, (low, high) in FLOAT_RANGES.items():
        value = values.get(name, low)
        if type(value) not in (int, float) or not math.isfinite(value) or not low <= value <= high:
            problems.append(f"{name}={str(value)[:40]!r} (a number in [{low}, {high}])")
    for name in BOOL_FIELDS:
        if name in values and type(values[name]) is not bool:
            problems.append(f"{name}={values[name]!r} (true or false)")
    for name, allowed in CHOICES.items():
        if name in values and values[name] not in allowed:
            problems.append(f"{name}={str(values[name])[:40]!r} (one of {', '.join(allowed)})")
    if values.get("frame_classes", 3) not in FRAME_CLASSES:
        problems.append(f"frame_classes={values['frame_classes']!r} (1 or 3)")
    if "name" in values and (not isinstance(values["name"], str) or len(values["name"]) > MAX_NAME_LENGTH):
        problems.append(f"name={str(values['name'])[:40]!r} (a string of at most {MAX_NAME_LENGTH} characters)")
    targets = values.get("lora_targets", [])
    if "lora_targets" in values and (not isinstance(targets, list) or not 1 <= len(targets) <= 16 or not all(
            isinstance(t, str) and MODULE_NAME.fullmatch(t) for t in targets)):
        problems.append(f"lora_targets={str(targets)[:60]} (1 to 16 module names)")
    skips = values.get("skip_layers", [])
    if "skip_layers" in values and (not isinstance(skips, list) or len(skips) != SKIP_LAYER_COUNT or not all(
            type(i) is int for i in skips)):
        problems.append(f"skip_layers={str(skips)[:60]} ({SKIP_LAYER_COUNT} integers)")
    if problems:
        raise ValueError("invalid model_config: " + "; ".join(problems))
    config = ModelConfig.from_dict(values)
    if list(config.skip_layers) != sorted(set(config.skip_layers)) or not (
            1 <= config.skip_layers[0] and config.skip_layers[-1] <= config.layers):
        problems.append(f"skip_layers={list(config.skip_layers)} (increasing, within 1..layers={config.layers})")
    if config.width % config.heads:
        problems.append(f"width={config.width} is not divisible by heads={config.heads}")
    if config.image_size % config.patch_size:
        problems.append(f"image_size={config.image_size} is not a multiple of patch_size={config.patch_size}")
    if problems:
        raise ValueError("invalid model_config: " + "; ".join(problems))
    return config


def read_checkpoint_info(path: str | Path) -> CheckpointInfo:
    """The metadata of a checkpoint, validated, without reading its weights."""
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
        preprocessing, extra = json.loads(meta["preprocessing"]), json.loads(meta["extra"])
        if not isinstance(preprocessing, dict) or not isinstance(extra, dict):
            raise ValueError("preprocessing and extra must be JSON objects")
        if "inference" in extra:
            check_inference_defaults(extra["inference"])
        ensemble = EnsembleLayout.parse(meta["ensemble"]) if format_version >= 2 else None
        return CheckpointInfo(
            config=validate_model_config(json.loads(meta["model_config"])),
            provenance=meta["provenance"],
            version=meta["algorithm_version"],
            format_version=format_version,
            preprocessing=preprocessing,
            extra=extra,
            ensemble=ensemble,
        )
    except CheckpointError:
        raise
    except (KeyError, TypeError, ValueError, RecursionError) as exc:  # RecursionError: absurdly nested JSON
        raise CheckpointError(f"{path} has incomplete or invalid metadata: {str(exc)[:300]}") from None


def expected_tensors(config: ModelConfig) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Name -> (shape, dtype) of every tensor the network `config` describes, built on the meta device (no
    memory is allocated, so a huge declared config costs nothing before it is refused)."""
    with torch.device("meta"):
        model = build_model(config)
    return {name: (tuple(t.shape), t.dtype) for name, t in model.state_dict().items()}


_SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                       "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                       "U8": torch.uint8, "BOOL": torch.bool}


def check_tensor_headers(path: Path, config: ModelConfig,
                         expected: Mapping[str, tuple[tuple[int, ...], torch.dtype]] | None = None) -> None:
    """Names, shapes and dtypes in the file's header against what `config` builds (or `expected`, an
    ensemble's), before any weight is read."""
    try:
        expected = expected_tensors(config) if expected is None else expected
    except (ValueError, RuntimeError, TypeError) as exc:
        raise CheckpointError(f"{path}: its config cannot be built: {str(exc)[:300]}") from None
    with safe_open(str(path), framework="pt") as fh:
        found = {name: (tuple(fh.get_slice(name).get_shape()), fh.get_slice(name).get_dtype()) for name in fh.keys()}
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    if missing or unexpected:
        raise CheckpointError(f"{path}: weights do not match its config: missing {missing[:5]} ({len(missing)}), "
                              f"unexpected {unexpected[:5]} ({len(unexpected)})")
    wrong = []
    for name, (shape, dtype) in expected.items():
        file_shape, file_dtype = found[name]
        if file_shape != shape or _SAFETENSORS_DTYPES.get(file_dtype) != dtype:
            wrong.append(f"{name}: {file_dtype}{list(file_shape)}, expected {str(dtype).removeprefix('torch.')}"
                         f"{list(shape)}")
    if wrong:
        raise CheckpointError(f"{path}: weights do not match its config ({len(wrong)} tensors): " + "; ".join(wrong[:3]))


def check_finite(path: Path, state: Mapping[str, torch.Tensor]) -> None:
    """Every floating-point tensor must be finite: NaN weights give -1 on every case without a word."""
    bad = [name for name, tensor in state.items() if tensor.is_floating_point() and not torch.isfinite(tensor).all()]
    if bad:
        raise CheckpointError(f"{path}: {len(bad)} tensors hold NaN or infinite values (first: {bad[0]})")


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu",
                    merge_lora: bool = False) -> tuple[FetalCLIPSeg, CheckpointInfo]:
    """Rebuild the network a checkpoint describes, load its weights strictly, return it in eval mode.

    Checked in order, each before anything bigger is done: the metadata (config types and ranges), the
    tensor names, shapes and dtypes in the header against the config (before the network is allocated),
    then the values (finite). `merge_lora=True` folds the adapters into the encoder weights (inference:
    plain open_clip modules, no per-call weight merging); `info.config` stays the file's.
    """
    path = Path(path)
    info = read_checkpoint_info(path)
    if info.ensemble:
        raise CheckpointError(f"{path} is an ensemble of {info.members} networks; this reads one network "
                              "(algorithm.model.ensemble.load_ensemble reads ensembles)")
    check_tensor_headers(path, info.config)
    try:
        state = load_file(str(path), device="cpu")
    except Exception as exc:
        raise CheckpointError(f"{path}: cannot read weights: {exc}") from exc
    check_finite(path, state)
    model = build_model(info.config)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:  # cannot happen after check_tensor_headers unless the model code changed
        raise CheckpointError(f"{path}: weights do not match its config: {str(exc)[:300]}") from exc
    del state
    if merge_lora:
        model.merge_lora()
    return model.to(device).eval(), info


def write_inference_defaults(source: str | Path, out: str | Path, settings: Mapping[str, str],
                             clear: bool = False) -> dict[str, str]:
    """Copy the checkpoint `source` to `out` with `settings` among its inference defaults (extra["inference"];
    `clear` drops the ones it had first). The weights are read and written through the checks of
    `load_checkpoint` and `save_checkpoint` (an ensemble's through theirs). Returns the defaults `out`
    carries."""
    info = read_checkpoint_info(source)
    defaults = check_inference_defaults({**({} if clear else info.inference_defaults), **settings})
    extra = {key: value for key, value in info.extra.items() if key != "inference"}
    if defaults:
        extra["inference"] = defaults
    if info.ensemble:
        from algorithm.model.ensemble import load_ensemble, save_ensemble

        members, info = load_ensemble(source)
        save_ensemble(out, members, info.provenance, extra=extra, preprocessing=info.preprocessing)
        return defaults
    model, info = load_checkpoint(source, device="cpu")
    save_checkpoint(out, model, model.config, info.provenance, extra=extra, preprocessing=info.preprocessing)
    return defaults
