"""Where the checkpoint comes from: an explicit path, grand-challenge's model mount, or the bundled file."""
from __future__ import annotations

from pathlib import Path

from .errors import WeightsError

MODEL_MOUNT = Path("/opt/ml/model")
BUNDLED = Path(__file__).resolve().parent / "weights"


def _checkpoints_in(folder: Path) -> list[Path]:
    try:
        return sorted(p for p in folder.rglob("*.safetensors") if p.is_file())
    except OSError:
        return []


def resolve_weights(explicit: Path | None = None, search: tuple[Path, ...] = (MODEL_MOUNT, BUNDLED)) -> Path:
    """The checkpoint to load. An explicit path must exist; otherwise the first folder of `search` that
    holds a `.safetensors` file wins (grand-challenge's mount before the bundled demo weights)."""
    if explicit is not None:
        explicit = Path(explicit)
        if explicit.is_dir():
            found = _checkpoints_in(explicit)
            if len(found) != 1:
                raise WeightsError(f"weights folder {explicit} holds {len(found)} .safetensors files; expected one")
            return found[0]
        if not explicit.is_file():
            raise WeightsError(f"weights file {explicit} does not exist")
        return explicit
    for folder in search:
        found = _checkpoints_in(folder)
        if len(found) > 1:
            raise WeightsError(f"{folder} holds {len(found)} .safetensors files ({', '.join(p.name for p in found)});"
                               " pass --weights to choose one")
        if found:
            return found[0]
    raise WeightsError("no weights found: looked in " + ", ".join(str(f) for f in search) +
                       "; pass --weights PATH")
