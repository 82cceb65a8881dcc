"""`python -m algorithm`: one grand-challenge case from /input to /output.

Exit codes: 0 success, 1 unexpected internal error, 2 bad input, 3 bad weights, 4 output not writable.
Every expected failure is one line on stderr naming the problem; nothing is left half-written in the output.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Callable

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from . import __version__
from .contract import Stack, check_writable, find_input_image, read_stack, write_outputs
from .errors import AlgorithmError, WeightsError
from .report import case_picture, write_png
from .weights import resolve_weights

log = logging.getLogger("algorithm")
EXTRAS_DIR = Path("fetalclipseg")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m algorithm", description=__doc__.splitlines()[0])
    parser.add_argument("--input", type=Path, default=Path("/input"), help="case folder (default /input)")
    parser.add_argument("--output", type=Path, default=Path("/output"), help="output folder (default /output)")
    parser.add_argument("--weights", type=Path, default=None,
                        help="checkpoint (.safetensors); default: /opt/ml/model/, then the bundled weights")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--batch-size", type=int, default=None, help="frames per forward pass")
    parser.add_argument("--coarse-stride", type=int, default=None,
                        help="encode every k-th frame first, then refine around the best (1 = every frame)")
    parser.add_argument("--no-extras", action="store_true",
                        help=f"write only the two output sockets, not {EXTRAS_DIR}/result.json and the PNG")
    parser.add_argument("--quiet", action="store_true", help="warnings and errors only")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    return parser.parse_args(argv)


def overrides_from(args: argparse.Namespace) -> dict:
    chosen = {"device": args.device, "batch_size": args.batch_size, "coarse_stride": args.coarse_stride}
    return {key: value for key, value in chosen.items() if value is not None}


def load(weights_path: Path, overrides: dict):
    """Load the predictor, turning every checkpoint failure into a WeightsError that names the file."""
    from .inference import load_predictor
    from .model.checkpoint import CheckpointError

    try:
        return load_predictor(weights_path, overrides)
    except CheckpointError as error:
        raise WeightsError(str(error)) from None
    except RuntimeError as error:  # e.g. --device cuda without a GPU
        raise AlgorithmError(str(error)) from None


def peak_memory_gib() -> float:
    """This process's peak resident memory since it started the interpreter, in GiB.

    Linux's VmHWM belongs to the address space that exec created, so it does not include the parent's
    memory the way `ru_maxrss` does for a child forked from a large process (a test runner, a notebook);
    `ru_maxrss` is the fallback elsewhere."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 2**20  # kB
    except OSError:
        pass
    import resource

    scale = 2**30 if sys.platform == "darwin" else 2**20  # bytes on macOS, kB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / scale


def process_case(predictor, checkpoint: dict, stack: Stack, output: Path, extras: bool = True,
                 progress: Callable[[int], None] | None = None):
    """Predict one read stack and write its outputs (and, with `extras`, result.json and the picture).

    The CLI and the test-set benchmark's local runner both call this, so their outputs are the same bytes.
    Returns the `CaseResult` and the summary dict (its `timings_s` gains `write`).
    """
    result = predictor.predict(stack.array, progress=progress)
    summary = {"input": str(stack.path), **result.summary(), "checkpoint": checkpoint,
               "device": str(predictor.device)}
    files = {}
    if extras:
        caption = f"frame {result.frame}" + (f"  AC {result.ac_mm:.1f} mm" if result.ac_mm else "")
        picture = case_picture(stack.array, result.frame, result.mask, result.ellipse,
                               result.scores.probabilities, result.scores.mask_fractions,
                               predictor.config.inference.sweeps, caption)
        files[EXTRAS_DIR / "chosen_frame.png"] = lambda path: write_png(path, picture)
        files[EXTRAS_DIR / "result.json"] = lambda path: path.write_text(json.dumps(summary, indent=2) + "\n")
    write_start = time.perf_counter()
    write_outputs(output, stack, result.frame, result.mask, files)
    summary["timings_s"]["write"] = round(time.perf_counter() - write_start, 3)
    return result, summary


def run(args: argparse.Namespace) -> dict:
    started = time.perf_counter()
    check_writable(args.output)
    weights_path = resolve_weights(args.weights)
    image_path = find_input_image(args.input)
    read_start = time.perf_counter()
    stack = read_stack(image_path)
    read_seconds = time.perf_counter() - read_start
    log.info("input %s: %d frames of %d x %d%s", image_path, *stack.shape,
             f" ({stack.note})" if stack.note else "")
    predictor, checkpoint = load(weights_path, overrides_from(args))
    log.info("weights %s on %s: %s", weights_path, predictor.device, checkpoint["provenance"])
    if "not for clinical use" in checkpoint["provenance"].lower():
        log.warning("these are replica-trained demo weights, not for clinical use")

    with Progress(TextColumn("[progress.description]{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), disable=args.quiet or not sys.stderr.isatty(), transient=True) as bar:
        task = bar.add_task("frames", total=len(stack.array))
        result, summary = process_case(predictor, checkpoint, stack, args.output, extras=not args.no_extras,
                                       progress=lambda done: bar.advance(task, done))
    summary["timings_s"]["read"] = round(read_seconds, 3)
    summary["timings_s"]["total"] = round(time.perf_counter() - started, 3)
    for candidate in result.selection.candidates:
        log.info("sweep %d: best frame %d (tier %d, score %.3f, mask %.1f %%)", candidate.sweep + 1,
                 candidate.frame, candidate.tier, candidate.score, 100 * candidate.mask_fraction)
    ac = f"{result.ac_mm:.1f} mm" if result.ac_mm else "n/a"
    log.info("chosen frame %d (%s), AC %s, %d/%d frames encoded, %.1f s, peak memory %.2f GiB", result.frame,
             summary["plane"], ac, result.frames_encoded, len(stack.array), summary["timings_s"]["total"],
             peak_memory_gib())
    if not args.no_extras:
        log.info("picture: %s", args.output / EXTRAS_DIR / "chosen_frame.png")
    return summary


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO,
                        format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S", stream=sys.stderr)
    try:
        run(args)
    except AlgorithmError as error:
        print(f"error: {error}", file=sys.stderr)
        return error.exit_code
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
