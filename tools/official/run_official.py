"""Run the challenge's own evaluation code on a predictions folder and print its per-case results as JSON.

    PYTHON tools/official/run_official.py --checkout DIR --predictions P --ground-truth G --out F.json \
        --sockets INPUT_SLUG MASK_SLUG FRAME_SLUG

PYTHON is an interpreter with the official code's requirements (SimpleITK, numpy, evalutils 0.4,
opencv-python-headless, psutil); `--checkout` a clone of DIAGNijmegen/ACOUSLIC-AI-evaluation-method.
Nothing of the project is imported. The official code is called as it is: only the folders it reads
(its module constants for /input and the ground-truth mount) point at a staging folder that lays out our
release-layout ground truth and per-case output folders the way grand-challenge mounts them, with
symbolic links. Its FOV is its own `data/fov_mask.mha`, so score our side with `--fov-mask` on that file.

Per case with a prediction folder: {"metrics": the dict its `process` returns, "ac_pred_mm": what its
`calculate_ellipse_circumference_mm` returned, "ac_ref_mm": the reference it loaded}, or {"error":
"<exception type>: <message>"} when it raised. Infinite values are written as JSON's Infinity.
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import io
import json
import os
import sys
import tempfile
from pathlib import Path

MASKS_DIR = Path("masks") / "stacked_fetal_abdomen"
CIRCUMFERENCES_CSV = Path("circumferences") / "fetal_abdominal_circumferences_per_sweep.csv"
SOCKETS = {"input": "", "mask": "", "frame": ""}  # the algorithm's socket slugs, from --sockets


def frame_json() -> str:
    return f"{SOCKETS['frame']}.json"


def job(uuid: str) -> dict:
    """A predictions.json entry as grand-challenge writes it for one algorithm job."""
    return {
        "pk": uuid,
        "inputs": [{"image": {"name": f"{uuid}.mha"},
                    "interface": {"slug": SOCKETS["input"], "relative_path": f"images/{SOCKETS['input']}"}}],
        "outputs": [{"interface": {"slug": SOCKETS["mask"], "relative_path": f"images/{SOCKETS['mask']}"}},
                    {"interface": {"slug": SOCKETS["frame"], "relative_path": frame_json()}}],
    }


def stage(predictions: Path, ground_truth: Path, root: Path) -> list[str]:
    """Lay out /input/<pk>/output and the ground-truth mount under `root`; returns the uuids to score."""
    references = {}
    with open(ground_truth / CIRCUMFERENCES_CSV, newline="") as handle:
        for row in csv.DictReader(handle):
            references[row["uuid"]] = {f"sweep_{k}_ac_mm": float(row[f"sweep_{k}_ac_mm"])
                                       if row[f"sweep_{k}_ac_mm"].strip() else None for k in range(1, 7)}
    uuids = []
    for mask in sorted((ground_truth / MASKS_DIR).glob("*.mha")):
        uuid = mask.stem
        if not (predictions / uuid / frame_json()).is_file():
            continue
        (root / "input" / uuid).mkdir(parents=True)
        (root / "input" / uuid / "output").symlink_to((predictions / uuid).resolve())
        case = root / "ground_truth" / uuid
        (case / "fetal_abdomen_stacked_masks").mkdir(parents=True)
        (case / "fetal_abdomen_stacked_masks" / f"{uuid}.mha").symlink_to(mask.resolve())
        (case / "fetal_abdominal_circumference.json").write_text(
            json.dumps(references.get(uuid, {f"sweep_{k}_ac_mm": None for k in range(1, 7)})))
        uuids.append(uuid)
    return uuids


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkout", type=Path, required=True)
    parser.add_argument("--predictions", type=Path, required=True)
    parser.add_argument("--ground-truth", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--sockets", nargs=3, required=True, metavar=("INPUT", "MASK", "FRAME"),
                        help="the algorithm's socket slugs (algorithm.contract)")
    args = parser.parse_args()
    SOCKETS.update(zip(("input", "mask", "frame"), args.sockets))
    checkout = args.checkout.resolve()
    predictions, ground_truth, out = (p.resolve() for p in (args.predictions, args.ground_truth, args.out))

    os.chdir(checkout)  # its ellipse module reads data/fov_mask.mha relative to the working folder
    sys.path[:0] = [str(checkout / "src"), str(checkout)]
    import acouslicaieval.evaluation as official_evaluation
    import evaluate as official

    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        uuids = stage(predictions, ground_truth, root)
        official.INPUT_DIRECTORY = root / "input"
        official.GROUND_TRUTH_DIRECTORY = root / "ground_truth"

        # Record what it measured: the two AC values of the case, as its own functions return them.
        seen: dict[str, object] = {}
        fit, load = official_evaluation.calculate_ellipse_circumference_mm, official.load_ground_truth

        def fit_and_record(*a, **k):
            seen["ac_pred_mm"] = fit(*a, **k)
            return seen["ac_pred_mm"]

        def load_and_record(*a, **k):
            masks, ac = load(*a, **k)
            seen["ac_ref_mm"] = ac
            return masks, ac

        official_evaluation.calculate_ellipse_circumference_mm = fit_and_record
        official.load_ground_truth = load_and_record
        for uuid in uuids:
            seen.clear()
            try:
                with contextlib.redirect_stdout(io.StringIO()):  # its debug print of every case
                    metrics = official.process(job(uuid))
                results[uuid] = {"metrics": {k: float(v) for k, v in metrics.items()}, **seen}
            except Exception as error:  # noqa: BLE001 -- what it raises is the result
                results[uuid] = {"error": f"{type(error).__name__}: {error}"}
            print(f"{uuid}: {'error' if 'error' in results[uuid] else 'scored'}", file=sys.stderr, flush=True)
    out.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
