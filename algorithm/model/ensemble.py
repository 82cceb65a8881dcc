"""Ensemble checkpoints: several FetalCLIPSEG networks in one `.safetensors` file, averaged at inference.

Two layouts, told apart by the members' encoders after LoRA merging:

* shared encoder: every member's encoder holds the same weights (`paper` mode's frozen FetalCLIP; the
  trials of one `reproduce` run differ only after it). The file holds that encoder once, and one decoder and
  one frame head per member: a frame costs one encoder pass and N decoder passes.
* whole members: encoders that trained (`fixed` mode) differ, so every member is a whole network and a
  frame costs N encoder passes.

Tensors are named `member{i}.<the single checkpoint's name>`; with a shared encoder only member 0 has
`encoder.*`. The header metadata is a single checkpoint's (algorithm.model.checkpoint) with format version 2
and `ensemble` = {"members": N, "shared_encoder": bool}. Members are stored with their LoRA merged
(`use_lora=False`) and must share one ModelConfig.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from safetensors.torch import load_file

from algorithm.config import ModelConfig
from algorithm.model.checkpoint import (FORMAT_VERSION, MAX_ENSEMBLE_MEMBERS, CheckpointError, CheckpointInfo,
                                        EnsembleLayout, check_finite, check_tensor_headers, checkpoint_metadata,
                                        expected_tensors, read_checkpoint_info, write_weights)
from algorithm.model.fetalclipseg import FetalCLIPSeg

ENCODER_PREFIX = "encoder."


def member_prefix(index: int) -> str:
    return f"member{index}."


def encoders_equal(members: Sequence[FetalCLIPSeg]) -> bool:
    """Whether every member's encoder holds exactly the same tensors (compare after `merge_lora()`: a LoRA
    that never trained still has its own random A matrices, while its B, and so its merged update, is zero)."""
    first = members[0].encoder.state_dict()
    for member in members[1:]:
        other = member.encoder.state_dict()
        if other.keys() != first.keys() or not all(torch.equal(first[k], other[k]) for k in first):
            return False
    return True


def ensemble_tensors(members: Sequence[FetalCLIPSeg], shared_encoder: bool) -> dict[str, torch.Tensor]:
    """The ensemble file's tensors: every member's state under its prefix, the encoder once when shared."""
    tensors = {}
    for index, member in enumerate(members):
        for name, tensor in member.state_dict().items():
            if shared_encoder and index > 0 and name.startswith(ENCODER_PREFIX):
                continue
            tensors[member_prefix(index) + name] = tensor
    return tensors


def expected_ensemble_tensors(config: ModelConfig, layout: EnsembleLayout) -> dict[str, tuple]:
    """Name -> (shape, dtype) of every tensor an ensemble of `layout` over `config` holds (meta device)."""
    single = expected_tensors(config)
    return {member_prefix(index) + name: spec for index in range(layout.members) for name, spec in single.items()
            if not (layout.shared_encoder and index > 0 and name.startswith(ENCODER_PREFIX))}


def save_ensemble(path: str | Path, members: Sequence[FetalCLIPSeg], provenance: str,
                  extra: Mapping[str, Any] | None = None, preprocessing: Mapping[str, Any] | None = None,
                  shared_encoder: bool | None = None) -> EnsembleLayout:
    """Write `members` (LoRA merged, one ModelConfig) as one ensemble checkpoint, atomically.

    `shared_encoder=None` stores the encoder once exactly when every member's is the same; True insists on
    it (ValueError when they differ). Returns the layout written."""
    if not 2 <= len(members) <= MAX_ENSEMBLE_MEMBERS:
        raise ValueError(f"an ensemble has 2 to {MAX_ENSEMBLE_MEMBERS} members, got {len(members)}")
    if len({id(member) for member in members}) != len(members):
        raise ValueError("a member is given twice")
    config = members[0].config
    if config.use_lora:
        raise ValueError("merge the members' LoRA first (FetalCLIPSeg.merge_lora)")
    if any(member.config != config for member in members):
        raise ValueError("the members of an ensemble must have one architecture (ModelConfig)")
    same = encoders_equal(members)
    if shared_encoder and not same:
        raise ValueError("the members' encoders differ, so they cannot share one")
    layout = EnsembleLayout(len(members), same if shared_encoder is None else bool(shared_encoder))
    metadata = checkpoint_metadata(config, provenance, extra, preprocessing, format_version=FORMAT_VERSION)
    metadata["ensemble"] = layout.to_json()
    write_weights(Path(path), ensemble_tensors(members, layout.shared_encoder), metadata)
    return layout


def load_ensemble(path: str | Path, device: str | torch.device = "cpu") -> tuple[list[FetalCLIPSeg], CheckpointInfo]:
    """The members of an ensemble checkpoint, in eval mode; with a shared encoder they hold one encoder module.

    Checked as a single checkpoint is: metadata, then every tensor's name, shape and dtype in the header
    against what the layout and config build, then the values (finite)."""
    path = Path(path)
    info = read_checkpoint_info(path)
    if info.ensemble is None:
        raise CheckpointError(f"{path} holds one network, not an ensemble")
    layout, config = info.ensemble, info.config
    check_tensor_headers(path, config, expected_ensemble_tensors(config, layout))
    try:
        state = load_file(str(path), device="cpu")
    except Exception as exc:
        raise CheckpointError(f"{path}: cannot read weights: {exc}") from exc
    check_finite(path, state)
    members: list[FetalCLIPSeg] = []
    for index in range(layout.members):
        prefix = member_prefix(index)
        own = {name[len(prefix):]: tensor for name, tensor in state.items() if name.startswith(prefix)}
        shared = members[0].encoder if layout.shared_encoder and members else None
        member = FetalCLIPSeg(config, encoder=shared)
        if shared is not None:
            own.update({ENCODER_PREFIX + name: tensor for name, tensor in shared.state_dict().items()})
        member.load_state_dict(own, strict=True)
        members.append(member.to(device).eval())
    return members, info
