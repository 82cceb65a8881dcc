"""`make demo`: generate one replica case (once) and run the algorithm on it with the bundled weights.

Prints the chosen frame, the AC, the case's challenge score against the replica's reference and where the
picture is, so a newcomer sees the whole data path work in a minute without the real dataset or the
FetalCLIP weights.
"""
from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path

from algorithm.__main__ import main as run_algorithm
from algorithm.contract import INPUT_FOLDER
from training.cli import CommandParser, number
from training.data.layout import image_path, stage_case
from training.data.replica import MIN_FRAMES_PER_SWEEP, write_dataset
from training.scoring.evaluate import evaluate, list_ground_truth_cases


def make_case(folder: Path, seed: int, frames_per_sweep: int) -> Path:
    """A replica case laid out as grand-challenge mounts /input; reused when it already exists."""
    case_dir = folder / "input"
    images = list((case_dir / INPUT_FOLDER).glob("*.mha"))
    if images:
        return case_dir
    release = folder / "release"
    uuid = write_dataset(release, cases=1, frames_per_sweep=frames_per_sweep, seed=seed)[0]
    stage_case(image_path(release, uuid), case_dir, how="symlink")  # the release keeps it for the scoring
    return case_dir


def replica_score(release: Path, output: Path) -> dict:
    """The case's metrics as the challenge scores them (training.scoring.evaluate), against the replica's
    reference."""
    (uuid,) = list_ground_truth_cases(release)
    with tempfile.TemporaryDirectory() as predictions:  # evaluate reads one folder per case, named by uuid
        os.symlink(output.resolve(), Path(predictions) / uuid)
        return evaluate(Path(predictions), release)["cases"][uuid]


def main(argv: list[str] | None = None) -> int:
    parser = CommandParser(prog="python -m training demo", description=__doc__.splitlines()[0])
    parser.add_argument("--folder", type=Path, default=Path("demo_output"),
                        help="where the case (input/) and the algorithm's outputs (output/) go; a case already "
                             "there is reused")
    parser.add_argument("--seed", type=int, default=2025, help="the replica case's seed")
    parser.add_argument("--frames-per-sweep", type=number(int, minimum=MIN_FRAMES_PER_SWEEP), default=140,
                        help="frames per sweep of the case (6 sweeps)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    args = parser.parse_args(argv)
    case_dir = make_case(args.folder, args.seed, args.frames_per_sweep)
    output = args.folder / "output"
    started = time.perf_counter()
    code = run_algorithm(["--input", str(case_dir), "--output", str(output), "--device", args.device])
    seconds = time.perf_counter() - started
    if code != 0:
        return code
    result = json.loads((output / "fetalclipseg" / "result.json").read_text())
    ac = f"{result['ac_mm']:.1f} mm" if result["ac_mm"] else "n/a"
    print(f"\nchosen frame: {result['frame']} ({result['plane']})   AC: {ac}   "
          f"time: {seconds:.1f} s on {result['device']} ({result['frames_encoded']} of {result['frames_total']} frames encoded)")
    score = replica_score(args.folder / "release", output)
    reference = f", reference AC {score['ac_ref_mm']:.1f} mm" if score["ac_ref_mm"] else ""
    print(f"challenge score against the replica's reference: {score['score']:.3f} (WFSS {score['wfss']:.2f}, "
          f"DSC_soft {score['dsc_soft']:.3f}, NAE_AC {score['nae_ac']:.3f}, HD {score['hd']:.1f} mm{reference})")
    print(f"outputs: {output}\npicture: {output / 'fetalclipseg' / 'chosen_frame.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
