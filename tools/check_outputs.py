"""Check one case's algorithm outputs against the grand-challenge contract (and optionally a reference run).

    python tools/check_outputs.py --input CASE/input --output CASE/output-container \
        [--reference CASE/output-host] [--expect any|found|none] [--label NAME]

The one output checker: the container test runs it as a script, the pytest suites call `check_outputs`.
Checks:
  * the output folder holds the mask socket's output.mha (the only image in its folder) and the frame
    number's JSON (`algorithm.contract`), and no leftover temporary files;
  * the mask is a 3-D uint8 image with values in {0, 1}, of the input's size, spacing, origin and direction;
  * the frame number is a JSON integer (not a bool or float) in [-1, frames);
  * frame -1 => the mask is all zeros; frame k >= 0 => voxels on frame k only (the network may find none);
  * --expect found: a frame was chosen and the mask has voxels on it; --expect none: -1 and an empty mask;
  * --reference: frame number identical, mask voxels and geometry identical.
Exit status 0 when everything holds, 1 otherwise (every failure is listed).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import SimpleITK as sitk

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository, when run as a script

from algorithm.contract import IMAGE_SUFFIXES, INPUT_FOLDER, INPUT_SLUG, INPUTS_JSON  # noqa: E402
from algorithm.contract import OUTPUT_FRAME as FRAME  # noqa: E402
from algorithm.contract import OUTPUT_MASK as MASK  # noqa: E402


class Report:
    def __init__(self, label: str):
        self.label = label
        self.failures: list[str] = []
        self.frame: int | None = None
        self.mask: np.ndarray | None = None
        self.spacing: tuple[float, ...] = ()

    def fail(self, message: str) -> None:
        self.failures.append(message)

    def check(self, ok: bool, message: str) -> bool:
        if not ok:
            self.fail(message)
        return ok


def input_image(input_dir: Path) -> Path:
    folder = input_dir / INPUT_FOLDER
    listing = input_dir / INPUTS_JSON
    if listing.is_file():
        for socket in json.loads(listing.read_text()):
            interface = socket.get("interface", {})
            if interface.get("slug") == INPUT_SLUG:
                folder = input_dir / interface["relative_path"]
    images = sorted(p for p in folder.iterdir() if p.name.lower().endswith(IMAGE_SUFFIXES))
    if len(images) != 1:
        raise SystemExit(f"check_outputs: expected one input image in {folder}, found {len(images)}")
    return images[0]


def read_frame(path: Path, report: Report) -> int | None:
    try:
        value = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        report.fail(f"{path}: not valid JSON ({error})")
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        report.fail(f"{path}: expected a JSON integer, got {type(value).__name__} {value!r}")
        return None
    return value


def geometry(image) -> dict:
    """Size, spacing, origin, direction of a sitk.Image or of an ImageFileReader after ReadImageInformation."""
    return {"size": image.GetSize(), "spacing": image.GetSpacing(),
            "origin": image.GetOrigin(), "direction": image.GetDirection()}


def check_output(output_dir: Path, reference_input, report: Report) -> tuple[int | None, np.ndarray | None, sitk.Image | None]:
    mask_path, frame_path = output_dir / MASK, output_dir / FRAME
    present = report.check(mask_path.is_file(), f"missing {MASK}") & report.check(frame_path.is_file(), f"missing {FRAME}")
    leftovers = [str(p.relative_to(output_dir)) for p in output_dir.rglob("*") if "partial" in p.name or p.name.startswith(".write-probe")]
    report.check(not leftovers, f"temporary files left in the output folder: {leftovers}")
    if mask_path.parent.is_dir():
        others = sorted(p.name for p in mask_path.parent.iterdir() if p.name != MASK.name)
        report.check(not others, f"{MASK.parent} holds more than output.mha: {others} (grand-challenge expects one image)")
    if not present:
        return None, None, None

    frame = read_frame(frame_path, report)
    image = sitk.ReadImage(str(mask_path))
    mask = sitk.GetArrayFromImage(image)
    depth = reference_input.GetSize()[2]
    report.check(image.GetDimension() == 3, f"mask is {image.GetDimension()}-D, expected 3-D")
    report.check(image.GetNumberOfComponentsPerPixel() == 1, "mask has more than one component per pixel")
    report.check(image.GetPixelID() == sitk.sitkUInt8, f"mask pixel type {image.GetPixelIDTypeAsString()}, expected 8-bit unsigned integer")
    got, want = geometry(image), geometry(reference_input)
    report.check(got["size"] == want["size"], f"mask size {got['size']} != input size {want['size']}")
    for key in ("spacing", "origin", "direction"):
        report.check(np.allclose(got[key], want[key], rtol=0, atol=1e-6), f"mask {key} {got[key]} != input {key} {want[key]}")
    values = np.unique(mask)
    report.check(set(values.tolist()) <= {0, 1}, f"mask values {values.tolist()[:10]} not within {{0, 1}}")

    if frame is not None:
        report.check(-1 <= frame < depth, f"frame number {frame} outside [-1, {depth})")
        per_frame = mask.reshape(mask.shape[0], -1).astype(bool).any(axis=1) if mask.ndim == 3 else np.zeros(0, bool)
        labelled = np.flatnonzero(per_frame).tolist()
        if frame == -1:
            report.check(not labelled, f"frame number -1 but the mask has voxels on frames {labelled[:10]}")
        elif 0 <= frame < depth:
            report.check(set(labelled) <= {frame}, f"frame number {frame} but mask voxels lie on frames {labelled[:10]} (expected only [{frame}])")
    return frame, mask, image


def check_outputs(input_image: Path, output_dir: Path, reference: Path | None = None, expect: str = "any",
                  label: str = "") -> Report:
    """Every check above for the outputs of one case whose input image is `input_image`: the report lists the
    failures (none: the contract holds) and holds the frame number and mask it read."""
    report = Report(label or str(output_dir))
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(input_image))
    reader.ReadImageInformation()  # geometry only: no need to load the 350 MB stack
    report.spacing = reader.GetSpacing()
    frame, mask, image = check_output(output_dir, reader, report)
    report.frame, report.mask = frame, mask

    if frame is not None and mask is not None:
        if expect == "found":
            if report.check(frame >= 0, "expected a chosen frame (>= 0), got -1") and frame < len(mask):
                report.check(bool(mask[frame].any()), f"frame {frame} chosen but its mask is empty")
        elif expect == "none":
            report.check(frame == -1, f"expected -1 (no abdomen in this case), got {frame}")
            report.check(not mask.any(), "expected an all-zero mask (no abdomen in this case)")

    if reference is not None:
        sub = Report("reference")
        ref_frame, ref_mask, ref_image = check_output(reference, reader, sub)
        for failure in sub.failures:
            report.fail(f"reference run: {failure}")
        if ref_mask is not None and mask is not None:
            report.check(frame == ref_frame, f"frame number {frame} != reference {ref_frame}")
            if mask.shape == ref_mask.shape:
                differ = int(np.count_nonzero(mask != ref_mask))
                report.check(differ == 0, f"mask differs from the reference in {differ} voxels")
            else:
                report.fail(f"mask shape {mask.shape} != reference {ref_mask.shape}")
            got, want = geometry(image), geometry(ref_image)
            report.check(got == want, f"mask geometry {got} != reference {want}")
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--input", type=Path, required=True, help="case input folder (as mounted at /input)")
    parser.add_argument("--output", type=Path, required=True, help="output folder to check (as written to /output)")
    parser.add_argument("--reference", type=Path, help="output folder of a reference run; must be identical")
    parser.add_argument("--expect", choices=("any", "found", "none"), default="any",
                        help="found: a frame must be chosen; none: -1 and an empty mask")
    parser.add_argument("--label", default="", help="name used in messages")
    parser.add_argument("--truth", type=Path, help="reference annotation (0 background, 1 optimal, 2 suboptimal): "
                        "reports the label of the chosen frame (information only)")
    args = parser.parse_args(argv)
    report = check_outputs(input_image(args.input), args.output, args.reference, args.expect, args.label)
    frame, mask, spacing = report.frame, report.mask, report.spacing

    summary = f"frame={frame}"
    if mask is not None:
        summary += f", mask voxels={int(np.count_nonzero(mask))}, size={tuple(reversed(mask.shape))}"
    summary += f", spacing={tuple(round(s, 4) for s in spacing)}"
    if report.failures:
        print(f"[check] {report.label}: FAILED ({summary})", file=sys.stderr)
        for failure in report.failures:
            print(f"[check]   - {failure}", file=sys.stderr)
        return 1
    if args.truth is not None and args.truth.is_file() and frame is not None:
        truth = sitk.GetArrayFromImage(sitk.ReadImage(str(args.truth)))
        annotated = {int(v) for v in np.unique(truth.reshape(truth.shape[0], -1).max(axis=1)) if v}
        label = {0: "background", 1: "optimal", 2: "suboptimal"}
        chosen = label.get(int(truth[frame].max()), "?") if 0 <= frame < len(truth) else "no frame"
        summary += f", annotation on the chosen frame: {chosen} (case has {len(np.flatnonzero(truth.reshape(truth.shape[0], -1).any(axis=1)))} annotated frames{', labels ' + str(sorted(annotated)) if annotated else ''})"
    extra = " (identical to the reference run)" if args.reference is not None else ""
    print(f"[check] {report.label}: OK {summary}{extra}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
