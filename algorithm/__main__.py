"""`python -m algorithm`: one grand-challenge case from /input to /output.

Exit codes: 0 success, 1 unexpected internal error, 2 bad input, 3 bad weights, 4 output not writable or
in use by another run, 5 device or precision unavailable, 130 / 143 interrupted by SIGINT / SIGTERM. Every
expected failure is one line on stderr naming the problem; nothing is left half-written in the output.
"""
from __future__ import annotations

import argparse
import logging
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeElapsedColumn

from . import __version__, signals
from .batch import run_dataset
from .contract import check_writable
from .errors import AlgorithmError, Interrupted
from .inputs import is_dataset
from .options import add_inference_options, add_output_options, add_weights_option, inference_overrides, program_name
from .progress import LoggedProgress, SearchProgress
from .run import load, output_lock, predict_case, read_case
from .weights_location import resolve_weights


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=program_name("python -m algorithm"), description=__doc__.splitlines()[0])
    parser.add_argument("--input", type=Path, default=Path("/input"),
                        help="case folder (default /input), image file, or dataset in the release layout")
    parser.add_argument("--output", type=Path, default=Path("/output"), help="output folder (default /output)")
    add_weights_option(parser)
    add_inference_options(parser)
    add_output_options(parser)
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


class BarProgress(SearchProgress):
    """A rich progress bar over the frames of each pass of the search (the CLI on a terminal)."""

    def __init__(self, bar: Progress):
        self.bar = bar
        self.task: TaskID | None = None

    def stage(self, name: str, frames: int) -> None:
        if self.task is None:
            self.task = self.bar.add_task(name, total=frames)
        else:
            self.bar.reset(self.task, total=frames, description=name)

    def advance(self, frames: int) -> None:
        if self.task is not None:
            self.bar.advance(self.task, frames)


@contextmanager
def progress_display(quiet: bool) -> Iterator[SearchProgress]:
    """A bar on a terminal, log lines elsewhere (a container's log), nothing with --quiet."""
    if quiet:
        yield SearchProgress()
    elif not sys.stderr.isatty():
        yield LoggedProgress()
    else:
        with Progress(TextColumn("[progress.description]{task.description}"), BarColumn(), MofNCompleteColumn(),
                      TimeElapsedColumn(), transient=True) as bar:
            yield BarProgress(bar)


def run(args: argparse.Namespace) -> dict | list:
    started = time.perf_counter()
    check_writable(args.output)
    with output_lock(args.output):
        if is_dataset(args.input):  # the release layout: every case, one output folder each, cases.csv
            return run_dataset(args.input, args.output, args.weights, inference_overrides(args), not args.no_extras)
        return _run_locked(args, started)


def _run_locked(args: argparse.Namespace, started: float) -> dict:
    weights_path = resolve_weights(args.weights)
    stack, read_seconds = read_case(args.input)
    network, checkpoint = load(weights_path, inference_overrides(args))
    with progress_display(args.quiet) as progress:
        return predict_case(network, checkpoint, stack, args.output, extras=not args.no_extras, progress=progress,
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
