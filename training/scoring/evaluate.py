"""Score a folder of algorithm outputs against a dataset in the public release layout.

    python -m training evaluate --predictions DIR --ground-truth DIR [--json FILE] [--fov-mask FILE] [--official]

`--predictions` holds one folder per case, named by the case uuid, laid out like the algorithm's /output:
the mask socket's folder holding one .mha (the (Z, H, W) output stack, or a single (H, W) mask) and the
frame-number JSON (an integer, -1 = no frame), as `algorithm.contract` names them. `--ground-truth` is a release-layout folder
(`training.data.layout`): masks/stacked_fetal_abdomen/<uuid>.mha, the per-sweep reference AC CSV and, unless
`--fov-mask` is given, images/stacked_fetal_ultrasound/<uuid>.mha from which each case's FOV is derived.

Every ground-truth case is scored. A case without a prediction folder (or without its frame JSON) is
listed under "missing" and scored as frame -1 (WFSS 0, NAE 1, DSC_soft 0 when the case is annotated), as
the challenge would score a failed job. A frame number without a mask file counts as an empty mask.
Metric definitions and where they differ from the official scorer: `training.scoring.metrics`.

`--official` scores as the challenge's own evaluation code does instead (`training.scoring.official`): its ellipse
fit, its nearest-frame rule, Hausdorff in pixels, and its infinite DSC_soft where it compares two empty
masks (null in the JSON, with a warning; a mean over such a case is null too, never a silent inf). It reads
the whole output stack (its binary check covers every frame) and, like it, should be given the
challenge's `fov_mask.mha` with `--fov-mask`. A case on which that code raises (a frame past the stack, a
missing or 2-D mask file) is reported under "failed" and left out of the means: on grand-challenge it
fails the whole evaluation.

Memory: the ground-truth label stack is read once per case (a view, no copy); of the prediction only the
chosen frame is read; the image stack (FOV only) is scanned and released before the labels are read. A
full-size case peaks at ~0.7 GB resident (~0.6 GB with --fov-mask), most of it one decompressed stack;
~0.9 GB with --official, which holds the whole output stack beside the labels.
"""
from __future__ import annotations

import csv
import json
import math
import sys
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import SimpleITK as sitk
from rich.console import Console
from rich.table import Table

from algorithm.config import PIXEL_SPACING_MM, SWEEPS_PER_CASE
from algorithm.fov import fov_from_stack
from training.cli import CommandParser
from training.data import layout
from training.scoring.metrics import case_score
from training.scoring.official import OfficialScorerFailure, official_case_score

METRIC_KEYS = ("wfss", "dsc_soft", "nae_ac", "hd", "score")


def read_reference_acs(ground_truth: Path) -> dict[str, list[float | None]]:
    """uuid -> reference AC (mm) of sweeps 1..6, None where the CSV cell is empty."""
    path = Path(ground_truth) / layout.CIRCUMFERENCES_CSV
    if not path.is_file():
        return {}
    columns = [f"sweep_{k}_ac_mm" for k in range(1, SWEEPS_PER_CASE + 1)]
    table: dict[str, list[float | None]] = {}
    with path.open(newline="") as handle:
        for row in csv.DictReader(handle):
            table[row["uuid"]] = [float(row[c]) if (row.get(c) or "").strip() else None for c in columns]
    return table


def list_ground_truth_cases(ground_truth: Path) -> list[str]:
    """uuids with a ground-truth mask stack, sorted."""
    return sorted(p.name[: -len(".mha")] for p in (Path(ground_truth) / layout.MASKS_DIR).glob("*.mha"))


def read_mask_frame(path: Path, frame: int) -> np.ndarray:
    """Frame `frame` of a (Z, H, W) mask file (or the whole file when it is 2-D), as uint8 {0, 1}.

    Reads only that frame's region, so a full-size output stack never lands in memory.
    """
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    reader.ReadImageInformation()
    size = reader.GetSize()
    if reader.GetDimension() == 3:
        if not 0 <= frame < size[2]:
            raise ValueError(f"{path}: frame {frame} outside its {size[2]} frames")
        reader.SetExtractIndex((0, 0, int(frame)))
        reader.SetExtractSize((size[0], size[1], 0))
    elif reader.GetDimension() != 2:
        raise ValueError(f"{path}: expected a 2-D or 3-D mask, got {reader.GetDimension()}-D")
    mask = sitk.GetArrayFromImage(reader.Execute())
    _require_binary(mask, path, f"frame {frame}")
    return mask.astype(np.uint8)


def _require_binary(mask: np.ndarray, path: Path, where: str, chunk: int = 32) -> None:
    """The challenge's scorer stops on a non-binary mask ("Segmentation mask should be binary"): a
    submission writing 255 would fail there, so it fails here too rather than being scored as if binary.
    A stack is checked a block of frames at a time (no sorted copy of a 350 MB stack)."""
    blocks = [mask] if mask.ndim < 3 else [mask[i:i + chunk] for i in range(0, len(mask), chunk)]
    if all(not ((block != 0) & (block != 1)).any() for block in blocks):
        return
    values = np.unique(mask)
    shown = ", ".join(str(v) for v in values[:6]) + (", ..." if len(values) > 6 else "")
    raise ValueError(f"{path}: mask values must be 0 or 1, {where} holds {shown}")


def read_mask_stack(path: Path) -> np.ndarray:
    """A whole mask file as uint8, checked binary on every frame (the official scorer's check).

    Checked on a view of the file's own pixels, then copied once: one stack in memory at the end."""
    image = sitk.ReadImage(str(path))
    _require_binary(sitk.GetArrayViewFromImage(image), path, "the file")
    return sitk.GetArrayFromImage(image).astype(np.uint8, copy=False)


def _stack_geometry(path: Path) -> tuple[int, tuple[int, int]]:
    """(frames, (H, W)) of a (Z, H, W) image file, from its header only."""
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    reader.ReadImageInformation()
    if reader.GetDimension() != 3:
        raise ValueError(f"{path}: expected a (Z, H, W) stack, got a {reader.GetDimension()}-D image")
    width, height, frames = reader.GetSize()
    return frames, (height, width)


def read_prediction(case_dir: Path) -> tuple[int, Path | None] | None:
    """(frame, mask file or None) of one prediction folder; None when the folder or its frame JSON is absent."""
    frame_json = case_dir / layout.OUTPUT_FRAME_JSON
    if not frame_json.is_file():
        return None
    frame = json.loads(frame_json.read_text())
    if isinstance(frame, bool) or not isinstance(frame, (int, float)) or not float(frame).is_integer():
        raise ValueError(f"{frame_json}: expected an integer frame number, got {frame!r}")
    masks = sorted((case_dir / layout.OUTPUT_MASK_DIR).glob("*.mha"))
    if len(masks) > 1:
        raise ValueError(f"{case_dir / layout.OUTPUT_MASK_DIR}: {len(masks)} .mha files, expected one")
    return int(frame), (masks[0] if masks else None)


def case_fov(ground_truth: Path, uuid: str) -> np.ndarray | None:
    """FOV derived from the case's image stack; None (whole frame) when the image is not there."""
    path = layout.image_path(ground_truth, uuid)
    if not path.is_file():
        return None
    image = sitk.ReadImage(str(path), sitk.sitkUInt8)
    return fov_from_stack(sitk.GetArrayViewFromImage(image))


def read_fov_mask(path: Path) -> np.ndarray:
    """A (H, W) FOV file (a single-slice 3-D file is accepted), as bool."""
    fov = sitk.GetArrayFromImage(sitk.ReadImage(str(path))) != 0
    if fov.ndim == 3 and fov.shape[0] == 1:
        fov = fov[0]
    if fov.ndim != 2:
        raise ValueError(f"{path}: expected a 2-D FOV mask, got shape {fov.shape}")
    return fov


def _finite(value: Any) -> Any:
    """JSON has no inf / NaN: write them as null."""
    return None if isinstance(value, float) and not math.isfinite(value) else value


def evaluate(predictions: Path, ground_truth: Path, fov_mask: np.ndarray | None = None,
             spacing_mm: float = PIXEL_SPACING_MM, official: bool = False) -> dict[str, Any]:
    """Score every ground-truth case; returns {"mode", "cases": {uuid: metrics}, "aggregate": means,
    "missing": [...], "failed": {uuid: reason}, "warnings": [...]}.

    `fov_mask` (H, W) is applied to every case; None derives each case's FOV from its image stack.
    `official` scores as the challenge's own code does (module docstring); `hd` is then in pixels.
    """
    predictions, ground_truth = Path(predictions), Path(ground_truth)
    if not predictions.is_dir():
        raise ValueError(f"predictions folder {predictions} does not exist")
    uuids = list_ground_truth_cases(ground_truth)
    if not uuids:
        raise ValueError(f"no ground-truth mask stacks (*.mha) under {ground_truth / layout.MASKS_DIR}")
    references = read_reference_acs(ground_truth)
    cases: dict[str, dict[str, Any]] = {}
    missing: list[str] = []
    failed: dict[str, str] = {}
    warnings: list[str] = []
    if official and fov_mask is None:
        warnings.append("the official scorer applies the challenge's fixed fov_mask.mha; without --fov-mask "
                        "each case's FOV is derived from its image stack")
    for uuid in uuids:
        pred_stack = labels = labels_image = None  # the previous case's stacks go before this one's come
        prediction = read_prediction(predictions / uuid)
        if prediction is None:
            missing.append(uuid)
            prediction = (-1, None)
        frame, mask_file = prediction

        # One large array at a time: the image (scanned for the FOV, then released), the predicted frame
        # (read as a region, ~1 frame of memory; the whole stack in official mode), then the label stack
        # (a view, not copied).
        fov = fov_mask if fov_mask is not None else case_fov(ground_truth, uuid)
        labels_path = layout.mask_path(ground_truth, uuid)
        n_frames, frame_shape = _stack_geometry(labels_path)
        if fov is not None and fov.shape != frame_shape:
            raise ValueError(f"{uuid}: FOV shape {fov.shape} does not match frames {frame_shape}")
        reference = references.get(uuid, [None] * SWEEPS_PER_CASE)
        if official:
            try:
                if mask_file is None and uuid not in missing:
                    raise OfficialScorerFailure(f"no .mha under {predictions / uuid / layout.OUTPUT_MASK_DIR} "
                                                "(the official scorer fails to read it)")
                pred_stack = None if mask_file is None else read_mask_stack(mask_file)
                labels_image = sitk.ReadImage(str(labels_path), sitk.sitkUInt8)
                labels = sitk.GetArrayViewFromImage(labels_image)
                result = official_case_score(frame, pred_stack, labels, reference,
                                             np.ones(frame_shape, bool) if fov is None else fov, spacing_mm)
            except OfficialScorerFailure as failure:
                failed[uuid] = str(failure)
                warnings.append(f"{uuid}: the official scorer would fail on this case: {failure}")
                continue
        else:
            pred_mask = None
            if 0 <= frame < n_frames and mask_file is not None:
                pred_mask = read_mask_frame(mask_file, frame)
                if pred_mask.shape != frame_shape:
                    raise ValueError(f"{uuid}: predicted frame {pred_mask.shape} vs ground truth {frame_shape}")
            labels_image = sitk.ReadImage(str(labels_path), sitk.sitkUInt8)
            labels = sitk.GetArrayViewFromImage(labels_image)
            result = case_score(frame, pred_mask, labels, reference, fov=fov, spacing_mm=spacing_mm)
        record = result.to_dict()
        for key, value in record.items():
            if key in METRIC_KEYS and isinstance(value, float) and not math.isfinite(value):
                warnings.append(f"{uuid}: {key} is {value} (the official scorer's Dice of two empty masks); "
                                "written as null")
        cases[uuid] = _json_ready(record)

    scored = set(cases) | set(failed)
    extra = sorted(p.name for p in predictions.iterdir() if p.is_dir() and p.name not in scored)
    if extra:
        warnings.append(f"{len(extra)} prediction folder(s) without ground truth ignored: {extra[:5]}")
    aggregate = _aggregate(cases, warnings)
    for warning in warnings:
        print(f"warning: {warning}", file=sys.stderr)
    return {"mode": "official" if official else "challenge", "cases": cases, "aggregate": aggregate,
            "missing": missing, "failed": failed, "warnings": warnings}


def _json_ready(value: Any) -> Any:
    """JSON has no inf / NaN: write them as null (recursively)."""
    if isinstance(value, dict):
        return {k: _json_ready(v) for k, v in value.items()}
    return _finite(value)


def _aggregate(cases: dict[str, dict[str, Any]], warnings: list[str]) -> dict[str, Any]:
    """Mean of each metric over the scored cases; null, with a warning, when a case's value is not finite
    (null in the case record), so an infinite official DSC_soft never hides inside a number."""
    aggregate: dict[str, Any] = {"n_cases": len(cases)}
    for key in METRIC_KEYS:
        values = [c[key] for c in cases.values()]
        finite = [v for v in values if v is not None]
        if len(finite) == len(values):
            aggregate[key] = float(np.mean(values)) if values else None
            continue
        aggregate[key] = None
        rest = f"{np.mean(finite):.4f} over the other {len(finite)}" if finite else "no other case"
        warnings.append(f"mean {key}: infinite in {len(values) - len(finite)} of {len(values)} case(s), so "
                        f"the official mean is infinite; written as null ({rest})")
    return aggregate


def _fmt(value: Any, digits: int = 3, none: str = "-") -> str:
    if value is None:
        return none
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def print_report(report: dict[str, Any], console: Console | None = None) -> None:
    """A per-case table with the mean row last."""
    if console is None:
        console = Console()
        if not console.is_terminal:  # a log file or pipe: room for full uuids instead of 80 columns
            console = Console(width=160)
    official = report.get("mode") == "official"
    title = "ACOUSLIC-AI evaluation, " + ("the official scorer's way" if official else "as the challenge defines it")
    table = Table(title=title)
    for name in ("case", "frame", "wfss", "dsc_soft", "nae_ac", "hd px" if official else "hd mm", "AC pred",
                 "AC ref", "score"):
        table.add_column(name, justify="left" if name == "case" else "right", no_wrap=True)
    missing = set(report["missing"])
    inf = "inf" if official else "-"  # a metric is null in official mode only where it is infinite
    for uuid, c in report["cases"].items():
        table.add_row(uuid + (" (missing)" if uuid in missing else ""), str(c["frame"]), _fmt(c["wfss"], 2),
                      _fmt(c["dsc_soft"], none=inf), _fmt(c["nae_ac"]), _fmt(c["hd"], 1, none=inf),
                      _fmt(c["ac_pred_mm"], 1), _fmt(c["ac_ref_mm"], 1), _fmt(c["score"], none=inf))
    for uuid, reason in report.get("failed", {}).items():
        table.add_row(f"{uuid} (the official scorer fails)", "", "", "", "", "", "", "", "", style="red")
    agg = report["aggregate"]
    table.add_section()
    table.add_row(f"mean of {agg['n_cases']}", "", _fmt(agg["wfss"], 2), _fmt(agg["dsc_soft"], none=inf),
                  _fmt(agg["nae_ac"]), _fmt(agg["hd"], 1, none=inf), "", "", _fmt(agg["score"], none=inf),
                  style="bold")
    console.print(table)
    if missing:
        console.print(f"{len(missing)} case(s) without a prediction, scored as frame -1.")


def main(argv: Sequence[str] | None = None) -> int:
    parser = CommandParser(prog="python -m training evaluate", description=__doc__.split("\n\n")[0])
    parser.add_argument("--predictions", type=Path, required=True, help="one output folder per case uuid")
    parser.add_argument("--ground-truth", type=Path, required=True, help="dataset in the public release layout")
    parser.add_argument("--json", type=Path, help="also write the report here (default: printed only)")
    parser.add_argument("--fov-mask", type=Path,
                        help="(H, W) FOV .mha used for every case (default: derived from each image stack)")
    parser.add_argument("--official", action="store_true",
                        help="score as the challenge's own evaluation code does (HD in pixels, its ellipse fit, "
                             "its nearest-frame rule, inf DSC_soft for two empty masks)")
    args = parser.parse_args(argv)

    try:
        fov = read_fov_mask(args.fov_mask) if args.fov_mask else None
        report = evaluate(args.predictions, args.ground_truth, fov, official=args.official)
    except (ValueError, OSError, RuntimeError) as error:  # bad inputs: one line, not a traceback
        print(f"error: {error}", file=sys.stderr)
        return 2
    print_report(report)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
