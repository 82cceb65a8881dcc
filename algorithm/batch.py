"""A dataset in the release layout through one loaded model: an output folder per case, a line per case, and
`cases.csv` at the end.

Each case runs exactly as `python -m algorithm` runs one case (algorithm.run: read, predict, write
atomically), into `OUT/<case>/`, named by the image's file stem. A case that fails is a row of the table and
a line on stdout, not the end of the run: the others still run, and the exit code at the end is the first
failure's. A failed case leaves no output of ours in its folder (an earlier run's are removed first), so the
folders and the table agree.
"""
from __future__ import annotations

import csv
import logging
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

from .contract import OutputTransaction, check_writable, output_lock, remove_outputs
from .errors import AlgorithmError
from .inputs import case_name, dataset_images, image_file
from .options import InferenceOverrides
from .run import load, predict_case, read_image
from .weights_location import resolve_weights

log = logging.getLogger("algorithm")

CASES_CSV = Path("cases.csv")
COLUMNS = ("case", "frame", "plane", "ac_mm", "seconds", "status", "error")


class CasesFailed(AlgorithmError):
    """Some cases of a dataset failed; the process exits with the first failure's code."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


@dataclass
class CaseRecord:
    """One row of cases.csv."""

    case: str
    seconds: float
    frame: int | None = None
    plane: str = ""
    ac_mm: float | None = None
    error: str = ""
    exit_code: int = 0

    def row(self) -> dict[str, str]:
        return {"case": self.case, "frame": "" if self.frame is None else str(self.frame), "plane": self.plane,
                "ac_mm": "" if self.ac_mm is None else f"{self.ac_mm:.2f}", "seconds": f"{self.seconds:.1f}",
                "status": "failed" if self.exit_code else "ok", "error": self.error}

    def line(self) -> str:
        if self.exit_code:
            return f"{self.case}: failed (exit {self.exit_code}): {self.error}"
        ac = f"{self.ac_mm:.1f} mm" if self.ac_mm else "n/a"
        return f"{self.case}: frame {self.frame} ({self.plane}), AC {ac}, {self.seconds:.1f} s"


def run_case(network, checkpoint: dict, image: Path, output: Path, extras: bool = True) -> CaseRecord:
    """One case of the dataset into `output`; every failure becomes the record's error, never an exception
    (interruptions excepted)."""
    name, started = case_name(image), time.perf_counter()
    try:
        check_writable(output)
        with output_lock(output):
            remove_outputs(output)
            stack, read_seconds = read_image(image_file(image))
            summary = predict_case(network, checkpoint, stack, output, extras=extras,
                                   timings={"read": read_seconds}, started=started)
    except Exception as error:  # noqa: BLE001 - one case's failure is its row; the others still run
        if not isinstance(error, AlgorithmError):
            log.error("case %s: unexpected error\n%s", name, traceback.format_exc())
        try:
            output.rmdir()  # only when empty: the case left nothing
        except OSError:
            pass
        message = str(error) if isinstance(error, AlgorithmError) else f"internal error: {type(error).__name__}: " \
            f"{(str(error).strip().splitlines() or [''])[0][:300]}"
        return CaseRecord(name, time.perf_counter() - started, error=message,
                          exit_code=getattr(error, "exit_code", 1))
    return CaseRecord(name, summary["timings_s"]["total"], frame=summary["frame"], plane=summary["plane"],
                      ac_mm=summary["ac_mm"])


def write_table(path: Path, records: list[CaseRecord]) -> None:
    """cases.csv, written atomically."""
    def write(staged: Path) -> None:
        with open(staged, "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=COLUMNS)
            writer.writeheader()
            writer.writerows(record.row() for record in records)

    transaction = OutputTransaction(path.parent, ours=(Path(path.name),))
    try:
        transaction.stage(Path(path.name), write)
        transaction.commit()
    except BaseException:
        transaction.abort()
        raise


def run_dataset(folder: Path, output: Path, weights: Path | None = None, overrides: InferenceOverrides | None = None,
                extras: bool = True) -> list[CaseRecord]:
    """Every case of a release-layout `folder` into `output/<case>/`, the model loaded once; then cases.csv.

    Raises CasesFailed at the end when a case failed; a problem common to all cases (no image, weights,
    the output folder) is raised at once, before any case runs.
    """
    output = Path(output)
    weights_path = resolve_weights(weights)
    images = dataset_images(folder)
    log.info("dataset %s: %d cases", folder, len(images))
    network, checkpoint = load(weights_path, overrides)
    records = []
    for number, image in enumerate(images, 1):
        log.info("case %d of %d: %s", number, len(images), image.name)
        record = run_case(network, checkpoint, image, output / case_name(image), extras=extras)
        print(record.line(), flush=True)
        records.append(record)
    write_table(output / CASES_CSV, records)
    failed = [record for record in records if record.exit_code]
    print(f"{len(records) - len(failed)} of {len(records)} cases done; table: {output / CASES_CSV}", flush=True)
    if failed:
        raise CasesFailed(f"{len(failed)} of {len(records)} cases failed (first: {failed[0].case}: "
                          f"{failed[0].error}); see {output / CASES_CSV}", failed[0].exit_code)
    return records
