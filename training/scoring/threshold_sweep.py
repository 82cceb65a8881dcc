"""The paper's threshold experiment: how the mask-size rule's frame decisions change with its threshold.

    python -m training threshold-sweep --frames runs/r/paper/trial_*/test_frames.npz --out runs/r/paper/sweep

A frame is called positive when its predicted abdomen covers at least a threshold fraction of the 224 x
224 input; the paper uses 1 % and this sweeps 0.1 % to 5 %. Input: the per-frame records training writes
(`test_frames.npz`, also after DDP runs: rank 0 gathers every rank's frames), one per trial; no network is
run. Output: `threshold_sweep.png` (precision against recall, one point per threshold, the paper's 1 % and
the F1-best threshold marked; mean over trials, thin lines per trial), `threshold_sweep.md` (a table) and
`threshold_sweep.json` (every threshold: mean and std over trials of each metric).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from algorithm.config import FRAME_NONE, InferenceConfig
from training.cli import CommandParser
from training.scoring.metrics import frame_level_metrics
from training.scoring.report_plots import plt, save_figure

THRESHOLDS = tuple(round(0.001 * k, 4) for k in range(1, 51))  # 0.1 % .. 5 % of the input, in 0.1 % steps
TABLE_THRESHOLDS = (0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.04, 0.05)
METRICS = ("accuracy", "f1", "precision", "recall", "specificity")
INPUT_PIXELS = 224 * 224


def read_frames(path: Path) -> dict[str, np.ndarray]:
    """A `*_frames.npz` record; refuses one without mask fractions (a model without a decoder)."""
    with np.load(path) as data:
        frames = {key: data[key] for key in data.files}
    if "mask_fraction" not in frames or not np.isfinite(frames["mask_fraction"]).all():
        raise ValueError(f"{path} has no mask fractions (a frame classifier's record?)")
    return frames


def sweep(mask_fraction: np.ndarray, label: np.ndarray, thresholds: Sequence[float] = THRESHOLDS
          ) -> list[dict[str, Any]]:
    """Frame-level metrics of the rule `mask_fraction >= t` for every t (positives: annotated frames)."""
    truth = np.asarray(label) != FRAME_NONE
    return [{"threshold": float(t), **frame_level_metrics(np.asarray(mask_fraction) >= t, truth)}
            for t in thresholds]


def sweep_trials(records: Sequence[dict[str, np.ndarray]], thresholds: Sequence[float] = THRESHOLDS
                 ) -> dict[str, Any]:
    """Per threshold the mean and std over trials; the F1-best threshold of the mean curve; the paper's."""
    if not records:
        raise ValueError("no frame records to sweep")
    per_trial = [sweep(r["mask_fraction"], r["label"], thresholds) for r in records]
    rows = []
    for i, t in enumerate(thresholds):
        values = {m: [trial[i][m] for trial in per_trial] for m in METRICS}
        rows.append({"threshold": float(t),
                     **{m: float(np.mean(v)) for m, v in values.items()},
                     **{f"{m}_std": float(np.std(v, ddof=1)) if len(v) > 1 else 0.0 for m, v in values.items()}})
    best = max(rows, key=lambda r: (r["f1"], -r["threshold"]))
    paper = InferenceConfig().min_mask_fraction
    at_paper = min(rows, key=lambda r: abs(r["threshold"] - paper))
    return {"trials": len(records), "frames": [int(len(r["label"])) for r in records], "rows": rows,
            "per_trial": per_trial, "best": best, "paper_threshold": at_paper}


def markdown(result: dict[str, Any], title: str = "") -> str:
    show = {round(t, 4) for t in TABLE_THRESHOLDS} | {round(result["best"]["threshold"], 4)}
    lines = ([f"### {title}\n"] if title else []) + [
        f"Mask-size rule on {result['trials']} trial(s); positive = annotated frame; mean ± std over trials.\n",
        "| threshold (% of 224²) | pixels | " + " | ".join(METRICS) + " |", "|" + "---|" * (len(METRICS) + 2)]
    for row in result["rows"]:
        if round(row["threshold"], 4) not in show:
            continue
        marks = (" (F1-best)" if row is result["best"] else "") + (" (paper)" if row is result["paper_threshold"] else "")
        cells = [f"{row[m]:.3f} ± {row[m + '_std']:.3f}" if result["trials"] > 1 else f"{row[m]:.3f}" for m in METRICS]
        lines.append(f"| {100 * row['threshold']:.2f}{marks} | {row['threshold'] * INPUT_PIXELS:.0f} | "
                     + " | ".join(cells) + " |")
    best = result["best"]
    lines.append(f"\nF1-best threshold: {100 * best['threshold']:.2f} % (F1 {best['f1']:.3f}); "
                 f"at the paper's 1 %: F1 {result['paper_threshold']['f1']:.3f}.\n")
    return "\n".join(lines)


def plot(result: dict[str, Any], path: Path, title: str = "") -> Path:
    fig, ax = plt.subplots(figsize=(6, 5))
    for trial in result["per_trial"] if result["trials"] > 1 else []:
        ax.plot([r["recall"] for r in trial], [r["precision"] for r in trial], color="0.75", lw=0.8)
    rows = result["rows"]
    points = ax.scatter([r["recall"] for r in rows], [r["precision"] for r in rows],
                        c=[100 * r["threshold"] for r in rows], cmap="viridis", s=18, zorder=3)
    ax.plot([r["recall"] for r in rows], [r["precision"] for r in rows], color="C0", lw=1, zorder=2)
    for row, label, colour in ((result["paper_threshold"], "paper: 1 %", "C3"),
                               (result["best"], f"F1-best: {100 * result['best']['threshold']:.1f} %", "C1")):
        ax.scatter([row["recall"]], [row["precision"]], s=90, facecolors="none", edgecolors=colour, lw=2,
                   label=f"{label} (F1 {row['f1']:.3f})", zorder=4)
    fig.colorbar(points, ax=ax, label="threshold (% of the 224 x 224 input)")
    ax.set(xlabel="recall", ylabel="precision", xlim=(0, 1.02), ylim=(0, 1.02),
           title=title or "mask-size rule: precision-recall over thresholds")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower left")
    return save_figure(fig, path)


def run(frame_files: Sequence[Path], out: Path, title: str = "") -> dict[str, Any]:
    """Sweep the records, write the PNG, the table and the JSON into `out`; returns the result."""
    result = sweep_trials([read_frames(Path(f)) for f in frame_files])
    result["files"] = [str(f) for f in frame_files]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    result["plot"] = str(plot(result, out / "threshold_sweep.png", title))
    result["table"] = str(out / "threshold_sweep.md")
    (out / "threshold_sweep.md").write_text(markdown(result, title))
    (out / "threshold_sweep.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


def main(argv: Sequence[str] | None = None) -> int:
    parser = CommandParser(prog="python -m training threshold-sweep", description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=Path, nargs="+", required=True,
                        help="test_frames.npz (or val_frames.npz) of one or more trials")
    parser.add_argument("--out", type=Path, required=True, help="folder for the table (JSON) and the plot")
    parser.add_argument("--title", default="", help="title of the table and the plot (default: none)")
    args = parser.parse_args(argv)
    try:
        result = run(args.frames, args.out, args.title)
    except (OSError, ValueError, KeyError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(markdown(result, args.title))
    print(f"picture: {result['plot']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
