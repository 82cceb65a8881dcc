"""Training curves as a PNG (loss per epoch, train / validation, and validation F1 per epoch), and the one
way the dev side writes a figure.

Matplotlib with the Agg backend, so it works on headless training machines.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def plot_history(history: Sequence[dict[str, Any]], path: Path, title: str = "") -> Path:
    """One row per epoch of `history` (keys: epoch, train_loss, val_loss, val_f1_mask, val_f1_head)."""
    path = Path(path)
    epochs = [h["epoch"] + 1 for h in history]
    fig, (ax_loss, ax_f1) = plt.subplots(1, 2, figsize=(10, 4))
    ax_loss.plot(epochs, [h["train_loss"] for h in history], "o-", label="train")
    ax_loss.plot(epochs, [h["val_loss"] for h in history], "o-", label="validation")
    best = min(history, key=lambda h: h["val_loss"]) if history else None
    if best is not None:
        ax_loss.axvline(best["epoch"] + 1, color="grey", ls=":", label=f"best (epoch {best['epoch'] + 1})")
    ax_loss.set(xlabel="epoch", ylabel="loss", title="loss")
    ax_loss.legend()
    for key, label in (("val_f1_mask", "mask >= 1 % rule"), ("val_f1_head", "frame head")):
        values = [h.get(key) for h in history]
        if any(v is not None for v in values):
            ax_f1.plot(epochs, [float("nan") if v is None else v for v in values], "o-", label=label)
    ax_f1.set(xlabel="epoch", ylabel="F1", title="validation frame-level F1", ylim=(0, 1))
    ax_f1.legend()
    for ax in (ax_loss, ax_f1):
        ax.grid(alpha=0.3)
        ax.xaxis.get_major_locator().set_params(integer=True)
    if title:
        fig.suptitle(title)
    return save_figure(fig, path)


def save_figure(fig: "plt.Figure", path: Path, dpi: int = 100) -> Path:
    """Lay out, write `fig` as a PNG at `path` (parent folders made) and free it."""
    path = Path(path)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path
