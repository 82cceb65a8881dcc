"""Score a benchmark's predictions and write OUT/report.md with its figures.

* scores.json: `training.scoring.evaluate.evaluate` on the benchmarked cases only (a ground-truth view restricted
  to them, so `--limit` or a subset folder is not scored as if the rest had failed);
* the challenge score (mean and per case) and its three parts, the frame-choice outcome counts;
* AC agreement: Bland-Altman of predicted vs reference AC (`training.scoring.agreement`) over the cases where
  both exist. The reference is the one `training.scoring.evaluate` uses for NAE_AC: the sonographer's AC of the
  sweep that holds the chosen frame. Cases without a chosen frame, a fittable ellipse or a reference AC on
  that sweep are left out and counted;
* the worst cases (lowest score): the chosen frame with the predicted mask (green) and its ellipse (red)
  beside the reference frame (the annotated frame nearest the chosen one in its sweep, else the case's
  largest optimal / suboptimal annotation) with the reference mask, drawn by `algorithm.report.draw_frame`;
* failures and per-case timings.
"""
from __future__ import annotations

import json
import math
import statistics
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import SimpleITK as sitk

from algorithm.biometry import fit_ellipse
from algorithm.config import PIXEL_SPACING_MM
from algorithm.fov import fov_from_stack
from algorithm.report import draw_frame, write_png
from training.data import layout
from training.scoring.agreement import plot_bland_altman
from training.scoring.evaluate import evaluate, read_mask_frame, read_reference_acs
from training.scoring.metrics import GT_OPTIMAL, FrameAnnotations, nearest_annotated_frame, sweep_length_of

from .cases import ground_truth_subset, mask_files, write_json_atomic
from .core import FAILURES, RUN, TIMINGS

FIGURES = "figures"
REPORT = "report.md"
SCORES = "scores.json"
METRICS = (("score", "score", 3), ("wfss", "WFSS", 2), ("dsc_soft", "DSC_soft", 3), ("nae_ac", "NAE_AC", 3),
           ("hd", "HD (mm)", 1))


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    return f"{value:.{digits}f}" if isinstance(value, (float, np.floating)) else str(value)


def _stats(values: list[float]) -> tuple[float, float, float, float]:
    return statistics.fmean(values), statistics.median(values), min(values), max(values)


# ------------------------------------------------------------------------------------------ pictures

def _reference_frame(labels: np.ndarray, chosen: int) -> tuple[int | None, str]:
    """The annotated frame to show beside the chosen one, and how it was picked."""
    annotations = FrameAnnotations.from_stack(labels)
    if not annotations.annotated.any():
        return None, "case has no annotated frame"
    near = nearest_annotated_frame(chosen, annotations, sweep_length_of(annotations.n_frames),
                                   max_distance=annotations.n_frames)
    if near is not None:
        return near, "nearest annotated frame in the chosen sweep"
    candidates = np.flatnonzero(annotations.optimal if annotations.optimal.any() else annotations.suboptimal)
    label = GT_OPTIMAL if annotations.optimal.any() else None
    areas = [int((labels[i] == label).sum()) if label else int((labels[i] > 0).sum()) for i in candidates]
    return int(candidates[int(np.argmax(areas))]), "largest annotation of the case"


def case_figure(image_path: Path, labels_path: Path | None, prediction_dir: Path, metrics: dict,
                reference_acs: list[float | None] | None = None) -> np.ndarray:
    """Chosen frame + predicted mask | reference frame + reference mask, with a caption line above (BGR).

    `reference_acs`: the case's reference AC per sweep (mm), to label the reference frame's sweep."""
    image = sitk.ReadImage(str(image_path), sitk.sitkUInt8)
    stack = sitk.GetArrayViewFromImage(image)
    fov = fov_from_stack(stack)
    chosen = int(metrics.get("frame", -1))
    shown = chosen if 0 <= chosen < len(stack) else len(stack) // 2
    frame = np.array(stack[shown])
    masks = mask_files(prediction_dir)
    mask = read_mask_frame(masks[0], shown) if masks and chosen >= 0 else None
    ellipse = fit_ellipse(mask, fov) if mask is not None and mask.any() else None
    ac = ellipse.circumference_mm(PIXEL_SPACING_MM) if ellipse is not None else None
    caption = (f"chosen frame {chosen}" + (f"  AC {ac:.0f} mm" if ac else "  no ellipse")) if chosen >= 0 \
        else f"no frame chosen (frame {shown} shown)"
    left = draw_frame(frame, mask, ellipse, caption)

    right_caption, right = "no ground truth", None
    if labels_path is not None and labels_path.is_file():
        labels_image = sitk.ReadImage(str(labels_path), sitk.sitkUInt8)
        labels = sitk.GetArrayViewFromImage(labels_image)
        reference, how = _reference_frame(labels, chosen)
        if reference is not None:
            label = labels[reference]
            kind = "optimal" if (label == GT_OPTIMAL).any() else "suboptimal"
            ref_mask = (label > 0).astype(np.uint8)
            sweep = reference // sweep_length_of(len(labels))
            ref_ac = (reference_acs or [])[sweep] if sweep < len(reference_acs or []) else None
            right_caption = f"reference frame {reference} ({kind})" + (f"  AC ref {ref_ac:.0f} mm" if ref_ac else "")
            right = draw_frame(np.array(stack[reference]), ref_mask, None, right_caption)  # the annotation itself
            cv2.putText(right, how, (10, 48), cv2.FONT_HERSHEY_SIMPLEX, 0.5, (200, 200, 200), 1, cv2.LINE_AA)
        else:
            right_caption = how
        del labels, labels_image
    if right is None:
        right = draw_frame(np.zeros_like(frame), None, None, right_caption)
    gap = np.full((left.shape[0], 8, 3), 255, dtype=np.uint8)
    body = np.hstack([left, gap, right])
    title = np.full((34, body.shape[1], 3), 32, dtype=np.uint8)
    text = (f"score {_fmt(metrics.get('score'))}   WFSS {_fmt(metrics.get('wfss'), 2)}   "
            f"DSC_soft {_fmt(metrics.get('dsc_soft'))}   NAE_AC {_fmt(metrics.get('nae_ac'))}   "
            f"AC pred {_fmt(metrics.get('ac_pred_mm'), 1)} / ref {_fmt(metrics.get('ac_ref_mm'), 1)} mm")
    cv2.putText(title, text, (10, 23), cv2.FONT_HERSHEY_SIMPLEX, 0.6, (255, 255, 255), 1, cv2.LINE_AA)
    del stack, image
    return np.vstack([title, body])


# ------------------------------------------------------------------------------------------ report

def write_report(out: Path, ground_truth: Path, uuids: list[str], cases_dir: Path | None = None,
                 images: dict[str, Path] | None = None, worst: int = 5, title: str = "") -> dict:
    """Score, draw and write OUT/report.md; returns {"scores", "agreement", "report"}."""
    out = Path(out)
    figures = out / FIGURES
    figures.mkdir(parents=True, exist_ok=True)
    for old in figures.glob("worst_*.png"):
        old.unlink()
    subset, no_truth = ground_truth_subset(ground_truth, uuids, out / ".ground-truth")
    scores = evaluate(out / "predictions", subset)
    scores["no_ground_truth"] = no_truth
    write_json_atomic(out / SCORES, scores)
    cases: dict[str, dict] = scores["cases"]
    missing = set(scores["missing"])

    failures = {f["uuid"]: f for f in (json.loads((out / FAILURES).read_text()) if (out / FAILURES).is_file() else [])}
    timings = json.loads((out / TIMINGS).read_text()) if (out / TIMINGS).is_file() else {}
    run = json.loads((out / RUN).read_text()) if (out / RUN).is_file() else {}

    predicted = [cases[u]["ac_pred_mm"] for u in cases]
    reference = [cases[u]["ac_ref_mm"] for u in cases]
    agreement = plot_bland_altman(predicted, reference, figures / "bland_altman.png")

    lines: list[str] = [f"# ACOUSLIC-AI benchmark{': ' + title if title else ''}", ""]
    runner_info = run.get("runner_info", {})
    if run:
        lines += [f"- runner: **{run.get('runner', '?')}**, finished {run.get('finished', '?')}"]
    for key in ("weights", "device", "image", "image_id", "algorithm", "base_url", "gcapi"):
        if runner_info.get(key):
            lines.append(f"- {key.replace('_', ' ')}: `{runner_info[key]}`")
    if run.get("git_commit"):
        lines.append(f"- code: `{run['git_commit']}`")
    lines += [f"- cases: {len(uuids)} benchmarked, {len(cases)} scored against `{ground_truth}`"
              + (f", {len(no_truth)} without ground truth (not scored)" if no_truth else ""),
              f"- without a prediction (failed or not run; scored as frame -1, as the challenge scores a "
              f"failed job): {len(missing)}", ""]

    lines += ["## Score", "", "Challenge score per case = 0.5 (1 - NAE_AC) + 0.25 WFSS + 0.25 DSC_soft "
              "(metric definitions: `training/scoring/metrics.py`).", ""]
    if cases:
        lines += ["| metric | mean | median | min | max |", "|---|---:|---:|---:|---:|"]
        for key, name, digits in METRICS:
            values = [c[key] for c in cases.values() if c[key] is not None]
            if values:
                mean, median, low, high = _stats(values)
                lines.append(f"| {'**' + name + '**' if key == 'score' else name} | {_fmt(mean, digits)} | "
                             f"{_fmt(median, digits)} | {_fmt(low, digits)} | {_fmt(high, digits)} |")
        wfss = [c["wfss"] for c in cases.values()]
        no_frame = sum(1 for c in cases.values() if c["frame"] < 0)
        lines += ["", f"Frame choice: optimal (WFSS 1) {sum(w == 1.0 for w in wfss)}, suboptimal where an optimal "
                  f"plane exists (WFSS 0.6) {sum(w == 0.6 for w in wfss)}, unannotated or none (WFSS 0) "
                  f"{sum(w == 0.0 for w in wfss)}; no frame chosen (-1): {no_frame}.", ""]

    lines += ["## Abdominal circumference agreement (Bland-Altman)", ""]
    excluded = len(cases) - agreement.n
    lines.append(f"Predicted AC (ellipse fitted to our mask, `algorithm.biometry`) against the reference AC of the "
                 f"sweep that holds the chosen frame: {agreement.n} case(s); {excluded} left out (no frame "
                 f"chosen, no ellipse, or no reference AC on that sweep).")
    lines.append("")
    if agreement.n >= 2:
        lines += ["| | value (mm) | 95 % CI (mm) |", "|---|---:|---:|",
                  f"| bias (predicted - reference) | {agreement.bias:+.1f} | "
                  f"{agreement.bias_ci[0]:+.1f} to {agreement.bias_ci[1]:+.1f} |",
                  f"| SD of the differences | {agreement.sd:.1f} | |",
                  f"| lower limit of agreement (bias - 1.96 SD) | {agreement.loa_low:+.1f} | "
                  f"{agreement.loa_low_ci[0]:+.1f} to {agreement.loa_low_ci[1]:+.1f} |",
                  f"| upper limit of agreement (bias + 1.96 SD) | {agreement.loa_high:+.1f} | "
                  f"{agreement.loa_high_ci[0]:+.1f} to {agreement.loa_high_ci[1]:+.1f} |",
                  f"| mean absolute difference | {agreement.mean_abs_diff:.1f} | |",
                  "", f"Mean absolute difference {agreement.mean_abs_pct:.1f} % of the reference; "
                  f"{agreement.within_loa} of {agreement.n} differences lie within the limits.", ""]
    elif agreement.n == 1:
        lines += [f"One pair only: difference {agreement.bias:+.1f} mm; no limits of agreement.", ""]
    lines += ["![Bland-Altman](figures/bland_altman.png)", ""]

    scored = [u for u in cases if u not in missing]
    worst_cases = sorted(scored, key=lambda u: (cases[u]["score"], u))[:worst]
    if worst_cases:
        lines += [f"## Worst {len(worst_cases)} case(s)", "",
                  "Left: the chosen frame with our mask (green) and its ellipse (red). Right: the reference "
                  "annotation (green) on the nearest annotated frame of the chosen sweep, or the case's largest "
                  "annotation when that sweep has none.", ""]
        for rank, uuid in enumerate(worst_cases, 1):
            c = cases[uuid]
            name = f"worst_{rank}_{uuid}.png"
            image = (images or {}).get(uuid) or (layout.image_path(cases_dir, uuid) if cases_dir else None)
            lines.append(f"### {rank}. `{uuid}`: score {_fmt(c['score'])}")
            lines.append("")
            lines.append(f"frame {c['frame']}, WFSS {_fmt(c['wfss'], 2)}, DSC_soft {_fmt(c['dsc_soft'])}, "
                         f"NAE_AC {_fmt(c['nae_ac'])}, AC {_fmt(c['ac_pred_mm'], 1)} vs {_fmt(c['ac_ref_mm'], 1)} mm")
            lines.append("")
            if image is not None and Path(image).is_file():
                picture = case_figure(Path(image), layout.mask_path(subset, uuid), out / "predictions" / uuid, c,
                                      read_reference_acs(subset).get(uuid))
                write_png(figures / name, picture)
                lines += [f"![{uuid}](figures/{name})", ""]
            else:
                lines += ["(input image not found: no picture)", ""]

    if failures:
        lines += [f"## Failures ({len(failures)})", "", "| case | error |", "|---|---|"]
        for uuid, failure in sorted(failures.items()):
            error = failure["error"].replace("|", "\\|").replace("\n", " ")[:300]
            lines.append(f"| `{uuid}` | {failure['error_type']}: {error} |")
        lines.append("")

    seconds = [timings[u]["seconds"] for u in uuids if u in timings]
    if seconds:
        mean, median, low, high = _stats(seconds)
        p90 = float(np.percentile(seconds, 90))
        lines += ["## Timings", "",
                  f"Per case (runner `{run.get('runner', '?')}`, {len(seconds)} case(s)): mean {mean:.1f} s, "
                  f"median {median:.1f} s, 90th percentile {p90:.1f} s, max {high:.1f} s; sum {sum(seconds):.0f} s. "
                  f"Last run's wall time {run.get('wall_s', 0):.0f} s for {run.get('done', 0)} case(s).", ""]

    lines += ["## Per case", "",
              "| case | frame | WFSS | DSC_soft | NAE_AC | HD mm | AC pred | AC ref | score | s |",
              "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for uuid, c in cases.items():
        flag = " (no prediction)" if uuid in missing else ""
        secs = timings.get(uuid, {}).get("seconds")
        lines.append(f"| `{uuid}`{flag} | {c['frame']} | {_fmt(c['wfss'], 2)} | {_fmt(c['dsc_soft'])} | "
                     f"{_fmt(c['nae_ac'])} | {_fmt(c['hd'], 1)} | {_fmt(c['ac_pred_mm'], 1)} | "
                     f"{_fmt(c['ac_ref_mm'], 1)} | {_fmt(c['score'])} | {_fmt(secs, 1)} |")
    if cases:
        agg = scores["aggregate"]
        lines.append(f"| **mean of {agg['n_cases']}** | | {_fmt(agg['wfss'], 2)} | {_fmt(agg['dsc_soft'])} | "
                     f"{_fmt(agg['nae_ac'])} | {_fmt(agg['hd'], 1)} | | | **{_fmt(agg['score'])}** | |")
    lines.append("")
    (out / REPORT).write_text("\n".join(lines))
    return {"scores": scores, "agreement": agreement.to_dict(), "report": str(out / REPORT)}
