"""The paper's frame-level table on a prepared split: is the abdomen plane on this frame or not?

    python -m training evaluate-frames --prepared DIR --weights W [--split test] [--json F] [--markdown F]

Ground truth: a frame is positive when it is annotated (optimal or suboptimal plane). Two predictions are
scored from the same forward pass:

* mask rule (FetalCLIPSEG, the paper's rule): positive when the predicted abdomen (softmax >= 0.5, as at
  inference) covers at least 1 % of the 224 x 224 input (`InferenceConfig.min_mask_fraction`);
* head (FetalCLIPCLS view): positive when the frame head says abdomen: argmax suboptimal or optimal for
  a three-class head, sigmoid >= 0.5 for a one-output head.

Reported per rule: accuracy, F1, precision, recall, specificity (`training.scoring.metrics.frame_level_metrics`),
with the trainable parameter count of the model. `FrameStats` accumulates the losses and confusion counts
batch by batch, so a split never has to fit in memory, and sums across ranks under torch.distributed; with
`keep_frames` it also keeps every frame's mask fraction and P(abdomen) (gathered on rank 0), which the
threshold sweep (training.scoring.threshold_sweep) reads.
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm

from algorithm.config import FRAME_NONE, InferenceConfig
from algorithm.model.checkpoint import load_checkpoint
from algorithm.model.fetalclipseg import effective_parameters, trainable_parameters
from algorithm.runtime import autocast, choose_precision, resolve_device
from training.cli import CommandParser, existing_file, number, run_command
from training.data.dataset import FrameDataset, prepared_folder
from training.models.losses import DiceSums, LossWeights, dice_sums, frame_loss
from training.models.modes import SPECS, canonical_mode
from training.scoring.metrics import frame_level_metrics

# The paper's frame-level figures (He, Wang, Yaqub 2025, arXiv 2507.22802), for side-by-side tables.
PAPER_FRAME_TABLE: dict[str, dict[str, float | None]] = {
    f"{spec.label.split(' (')[0]} (paper)": dict(spec.paper_metrics, paper_parameters=spec.paper_parameters)
    for spec in SPECS.values() if spec.paper_metrics}
METRIC_COLUMNS = ("accuracy", "f1", "precision", "recall", "specificity")
FRAME_FIELDS = ("index", "mask_fraction", "p_abdomen", "label")


@dataclass
class FrameStats:
    """Running sums over a split: loss terms and the confusion counts of both frame rules."""

    classes: int = 2
    dice_i: torch.Tensor = field(default_factory=lambda: torch.zeros(2, dtype=torch.float64))
    dice_p: torch.Tensor = field(default_factory=lambda: torch.zeros(2, dtype=torch.float64))
    dice_t: torch.Tensor = field(default_factory=lambda: torch.zeros(2, dtype=torch.float64))
    # [mask_ce_sum, frames, frame_loss_weighted_sum, frame_weight_sum]
    sums: torch.Tensor = field(default_factory=lambda: torch.zeros(4, dtype=torch.float64))
    # rows: mask rule, head; columns: tp, fp, tn, fn
    confusion: torch.Tensor = field(default_factory=lambda: torch.zeros(2, 4, dtype=torch.float64))
    keep_frames: bool = False
    per_frame: list[np.ndarray] = field(default_factory=list)  # (B, 3): mask fraction, P(abdomen), label
    indices: list[int] = field(default_factory=list)  # dataset index of each kept frame, in order

    def add(self, mask_logits: torch.Tensor | None, frame_logits: torch.Tensor, mask: torch.Tensor,
            label: torch.Tensor, class_weights: torch.Tensor, min_fraction: float, threshold: float) -> None:
        frame_logits = frame_logits.float()
        gt = label != FRAME_NONE
        if frame_logits.shape[1] == 1:  # one output: abdomen plane present (FetalCLIPCLS)
            p_abdomen = torch.sigmoid(frame_logits[:, 0])
            loss, w = frame_loss(frame_logits, label, reduction="none"), torch.ones_like(p_abdomen)
            head = p_abdomen >= 0.5
        else:
            probs = torch.softmax(frame_logits, dim=1)
            p_abdomen = 1.0 - probs[:, FRAME_NONE]
            w = class_weights.to(frame_logits.device)[label]
            loss = frame_loss(frame_logits, label, reduction="none")
            head = probs.argmax(dim=1) != FRAME_NONE
        self.sums[2] += float((w * loss).sum())
        self.sums[3] += float(w.sum())
        self.sums[1] += len(label)
        self.confusion[1] += _confusion(head, gt)
        fraction = torch.full((len(label),), float("nan"), device=frame_logits.device)
        if mask_logits is not None:
            sums = dice_sums(mask_logits, mask)
            self.dice_i += sums.intersection.double().cpu()
            self.dice_p += sums.prediction.double().cpu()
            self.dice_t += sums.target.double().cpu()
            self.sums[0] += float(F.cross_entropy(mask_logits.float(), mask, reduction="sum")) / mask[0].numel()
            abdomen = 1.0 - torch.softmax(mask_logits.float(), dim=1)[:, 0]
            fraction = (abdomen >= threshold).float().mean(dim=(1, 2))
            self.confusion[0] += _confusion(fraction >= min_fraction, gt)
        if self.keep_frames:
            self.per_frame.append(torch.stack([fraction, p_abdomen, label.float()], 1).cpu().numpy())

    def all_reduce(self) -> None:
        """Sum every count over the ranks of the default process group (no-op without one)."""
        if not (dist.is_available() and dist.is_initialized()):
            return
        for name in ("dice_i", "dice_p", "dice_t", "sums", "confusion"):
            tensor = getattr(self, name)
            device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
            reduced = tensor.to(device)
            dist.all_reduce(reduced)
            setattr(self, name, reduced.cpu())

    def losses(self, weights: LossWeights = LossWeights(), use_mask: bool = True, mask_loss: str = "dice",
               select_on_mask: bool = False) -> dict[str, float]:
        """The split's loss terms; "loss" is what picks the best epoch (the mask loss alone for the
        published model selection, `select_on_mask`)."""
        frames = max(float(self.sums[1]), 1.0)
        frame = float(self.sums[2]) / max(float(self.sums[3]), 1e-12)
        out = {"frame_ce": frame}
        total = weights.frame * frame
        if use_mask:
            sums = DiceSums(self.dice_i, self.dice_p, self.dice_t)
            dice = float(sums.value(mask_loss))
            mask_ce = float(self.sums[0]) / frames
            out.update(dice=dice, mask_ce=mask_ce)
            mask_total = weights.mask_dice * dice + weights.mask_ce * mask_ce
            total = mask_total if select_on_mask else total + mask_total
        out["loss"] = total
        return out

    def metrics(self, rule: str) -> dict[str, float]:
        """frame_level_metrics of `rule` ("mask" or "head") from the accumulated counts."""
        tp, fp, tn, fn = (int(v) for v in self.confusion[0 if rule == "mask" else 1])
        pred = np.array([True] * tp + [True] * fp + [False] * tn + [False] * fn)
        gt = np.array([True] * tp + [False] * fp + [False] * tn + [True] * fn)
        return frame_level_metrics(pred, gt)

    def frames(self) -> dict[str, np.ndarray]:
        """This rank's kept frames as named arrays (FRAME_FIELDS)."""
        rows = np.concatenate(self.per_frame) if self.per_frame else np.zeros((0, 3), np.float32)
        return {"index": np.asarray(self.indices[:len(rows)], dtype=np.int64), "mask_fraction": rows[:, 0],
                "p_abdomen": rows[:, 1], "label": rows[:, 2].astype(np.int64)}


def _confusion(pred: torch.Tensor, gt: torch.Tensor) -> torch.Tensor:
    return torch.tensor([float((pred & gt).sum()), float((pred & ~gt).sum()), float((~pred & ~gt).sum()),
                         float((~pred & gt).sum())], dtype=torch.float64)


def merge_frames(parts: Sequence[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Kept frames of several ranks -> one set in dataset order (each frame once)."""
    merged = {key: np.concatenate([p[key] for p in parts]) for key in FRAME_FIELDS}
    _, first = np.unique(merged["index"], return_index=True)
    return {key: value[first] for key, value in merged.items()}


def save_frames(frames: dict[str, np.ndarray], path: Path) -> Path:
    """The per-frame record as .npz (named arrays; read it with np.load)."""
    np.savez(path, **frames)
    return path


@torch.no_grad()
def accumulate(forward, batches: Iterable, device: torch.device, class_weights: torch.Tensor,
               precision: str = "fp32", min_fraction: float | None = None, threshold: float | None = None,
               keep_frames: bool = False, progress: bool = False, total: int | None = None,
               desc: str = "eval") -> FrameStats:
    """Run `forward(images) -> (mask_logits or None, frame_logits)` over `batches`, summing FrameStats.

    `precision` is a resolved one (fp32 | fp16 | bf16, `algorithm.runtime.choose_precision`). A loader of
    `frame_loader` carries its dataset indices, which kept frames record.
    """
    defaults = InferenceConfig()
    min_fraction = defaults.min_mask_fraction if min_fraction is None else min_fraction
    threshold = defaults.mask_threshold if threshold is None else threshold
    stats = FrameStats(keep_frames=keep_frames)
    if keep_frames:
        stats.indices = list(getattr(batches, "frame_indices", []))
    for images, mask, label in tqdm(batches, total=total, desc=desc, unit="batch", leave=False,
                                    disable=not progress):
        images, mask, label = images.to(device), mask.to(device), label.to(device)
        with autocast(device, precision):
            mask_logits, frame_logits = forward(images)
        stats.add(mask_logits, frame_logits, mask, label, class_weights, min_fraction, threshold)
    return stats


def frame_loader(dataset: FrameDataset, indices: Sequence[int] | None, batch_size: int, workers: int,
                 rank: int = 0, world: int = 1) -> DataLoader:
    """Deterministic, unaugmented batches over `indices` (all frames when None), sharded over ranks; the
    loader's `frame_indices` lists the dataset index of each frame it yields, in order."""
    chosen = np.arange(len(dataset)) if indices is None else np.asarray(indices)
    mine = chosen[rank::world].tolist()
    loader = DataLoader(Subset(dataset, mine), batch_size=batch_size, shuffle=False, num_workers=workers,
                        pin_memory=torch.cuda.is_available(), persistent_workers=False)
    loader.frame_indices = mine  # type: ignore[attr-defined]
    return loader


def frame_report(stats: FrameStats, trainable: int, effective: int | None = None, use_mask: bool = True
                 ) -> dict[str, Any]:
    """The JSON block of one model: both rules' metrics, parameter counts, frame count."""
    report: dict[str, Any] = {"frames": int(stats.sums[1]), "trainable_parameters": int(trainable),
                              "head": stats.metrics("head")}
    if effective is not None:
        report["effective_trainable_parameters"] = int(effective)
    if use_mask:
        report["mask_rule"] = stats.metrics("mask")
    return report


def _fmt(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.3f}"
    if isinstance(value, int):
        return f"{value / 1e6:.2f} M" if value >= 100_000 else str(value)
    return str(value)


def markdown_table(rows: dict[str, dict[str, Any]], with_paper: bool = True) -> str:
    """Rows of {accuracy, f1, precision, recall, specificity, trainable_parameters, effective_parameters,
    paper_parameters} -> a Markdown table (the paper's rows appended)."""
    header = "| model | " + " | ".join(METRIC_COLUMNS) + " | trainable params | can change | paper params |"
    lines = [header, "|" + "---|" * (len(METRIC_COLUMNS) + 4)]
    all_rows = dict(rows)
    if with_paper:
        all_rows.update({name: dict(values) for name, values in PAPER_FRAME_TABLE.items()})
    for name, values in all_rows.items():
        cells = [_fmt(values.get(k)) for k in METRIC_COLUMNS] + [
            _fmt(values.get(k)) for k in ("trainable_parameters", "effective_parameters", "paper_parameters")]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def table_rows(name: str, report: dict[str, Any], paper_parameters: int | None = None
               ) -> dict[str, dict[str, Any]]:
    """One model's report -> table rows (mask rule and head)."""
    rows = {}
    params = {"trainable_parameters": report.get("trainable_parameters"),
              "effective_parameters": report.get("effective_trainable_parameters", report.get("trainable_parameters")),
              "paper_parameters": paper_parameters}
    if "mask_rule" in report:
        rows[f"{name}: mask >= 1 %"] = {**report["mask_rule"], **params}
    rows[f"{name}: frame head"] = {**report["head"], **params}
    return rows


def evaluate_weights(weights: Path, prepared: Path, split: str = "test", device: str = "auto",
                     batch_size: int = 32, workers: int = 0, precision: str = "auto",
                     progress: bool = True) -> dict[str, Any]:
    """Load a checkpoint in algorithm's format and score it on a prepared split."""
    dev = resolve_device(device)
    model, info = load_checkpoint(weights, device=dev)
    dataset = FrameDataset(prepared, split, input_frames=model.config.input_frames)
    loader = frame_loader(dataset, None, batch_size, workers)

    def forward(images: torch.Tensor):
        out = model(images)
        return out.mask_logits, out.frame_logits

    stats = accumulate(forward, loader, dev, torch.ones(3), choose_precision(precision, dev), progress=progress,
                       total=len(loader), desc=f"{split} frames")
    extra = info.extra or {}
    trainable = int(extra.get("trainable_parameters", trainable_parameters(model)))
    effective = extra.get("effective_trainable_parameters", effective_parameters(model))
    mode = canonical_mode(str(extra.get("mode", "")))  # as recorded at training: a former name in older weights
    use_mask = model.decoder is not None and (mode not in SPECS or SPECS[mode].segments)
    report = frame_report(stats, trainable, effective, use_mask=use_mask)
    report.update(weights=str(weights), split=split, provenance=info.provenance)
    return report


def main(argv: Sequence[str] | None = None) -> int:
    parser = CommandParser(prog="python -m training evaluate-frames", description=__doc__.splitlines()[0])
    parser.add_argument("--prepared", type=prepared_folder, required=True, help="output of python -m training prepare")
    parser.add_argument("--weights", type=existing_file, required=True, help="a checkpoint in algorithm's format")
    parser.add_argument("--split", default="test", choices=["train", "val", "test"], help="the split to score")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--batch-size", type=number(int, minimum=1), default=32, help="frames per forward pass")
    parser.add_argument("--workers", type=number(int, minimum=0), default=0, help="DataLoader workers")
    parser.add_argument("--precision", default="auto", choices=["auto", "fp32", "fp16", "bf16"],
                        help="auto: bf16 where native (GPU capability >= 8.0, CPUs with bf16 units), fp16 on "
                             "older GPUs, fp32 elsewhere (algorithm.runtime)")
    parser.add_argument("--json", type=Path, help="also write the report here (default: printed only)")
    parser.add_argument("--markdown", type=Path, help="also write the table here (default: printed only)")
    args = parser.parse_args(argv)
    return run_command(lambda: _evaluate_frames_command(args))


def _evaluate_frames_command(args: argparse.Namespace) -> int:
    report = evaluate_weights(args.weights, args.prepared, args.split, args.device, args.batch_size,
                              args.workers, args.precision)
    table = markdown_table(table_rows(args.weights.stem, report))
    print(table)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    if args.markdown:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
