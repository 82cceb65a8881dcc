"""`python -m training benchmark`: run a whole test set, score it, write a clinical agreement report.

    python -m training benchmark --cases DIR --out DIR [--ground-truth DIR]
        [--runner local|docker|grand-challenge] [--weights W] [--device auto|cpu|cuda] [--image TAG]
        [--algorithm SLUG] [--jobs N] [--limit N]

Exit status: 0 every case has outputs (and the report was written if asked for); 1 some cases failed or
were not run (see OUT/failures.json; the report still scores them as failed jobs); 2 bad arguments or
the runner could not start (weights, image, token, algorithm); 130 interrupted (run it again to resume).
"""
from __future__ import annotations

import argparse
import logging
import subprocess
import sys
from pathlib import Path

from algorithm.options import add_inference_options, add_weights_option
from training.cli import CommandParser, number

from . import DEFAULT_IMAGE, RUNNERS
from .cases import discover_cases
from .core import run_benchmark

log = logging.getLogger("training.benchmark")
REPO = Path(__file__).resolve().parents[2]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = CommandParser(prog="python -m training benchmark", description=__doc__.split("\n\n")[0],
                           epilog=__doc__.split("\n\n", 2)[2])
    parser.add_argument("--cases", type=Path, required=True,
                        help="release-layout folder (images/stacked_fetal_ultrasound/<uuid>.mha) or a folder of .mha")
    parser.add_argument("--out", type=Path, required=True, help="output folder (predictions/<uuid>/, report.md, ...)")
    parser.add_argument("--ground-truth", type=Path,
                        help="release-layout folder with masks/ and the circumferences CSV: score and write "
                             "report.md (default: no scoring)")
    parser.add_argument("--runner", choices=RUNNERS, default="local", help="where the algorithm runs")
    parser.add_argument("--limit", type=number(int, minimum=1),
                        help="only the first N cases, sorted by id (default: every case)")
    parser.add_argument("--jobs", type=number(int, minimum=1), default=None,
                        help="cases at once: containers (docker, default 1) or jobs in flight (grand-challenge, "
                             "default 4); the local runner runs one case at a time")
    parser.add_argument("--worst", type=number(int, minimum=0), default=5, help="worst cases to draw in the report")
    parser.add_argument("--report-only", action="store_true", help="do not run anything: score and report OUT")
    parser.add_argument("--max-consecutive-failures", type=number(int, minimum=0), default=10,
                        help="stop after this many failures in a row (0: never)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar (one log line per case)")
    parser.add_argument("--quiet", action="store_true", help="warnings and errors only")

    local = parser.add_argument_group("local and docker runners: the algorithm's options")
    add_weights_option(local, help="checkpoint (.safetensors) or a folder holding one (default: as `python -m "
                                   "algorithm` for the local runner, the weights in the image for docker)")
    add_inference_options(local)

    docker = parser.add_argument_group("docker runner")
    docker.add_argument("--image", default=DEFAULT_IMAGE, help=f"image tag (default {DEFAULT_IMAGE})")
    docker.add_argument("--memory", default="15g", help="container memory limit (default 15g)")
    docker.add_argument("--case-timeout", type=number(float, above=0), default=1200,
                        help="seconds per container (default 1200)")

    gc = parser.add_argument_group("grand-challenge runner (token: GRAND_CHALLENGE_AUTHORIZATION)")
    gc.add_argument("--algorithm",
                    help="algorithm slug, as in https://grand-challenge.org/algorithms/<slug>/ (default: none; the "
                         "grand-challenge runner needs one)")
    gc.add_argument("--base-url", default="https://grand-challenge.org/api/v1/", help="the site's API")
    gc.add_argument("--ca-bundle",
                    help="CA certificate file to verify the site with, for a test server or a proxy (default: the "
                         "system's)")
    gc.add_argument("--poll-interval", type=number(float, above=0), default=15.0,
                    help="seconds between job status checks")
    gc.add_argument("--job-timeout", type=number(float, above=0), default=3 * 3600,
                    help="give up waiting for a job after this many seconds")
    gc.add_argument("--retries", type=number(int, minimum=0), default=5,
                    help="retries per step on timeouts, dropped connections, 5xx and 429 (default 5)")
    gc.add_argument("--retry-delay", type=number(float, minimum=0), default=2.0,
                    help="seconds before the first retry, doubled each time up to 120 (default 2)")
    return parser.parse_args(argv)


def git_commit() -> str:
    """Short commit of the code that ran, '+dirty' with uncommitted changes to tracked files; '' outside git."""
    try:
        commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""
    return commit + ("+dirty" if commit and dirty else "")


def make_runner(args: argparse.Namespace):
    if args.runner == "local":
        from .local import LocalRunner

        return LocalRunner(args.weights, args.device, args.batch_size, args.coarse_stride, precision=args.precision)
    if args.runner == "docker":
        from .docker import DockerRunner

        extra: list[str] = []
        for flag, value in (("--precision", args.precision), ("--batch-size", args.batch_size),
                            ("--coarse-stride", args.coarse_stride)):
            if value is not None:
                extra += [flag, str(value)]
        return DockerRunner(args.out, args.image, args.weights, args.device, jobs=args.jobs or 1,
                            memory=args.memory, case_timeout=args.case_timeout, algorithm_args=extra)
    from .grand_challenge import GrandChallengeRunner, RetryPolicy

    return GrandChallengeRunner(args.out, args.algorithm, jobs=args.jobs or 4, base_url=args.base_url,
                                verify=args.ca_bundle or True, poll_interval=args.poll_interval,
                                job_timeout=args.job_timeout,
                                retry=RetryPolicy(attempts=args.retries + 1, base_delay=args.retry_delay))


def setup_logging(quiet: bool, console) -> None:
    level = logging.WARNING if quiet else logging.INFO
    if console is not None:
        from rich.logging import RichHandler

        handler: logging.Handler = RichHandler(console=console, show_path=False, log_time_format="%H:%M:%S")
        handler.setFormatter(logging.Formatter("%(message)s"))
    else:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S"))
    root = logging.getLogger()
    if root.handlers:  # logging is configured already (an embedding program, pytest): leave it alone
        return
    root.addHandler(handler)
    root.setLevel(level)
    logging.getLogger("httpx").setLevel(logging.WARNING)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    console = None
    if not args.no_progress and sys.stderr.isatty():
        from rich.console import Console

        console = Console(stderr=True)
    setup_logging(args.quiet, console)
    try:
        cases = discover_cases(args.cases, args.limit)
    except (OSError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2

    status = 0
    if not args.report_only:
        try:
            runner = make_runner(args)
        except ValueError as error:
            print(f"error: {error}", file=sys.stderr)
            return 2
        undo = runner.install_log_redaction() if hasattr(runner, "install_log_redaction") else (lambda: None)
        settings = {"cases_dir": str(args.cases), "limit": args.limit, "git_commit": git_commit()}
        log.info("%d case(s) from %s -> %s (runner %s)", len(cases), args.cases, args.out, runner.name)
        try:
            result = run_benchmark(cases, args.out, runner, progress=console is not None, console=console,
                                   max_consecutive_failures=args.max_consecutive_failures, settings=settings)
        except Exception as error:  # noqa: BLE001 - the runner could not start: one line, not a traceback
            redact = getattr(runner, "redact", lambda text: text)
            print(f"error: {redact(str(error)) or type(error).__name__}", file=sys.stderr)
            undo()
            return 2
        undo()
        log.info("%d done, %d already complete, %d failed, %d not run, %.0f s", len(result.done),
                 len(result.skipped), len(result.failed), len(result.not_run), result.wall_s)
        if result.interrupted:
            print(f"interrupted: run the same command again to resume ({len(result.not_run)} case(s) left)",
                  file=sys.stderr)
            return 130
        status = 0 if result.complete else 1

    if args.ground_truth:
        from .report import write_report

        try:
            written = write_report(args.out, args.ground_truth, [c.uuid for c in cases],
                                   images={c.uuid: c.image for c in cases}, worst=args.worst)
        except (OSError, ValueError, RuntimeError) as error:
            print(f"error: scoring failed: {error}", file=sys.stderr)
            return 2
        agg = written["scores"]["aggregate"]
        ba = written["agreement"]
        mean = f"{agg['score']:.4f}" if agg["score"] is not None else "-"
        bias = f"{ba['bias']:+.1f} mm" if ba["bias"] is not None else "-"
        print(f"mean score {mean} over {agg['n_cases']} case(s); AC bias {bias} (n={ba['n']}); "
              f"report: {written['report']}")
    return status


if __name__ == "__main__":
    sys.exit(main())
