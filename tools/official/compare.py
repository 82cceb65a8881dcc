"""Score the same cases with `python -m training evaluate --official` and with the official code itself,
and list every per-case value on which they differ by more than 1e-9.

    .venv/bin/python tools/official/compare.py --checkout DIR --official-python PY --work DIR [--random N] [--seed S]
    .venv/bin/python tools/official/compare.py --checkout DIR --official-python PY --work DIR \
        --ground-truth G --predictions P

`--checkout` is a clone of DIAGNijmegen/ACOUSLIC-AI-evaluation-method, `--official-python` an interpreter
with its requirements (see run_official.py). Without `--ground-truth` it writes cases (the hand-built ones
of cases.py and N random ones) under `--work`; with it, it compares on existing folders (e.g. a replica
and the algorithm's outputs for it). Both reports go to `--work`. Exit code 1 on any mismatch.
"""
from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
TOLERANCE = 1e-9


def _same(a, b) -> bool:
    if a is None or b is None:
        return a is None and b is None
    a, b = float(a), float(b)
    if math.isnan(a) or math.isnan(b):
        return math.isnan(a) and math.isnan(b)
    if math.isinf(a) or math.isinf(b):
        return a == b
    return abs(a - b) <= TOLERANCE * max(1.0, abs(a), abs(b))


def compare(ours: dict, theirs: dict) -> tuple[int, list[str]]:
    """(number of values compared, mismatches) between our --official report and run_official.py's output.

    Our JSON writes inf as null; the official value must then be inf. A case it fails on must be one we
    report as failed, and the other way round.
    """
    mismatches, compared = [], 0
    for uuid, result in theirs.items():
        if "error" in result:
            if uuid not in ours["failed"]:
                mismatches.append(f"{uuid}: the official code raised ({result['error']}), we scored it")
            continue
        if uuid in ours["failed"]:
            mismatches.append(f"{uuid}: we report a failure ({ours['failed'][uuid]}), the official code scored it")
            continue
        case = ours["cases"][uuid]
        pairs = [(f"official.{k}", case["official"].get(k, "absent"), v) for k, v in result["metrics"].items()]
        pairs += [(k, case[k], result.get(k)) for k in ("ac_pred_mm", "ac_ref_mm")]
        for name, mine, official in pairs:
            compared += 1
            if mine is None and official is not None and math.isinf(float(official)):
                continue  # inf, written as null
            if mine == "absent" or not _same(mine, official):
                mismatches.append(f"{uuid}: {name} ours {mine!r}, official {official!r}")
    missing = set(ours["cases"]) - set(theirs) - set(ours["missing"])
    mismatches += [f"{uuid}: not scored by the official code" for uuid in sorted(missing)]
    return compared, mismatches


def run_both(checkout: Path, official_python: str, ground_truth: Path, predictions: Path, work: Path) -> tuple[dict, dict]:
    """Our --official report (with the checkout's FOV mask) and the official code's per-case results."""
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    from algorithm.contract import FRAME_SLUG, INPUT_SLUG, MASK_SLUG

    ours_json, theirs_json = work / "ours.json", work / "official.json"
    subprocess.run([sys.executable, "-m", "training", "evaluate", "--official", "--predictions", str(predictions),
                    "--ground-truth", str(ground_truth), "--fov-mask", str(checkout / "data" / "fov_mask.mha"),
                    "--json", str(ours_json)], cwd=REPO, check=True, capture_output=True, text=True)
    subprocess.run([official_python, str(HERE / "run_official.py"), "--checkout", str(checkout),
                    "--predictions", str(predictions), "--ground-truth", str(ground_truth), "--out", str(theirs_json),
                    "--sockets", INPUT_SLUG, MASK_SLUG, FRAME_SLUG],
                   check=True, capture_output=True, text=True)
    return json.loads(ours_json.read_text()), json.loads(theirs_json.read_text())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkout", type=Path, required=True)
    parser.add_argument("--official-python", required=True)
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--random", type=int, default=0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-hand-built", action="store_true")
    parser.add_argument("--ground-truth", type=Path, help="an existing release-layout folder to score")
    parser.add_argument("--predictions", type=Path, help="the output folders for --ground-truth")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    ground_truth, predictions = args.ground_truth, args.predictions
    if ground_truth is None:
        sys.path[:0] = [str(REPO), str(HERE)]
        from cases import hand_built, random_cases, write_cases

        from training.scoring.evaluate import read_fov_mask

        fov = read_fov_mask(args.checkout / "data" / "fov_mask.mha")
        cases = ([] if args.no_hand_built else hand_built(fov)) + random_cases(fov, args.random, args.seed)
        start = time.perf_counter()
        ground_truth, predictions = args.work / "ground_truth", args.work / "predictions"
        write_cases(cases, ground_truth, predictions)
        print(f"{len(cases)} cases written in {time.perf_counter() - start:.0f} s", flush=True)
    start = time.perf_counter()
    ours, theirs = run_both(args.checkout.resolve(), args.official_python, ground_truth, predictions, args.work)
    compared, mismatches = compare(ours, theirs)
    failed = sum("error" in r for r in theirs.values())
    print(f"{len(theirs)} cases ({failed} on which the official code raises), {compared} values compared "
          f"in {time.perf_counter() - start:.0f} s: {len(mismatches)} mismatch(es)")
    for line in mismatches:
        print("  " + line)
    return 1 if mismatches else 0


if __name__ == "__main__":
    raise SystemExit(main())
