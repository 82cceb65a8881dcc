"""`python -m algorithm`: one grand-challenge case from /input to /output.

Exit codes: 0 success, 1 unexpected internal error, 2 bad input, 3 bad weights, 4 output not writable or
in use by another run, 130 / 143 interrupted by SIGINT / SIGTERM. Every expected failure is one line on
stderr naming the problem; nothing is left half-written in the output.
"""
from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from . import __version__, signals
from .batch import run_dataset
from .contract import check_writable
from .errors import AlgorithmError, Interrupted
from .inputs import is_dataset
from .run import EXTRAS_DIR, load, output_lock, predict_case, read_case
from .weights_location import resolve_weights


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m algorithm", description=__doc__.splitlines()[0])
    parser.add_argument("--input", type=Path, default=Path("/input"),
                        help="case folder (default /input), image file, or dataset in the release layout")
    parser.add_argument("--output", type=Path, default=Path("/output"), help="output folder (default /output)")
    parser.add_argument("--weights", type=Path, default=None,
                        help="checkpoint (.safetensors) or a folder holding one; default: the one in "
                             "/opt/ml/model/ when that folder exists, else the bundled demo weights")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                        help="auto: the GPU when torch can use it (a WARNING says why not when one is visible)")
    parser.add_argument("--precision", default=None, choices=["auto", "fp32", "fp16", "bf16"],
                        help="auto: fp16 on GPUs without native bf16 (T4), bf16 on newer GPUs and bf16 CPUs")
    parser.add_argument("--batch-size", type=int, default=None,
                        help="frames per forward pass (default: from free GPU memory on CUDA, 32 on the CPU)")
    parser.add_argument("--coarse-stride", type=int, default=None,
                        help="encode every k-th frame first, then refine around the best (1 = every frame)")
    parser.add_argument("--no-extras", action="store_true",
                        help=f"write only the two output sockets, not {EXTRAS_DIR}/result.json and the PNG")
    parser.add_argument("--quiet", action="store_true", help="warnings and errors only")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    return parser.parse_args(argv)


def overrides_from(args: argparse.Namespace) -> dict:
    chosen = {"device": args.device, "precision": args.precision, "batch_size": args.batch_size,
              "coarse_stride": args.coarse_stride}
    return {key: value for key, value in chosen.items() if value is not None}


def run(args: argparse.Namespace) -> dict | list:
    started = time.perf_counter()
    check_writable(args.output)
    with output_lock(args.output):
        if is_dataset(args.input):  # the release layout: every case, one output folder each, cases.csv
            return run_dataset(args.input, args.output, args.weights, overrides_from(args), not args.no_extras)
        return _run_locked(args, started)


def _run_locked(args: argparse.Namespace, started: float) -> dict:
    weights_path = resolve_weights(args.weights)
    stack, read_seconds = read_case(args.input)
    predictor, checkpoint = load(weights_path, overrides_from(args))
    with Progress(TextColumn("[progress.description]{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), disable=args.quiet or not sys.stderr.isatty(), transient=True) as bar:
        task = bar.add_task("frames", total=len(stack.array))
        return predict_case(predictor, checkpoint, stack, args.output, extras=not args.no_extras,
                            progress=lambda done: bar.advance(task, done),
                            timings={"read": read_seconds}, started=started)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # Our INFO lines only: libraries keep WARNING (torch logs cache statistics at INFO when the process exits).
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S",
                        stream=sys.stderr)
    logging.getLogger("algorithm").setLevel(logging.WARNING if args.quiet else logging.INFO)
    restore = signals.install()  # SIGTERM unwinds like Ctrl-C, also as PID 1 of a container
    try:
        run(args)
    except AlgorithmError as error:
        print(f"error: {error}", file=sys.stderr)
        return error.exit_code
    except Interrupted as interrupted:
        print(f"error: interrupted by {interrupted}", file=sys.stderr)
        return interrupted.exit_code
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    finally:
        restore()
    return 0


if __name__ == "__main__":
    sys.exit(main())
