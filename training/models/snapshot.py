"""Training snapshots (`last.pt`, `best.pt`): only what trains, read without unpickling code.

A snapshot holds the tensors that training changes (LoRA adapters, decoder, heads, and every buffer such
as BatchNorm statistics), the optimiser, scheduler and gradient-scaler state, the RNG states and the loop's
bookkeeping. The frozen encoder is not in it: it is rebuilt from the FetalCLIP file (hundreds of MB per
epoch saved). Everything stored is a tensor or a plain Python value, so `torch.load(weights_only=True)`
reads it; a file that needs anything else (a pickle that would run code) is refused with `SnapshotError`.
"""
from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
from torch import nn

from training.cli import UsageError


class SnapshotError(UsageError):
    """A snapshot or `--init` file that cannot be read safely or does not fit the model."""


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The part of `model.state_dict()` that training can change: trainable parameters and all buffers."""
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    buffers = {name for name, _ in model.named_buffers()}
    return {k: v.detach().to("cpu").clone() for k, v in model.state_dict().items() if k in trainable | buffers}


def load_trainable_state(model: nn.Module, state: Mapping[str, torch.Tensor], source: Path | str) -> None:
    """Load a `trainable_state` into `model`: every key must exist with its shape, and every trainable
    parameter of `model` must be present (so a snapshot of another mode or size is refused)."""
    own = model.state_dict()
    unknown = sorted(k for k in state if k not in own)
    wrong = sorted(k for k in state if k in own and tuple(own[k].shape) != tuple(state[k].shape))
    missing = sorted(name for name, p in model.named_parameters() if p.requires_grad and name not in state)
    if unknown or wrong or missing:
        def show(keys: list[str]) -> str:
            return ", ".join(keys[:4]) + (f" ... (+{len(keys) - 4})" if len(keys) > 4 else "")
        problems = [f"{what}: {show(keys)}" for what, keys in
                    (("unknown", unknown), ("shape mismatch", wrong), ("missing", missing)) if keys]
        raise SnapshotError(f"{source} does not fit this model ({'; '.join(problems)})")
    model.load_state_dict(dict(state), strict=False)


def save_snapshot(payload: Mapping[str, Any], path: Path) -> None:
    """torch.save to a temporary name, then rename: a crash leaves the previous file, never half of one."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(dict(payload), tmp)
    os.replace(tmp, path)


def read_snapshot(path: Path | str, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """`torch.load(weights_only=True)`: tensors and plain values only; anything else is a SnapshotError."""
    path = Path(path)
    if not path.is_file():
        raise SnapshotError(f"snapshot not found: {path}")
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # pickle.UnpicklingError for forbidden globals, RuntimeError/EOFError for damage
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise SnapshotError(f"refusing {path}: not a plain tensor file that loads with weights_only=True "
                            f"(it would need unpickling arbitrary objects, or it is damaged): {first}") from None
    if not isinstance(obj, dict):
        raise SnapshotError(f"{path} holds a {type(obj).__name__}, not a training snapshot")
    return obj


# ------------------------------------------------------------------------------------------ RNG states

def rng_state() -> dict[str, Any]:
    """The RNG states of python, numpy and torch in weights_only-loadable form (tensors and plain values)."""
    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": [version, list(internal), gauss],
        "numpy": {"name": name, "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
